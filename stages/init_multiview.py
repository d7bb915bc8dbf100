"""Init stage, ``mode=multiview``: the initial Gaussians of a synchronized multi-view dataset (a
Panoptic folder as the input) from the first timestep's training views, their foreground masks
and known cameras, without flow or depth.

Candidates (``hull_candidates`` of each kind) lie in the box spanned by the centres of every
camera of the dataset (the held-out ones too: their poses are known, their images are not used;
a single training camera spans no box), grown by :data:`BOX_MARGIN` of its largest side on every side (the cameras of a capture
dome look inwards, so the scene lies inside it and its walls and floor just beyond; the margin
follows the largest side because cameras often share a height):

- foreground (dynamic, label 1): candidates on the rays of random foreground pixels of the views
  (:func:`foreground_candidates`), cut to a loose visual hull of the masks
  (:func:`mono4d.stages.init_silhouette.hull_points` with the masks as silhouettes: a point on
  the foreground of at least ``hull_min_foreground`` of the views), at most ``max_dynamic``
  points coloured by those views;
- background (static, label 0): random points of the box that the views see photo-consistently, off the
  foreground: seen inside at least :data:`MIN_BACKGROUND_VIEWS` views (all of them when there are fewer), their colours there with
  a standard deviation below ``background_max_std`` (colours in [0, 1]), at most ``max_static`` of them,
  the most consistent first, coloured by the mean. There is no occlusion reasoning: the
  optimisation prunes and moves what is wrong.

Scales come from the nearest neighbours, rotations are the identity, opacities
``init_opacity``; the deformation field is the identity (online training moves the Gaussians
timestep by timestep instead). The scene scale is the median distance of the cameras (all of
them, as for the box) from their mean centre. Frames, times and held-out frames are the frames stage's (the test
cameras are held out). Outputs as the other modes: ``init.pt``, ``init.json``, ``init_view.png``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mono4d.data.errors import InputError, require_inputs

if TYPE_CHECKING:
    from mono4d.stages.init import Params

logger = logging.getLogger(__name__)

#: The candidates' box is the cameras' bounding box grown by this fraction of its largest side.
BOX_MARGIN = 0.25
#: A background point must project inside at least this many views (off their foreground).
MIN_BACKGROUND_VIEWS = 3
#: Label and name of the foreground Gaussians.
FOREGROUND_LABEL = 1
FOREGROUND_NAME = "foreground"


def camera_box(w2c: np.ndarray, margin: float = BOX_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """``(low (3,), high (3,))`` world corners of the bounding box of the centres of the cameras
    ``w2c (V, 4, 4)``, grown by ``margin`` of its largest side on every side."""
    from mono4d.data.geometry import camera_centers

    centres = camera_centers(w2c)
    low, high = centres.min(axis=0), centres.max(axis=0)
    grow = margin * float((high - low).max())
    return low - grow, high + grow


def foreground_candidates(foreground: np.ndarray, K: np.ndarray, w2c: np.ndarray, box: tuple[np.ndarray, np.ndarray],
                          count: int, rng: np.random.Generator) -> np.ndarray:
    """``(M, 3)`` world points, ``M <= count``: random foreground pixels (``foreground (V, H, W)``
    bool) of random views (OpenCV ``K (V, 3, 3)``, ``w2c (V, 4, 4)``) lifted to a random depth
    between the camera and the far corner of ``box``, kept inside ``box``. The foreground is a
    small part of the box, so these candidates meet the hull far more often than uniform ones."""
    from mono4d.data.geometry import invert_rigid

    views, rows, cols = np.nonzero(foreground)
    pick = rng.integers(0, len(views), count)
    view, pixels = views[pick], np.stack([cols[pick] + 0.5, rows[pick] + 0.5, np.ones(count)], axis=1)
    c2w = invert_rigid(w2c)
    rays = np.einsum("nij,nj->ni", np.linalg.inv(K)[view], pixels)
    corners = np.stack(np.meshgrid(*zip(*box), indexing="ij"), axis=-1).reshape(-1, 3)
    far = np.linalg.norm(corners[None] - c2w[:, None, :3, 3], axis=2).max(axis=1)
    depth = rng.uniform(0.0, 1.0, count) * far[view]
    points = np.einsum("nij,nj->ni", c2w[view, :3, :3], rays * depth[:, None]) + c2w[view, :3, 3]
    return points[np.all((points >= box[0]) & (points <= box[1]), axis=1)]


def consistent_points(rgb: np.ndarray, foreground: np.ndarray, K: np.ndarray, w2c: np.ndarray,
                      box: tuple[np.ndarray, np.ndarray], params: Params,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """World points ``(N, 3)`` float64 and mean colours ``(N, 3)`` in [0, 1] of the photo-consistent
    background (see the module docstring) of the views ``rgb (V, H, W, 3)`` uint8 with their
    foreground ``(V, H, W)`` bool and OpenCV cameras ``K (V, 3, 3)``, ``w2c (V, 4, 4)``;
    ``N <= params.max_static``."""
    from mono4d.data.geometry import project_points

    points = rng.uniform(box[0], box[1], (params.hull_candidates, 3))
    height, width = rgb.shape[1:3]
    count = np.zeros(len(points))
    total = np.zeros((len(points), 3))
    squares = np.zeros((len(points), 3))
    for view in range(len(rgb)):
        uv, depth = project_points(K[view], w2c[view], points)
        cols, rows = np.floor(uv[:, 0]), np.floor(uv[:, 1])
        seen = np.flatnonzero((depth > 0) & (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height))
        r, c = rows[seen].astype(np.int64), cols[seen].astype(np.int64)
        off = ~foreground[view, r, c]
        seen, colour = seen[off], rgb[view, r[off], c[off]] / 255.0
        count[seen] += 1
        total[seen] += colour
        squares[seen] += colour ** 2
    enough = np.flatnonzero(count >= min(MIN_BACKGROUND_VIEWS, len(rgb)))
    mean = total[enough] / count[enough, None]
    spread = np.sqrt(np.maximum(squares[enough] / count[enough, None] - mean ** 2, 0.0)).mean(axis=1)
    keep = np.flatnonzero(spread < params.background_max_std)
    keep = keep[np.argsort(spread[keep], kind="stable")[:params.max_static]]
    return points[enough[keep]], mean[keep]


def multiview_model(rgb: np.ndarray, masks: np.ndarray, K: np.ndarray, w2c: np.ndarray,
                    box: tuple[np.ndarray, np.ndarray], params: Params, meta: dict):
    """The :class:`mono4d.models.gaussians.SceneModel` of the views ``rgb (V, H, W, 3)`` uint8 with
    label maps ``masks (V, H, W)`` (> 0 foreground) and cameras ``K (V, 3, 3)``, ``w2c (V, 4, 4)``:
    foreground hull and photo-consistent background (module docstring) in ``box`` (:func:`camera_box`),
    identity field, ``meta``."""
    import torch

    from mono4d.models.gaussians import SceneModel, create_params
    from mono4d.stages.init import identity_field, nearest_neighbour_scales
    from mono4d.stages.init_silhouette import hull_points

    rng = np.random.default_rng(params.seed)
    foreground = masks > 0
    silhouettes = np.where(foreground, 255, 0).astype(np.uint8)
    candidates = foreground_candidates(foreground, K, w2c, box, params.hull_candidates, rng)
    fg_points, fg_colors = hull_points(silhouettes, rgb, K, w2c, params, rng, candidates)
    bg_points, bg_colors = consistent_points(rgb, foreground, K, w2c, box, params, rng)
    points = np.concatenate([fg_points, bg_points])
    scales = np.concatenate([nearest_neighbour_scales(part) for part in (fg_points, bg_points) if len(part)])
    is_dynamic = torch.arange(len(points)) < len(fg_points)
    gaussians, variables = create_params(
        torch.as_tensor(points, dtype=torch.float32),
        torch.as_tensor(np.concatenate([fg_colors, bg_colors]), dtype=torch.float32),
        torch.as_tensor(np.repeat(scales[:, None], 3, axis=1), dtype=torch.float32), is_dynamic,
        params.sh_degree, params.init_opacity, is_dynamic.long() * FOREGROUND_LABEL)
    centre = fg_points.mean(axis=0)
    radius = float(np.linalg.norm(fg_points - centre, axis=1).max()) + 1e-6
    return SceneModel(gaussians, variables, identity_field(params, centre, radius), meta)


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """The multi-view initialisation (see the module docstring) of ``inputs["frames"]``,
    ``inputs["cameras"]`` (with per-frame views) and ``inputs["masks"]``. Returns key figures:
    ``num_static``, ``num_dynamic``, ``num_views`` (training views of the first timestep),
    ``num_train_frames``, ``num_holdout_frames``, ``scene_scale``."""
    from mono4d.data.artifacts import read_camera_views, read_cameras, read_masks
    from mono4d.data.geometry import camera_centers
    from mono4d.models.gaussians import save_model
    from mono4d.stages.frames import load_frames, read_frames_meta
    from mono4d.stages.init import CHECKPOINT_FILE, SUMMARY_FILE
    from mono4d.stages.init_silhouette import frames_split, model_meta, write_init_view

    require_inputs(inputs, ("frames", "cameras", "masks"), "init (mode multiview)")
    out_dir = Path(out_dir)
    views = read_camera_views(inputs["cameras"])
    if views is None:
        raise InputError("init.mode=multiview needs a multi-view input (several cameras per timestep), but the "
                         "cameras stage recorded one camera per frame",
                         "give a Panoptic folder as the input, or use init.mode=flow for a video")
    K, w2c, _ = read_cameras(inputs["cameras"])
    masks = read_masks(inputs["masks"])
    frames_meta = read_frames_meta(inputs["frames"])
    num_frames = int(frames_meta["num_frames"])
    if len(K) != num_frames or len(masks) != num_frames:
        raise InputError(f"the cameras ({len(K)} frames) or masks ({len(masks)}) do not match the {num_frames} frames",
                         "rerun the cameras and masks stages on the current frames")
    times, held_out = frames_split(frames_meta, num_frames, params.holdout_every)
    held_out_set = set(held_out)
    train_frames = [i for i in range(num_frames) if i not in held_out_set]
    first = int(views[1][train_frames].min()) if train_frames else 0
    first_views = [i for i in train_frames if views[1][i] == first]
    if not first_views:
        raise InputError("no training view at the first timestep", "keep at least one training camera")
    images = load_frames(inputs["frames"], first_views)
    if not masks[first_views].any():
        raise InputError("the masks mark no foreground in the first timestep's training views",
                         "give the dataset's foreground masks (seg/) through masks.backend=file")
    centres = camera_centers(w2c)  # every camera, as the box: one training camera has no spread
    scene_scale = float(np.median(np.linalg.norm(centres - centres.mean(axis=0), axis=1)))
    meta = model_meta(inputs, params, (num_frames, *images.shape[1:3]), times, train_frames, held_out, scene_scale,
                      {0: "background", FOREGROUND_LABEL: FOREGROUND_NAME})
    model = multiview_model(images, masks[first_views], K[first_views], w2c[first_views], camera_box(w2c), params,
                            meta)
    save_model(out_dir / CHECKPOINT_FILE, model)
    view = len(first_views) // 2
    write_init_view(out_dir, model, images[view], K[first_views[view]], w2c[first_views[view]])
    figures = {"num_static": model.num_gaussians - model.num_dynamic, "num_dynamic": model.num_dynamic,
               "num_views": len(first_views), "num_train_frames": len(train_frames),
               "num_holdout_frames": len(held_out), "scene_scale": round(scene_scale, 6)}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(figures, indent=1))
    logger.info("init (multiview): %d foreground and %d background Gaussians from %d views", model.num_dynamic,
                figures["num_static"], len(first_views))
    return figures
