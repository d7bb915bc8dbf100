"""Init stage, ``mode=silhouette``: the initial Gaussians of an object-centred dataset with an
alpha channel (a D-NeRF folder as the input) from its silhouettes, without flow, masks or depth.

``max_dynamic`` random points of the cube ``[-hull_half_size, hull_half_size]^3`` (world units)
that project onto the foreground (alpha > 127) in at least ``hull_min_foreground`` of the
training views (a loose visual hull, loose because the object moves), coloured with the mean of
those views' pixels; ``hull_candidates`` points are drawn before that filter. Every Gaussian is
dynamic (label 1, "object"), with isotropic scales from its nearest neighbours, identity
rotations and opacity ``init_opacity``; the deformation field is the identity, normalised to
the cube (centre 0, radius ``hull_half_size * sqrt(3)``).

Frames, times and held-out frames: those the frames stage wrote for the dataset (its test split
is held out, its times are the dataset's); frames from elsewhere use ``holdout_every`` and
``t = i / (T - 1)``. The scene scale is the median distance of the training cameras from the
origin. Outputs as the flow mode's (:mod:`mono4d.stages.init`): ``init.pt``, ``init.json`` and
``init_view.png``.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mono4d.data.errors import InputError, require_inputs
from mono4d.data.images import write_rgb

if TYPE_CHECKING:
    from mono4d.stages.init import Params

logger = logging.getLogger(__name__)

#: The label and name of every Gaussian of a silhouette initialisation.
OBJECT_LABEL = 1
OBJECT_NAME = "object"
#: Fewer points than this on the foreground means the cameras or the alpha are wrong.
MIN_POINTS = 100


def hull_points(alpha: np.ndarray, rgb: np.ndarray, K: np.ndarray, w2c: np.ndarray, params: Params,
                rng: np.random.Generator, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """World points ``(N, 3)`` float64 and colours ``(N, 3)`` in [0, 1] of the loose visual hull
    (see the module docstring) of the views ``alpha (V, H, W)`` uint8, ``rgb (V, H, W, 3)``
    uint8 with OpenCV cameras ``K (V, 3, 3)``, ``w2c (V, 4, 4)``; ``N <= params.max_dynamic``.
    The hull is cut from ``candidates (M, 3)`` world points (None: ``params.hull_candidates``
    drawn in the cube of half size ``params.hull_half_size`` around the origin)."""
    from mono4d.data.geometry import project_points

    half = params.hull_half_size
    points = rng.uniform(-half, half, (params.hull_candidates, 3)) if candidates is None else candidates
    height, width = alpha.shape[1:3]
    inside = np.zeros(len(points))
    color_sum = np.zeros((len(points), 3))
    for view in range(len(alpha)):
        uv, depth = project_points(K[view], w2c[view], points)
        cols, rows = np.floor(uv[:, 0]), np.floor(uv[:, 1])
        ok = (depth > 0) & (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
        r, c = rows[ok].astype(np.int64), cols[ok].astype(np.int64)
        foreground = alpha[view, r, c] > 127
        seen = np.flatnonzero(ok)[foreground]
        inside[seen] += 1
        color_sum[seen] += rgb[view, r[foreground], c[foreground]] / 255.0
    keep = np.flatnonzero((inside > 0) & (inside >= params.hull_min_foreground * len(alpha)))
    if len(keep) < MIN_POINTS:
        raise InputError(f"only {len(keep)} of {len(points)} random points fall on the foreground of "
                         f"{params.hull_min_foreground:.0%} of the views",
                         "check the dataset (RGBA images with an alpha channel, cameras around the origin), or "
                         "lower init.hull_min_foreground / adjust init.hull_half_size")
    keep = rng.choice(keep, min(params.max_dynamic, len(keep)), replace=False)
    return points[keep], color_sum[keep] / inside[keep, None]


def silhouette_model(alpha: np.ndarray, rgb: np.ndarray, K: np.ndarray, w2c: np.ndarray, params: Params, meta: dict):
    """The :class:`mono4d.models.gaussians.SceneModel` of the visual hull of the views (arrays as in
    :func:`hull_points`) with an identity deformation field and ``meta``."""
    import torch

    from mono4d.models.gaussians import SceneModel, create_params
    from mono4d.stages.init import identity_field, nearest_neighbour_scales

    points, colors = hull_points(alpha, rgb, K, w2c, params, np.random.default_rng(params.seed))
    scales = nearest_neighbour_scales(points)
    gaussians, variables = create_params(
        torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(colors, dtype=torch.float32),
        torch.as_tensor(np.repeat(scales[:, None], 3, axis=1), dtype=torch.float32),
        torch.ones(len(points), dtype=torch.bool), params.sh_degree, params.init_opacity,
        torch.full((len(points),), OBJECT_LABEL, dtype=torch.int64))
    return SceneModel(gaussians, variables, identity_field(params, np.zeros(3), params.hull_half_size * math.sqrt(3.0)),
                      meta)


def frames_split(frames_meta: dict, num_frames: int, holdout_every: int) -> tuple[np.ndarray, list[int]]:
    """``(times (T,), held-out frames)``: the frames stage's (a dataset's) when it wrote them,
    else ``i / (T - 1)`` and every ``holdout_every``-th frame (:func:`mono4d.stages.init.holdout_frames`)."""
    from mono4d.stages.init import frame_times, holdout_frames

    if "times" in frames_meta and "holdout_frames" in frames_meta:
        return np.asarray(frames_meta["times"], np.float64), [int(i) for i in frames_meta["holdout_frames"]]
    return frame_times(num_frames), holdout_frames(num_frames, holdout_every)


def model_meta(inputs: Mapping[str, Path], params: Params, shape: tuple[int, int, int], times: np.ndarray,
               train_frames: list[int], held_out: list[int], scene_scale: float, names: dict[int, str]) -> dict:
    """The ``meta`` of an initial model of frames ``shape`` ``(T, H, W)`` at ``times (T,)``: the
    frame split, scene scale (world units), the cameras' units, the parameters and the label
    ``names`` (id -> name, with ``params.label_names`` applied)."""
    from mono4d.data.artifacts import read_cameras_meta
    from mono4d.models.layers import parse_label_names

    names = {**names, **parse_label_names(params.label_names)}
    return {"num_frames": shape[0], "width": shape[2], "height": shape[1], "times": np.asarray(times).tolist(),
            "train_frames": train_frames, "holdout_frames": held_out, "scene_scale": scene_scale,
            "units": read_cameras_meta(inputs["cameras"]).get("units", "dataset"), "stage": "init",
            "params": asdict(params), "labels": {str(k): v for k, v in sorted(names.items())}}


def write_init_view(out_dir: Path, model, image: np.ndarray, K: np.ndarray, w2c: np.ndarray) -> None:
    """``init_view.png``: the frame ``image (H, W, 3)`` uint8 next to the model's Gaussian centres
    splatted through its camera ``K (3, 3)``, ``w2c (4, 4)``."""
    import torch

    from mono4d.models.gaussians import sh0_to_rgb
    from mono4d.stages.init import splat_points

    with torch.no_grad():
        points = model.params["means"].numpy().astype(np.float64)
        colors = sh0_to_rgb(model.params["sh0"][:, 0]).clamp(0, 1).numpy()
    height, width = image.shape[:2]
    write_rgb(Path(out_dir) / "init_view.png",
              np.concatenate([image, splat_points(points, colors, K, w2c, height, width)], axis=1))


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """The silhouette initialisation (see the module docstring) of ``inputs["frames"]`` (with
    alpha) and ``inputs["cameras"]``. Returns key figures: ``num_static`` (0), ``num_dynamic``,
    ``num_train_frames``, ``num_holdout_frames``, ``scene_scale``."""
    from mono4d.data.artifacts import read_cameras
    from mono4d.models.gaussians import save_model
    from mono4d.stages.frames import load_alpha, load_frames, read_frames_meta
    from mono4d.stages.init import CHECKPOINT_FILE, SUMMARY_FILE

    require_inputs(inputs, ("frames", "cameras"), "init (mode silhouette)")
    out_dir = Path(out_dir)
    images = load_frames(inputs["frames"])
    alpha = load_alpha(inputs["frames"])
    K, w2c, _ = read_cameras(inputs["cameras"])
    num_frames, height, width = images.shape[:3]
    if len(K) != num_frames or alpha.shape != (num_frames, height, width):
        raise InputError(f"the cameras ({len(K)} frames) or the alpha {alpha.shape} do not match the frames "
                         f"({num_frames}, {height}, {width})", "rerun the cameras stage on the current frames")
    times, held_out = frames_split(read_frames_meta(inputs["frames"]), num_frames, params.holdout_every)
    posed = np.isfinite(w2c).all(axis=(1, 2))
    train_frames = [i for i in range(num_frames) if posed[i] and i not in set(held_out)]
    if len(train_frames) < 2:
        raise InputError(f"only {len(train_frames)} posed training frames remain (of {num_frames})",
                         "give a dataset with a train split of posed views")
    centres = np.linalg.inv(w2c[train_frames])[:, :3, 3]
    scene_scale = float(np.median(np.linalg.norm(centres, axis=1)))
    meta = model_meta(inputs, params, (num_frames, height, width), times, train_frames, held_out, scene_scale,
                      {0: "background", OBJECT_LABEL: OBJECT_NAME})
    model = silhouette_model(alpha[train_frames], images[train_frames], K[train_frames], w2c[train_frames], params,
                             meta)
    save_model(out_dir / CHECKPOINT_FILE, model)
    middle = train_frames[len(train_frames) // 2]
    write_init_view(out_dir, model, images[middle], K[middle], w2c[middle])
    figures = {"num_static": 0, "num_dynamic": model.num_gaussians, "num_train_frames": len(train_frames),
               "num_holdout_frames": len(held_out), "scene_scale": round(scene_scale, 6)}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(figures, indent=1))
    logger.info("init (silhouette): %d dynamic Gaussians from %d training views", model.num_gaussians,
                len(train_frames))
    return figures
