"""What the train stage writes after optimising: scores, renders, videos, PLY files, trajectories.

Files under the stage folder:

- ``model.pt``: the trained model (:func:`mono4d.models.gaussians.save_model` layout).
- ``metrics.json``: ``{"eval": {"mean": {...}, "frames": {"4": {...}}}, "train": {...}}`` with
  per-frame ``psnr``, ``ssim`` (dB / [0, 1], at training resolution, evaluation background),
  ``psnr_dynamic`` (pixels with mask > 0: the foreground; absent without such pixels), for
  multi-view input the means per dataset camera id (``"cameras": {"0": {...}}``), and ``depth_order``
  (fraction of random pixel pairs whose rendered depth order matches the aligned depth's).
- ``curves.json`` / ``curves.png``: loss terms and training-step PSNR every ``log_fraction`` of
  the iterations, held-out PSNR/SSIM every ``eval_fraction``, Gaussian counts.
- ``renders/heldout`` and ``renders/train``: ``rgb/{i:06d}.png``, ``depth/{i:06d}.npy`` (float32
  expected z-depth, world units), ``depth_vis/{i:06d}.png``, ``gt/{i:06d}.png`` (the frame at
  training resolution, what ``rgb`` is scored against); ``renders/heldout/compare`` puts
  frame | render | rendered depth side by side.
- ``novel_view.mp4``: the input trajectory swaying sideways by ``novel_offset`` x scene scale, time
  following the frames; ``time_sweep.mp4``: the middle training camera fixed, time 0 -> 1.
- per scene layer (static, objects, hands): ``renders/*/layers/<layer>/``, ``layers.json`` and,
  with hands, ``novel_view_without_hands.mp4`` (:mod:`mono4d.stages.train_layers`).
- ``ply/{i:06d}.ply``: the Gaussians at frame i's time (:mod:`mono4d.data.ply`), every ``ply_every`` frames
  (multi-view input: at timestep i's time, every ``ply_every`` timesteps).
- ``trajectories.npz``: dense 6-DOF tracks of the dynamic Gaussians: ``xyz (D, T, 3)`` float32
  world positions and ``quats (D, T, 4)`` float32 unit wxyz rotations at every frame's time
  (multi-view input: every timestep's, T timesteps), ``rgb (D, 3)`` uint8, ``opacity (D,)``,
  ``index (D,)`` rows of the model's Gaussians, ``times (T,)``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mono4d.data.images import write_rgb
from mono4d.data.video import write_video
from mono4d.data.visualize import colorize_depth

logger = logging.getLogger(__name__)

def score_frames(model, data, frames: list[int], params, render_dir: Path | None = None,
                 compare: bool = False) -> dict:
    """Render ``frames`` and score them against the frames (:func:`mono4d.models.trainer.frame_scores`);
    with ``render_dir``, write the renders there (see the module docstring). Returns
    ``{"frames": {i: scores}, "mean": scores}`` and, for multi-view input, ``"cameras": {camera
    id: mean scores of its frames}``."""
    from mono4d.models.trainer import frame_scores, mean_scores, render_view

    per_frame: dict[int, dict] = {}
    if render_dir is not None:
        for sub in ("rgb", "depth", "depth_vis", "gt") + (("compare",) if compare else ()):
            (render_dir / sub).mkdir(parents=True, exist_ok=True)
    for frame in frames:
        view = render_view(model, data, float(data.times[frame]), data.K[frame], data.w2c[frame], params)
        per_frame[frame] = frame_scores(view, data, frame)
        if render_dir is not None:
            name = f"{frame:06d}"
            write_rgb(render_dir / "rgb" / f"{name}.png", view["rgb"])
            np.save(render_dir / "depth" / f"{name}.npy", view["depth"])
            depth_picture = colorize_depth(view["depth"], view["alpha"] > 0.5)
            write_rgb(render_dir / "depth_vis" / f"{name}.png", depth_picture)
            frame_image = data.images[frame].cpu().numpy()
            write_rgb(render_dir / "gt" / f"{name}.png", frame_image)
            if compare:
                write_rgb(render_dir / "compare" / f"{name}.png",
                          np.concatenate([frame_image, view["rgb"], depth_picture], axis=1))
    scores = {"frames": per_frame, "mean": mean_scores(per_frame)}
    if data.cameras is not None:
        scores["cameras"] = {int(camera): mean_scores({f: s for f, s in per_frame.items() if data.cameras[f] == camera})
                             for camera in sorted({int(data.cameras[frame]) for frame in frames})}
    return scores


def plot_curves(curves: dict, width: int = 720, height: int = 360) -> np.ndarray:
    """``(H, W, 3)`` uint8 picture: loss (log scale, left panel) and PSNR (right panel: training
    step in grey, evaluation in orange) against the step."""
    canvas = np.full((height, width, 3), 255, np.uint8)
    panel = width // 2
    margin = 36

    def draw(x0: int, steps: list, values: list, color: tuple, low: float, high: float, last_step: float) -> None:
        if len(values) < 1 or high <= low:
            return
        xs = [x0 + margin + (s / max(last_step, 1)) * (panel - 2 * margin) for s in steps]
        ys = [height - margin - (v - low) / (high - low) * (height - 2 * margin) for v in values]
        points = np.array([[int(x), int(y)] for x, y in zip(xs, ys)], np.int32)
        cv2.polylines(canvas, [points], False, color, 1, cv2.LINE_AA)
        if len(points) == 1:
            cv2.circle(canvas, tuple(points[0]), 3, color, -1)

    last = max(curves["step"][-1] if curves["step"] else 1, curves["eval_step"][-1] if curves["eval_step"] else 1)
    losses = np.log10(np.maximum(np.array(curves["loss"], np.float64), 1e-8))
    if losses.size:
        draw(0, curves["step"], list(losses), (40, 90, 200), float(losses.min()), float(losses.max()) + 1e-9, last)
        cv2.putText(canvas, f"loss (log10 {losses.min():.2f}..{losses.max():.2f})", (margin, 20),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (40, 90, 200), 1)
    psnr_values = list(curves["psnr_train_step"]) + list(curves["psnr_eval"])
    if psnr_values:
        low, high = float(min(psnr_values)) - 0.5, float(max(psnr_values)) + 0.5
        draw(panel, curves["step"], curves["psnr_train_step"], (150, 150, 150), low, high, last)
        draw(panel, curves["eval_step"], curves["psnr_eval"], (255, 120, 0), low, high, last)
        cv2.putText(canvas, f"PSNR dB {low:.1f}..{high:.1f} (grey train step, orange held-out)",
                    (panel + 4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.line(canvas, (panel, 0), (panel, height), (200, 200, 200), 1)
    cv2.putText(canvas, f"step 0..{last}", (margin, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    return canvas


def write_metrics_and_curves(out_dir: Path, model, eval_scores: dict, train_scores: dict | None, curves: dict) -> None:
    """Write ``model.pt``, ``metrics.json``, ``curves.json`` and ``curves.png``."""
    from mono4d.models.gaussians import save_model

    save_model(out_dir / "model.pt", model)
    metrics = {}
    for split, scores in (("eval", eval_scores), ("train", train_scores)):
        if scores is not None:
            metrics[split] = {"mean": scores["mean"], "frames": {str(k): v for k, v in scores["frames"].items()}}
            if "cameras" in scores:
                metrics[split]["cameras"] = {str(k): v for k, v in scores["cameras"].items()}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out_dir / "curves.json").write_text(json.dumps(curves))
    write_rgb(out_dir / "curves.png", plot_curves(curves))


def novel_path(w2c: np.ndarray, offset: float) -> np.ndarray:
    """``(F, 4, 4)`` world-to-camera poses: each input pose moved along its own right (x) axis by
    ``offset * sin(2 pi k / F)`` and along its up axis by ``0.3 * offset * sin(4 pi k / F)``
    (world units), orientation kept."""
    from mono4d.data.geometry import invert_rigid

    count = len(w2c)
    c2w = invert_rigid(w2c)
    phase = 2.0 * np.pi * np.arange(count) / max(count, 1)
    shift = (offset * np.sin(phase))[:, None] * c2w[:, :3, 0] - (0.3 * offset * np.sin(2 * phase))[:, None] * c2w[:, :3, 1]
    c2w[:, :3, 3] += shift
    return invert_rigid(c2w)


def novel_view_frames(model, data, params, posed_frames: list[int]) -> list[np.ndarray]:
    """``(H, W, 3)`` uint8 pictures of ``model`` along the novel camera path (:func:`novel_path`
    of the ``posed_frames``' cameras), time following the frames."""
    import torch

    from mono4d.models.trainer import render_view

    w2c = data.w2c[posed_frames].cpu().numpy().astype(np.float64)
    path = novel_path(w2c, params.novel_offset * data.scene_scale)
    device = data.K.device
    frames = []
    for k, frame in enumerate(tqdm(posed_frames, desc="novel view video", unit="frame", leave=False)):
        view = render_view(model, data, float(data.times[frame]), data.K[frame],
                           torch.as_tensor(path[k], dtype=torch.float32, device=device), params)
        frames.append(view["rgb"])
    return frames


def write_videos(out_dir: Path, model, data, params, posed_frames: list[int]) -> None:
    """``novel_view.mp4`` and ``time_sweep.mp4`` (see the module docstring)."""
    from mono4d.models.trainer import render_view

    write_video(out_dir / "novel_view.mp4", novel_view_frames(model, data, params, posed_frames), fps=data.fps)
    middle = data.train_frames[len(data.train_frames) // 2]
    sweep = []
    for time in tqdm(np.linspace(0.0, 1.0, max(len(posed_frames), 24)), desc="time sweep video", unit="frame",
                     leave=False):
        sweep.append(render_view(model, data, float(time), data.K[middle], data.w2c[middle], params)["rgb"])
    write_video(out_dir / "time_sweep.mp4", sweep, fps=data.fps)


def export_plys(out_dir: Path, model, times: np.ndarray, every: int) -> int:
    """Write ``ply/{i:06d}.ply`` for every ``every``-th frame; returns how many were written."""
    import torch

    from mono4d.data.ply import write_ply
    from mono4d.models.gaussians import gaussians_at

    folder = out_dir / "ply"
    folder.mkdir(parents=True, exist_ok=True)
    frames = list(range(0, len(times), every))
    with torch.no_grad():
        sh_rest = model.params["shN"].cpu().numpy()
        sh0 = model.params["sh0"].cpu().numpy()
        opacity = model.params["opacities"].cpu().numpy()
        for frame in tqdm(frames, desc="PLY export", unit="frame", leave=False):
            state = gaussians_at(model.params, model.variables, model.field, float(times[frame]))
            write_ply(folder / f"{frame:06d}.ply", state["means"].cpu().numpy(), state["quats"].cpu().numpy(),
                      torch.log(state["scales"]).cpu().numpy(), opacity, sh0, sh_rest)
    return len(frames)


def export_trajectories(path: Path, model, times: np.ndarray) -> int:
    """Write ``trajectories.npz`` (see the module docstring) at ``times (T,)``; returns the number
    of tracks."""
    import torch

    from mono4d.models.gaussians import gaussians_at, sh0_to_rgb

    dynamic = torch.nonzero(model.variables["is_dynamic"], as_tuple=True)[0]
    xyz, quats = np.zeros((len(dynamic), len(times), 3)), np.zeros((len(dynamic), len(times), 4))
    with torch.no_grad():
        if len(dynamic):
            for k, t in enumerate(times):
                state = gaussians_at(model.params, model.variables, model.field, float(t))
                xyz[:, k] = state["means"][dynamic].cpu().numpy()
                quats[:, k] = state["quats"][dynamic].cpu().numpy()
        rgb = (sh0_to_rgb(model.params["sh0"][dynamic, 0]).clamp(0, 1) * 255 + 0.5).byte().cpu().numpy()
        opacity = torch.sigmoid(model.params["opacities"][dynamic]).cpu().numpy()
    np.savez_compressed(path, xyz=xyz.astype(np.float32), quats=quats.astype(np.float32), rgb=rgb,
                        opacity=opacity.astype(np.float32), index=dynamic.cpu().numpy().astype(np.int64),
                        times=np.asarray(times, np.float32))
    return len(dynamic)


def write_all(out_dir: Path, model, data, params, curves: dict) -> dict:
    """Everything the train stage writes (see the module docstring); returns its key figures."""
    from mono4d.stages import train_layers

    eval_frames = data.eval_frames or data.train_frames
    eval_scores = score_frames(model, data, eval_frames, params, out_dir / "renders" / "heldout", compare=True)
    train_scores = score_frames(model, data, data.train_frames, params, out_dir / "renders" / "train")
    if data.eval_frames and (not curves["eval_step"] or curves["eval_step"][-1] != curves["step"][-1]):
        curves["eval_step"].append(curves["step"][-1] if curves["step"] else 0)
        curves["psnr_eval"].append(eval_scores["mean"]["psnr"])
        curves["ssim_eval"].append(eval_scores["mean"]["ssim"])
    write_metrics_and_curves(out_dir, model, eval_scores, train_scores, curves)
    posed = sorted(set(data.train_frames) | set(data.eval_frames))
    layer_figures = train_layers.write_layer_renders(out_dir, model, data, params)
    if params.make_videos:
        write_videos(out_dir, model, data, params, posed)
        train_layers.write_video_without_hands(out_dir, model, data, params, posed)
    times = data.sequence_times()
    num_ply = export_plys(out_dir, model, times, params.ply_every) if params.export_ply else 0
    num_tracks = export_trajectories(out_dir / "trajectories.npz", model, times)
    figures = {"psnr_heldout": eval_scores["mean"]["psnr"], "ssim_heldout": eval_scores["mean"]["ssim"],
               "psnr_train": train_scores["mean"]["psnr"], "ssim_train": train_scores["mean"]["ssim"],
               "num_gaussians": model.num_gaussians, "num_dynamic": model.num_dynamic,
               "num_ply": num_ply, "num_trajectories": num_tracks}
    for key in ("psnr_dynamic", "depth_order"):
        if key in eval_scores["mean"]:
            figures[f"{key}_heldout"] = eval_scores["mean"][key]
    if "cameras" in eval_scores and data.eval_frames:
        figures["heldout_cameras"] = {str(camera): {key: scores[key] for key in ("psnr", "ssim", "psnr_dynamic")
                                                    if key in scores}
                                      for camera, scores in eval_scores["cameras"].items()}
    figures.update(layer_figures)
    return figures
