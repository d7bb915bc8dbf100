"""What the train stage (and ``mono4d edit``) writes per scene layer (:mod:`mono4d.models.layers`:
``static``, ``object_<k>``, ``hand``), each layer rendered alone.

Files under the stage folder:

- ``renders/heldout/layers/<layer>/`` and ``renders/train/layers/<layer>/``: ``rgb/{i:06d}.png``
  (the layer's Gaussians alone over the evaluation background, at training resolution) and
  ``alpha/{i:06d}.png`` (their accumulated opacity, 8-bit grey, 255 = opaque).
- ``layers.json``: ``{"layers": {name: {"labels": [ids], "names": [label names],
  "num_gaussians": n, "mask_iou_heldout": IoU}}}``. The IoU (dynamic layers only) is between the
  layer's pixels with alpha > :data:`ALPHA_COVERED` and the masks' pixels of its labels, averaged
  over the held-out frames where either is non-empty. A static layer rendered alone also covers
  the background behind the moving things, so it has no IoU.
- ``novel_view_without_hands.mp4`` when the model has a hand layer: the novel-view camera path
  of ``novel_view.mp4`` rendered without the hands.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mono4d.data.images import write_gray, write_rgb
from mono4d.data.video import write_video

LAYERS_FILE = "layers.json"
#: A pixel is covered by a layer where the layer's accumulated opacity exceeds this.
ALPHA_COVERED = 0.5


def mask_iou(covered: np.ndarray, truth: np.ndarray) -> float | None:
    """Intersection over union of two ``(H, W)`` bool maps; None when both are empty."""
    union = np.logical_or(covered, truth).sum()
    return None if union == 0 else float(np.logical_and(covered, truth).sum() / union)


def write_layer_renders(out_dir: Path, model, data, params) -> dict:
    """Render every layer of ``model`` alone on the held-out (or, without any, training) and
    training frames of ``data`` (a :class:`mono4d.models.trainer.TrainingData`) into ``renders/*/layers/``
    and write ``layers.json`` (see the module docstring). Returns key figures: ``num_layers``
    and ``mask_iou_<layer>`` per dynamic layer."""
    from mono4d.models import layers
    from mono4d.models.trainer import render_view

    table = layers.model_layers(model)
    names = layers.label_names(model)
    splits = (("heldout", data.eval_frames or data.train_frames), ("train", data.train_frames))
    summary: dict[str, dict] = {}
    for layer, labels in table.items():
        part = layers.subset(model, layers.labels_mask(model, labels))
        ious = []
        for split, frames in splits:
            folder = Path(out_dir) / "renders" / split / "layers" / layer
            (folder / "rgb").mkdir(parents=True, exist_ok=True)
            (folder / "alpha").mkdir(parents=True, exist_ok=True)
            for frame in tqdm(frames, desc=f"layer {layer} ({split})", unit="frame", leave=False):
                view = render_view(part, data, float(data.times[frame]), data.K[frame], data.w2c[frame], params)
                write_rgb(folder / "rgb" / f"{frame:06d}.png", view["rgb"])
                write_gray(folder / "alpha" / f"{frame:06d}.png",
                           np.clip(view["alpha"] * 255.0 + 0.5, 0, 255).astype(np.uint8))
                # a multi-view dataset's cameras without masks (held-out ones) are all 0: not scored
                scored = data.masks is not None and (data.timesteps is None or bool(data.masks[frame].any()))
                if split == "heldout" and layer != layers.STATIC and scored:
                    truth = np.isin(data.masks[frame].cpu().numpy(), labels)
                    iou = mask_iou(view["alpha"] > ALPHA_COVERED, truth)
                    if iou is not None:
                        ious.append(iou)
        summary[layer] = {"labels": labels, "names": [names[label] for label in labels],
                          "num_gaussians": part.num_gaussians}
        if ious:
            summary[layer]["mask_iou_heldout"] = round(float(np.mean(ious)), 4)
    (Path(out_dir) / LAYERS_FILE).write_text(json.dumps({"layers": summary}, indent=1))
    figures = {"num_layers": len(summary)}
    figures.update({f"mask_iou_{layer}": entry["mask_iou_heldout"] for layer, entry in summary.items()
                    if "mask_iou_heldout" in entry})
    return figures


def write_video_without_hands(out_dir: Path, model, data, params, posed_frames: list[int]) -> bool:
    """``novel_view_without_hands.mp4`` (see the module docstring) when the model has a hand
    layer; returns whether it was written."""
    from mono4d.models import layers
    from mono4d.stages.train_outputs import novel_view_frames

    table = layers.model_layers(model)
    if layers.HAND not in table or len(table) == 1:
        return False
    rest = layers.subset(model, ~layers.labels_mask(model, table[layers.HAND]))
    write_video(Path(out_dir) / "novel_view_without_hands.mp4", novel_view_frames(rest, data, params, posed_frames),
                fps=data.fps)
    return True


def read_layers(stage_dir: Path) -> dict:
    """The ``layers`` table of a train output's ``layers.json`` ({} when it has none)."""
    path = Path(stage_dir) / LAYERS_FILE
    return json.loads(path.read_text()).get("layers", {}) if path.is_file() else {}
