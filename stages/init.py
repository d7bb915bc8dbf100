"""Init stage (stage 1 of the optimiser, 3D-aware): fit the deformation field to the 3D flow
pairs, then create canonical Gaussians from the aligned depth.

1. Deformation (MoDGS-style). The 3D flow pairs of the tracks stage whose both ends lie on
   dynamic pixels (masks > 0) give world points ``x_i`` seen at frame i and ``x_j`` at frame j.
   The invertible field of :mod:`mono4d.models.deformation` is fitted so that
   ``F(F^-1(x_i, t_i), t_j) ~= x_j`` (mean Euclidean distance), plus a neighbour-smoothness term
   (3D neighbours on one frame's dynamic surface move alike to a random time) and, for the
   rotation head only, a local-rigidity term (each point's rotation delta turns its neighbours'
   canonical offsets into their offsets at time t). Pairs touching held-out frames are unused.
2. Gaussians. Every usable frame's pixels with valid aligned depth (away from depth edges,
   pixel centres at half-integers, ``K`` and ``w2c`` from the cameras stage) are lifted to
   world space; static pixels (mask 0) stay in world space, dynamic ones are mapped to
   canonical space with ``F^-1(., t_i)``. Each set is voxel-downsampled to its budget (voxel
   size found by bisection; positions and colours averaged per voxel); scales are the mean
   distance to the 3 nearest Gaussians (isotropic), rotations identity, opacity ``init_opacity``,
   colours from the frames as the DC spherical-harmonics term. Each Gaussian gets a label
   (:mod:`mono4d.models.layers`): 0 for static ones, a dynamic one the majority mask label of the
   lifted points nearest to it; the label names come from the masks stage's ``labels.json``
   (and ``label_names``) and are kept in the checkpoint's ``meta["labels"]``.

Frames without a pose (NaN ``w2c``) and held-out frames (``holdout_every``) are not used; the
train stage evaluates on the held-out frames and reads the list from this stage's checkpoint.
Time is ``t = i / (T - 1)``.

``mode=silhouette`` instead initialises an object-centred dataset with alpha (a D-NeRF folder as
the input) from its silhouettes alone (:mod:`mono4d.stages.init_silhouette`); ``mode=multiview``
a synchronized multi-view dataset (a Panoptic folder) from its first timestep's views and
foreground masks (:mod:`mono4d.stages.init_multiview`).

Outputs: ``init.pt`` (:func:`mono4d.models.gaussians.save_model` layout: params, is_dynamic, field,
``meta`` with ``num_frames``, ``width``, ``height``, ``times``, ``train_frames``,
``holdout_frames``, ``scene_scale`` (median aligned depth, world units), ``units`` and the
parameters), ``init.json`` (the key figures), ``pair_residuals.png`` (histograms of the pair
residuals before/after the fit) and ``init_view.png`` (the initial Gaussian centres splatted
into the middle training frame, next to the frame). Loader: :func:`load_init`.
"""
from __future__ import annotations

import json
import logging
import math
import time as timer
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mono4d.data.errors import InputError, ParameterError, StageFailure, require_inputs
from mono4d.data.images import write_rgb
from mono4d.models.layers import nearest_labels, parse_label_names

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "init.pt"
SUMMARY_FILE = "init.json"
MODES = ("flow", "silhouette", "multiview")
#: At most this many pixels are lifted over all frames (a pixel stride is chosen to stay below).
MAX_LIFTED_POINTS = 3_000_000
#: Per-frame dynamic points kept as anchors of the smoothness / rigidity terms.
ANCHORS_PER_FRAME = 512
#: Neighbours per anchor in the smoothness / rigidity terms.
ANCHOR_NEIGHBOURS = 6
#: Neighbours whose mean distance sets a Gaussian's initial scale.
SCALE_NEIGHBOURS = 3


