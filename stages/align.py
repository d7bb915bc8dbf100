"""Align stage: monocular depth -> z-depth in the cameras stage's units, frame by frame.

For each frame, the 3D points that SfM observed in it (``points.npz`` observations, projected
with that frame's camera) give sparse target depths at static pixels (pixels labelled dynamic by
the masks stage, dilated by ``mask_dilation``, are left out). The depth stage's map is sampled
there and an affine map ``target = scale * mono + shift`` is fitted:

- in inverse depth (target = 1/z) when the depth kind is ``relative_inverse`` (what affine-invariant
  monocular models predict), in depth (target = z) for ``metric`` and ``sfm`` kinds;
- residuals are relative (``(scale * mono + shift) / target - 1``), so near and far points
  count alike and the numbers read as relative depth errors;
- robustly: RANSAC over point pairs, then iteratively reweighted least squares with Huber weights
  on the RANSAC inliers (points beyond ``inlier_threshold`` get no weight).

The per-frame fits are then smoothed over time by a quadratic smoother over all frames at once:
each frame's fit is held by its own data (the IRLS information matrix) and tied to the next frame
by a drift prior (``temporal_drift``: the expected relative change of the aligned depth between
consecutive frames). Frames with fewer than ``min_points`` inliers carry no data term and are
filled from their neighbours (flag ``filled``); well-observed frames barely move.

Outputs in ``out_dir``: ``depth/000000.npy`` float32 z-depth (0 = invalid: no mono value,
non-positive, or farther than ``max_depth_ratio`` x the 99th percentile of the SfM depths),
``vis/000000.png``, ``alignment.json`` (per-frame scale, shift, raw fit, residual, point counts,
inlier fraction, filled/smoothed flags; depth and record written by
:func:`mono4d.data.artifacts.write_aligned_depth`) and ``scatter.png`` (aligned mono depth vs SfM depth at
the points of all frames, log-log; inliers green, outliers red).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np
from tqdm import tqdm

from mono4d.data.artifacts import read_cameras, read_depth, read_masks, read_points, write_aligned_depth
from mono4d.data.errors import InputError, ParameterError, StageFailure
from mono4d.data.images import write_rgb
from mono4d.data.visualize import colorize_depth
from mono4d.stages.depth_backends import observed_point_depths, pixel_indices

logger = logging.getLogger(__name__)

MIN_RESIDUAL_SCALE = 0.005   # floor of the per-frame relative noise level (avoids infinite confidence)


@dataclass(frozen=True)
class Params:
    """Parameters of the align stage.

    min_points: inlier points a frame needs for its own fit; frames with fewer are filled from
        their neighbours.
    inlier_threshold: largest relative depth residual of an inlier (RANSAC and final fit).
    ransac_iterations: point pairs tried by RANSAC per frame.
    temporal_drift: expected relative change of the aligned depth between consecutive frames;
        smaller = smoother over time (0.05 = 5 %).
    max_depth_ratio: aligned depths beyond this x the 99th percentile of SfM depths are invalid.
    use_masks: leave out points on dynamic pixels when the masks stage output is given.
    mask_dilation: pixels by which dynamic masks are grown before leaving points out.
    seed: random seed of RANSAC.
    """

    min_points: int = 20
    inlier_threshold: float = 0.15
    ransac_iterations: int = 200
    temporal_drift: float = 0.05
    max_depth_ratio: float = 10.0
    use_masks: bool = True
    mask_dilation: int = 3
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot work."""
        checks = [
            (self.min_points >= 3, f"align.min_points must be >= 3, not {self.min_points}"),
            (0.0 < self.inlier_threshold < 1.0,
             f"align.inlier_threshold must be in (0, 1), not {self.inlier_threshold}"),
            (self.ransac_iterations >= 1, f"align.ransac_iterations must be >= 1, not {self.ransac_iterations}"),
            (self.temporal_drift > 0.0, f"align.temporal_drift must be > 0, not {self.temporal_drift}"),
            (self.max_depth_ratio > 1.0, f"align.max_depth_ratio must be > 1, not {self.max_depth_ratio}"),
            (self.mask_dilation >= 0, f"align.mask_dilation must be >= 0, not {self.mask_dilation}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParameterError(message, "fix the value in luigi.cfg [align] or with --set align.NAME=VALUE")


@dataclass
class FrameFit:
    """Robust affine fit of one frame: ``target ~ scale * mono + shift``.

    ``mono``/``target`` ``(M,)`` are the samples, ``inliers`` ``(M,)`` bool, ``information``
    ``(2, 2)`` the inverse covariance of ``(scale, shift)`` (zeros when the fit is unusable), and
    ``metric`` ``(2, 2)`` the mean of ``[mono, 1]^T [mono, 1] / target^2`` (turns a parameter change
    into a mean squared relative change of the aligned depth)."""

    scale: float
    shift: float
    mono: np.ndarray
    target: np.ndarray
    inliers: np.ndarray
    information: np.ndarray
    metric: np.ndarray


def relative_residuals(scale: float | np.ndarray, shift: float | np.ndarray, mono: np.ndarray,
                       target: np.ndarray) -> np.ndarray:
    """``(scale * mono + shift) / target - 1`` (broadcasts hypotheses ``(N, 1)`` over points ``(M,)``)."""
    return (scale * mono + shift) / target - 1.0


def ransac_affine(mono: np.ndarray, target: np.ndarray, threshold: float, iterations: int,
                  rng: np.random.Generator) -> tuple[float, float]:
    """Best ``(scale > 0, shift)`` over random point pairs by truncated squared relative residual
    (MSAC). Falls back to a least-squares scale through the origin when no pair is usable."""
    count = len(mono)
    first = rng.integers(0, count, iterations)
    second = rng.integers(0, count, iterations)
    spread = mono[first] - mono[second]
    usable = np.abs(spread) > 1e-9 * max(float(np.ptp(mono)), 1e-12)
    scales = np.where(usable, (target[first] - target[second]) / np.where(usable, spread, 1.0), 0.0)
    shifts = target[first] - scales * mono[first]
    usable &= scales > 0
    if not usable.any():
        return float(np.sum(mono * target) / max(np.sum(mono * mono), 1e-20)), 0.0
    scales, shifts = scales[usable], shifts[usable]
    residuals = relative_residuals(scales[:, None], shifts[:, None], mono[None], target[None])
    cost = np.minimum(residuals ** 2, threshold ** 2).sum(axis=1)
    best = int(np.argmin(cost))
    return float(scales[best]), float(shifts[best])


def fit_frame(mono: np.ndarray, target: np.ndarray, threshold: float, iterations: int, min_points: int,
              rng: np.random.Generator, irls_steps: int = 10) -> FrameFit:
    """Robust affine fit of one frame's samples (``mono``, ``target`` ``(M,)``, target > 0):
    RANSAC, then IRLS with Huber weights (points beyond ``threshold`` get weight 0)."""
    mono = np.asarray(mono, np.float64)
    target = np.asarray(target, np.float64)
    unusable = FrameFit(1.0, 0.0, mono, target, np.zeros(len(mono), bool), np.zeros((2, 2)), np.zeros((2, 2)))
    if len(mono) < max(min_points, 3):
        return unusable
    scale, shift = ransac_affine(mono, target, threshold, iterations, rng)
    # Rows: derivative of each relative residual by (scale, shift).
    design = np.stack([mono, np.ones_like(mono)], axis=1) / target[:, None]
    for _ in range(irls_steps):
        residual = relative_residuals(scale, shift, mono, target)
        inliers = np.abs(residual) < threshold
        if inliers.sum() < min_points:
            return unusable
        sigma = max(1.4826 * float(np.median(np.abs(residual[inliers]))), MIN_RESIDUAL_SCALE)
        huber = np.minimum(1.0, 1.345 * sigma / np.maximum(np.abs(residual), 1e-12))
        weights = np.where(inliers, huber, 0.0)
        normal = design.T @ (design * weights[:, None])
        if np.linalg.cond(normal) > 1e12:
            return unusable
        scale, shift = np.linalg.solve(normal, design.T @ (weights * np.ones_like(mono)))
    residual = relative_residuals(scale, shift, mono, target)
    inliers = np.abs(residual) < threshold
    if inliers.sum() < min_points or scale <= 0:
        return unusable
    sigma = max(float(np.sqrt(np.mean(residual[inliers] ** 2))), MIN_RESIDUAL_SCALE)
    information = design[inliers].T @ design[inliers] / sigma ** 2
    metric = design.T @ design / len(mono)
    return FrameFit(float(scale), float(shift), mono, target, inliers, information, metric)


def smooth_over_time(fits: list[FrameFit], drift: float) -> np.ndarray:
    """Temporally smoothed ``(T, 2)`` (scale, shift): minimises
    ``sum_t (p_t - p^_t)^T I_t (p_t - p^_t) + sum_t (p_t+1 - p_t)^T (M_t / drift^2) (p_t+1 - p_t)``
    with ``I_t`` each fit's information matrix and ``M_t`` the relative-change metric (taken from
    the nearest frame with data when a frame has none)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    count = len(fits)
    with_data = [t for t, fit in enumerate(fits) if fit.information.any()]
    if not with_data:
        raise StageFailure("no frame has enough SfM points to align the depth to",
                           "check the cameras stage (few registered frames or points?) and the masks; or lower "
                           "--set align.min_points")
    metrics = [fits[min(with_data, key=lambda d: abs(d - t))].metric for t in range(count)]
    rows, cols, values = [], [], []

    def add_block(row: int, col: int, block: np.ndarray) -> None:
        for i in range(2):
            for j in range(2):
                rows.append(2 * row + i)
                cols.append(2 * col + j)
                values.append(block[i, j])

    rhs = np.zeros(2 * count)
    for t, fit in enumerate(fits):
        add_block(t, t, fit.information)
        rhs[2 * t:2 * t + 2] = fit.information @ np.array([fit.scale, fit.shift])
    for t in range(count - 1):
        tie = 0.5 * (metrics[t] + metrics[t + 1]) / drift ** 2
        add_block(t, t, tie)
        add_block(t + 1, t + 1, tie)
        add_block(t, t + 1, -tie)
        add_block(t + 1, t, -tie)
    system = coo_matrix((values, (rows, cols)), shape=(2 * count, 2 * count)).tocsc()
    return np.asarray(spsolve(system, rhs)).reshape(count, 2)


def frame_samples(mono: np.ndarray, camera_points: np.ndarray, K: np.ndarray, static: np.ndarray | None,
                  inverse: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample one frame's mono map ``(H, W)`` at its observed SfM points ``(M, 3)`` (camera
    coordinates). Returns ``mono values (N,)``, ``targets (N,)`` (1/z when ``inverse``, else z)
    and SfM z ``(N,)`` for points that project inside, land on static pixels (``static`` ``(H, W)``
    bool or None) and have a valid (> 0) mono value."""
    height, width = mono.shape
    z = camera_points[:, 2]
    u, v = pixel_indices(K, camera_points)
    keep = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    u, v, z = u[keep], v[keep], z[keep]
    values = mono[v, u]
    keep = np.isfinite(values) & (values > 0)
    if static is not None:
        keep &= static[v, u]
    z = z[keep]
    return values[keep].astype(np.float64), (1.0 / z if inverse else z), z


def aligned_depth(mono: np.ndarray, scale: float, shift: float, inverse: bool, max_depth: float) -> np.ndarray:
    """Apply an alignment to a mono map ``(H, W)``: z-depth float32, 0 where invalid."""
    valid = np.isfinite(mono) & (mono > 0)
    value = scale * mono.astype(np.float64) + shift
    if inverse:
        depth = np.where(value > 0, 1.0 / np.where(value > 0, value, 1.0), 0.0)
    else:
        depth = value
    ok = valid & (depth > 0) & (depth <= max_depth)
    return np.where(ok, depth, 0.0).astype(np.float32)


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Align ``inputs["depth"]`` to the SfM points of ``inputs["cameras"]`` (static pixels per
    ``inputs["masks"]`` when present) and write ``depth/``, ``vis/``, ``alignment.json``,
    ``scatter.png`` into ``out_dir``."""
    params.validate()
    mono, kind = read_depth(inputs["depth"])
    K, w2c, registered = read_cameras(inputs["cameras"])
    points = read_points(inputs["cameras"])
    num_frames, height, width = mono.shape
    if len(K) != num_frames:
        raise InputError(f"the depth stage has {num_frames} frames but the cameras stage {len(K)}",
                         "rerun both stages on the same frames")
    static = None
    if params.use_masks and "masks" in inputs:
        static = dynamic_to_static(read_masks(inputs["masks"]), (height, width), params.mask_dilation)
    observed = observed_point_depths(points, np.where(np.isfinite(w2c), w2c, 0.0), num_frames)
    inverse = kind == "relative_inverse"
    rng = np.random.default_rng(params.seed)
    fits, sfm_depths = [], []
    for t in tqdm(range(num_frames), desc="align", unit="frame", leave=False):
        values, targets, z = frame_samples(mono[t], observed[t], K[t], None if static is None else static[t], inverse)
        fits.append(fit_frame(values, targets, params.inlier_threshold, params.ransac_iterations,
                              params.min_points, rng))
        sfm_depths.append(z)
    all_sfm = np.concatenate(sfm_depths)
    if all_sfm.size == 0:
        raise StageFailure("no SfM point lands on a static pixel with valid monocular depth in any frame",
                           "check the cameras stage output (points.npz observations) and the masks")
    max_depth = params.max_depth_ratio * float(np.percentile(all_sfm, 99))
    smoothed = smooth_over_time(fits, params.temporal_drift)

    (out_dir / "vis").mkdir(parents=True, exist_ok=True)
    aligned = np.empty_like(mono)
    records, scatter_sfm, scatter_aligned, scatter_inlier = [], [], [], []
    for t, fit in enumerate(fits):
        scale, shift = (float(v) for v in smoothed[t])
        aligned[t] = aligned_depth(mono[t], scale, shift, inverse, max_depth)
        write_rgb(out_dir / "vis" / f"{t:06d}.png", colorize_depth(aligned[t]))
        filled = not fit.information.any()
        residual = relative_residuals(scale, shift, fit.mono, fit.target) if len(fit.mono) else np.zeros(0)
        raw_prediction = fit.scale * fit.mono + fit.shift
        change = (scale * fit.mono + shift) / np.where(raw_prediction != 0, raw_prediction, 1.0) - 1.0
        records.append({
            "index": t, "scale": scale, "shift": shift,
            "raw_scale": None if filled else fit.scale, "raw_shift": None if filled else fit.shift,
            "residual": float(np.median(np.abs(residual[fit.inliers]))) if fit.inliers.any() else None,
            "num_points": int(len(fit.mono)), "num_inliers": int(fit.inliers.sum()),
            "inlier_fraction": float(fit.inliers.mean()) if len(fit.mono) else 0.0,
            "registered": bool(registered[t]), "filled": filled,
            "smoothed": bool(not filled and len(change) and np.sqrt(np.mean(change ** 2)) > 0.01),
        })
        if len(fit.mono):
            prediction = scale * fit.mono + shift
            scatter_aligned.append(1.0 / np.maximum(prediction, 1e-12) if inverse else prediction)
            scatter_sfm.append(sfm_depths[t])
            scatter_inlier.append(np.abs(residual) < params.inlier_threshold)
    write_scatter(out_dir / "scatter.png", np.concatenate(scatter_sfm), np.concatenate(scatter_aligned),
                  np.concatenate(scatter_inlier), rng)
    filled_frames = [r["index"] for r in records if r["filled"]]
    meta = {"depth_kind": kind, "fit_space": "inverse_depth" if inverse else "depth",
            "max_depth": max_depth, "invalid": "0", "units": "cameras", "masks_used": static is not None,
            "frames": records}
    write_aligned_depth(out_dir, aligned, meta)
    residuals = [r["residual"] for r in records if r["residual"] is not None]
    figures = {"median_residual": round(float(np.median(residuals)), 4) if residuals else None,
               "mean_num_points": round(float(np.mean([r["num_points"] for r in records])), 1),
               "frames_too_few_points": len(filled_frames),
               "mean_inlier_fraction": round(float(np.mean([r["inlier_fraction"] for r in records])), 4)}
    if filled_frames:
        figures["notes"] = [f"{len(filled_frames)} frames had fewer than {params.min_points} inlier SfM points; "
                            f"their alignment is interpolated from neighbouring frames: {filled_frames}"]
    return figures


def dynamic_to_static(masks: np.ndarray, size: tuple[int, int], dilation: int) -> np.ndarray:
    """``(T, H, W)`` bool static-pixel maps from label masks (0 = static), resized to ``size``
    with nearest neighbour, with dynamic regions grown by ``dilation`` pixels."""
    height, width = size
    kernel = np.ones((2 * dilation + 1, 2 * dilation + 1), np.uint8) if dilation > 0 else None
    out = np.zeros((len(masks), height, width), bool)
    for t, labels in enumerate(masks):
        dynamic = (labels > 0).astype(np.uint8)
        if dynamic.shape != (height, width):
            dynamic = cv2.resize(dynamic, (width, height), interpolation=cv2.INTER_NEAREST)
        if kernel is not None:
            dynamic = cv2.dilate(dynamic, kernel)
        out[t] = dynamic == 0
    return out


def write_scatter(path: Path, sfm_depth: np.ndarray, aligned: np.ndarray, inliers: np.ndarray,
                  rng: np.random.Generator, size: int = 512, max_points: int = 20000) -> None:
    """Log-log scatter of aligned mono depth (y) against SfM depth (x) as a PNG, drawn with
    OpenCV: inliers green, outliers red, the y = x diagonal grey, axis ticks labelled."""
    ok = (sfm_depth > 0) & (aligned > 0) & np.isfinite(aligned)
    sfm_depth, aligned, inliers = sfm_depth[ok], aligned[ok], inliers[ok]
    if len(sfm_depth) > max_points:
        pick = rng.choice(len(sfm_depth), max_points, replace=False)
        sfm_depth, aligned, inliers = sfm_depth[pick], aligned[pick], inliers[pick]
    canvas = np.full((size, size, 3), 255, np.uint8)
    margin = 60
    low, high = np.log10(np.percentile(sfm_depth, [0.5, 99.5])) if len(sfm_depth) else (0.0, 1.0)
    low, high = low - 0.1 * max(high - low, 0.1), high + 0.1 * max(high - low, 0.1)

    def to_pixel(values: np.ndarray, vertical: bool) -> np.ndarray:
        fraction = (np.log10(np.maximum(values, 1e-12)) - low) / (high - low)
        span = size - 2 * margin
        return np.rint(size - margin - fraction * span if vertical else margin + fraction * span).astype(np.int64)

    black, grey = (0, 0, 0), (170, 170, 170)
    cv2.rectangle(canvas, (margin, margin), (size - margin, size - margin), black, 1)
    cv2.line(canvas, (margin, size - margin), (size - margin, margin), grey, 1, cv2.LINE_AA)
    for tick in np.linspace(low, high, 5):
        label = f"{10 ** tick:.3g}"
        position = int(to_pixel(np.array([10 ** tick]), False)[0])
        cv2.line(canvas, (position, size - margin), (position, size - margin + 5), black, 1)
        cv2.putText(canvas, label, (position - 15, size - margin + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, black, 1,
                    cv2.LINE_AA)
        position = int(to_pixel(np.array([10 ** tick]), True)[0])
        cv2.line(canvas, (margin - 5, position), (margin, position), black, 1)
        cv2.putText(canvas, label, (5, position + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, "SfM depth", (size // 2 - 35, size - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, "aligned mono depth (inliers green, outliers red)", (margin, margin - 15),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, black, 1, cv2.LINE_AA)
    xs, ys = to_pixel(sfm_depth, False), to_pixel(aligned, True)
    inside = (xs >= margin) & (xs <= size - margin) & (ys >= margin) & (ys <= size - margin)
    for selection, color in ((inside & ~inliers, (220, 40, 40)), (inside & inliers, (30, 160, 60))):
        canvas[ys[selection], xs[selection]] = color
        canvas[np.minimum(ys[selection] + 1, size - 1), xs[selection]] = color
        canvas[ys[selection], np.minimum(xs[selection] + 1, size - 1)] = color
    write_rgb(path, canvas)