@dataclass(frozen=True)
class Params:
    """Parameters of the init stage.

    mode: "flow" (the deformation fitted to the 3D flow pairs, Gaussians lifted from the aligned
        depth: see the module docstring) or "silhouette" (a visual hull of the frames' alpha, for
        a dataset of RGBA images with known cameras: :mod:`mono4d.stages.init_silhouette`) or
        "multiview" (foreground hull of the masks and photo-consistent background of the first
        timestep's views of a multi-view dataset: :mod:`mono4d.stages.init_multiview`).
    holdout_every: every k-th frame (frames with ``i % k == k // 2``) is held out of init and
        training and evaluated by the train stage; 0 = use every frame.
    max_static: budget of static (background) Gaussians.
    max_dynamic: budget of dynamic Gaussians.
    sh_degree: spherical-harmonics degree of the colours (0..3).
    init_opacity: initial opacity of every Gaussian, in (0, 1) (0.3 covers the frames from the
        first step; 3DGS's 0.1 converges more slowly in short runs).
    depth_edge_threshold: pixels whose 3x3 depth spread exceeds this fraction of their depth
        are not lifted (flying pixels at occlusion boundaries).
    deform_layers: coupling layers of the deformation field (>= 3).
    deform_width: hidden width of the deformation field's MLPs.
    position_frequencies: sinusoidal frequencies encoding positions in the field.
    time_frequencies: sinusoidal frequencies encoding time in the field.
    canonical_time: normalised time in [0, 1] at which the deformation is the identity.
    fit_iterations: Adam steps fitting the field to the 3D flow pairs (0 = keep the identity).
    fit_lr: learning rate of that fit (decays tenfold over the steps).
    fit_batch: 3D flow pairs per step.
    smoothness_weight: weight of the neighbour-smoothness term of the fit.
    rigidity_weight: weight of the rigidity term that fits the field's rotation head.
    seed: random seed (pair batches, sampling).
    device: "auto" (CUDA when available), "cpu" or "cuda".
    hull_candidates, hull_half_size, hull_min_foreground: mode "silhouette": random points drawn,
        half size of the cube they are drawn in (world units) and the fraction of the training
        views whose foreground a point must fall on; mode "multiview" uses the first and the last
        (its points are drawn in the box of the cameras).
    background_max_std: mode "multiview": a background point is kept when its colours in the
        views that see it have a standard deviation below this (colours in [0, 1]).
    label_names: "ID:NAME,..." names of mask label ids that replace those of the masks stage's
        labels.json (e.g. "2:hand": the file and motion backends cannot name a hand; a label
        named hand goes to the hand layer, see :mod:`mono4d.models.layers`); "" keeps labels.json's.
    """

    mode: str = "flow"
    holdout_every: int = 8
    max_static: int = 20000
    max_dynamic: int = 10000
    sh_degree: int = 3
    init_opacity: float = 0.3
    depth_edge_threshold: float = 0.05
    deform_layers: int = 6
    deform_width: int = 64
    position_frequencies: int = 4
    time_frequencies: int = 5
    canonical_time: float = 0.5
    fit_iterations: int = 1000
    fit_lr: float = 3e-3
    fit_batch: int = 4096
    smoothness_weight: float = 0.1
    rigidity_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    hull_candidates: int = 400000
    hull_half_size: float = 1.5
    hull_min_foreground: float = 0.6
    background_max_std: float = 0.05
    label_names: str = ""

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot make sense."""
        for name in ("holdout_every", "max_static", "max_dynamic", "sh_degree", "deform_layers", "deform_width",
                     "position_frequencies", "time_frequencies", "fit_iterations", "fit_batch", "seed",
                     "hull_candidates"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ParameterError(f"init.{name} must be a whole number, got {value!r}",
                                     f"write init.{name} without a decimal point")
        if self.holdout_every < 0 or self.holdout_every == 1:
            raise ParameterError(f"init.holdout_every={self.holdout_every} leaves no training frame or is negative",
                                 "use 0 (no held-out frames) or 2 and more")
        if self.max_static < 0 or self.max_dynamic < 0 or self.max_static + self.max_dynamic < 100:
            raise ParameterError(f"init.max_static={self.max_static}, init.max_dynamic={self.max_dynamic} is too few "
                                 "Gaussians", "allow at least 100 Gaussians in all (thousands for real scenes)")
        if not 0 <= self.sh_degree <= 3:
            raise ParameterError(f"init.sh_degree={self.sh_degree} is out of range", "use 0..3")
        if not 0.0 < self.init_opacity < 1.0:
            raise ParameterError(f"init.init_opacity={self.init_opacity} is not in (0, 1)", "use e.g. 0.1")
        if not self.depth_edge_threshold > 0:
            raise ParameterError(f"init.depth_edge_threshold={self.depth_edge_threshold} must be positive",
                                 "use e.g. 0.05 (5% of the depth)")
        if self.deform_layers < 3 or self.deform_width < 4:
            raise ParameterError(f"init.deform_layers={self.deform_layers}, init.deform_width={self.deform_width} is "
                                 "too small a field", "use at least 3 layers of width 16 or more (default 6 x 64)")
        if not (0 <= self.position_frequencies <= 12 and 0 <= self.time_frequencies <= 12):
            raise ParameterError("init.position_frequencies / init.time_frequencies must be in 0..12",
                                 "use e.g. 4 and 5")
        if not 0.0 <= self.canonical_time <= 1.0:
            raise ParameterError(f"init.canonical_time={self.canonical_time} is not in [0, 1]", "use 0.5")
        if self.fit_iterations < 0 or self.fit_batch < 16:
            raise ParameterError("init.fit_iterations must be >= 0 and init.fit_batch >= 16", "use e.g. 1000 and 4096")
        if not self.fit_lr > 0:
            raise ParameterError(f"init.fit_lr={self.fit_lr} must be positive", "use e.g. 3e-3")
        if self.smoothness_weight < 0 or self.rigidity_weight < 0:
            raise ParameterError("init.smoothness_weight and init.rigidity_weight must be >= 0", "use 0 to turn off")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ParameterError(f"init.device={self.device!r} is unknown", "use auto, cpu or cuda")
        if self.mode not in MODES:
            raise ParameterError(f"init.mode={self.mode!r} is unknown", f"use one of {', '.join(MODES)}")
        if self.hull_candidates < 100 or not self.hull_half_size > 0 or not 0 < self.hull_min_foreground <= 1:
            raise ParameterError("init.hull_candidates must be >= 100, init.hull_half_size > 0 and "
                                 "init.hull_min_foreground in (0, 1]", "use e.g. 400000, 1.5 and 0.6")
        if not self.background_max_std > 0:
            raise ParameterError(f"init.background_max_std={self.background_max_std} must be positive", "use e.g. 0.05")
        parse_label_names(self.label_names)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; ``"cuda"`` without CUDA raises
    :class:`ParameterError`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device cuda was requested but CUDA is not available here", "use device=auto or cpu")
    return device


def holdout_frames(num_frames: int, every: int) -> list[int]:
    """Frames held out for evaluation: ``i % every == every // 2`` (none for ``every`` 0)."""
    return [] if every <= 0 else [i for i in range(num_frames) if i % every == every // 2]


def frame_times(num_frames: int) -> np.ndarray:
    """``(T,)`` normalised times ``i / (T - 1)``."""
    return np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(num_frames)


def pixel_centres(height: int, width: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns ``(M,)`` of every ``stride``-th pixel in both directions."""
    rows, cols = np.mgrid[stride // 2:height:stride, stride // 2:width:stride]
    return rows.ravel(), cols.ravel()


def lift_pixels(rows: np.ndarray, cols: np.ndarray, depth: np.ndarray, K: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """World points ``(M, 3)`` float64 of pixels (rows, cols) with z-depth ``depth (M,)``; the
    pixel centre is at ``(col + 0.5, row + 0.5)``."""
    from mono4d.stages.tracks import unproject

    xy = np.stack([cols + 0.5, rows + 0.5], axis=1)
    return unproject(xy, depth, K, w2c)


def voxel_downsample(points: np.ndarray, colors: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``budget`` points: the means of ``points (N, 3)`` and ``colors (N, 3)`` over the
    occupied cells of the finest voxel grid (bisection on the voxel size) with at most
    ``budget`` occupied cells."""
    if len(points) <= budget or budget == 0:
        return (points, colors) if budget else (points[:0], colors[:0])
    low_corner = points.min(axis=0)
    extent = float(np.max(points.max(axis=0) - low_corner)) + 1e-9

    def cells(size: float) -> tuple[np.ndarray, np.ndarray]:
        keys = np.floor((points - low_corner) / size).astype(np.int64)
        flat = (keys[:, 0] * 2_000_003 + keys[:, 1]) * 2_000_029 + keys[:, 2]
        return np.unique(flat, return_inverse=True)

    fine, coarse = extent * 1e-6, extent
    for _ in range(40):
        middle = math.sqrt(fine * coarse)
        if len(cells(middle)[0]) > budget:
            fine = middle
        else:
            coarse = middle
        if coarse / fine < 1.01:
            break
    unique, inverse = cells(coarse)
    counts = np.bincount(inverse, minlength=len(unique)).astype(np.float64)[:, None]
    mean_points = np.stack([np.bincount(inverse, points[:, a], len(unique)) for a in range(3)], axis=1) / counts
    mean_colors = np.stack([np.bincount(inverse, colors[:, a], len(unique)) for a in range(3)], axis=1) / counts
    return mean_points, mean_colors


def nearest_neighbour_scales(points: np.ndarray, neighbours: int = SCALE_NEIGHBOURS) -> np.ndarray:
    """``(N,)`` mean distance of each point to its ``neighbours`` nearest others, clipped to
    [1/10, 10] times the median (world units)."""
    from scipy.spatial import cKDTree

    if len(points) <= neighbours:
        return np.full(len(points), 0.01)
    distance, _ = cKDTree(points).query(points, k=neighbours + 1)
    scales = distance[:, 1:].mean(axis=1)
    median = float(np.median(scales[scales > 0])) if np.any(scales > 0) else 0.01
    return np.clip(scales, 0.1 * median, 10.0 * median)


def classify_pairs(pairs: dict[str, np.ndarray], masks: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """``(M,)`` bool: the pair's frames are usable and both ends lie on dynamic pixels, with
    finite coordinates."""
    num_frames, height, width = masks.shape
    src, dst = pairs["src_frame"].astype(np.int64), pairs["dst_frame"].astype(np.int64)
    finite = (np.isfinite(pairs["src_xyz"]).all(1) & np.isfinite(pairs["dst_xyz"]).all(1)
              & np.isfinite(pairs["src_xy"]).all(1) & np.isfinite(pairs["dst_xy"]).all(1))
    inside = (src >= 0) & (src < num_frames) & (dst >= 0) & (dst < num_frames)
    keep = finite & inside
    keep[keep] &= usable[src[keep]] & usable[dst[keep]]

    def on_dynamic(frames: np.ndarray, xy: np.ndarray) -> np.ndarray:
        cols = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, width - 1)
        rows = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, height - 1)
        return masks[frames, rows, cols] > 0

    keep[keep] &= on_dynamic(src[keep], pairs["src_xy"][keep]) & on_dynamic(dst[keep], pairs["dst_xy"][keep])
    return keep


def identity_field(params: Params, centre: np.ndarray, radius: float):
    """A zero (identity) :class:`~mono4d.models.deformation.DeformationField` of the parameters'
    shape, normalised to the sphere of ``centre (3,)`` and ``radius`` (world units)."""
    import torch

    from mono4d.models.deformation import DeformationConfig, DeformationField

    config = DeformationConfig(num_layers=params.deform_layers, hidden=params.deform_width,
                               position_frequencies=params.position_frequencies,
                               time_frequencies=params.time_frequencies, canonical_time=params.canonical_time)
    return DeformationField(config, torch.as_tensor(centre, dtype=torch.float32), float(radius))


def make_field(params: Params, dynamic_points: np.ndarray):
    """A zero (identity) :class:`~mono4d.models.deformation.DeformationField` normalised to the bounding
    box of ``dynamic_points (N, 3)`` (1st to 99th percentile)."""
    if len(dynamic_points) == 0:
        return identity_field(params, np.zeros(3), 1.0)
    low, high = np.percentile(dynamic_points, [1, 99], axis=0)
    radius = 0.5 * float(np.linalg.norm(high - low)) + 1e-6
    return identity_field(params, (low + high) / 2, radius)


@dataclass
class Anchors:
    """Per-frame dynamic surface points for the smoothness / rigidity terms: ``points`` (F)
    arrays ``(A, 3)`` world points of frame ``frames[f]`` at time ``times[f]`` and
    ``neighbours`` (F) arrays ``(A, k)`` of their nearest neighbours' rows."""

    frames: list[int]
    times: list[float]
    points: list[np.ndarray]
    neighbours: list[np.ndarray]


def make_anchors(dynamic_by_frame: dict[int, np.ndarray], times: np.ndarray, rng: np.random.Generator) -> Anchors:
    """Subsample each frame's dynamic points to :data:`ANCHORS_PER_FRAME` and find neighbours."""
    from scipy.spatial import cKDTree

    anchors = Anchors([], [], [], [])
    for frame, points in sorted(dynamic_by_frame.items()):
        if len(points) <= ANCHOR_NEIGHBOURS:
            continue
        if len(points) > ANCHORS_PER_FRAME:
            points = points[rng.choice(len(points), ANCHORS_PER_FRAME, replace=False)]
        _, neighbours = cKDTree(points).query(points, k=ANCHOR_NEIGHBOURS + 1)
        anchors.frames.append(frame)
        anchors.times.append(float(times[frame]))
        anchors.points.append(points)
        anchors.neighbours.append(neighbours[:, 1:])
    return anchors


def pair_residuals(field, src: np.ndarray, dst: np.ndarray, src_time: np.ndarray, dst_time: np.ndarray,
                   device: str, chunk: int = 65536) -> np.ndarray:
    """``(M,)`` distances ``|F(F^-1(src, t_src), t_dst) - dst|`` (world units)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(src), chunk):
            part = slice(start, start + chunk)
            moved = field.transfer(torch.as_tensor(src[part], dtype=torch.float32, device=device),
                                   torch.as_tensor(src_time[part], dtype=torch.float32, device=device),
                                   torch.as_tensor(dst_time[part], dtype=torch.float32, device=device))
            out.append((moved - torch.as_tensor(dst[part], dtype=torch.float32, device=device)).norm(dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def fit_deformation(field, src: np.ndarray, dst: np.ndarray, src_time: np.ndarray, dst_time: np.ndarray,
                    anchors: Anchors, params: Params, device: str) -> list[float]:
    """Fit ``field`` (in place) to the 3D flow pairs with the smoothness and rigidity terms (see
    the module docstring). Returns the pair loss every 50 steps.

    On the CPU the fit runs on one torch thread: its tensors are small (a few thousand points
    through 64-wide MLPs), so intra-op threads only add synchronisation; on a 2-core machine with
    other load, 40 steps took 9-14 s on one thread against 120-155 s on two."""
    import torch

    if device == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _fit_deformation(field, src, dst, src_time, dst_time, anchors, params, device)
        finally:
            torch.set_num_threads(threads)
    return _fit_deformation(field, src, dst, src_time, dst_time, anchors, params, device)


def _fit_deformation(field, src: np.ndarray, dst: np.ndarray, src_time: np.ndarray, dst_time: np.ndarray,
                     anchors: Anchors, params: Params, device: str) -> list[float]:
    """:func:`fit_deformation` on the current torch threads."""
    import torch

    from mono4d.models.deformation import rotate_vectors

    generator = torch.Generator().manual_seed(params.seed)
    src_t, dst_t = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in (src, dst))
    src_time_t, dst_time_t = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in (src_time, dst_time))
    anchor_points = [torch.as_tensor(p, dtype=torch.float32, device=device) for p in anchors.points]
    anchor_neighbours = [torch.as_tensor(n, device=device) for n in anchors.neighbours]
    radius = float(field.radius)
    position_params = [p for name, p in field.named_parameters() if name.startswith("couplings")]
    optimizer = torch.optim.Adam([{"params": position_params}, {"params": field.shape_head.parameters()}],
                                 lr=params.fit_lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.1 ** (1.0 / max(params.fit_iterations, 1)))
    history: list[float] = []
    for step in tqdm(range(params.fit_iterations), desc="fit deformation", unit="step", leave=False):
        batch = torch.randint(len(src_t), (min(params.fit_batch, len(src_t)),), generator=generator).to(device)
        moved = field.transfer(src_t[batch], src_time_t[batch], dst_time_t[batch])
        pair_loss = (moved - dst_t[batch]).norm(dim=-1).mean() / radius
        loss = pair_loss
        if anchors.points and (params.smoothness_weight > 0 or params.rigidity_weight > 0):
            which = int(torch.randint(len(anchor_points), (1,), generator=generator))
            points, neighbours = anchor_points[which], anchor_neighbours[which]
            target_time = float(torch.rand(1, generator=generator))
            canonical = field.to_canonical(points, anchors.times[which])
            at_target = field.to_time(canonical, target_time)
            motion = at_target - points
            smoothness = (motion[neighbours] - motion[:, None]).norm(dim=-1).mean() / radius
            rotation, _ = field.shape_deltas(canonical.detach(), target_time)
            offsets_rest = (canonical[neighbours] - canonical[:, None]).detach()
            offsets_now = (at_target[neighbours] - at_target[:, None]).detach()
            turned = rotate_vectors(rotation[:, None].expand(-1, neighbours.shape[1], -1), offsets_rest)
            rigidity = (turned - offsets_now).norm(dim=-1).mean() / radius
            loss = loss + params.smoothness_weight * smoothness + params.rigidity_weight * rigidity
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == params.fit_iterations - 1:
            history.append(float(pair_loss.detach()) * radius)
    return history


def write_residual_histogram(path: Path, before: np.ndarray, after: np.ndarray) -> None:
    """Histograms of pair residuals before (grey) and after (orange) the fit, on a shared axis."""
    width, height, margin = 640, 320, 30
    canvas = np.full((height, width, 3), 255, np.uint8)
    if before.size:
        top = float(np.percentile(np.concatenate([before, after]), 99)) + 1e-12
        bins = np.linspace(0.0, top, 61)
        counts = [np.histogram(np.clip(v, 0, top), bins)[0] for v in (before, after)]
        peak = max(int(c.max()) for c in counts) or 1
        bar = (width - 2 * margin) / 60
        for values, color, offset in ((counts[0], (150, 150, 150), 0.0), (counts[1], (255, 140, 0), 0.5)):
            for i, count in enumerate(values):
                x0 = int(margin + (i + offset * 0.5) * bar)
                y0 = int(height - margin - count / peak * (height - 2 * margin))
                cv2.rectangle(canvas, (x0, y0), (int(x0 + bar * 0.5), height - margin), color, -1)
        cv2.putText(canvas, f"0 .. {top:.3g} world units", (margin, height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1)
        cv2.putText(canvas, f"before: median {np.median(before):.3g}", (margin, 20), cv2.FONT_HERSHEY_SIMPLEX,
                    0.5, (110, 110, 110), 1)
        cv2.putText(canvas, f"after: median {np.median(after):.3g}", (width // 2, 20), cv2.FONT_HERSHEY_SIMPLEX,
                    0.5, (255, 120, 0), 1)
    write_rgb(path, canvas)


def splat_points(points: np.ndarray, colors: np.ndarray, K: np.ndarray, w2c: np.ndarray, height: int,
                 width: int) -> np.ndarray:
    """``(H, W, 3)`` uint8: points projected into a camera, nearest first (a z-buffer), on black."""
    from mono4d.data.geometry import project_points

    image = np.zeros((height, width, 3), np.uint8)
    uv, depth = project_points(K, w2c, points)
    inside = (depth > 0) & np.isfinite(uv).all(1)
    cols, rows = np.floor(uv[inside, 0]).astype(np.int64), np.floor(uv[inside, 1]).astype(np.int64)
    ok = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    order = np.argsort(-depth[inside][ok])
    image[rows[ok][order], cols[ok][order]] = (np.clip(colors[inside][ok][order], 0, 1) * 255).astype(np.uint8)
    return image


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Fit the deformation and create the canonical Gaussians (see the module docstring).

    ``inputs``: ``frames``, ``cameras``, ``align``, ``masks``, ``tracks`` (mode "silhouette":
    ``frames`` and ``cameras``, see :func:`mono4d.stages.init_silhouette.run`; mode "multiview":
    ``frames``, ``cameras`` and ``masks``, see :func:`mono4d.stages.init_multiview.run`). Returns key figures:
    ``num_static``, ``num_dynamic``, ``num_pairs_dynamic``, ``pair_residual_before`` and
    ``pair_residual_after`` (median, world units), ``pair_residual_ratio`` (after / before),
    ``num_train_frames``, ``num_holdout_frames``, ``fit_seconds``.
    """
    import torch

    from mono4d.data.artifacts import (LABELS_FILE, read_aligned_depth, read_cameras, read_cameras_meta, read_labels,
                                       read_masks, read_pairs3d)
    from mono4d.models.gaussians import SceneModel, create_params, save_model
    from mono4d.stages.frames import load_frames
    from mono4d.stages.tracks import depth_edges

    params.validate()
    if params.mode == "silhouette":
        from mono4d.stages import init_silhouette

        return init_silhouette.run(inputs, params, out_dir)
    if params.mode == "multiview":
        from mono4d.stages import init_multiview

        return init_multiview.run(inputs, params, out_dir)
    require_inputs(inputs, ("frames", "cameras", "align", "masks", "tracks"), "init")
    out_dir = Path(out_dir)
    device = resolve_device(params.device)
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)

    images = load_frames(inputs["frames"])
    K, w2c, _ = read_cameras(inputs["cameras"])
    depth = read_aligned_depth(inputs["align"])
    masks = read_masks(inputs["masks"])
    pairs = read_pairs3d(inputs["tracks"])
    num_frames, height, width = images.shape[:3]
    if num_frames < 2:
        raise InputError("the init stage needs at least 2 frames", "extract more frames (frames.max_frames)")
    for what, shape in (("aligned depth", depth.shape), ("masks", masks.shape)):
        if tuple(shape) != (num_frames, height, width):
            raise InputError(f"{what} {tuple(shape)} does not match the frames ({num_frames}, {height}, {width})",
                             "rerun the stages after frames so they see the same frames")
    if len(K) != num_frames:
        raise InputError(f"the cameras stage has {len(K)} frames, the frames stage {num_frames}",
                         "rerun the cameras stage on the current frames")

    times = frame_times(num_frames)
    held_out = holdout_frames(num_frames, params.holdout_every)
    posed = np.isfinite(w2c).all(axis=(1, 2)) & np.isfinite(K).all(axis=(1, 2))
    usable = posed.copy()
    usable[held_out] = False
    train_frames = [int(i) for i in np.flatnonzero(usable)]
    if len(train_frames) < 2:
        raise InputError(f"only {len(train_frames)} posed training frames remain (of {num_frames}; "
                         f"{int((~posed).sum())} have no pose, {len(held_out)} are held out)",
                         "lower init.holdout_every (0 keeps every frame) or fix the cameras stage")
    notes: list[str] = []

    # --- lift the depth of every training frame --------------------------------------------
    stride = max(1, math.ceil(math.sqrt(len(train_frames) * height * width / MAX_LIFTED_POINTS)))
    rows, cols = pixel_centres(height, width, stride)
    static_points, static_colors, dynamic_by_frame, dynamic_colors_by_frame = [], [], {}, {}
    dynamic_labels_by_frame = {}
    depth_values = []
    for frame in tqdm(train_frames, desc="lift depth", unit="frame", leave=False):
        frame_depth = depth[frame]
        ok = np.isfinite(frame_depth[rows, cols]) & (frame_depth[rows, cols] > 0)
        ok &= ~depth_edges(frame_depth, params.depth_edge_threshold)[rows, cols]
        r, c = rows[ok], cols[ok]
        if not len(r):
            continue
        depth_values.append(frame_depth[r, c])
        points = lift_pixels(r, c, frame_depth[r, c], K[frame], w2c[frame])
        colors = images[frame, r, c].astype(np.float64) / 255.0
        dynamic = masks[frame, r, c] > 0
        static_points.append(points[~dynamic])
        static_colors.append(colors[~dynamic])
        if dynamic.any():
            dynamic_by_frame[frame] = points[dynamic]
            dynamic_colors_by_frame[frame] = colors[dynamic]
            dynamic_labels_by_frame[frame] = masks[frame, r, c][dynamic]
    if not depth_values:
        raise InputError("no training frame has valid aligned depth", "check the align stage's output (align/vis)")
    scene_scale = float(np.median(np.concatenate(depth_values)))

    # --- fit the deformation to the dynamic 3D flow pairs ------------------------------------
    all_dynamic = (np.concatenate(list(dynamic_by_frame.values())) if dynamic_by_frame else np.zeros((0, 3)))
    field = make_field(params, all_dynamic).to(device)
    dynamic_pairs = classify_pairs(pairs, masks, usable)
    src, dst = pairs["src_xyz"][dynamic_pairs].astype(np.float64), pairs["dst_xyz"][dynamic_pairs].astype(np.float64)
    src_time = times[pairs["src_frame"][dynamic_pairs]]
    dst_time = times[pairs["dst_frame"][dynamic_pairs]]
    before = np.linalg.norm(src - dst, axis=1)
    started = timer.perf_counter()
    if len(src) and params.fit_iterations:
        anchors = make_anchors(dynamic_by_frame, times, rng)
        fit_deformation(field, src, dst, src_time, dst_time, anchors, params, device)
    elif not len(src):
        notes.append("no 3D flow pair lies on dynamic pixels: the deformation stays the identity "
                     "(a static scene, or the masks/tracks found no motion)")
    fit_seconds = timer.perf_counter() - started
    field.eval()
    after = pair_residuals(field, src, dst, src_time, dst_time, device) if len(src) else before

    # --- canonical Gaussians ----------------------------------------------------------------
    static_points = np.concatenate(static_points) if static_points else np.zeros((0, 3))
    static_colors = np.concatenate(static_colors) if static_colors else np.zeros((0, 3))
    canonical_parts = []
    with torch.no_grad():
        for frame, points in dynamic_by_frame.items():
            canonical = field.to_canonical(torch.as_tensor(points, dtype=torch.float32, device=device), float(times[frame]))
            canonical_parts.append(canonical.cpu().numpy().astype(np.float64))
    dynamic_points = np.concatenate(canonical_parts) if canonical_parts else np.zeros((0, 3))
    lifted_dynamic = dynamic_points
    lifted_labels = (np.concatenate([dynamic_labels_by_frame[f] for f in dynamic_by_frame])
                     if dynamic_by_frame else np.zeros(0, np.int64))
    dynamic_colors = (np.concatenate([dynamic_colors_by_frame[f] for f in dynamic_by_frame])
                      if dynamic_by_frame else np.zeros((0, 3)))
    static_points, static_colors = voxel_downsample(static_points, static_colors, params.max_static)
    dynamic_points, dynamic_colors = voxel_downsample(dynamic_points, dynamic_colors, params.max_dynamic)
    points = np.concatenate([static_points, dynamic_points])
    colors = np.concatenate([static_colors, dynamic_colors])
    if len(points) < 4:
        raise StageFailure(f"only {len(points)} Gaussians could be created from the aligned depth",
                           "check the align stage's depth maps (align/vis) and the cameras")
    scales = nearest_neighbour_scales(points)
    is_dynamic = np.concatenate([np.zeros(len(static_points), bool), np.ones(len(dynamic_points), bool)])
    labels = np.concatenate([np.zeros(len(static_points), np.int64),
                             nearest_labels(dynamic_points, lifted_dynamic, lifted_labels)])
    gaussians, variables = create_params(
        torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(colors, dtype=torch.float32),
        torch.as_tensor(np.repeat(scales[:, None], 3, axis=1), dtype=torch.float32),
        torch.as_tensor(is_dynamic), params.sh_degree, params.init_opacity, torch.as_tensor(labels))
    names = read_labels(inputs["masks"]) if (Path(inputs["masks"]) / LABELS_FILE).is_file() else {0: "background"}
    names.update(parse_label_names(params.label_names))
    units = read_cameras_meta(inputs["cameras"]).get("units", "sfm")
    meta = {"num_frames": num_frames, "width": width, "height": height, "times": times.tolist(),
            "train_frames": train_frames, "holdout_frames": held_out, "scene_scale": scene_scale, "units": units,
            "stage": "init", "params": asdict(params), "labels": {str(k): v for k, v in sorted(names.items())}}
    save_model(out_dir / CHECKPOINT_FILE, SceneModel(gaussians, variables, field.cpu(), meta))

    # --- pictures and figures -----------------------------------------------------------------
    write_residual_histogram(out_dir / "pair_residuals.png", before, after)
    middle = train_frames[len(train_frames) // 2]
    with torch.no_grad():
        dynamic_now = field.to_time(torch.as_tensor(dynamic_points, dtype=torch.float32), float(times[middle])).numpy()
    splatted = splat_points(np.concatenate([static_points, dynamic_now]), colors, K[middle], w2c[middle], height, width)
    write_rgb(out_dir / "init_view.png", np.concatenate([images[middle], splatted], axis=1))
    figures = {
        "num_static": int(len(static_points)), "num_dynamic": int(len(dynamic_points)),
        "num_pairs_dynamic": int(len(src)),
        "pair_residual_before": round(float(np.median(before)), 6) if len(before) else 0.0,
        "pair_residual_after": round(float(np.median(after)), 6) if len(after) else 0.0,
        "pair_residual_ratio": round(float(np.median(after) / max(np.median(before), 1e-12)), 4) if len(before) else 1.0,
        "num_train_frames": len(train_frames), "num_holdout_frames": len(held_out),
        "fit_seconds": round(fit_seconds, 2),
    }
    if not len(dynamic_points):
        notes.append("no dynamic Gaussian was created (no dynamic pixel with valid depth)")
    (out_dir / SUMMARY_FILE).write_text(json.dumps(figures, indent=1))
    logger.info("init: %d static + %d dynamic Gaussians; pair residual %.4g -> %.4g", figures["num_static"],
                figures["num_dynamic"], figures["pair_residual_before"], figures["pair_residual_after"])
    if notes:
        figures["notes"] = notes
    return figures


def load_init(init_dir: str | Path, device: str = "cpu"):
    """The init stage's model (:class:`mono4d.models.gaussians.SceneModel`) on ``device``."""
    from mono4d.models.gaussians import load_model

    path = Path(init_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing: {init_dir} is not a finished init stage output", "run the init stage first")
    model, _ = load_model(path, device)
    return model
