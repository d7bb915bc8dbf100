"""Refined masks stage: the motion masks redone once cameras and aligned depth exist.

The first ``masks`` pass runs before the cameras (COLMAP must not match features on moving
things), so it can only compare each pixel's flow with a two-view epipolar geometry, which is
blind to motion along the epipolar lines (e.g. a person walking parallel to a panning camera).
After ``cameras`` and ``align`` every static pixel's flow is predicted in full: lift the pixel
of frame i with its aligned z-depth, move it into frame j with the registered cameras and
project it. The residual ``|observed flow - camera-induced flow|`` (pixels) over the flow
stage's pairs up to ``max_pair_offset`` frames apart, divided by a robust estimate of the
static residual noise of that pair (pixels the first pass called static, at least 0.3 px),
is the score of the pixel (the largest over its pairs, averaged over ``temporal_window``
flow-aligned frames). It is segmented like the first pass (:mod:`mono4d.stages.masks`): regions above
``threshold`` holding temporally confirmed seeds where the flow is reliable (texture x
forward-backward consistency), a colour-aware vote for unreliable pixels, edge snapping.

The first pass is kept where the residual does not clearly explain it: a first-pass dynamic
pixel is dropped only where its flow is reliable, its depth valid, and its residual below the
threshold in a frame with a pose (the static scene explains it). Pixels without depth or pose
keep the first pass. Masks of the ``file``, ``sam`` and ``sam2`` backends (the user's or
prompted objects) are passed through unchanged.

Inputs: ``frames``, ``flow``, ``masks`` (first pass), ``cameras`` and ``align``. Outputs, in
the masks stage's format (``mono4d.data.artifacts.read_masks``/``read_labels`` read them): ``masks/``,
``vis/`` overlays, ``vis/cues/score_*.png``/``confidence_*.png`` and ``labels.json``
(``backend`` = ``residual``).
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numba import njit
from tqdm import tqdm

from mono4d.data.artifacts import (LABELS_FILE, MASKS_DIR, read_aligned_depth, read_cameras, read_labels, read_masks,
                                   read_masks_meta)
from mono4d.data.errors import InputError, ParameterError, require_inputs
from mono4d.stages import frames as frames_stage
from mono4d.stages import masks as masks_stage
from mono4d.stages.flow import MAX_WORKERS, prefetch, worker_count
from mono4d.stages.masks_common import StageFlow, dilate_labels, morph_radius, require_consecutive_pairs, worker_pool

logger = logging.getLogger(__name__)

BACKEND = "residual"
# Floor of the static residual noise (pixels), as in the first pass.
_NOISE_FLOOR_PX = 0.3
# A region ends where its residual falls below this fraction of its peak. Higher than the first
# pass's 25 %: the residual against the camera-induced flow is high on the whole moving body, so
# a lower cut only adds the halo of dragged flow around it (CI scene: 1.9 % instead of 1.3 % of
# the static pixels marked dynamic at 25 %).
_BOUNDARY_FRACTION = 0.4
# Pairs computed ahead on the worker pool (bounded memory).
_IN_FLIGHT = 2 * MAX_WORKERS


@dataclass(frozen=True)
class Params:
    """Parameters of the refined masks stage.

    threshold: a pixel is dynamic where its flow misses the camera-induced flow by more than
        this many times the static residual noise (robust sigma of the pair, at least 0.3 px)
        and its region holds confident pixels above twice as many.
    max_pair_offset: use the flow stage's pairs up to this many frames apart.
    temporal_window: frames (odd; 1 = none) over which scores are averaged and masks
        majority-voted after aligning them with the flow.
    min_area_fraction: connected dynamic regions smaller than this fraction of the image are
        dropped (0 keeps everything).
    keep_first_pass: keep the first pass's dynamic pixels that the residual cannot clearly
        call static (no depth, no pose, unreliable flow); false = the residual decides alone.
    dilate_px: grow every dynamic region by this many pixels at the end.
    work_max_side: score and segment at this longer image side; 0 = full resolution.
    """

    threshold: float = 2.0
    max_pair_offset: int = 4
    temporal_window: int = 3
    min_area_fraction: float = 0.002
    keep_first_pass: bool = True
    dilate_px: int = 0
    work_max_side: int = 480

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot work."""
        if not self.threshold > 0:
            raise ParameterError(f"masks_refine.threshold={self.threshold} must be > 0",
                                 "typical values are 2..5 (noise sigmas); raise it if static parts are marked")
        if self.max_pair_offset < 1:
            raise ParameterError(f"masks_refine.max_pair_offset={self.max_pair_offset} must be >= 1",
                                 "use e.g. 4 (consecutive pairs only: 1)")
        if self.temporal_window < 1 or self.temporal_window % 2 == 0:
            raise ParameterError(f"masks_refine.temporal_window={self.temporal_window} must be an odd number >= 1",
                                 "use 1 (no temporal vote), 3 or 5")
        if not 0 <= self.min_area_fraction < 0.5:
            raise ParameterError(f"masks_refine.min_area_fraction={self.min_area_fraction} must be in [0, 0.5)",
                                 "use e.g. 0.002 (0.2 % of the image) or 0 to keep every region")
        if not 0 <= self.dilate_px <= 256:
            raise ParameterError(f"masks_refine.dilate_px={self.dilate_px} must be in 0..256", "use e.g. 0 or 4")
        if self.work_max_side != 0 and self.work_max_side < 64:
            raise ParameterError(f"masks_refine.work_max_side={self.work_max_side} is too small",
                                 "use 0 (full resolution) or at least 64, e.g. 480")


@njit(cache=True, nogil=True, error_model="numpy")
def _camera_flow_kernel(depth: np.ndarray, inv_K_i: np.ndarray, relative: np.ndarray, K_j: np.ndarray,
                        flow: np.ndarray, defined: np.ndarray) -> None:
    """Per pixel of ``depth (H, W)``: the ray through the pixel centre (``inv_K_i`` 3x3), scaled
    by the depth, moved by ``relative`` (4x4, camera i -> camera j) and projected with ``K_j``;
    ``flow (H, W, 2) float32`` is the target minus the pixel centre where ``defined (H, W)``
    (positive finite depth, in front of camera j), else 0. All in float64."""
    height, width = depth.shape
    for row in range(height):
        y = row + 0.5
        for col in range(width):
            x = col + 0.5
            z_i = np.float64(depth[row, col])
            flow[row, col, 0] = 0.0
            flow[row, col, 1] = 0.0
            defined[row, col] = False
            if not (z_i > 0.0 and np.isfinite(z_i)):
                continue
            px = (inv_K_i[0, 0] * x + inv_K_i[0, 1] * y + inv_K_i[0, 2]) * z_i
            py = (inv_K_i[1, 0] * x + inv_K_i[1, 1] * y + inv_K_i[1, 2]) * z_i
            pz = (inv_K_i[2, 0] * x + inv_K_i[2, 1] * y + inv_K_i[2, 2]) * z_i
            mx = relative[0, 0] * px + relative[0, 1] * py + relative[0, 2] * pz + relative[0, 3]
            my = relative[1, 0] * px + relative[1, 1] * py + relative[1, 2] * pz + relative[1, 3]
            mz = relative[2, 0] * px + relative[2, 1] * py + relative[2, 2] * pz + relative[2, 3]
            if not mz > 1e-9:
                continue
            qx = K_j[0, 0] * mx + K_j[0, 1] * my + K_j[0, 2] * mz
            qy = K_j[1, 0] * mx + K_j[1, 1] * my + K_j[1, 2] * mz
            qz = K_j[2, 0] * mx + K_j[2, 1] * my + K_j[2, 2] * mz
            flow[row, col, 0] = qx / qz - x
            flow[row, col, 1] = qy / qz - y
            defined[row, col] = True


def camera_flow(depth: np.ndarray, K_i: np.ndarray, w2c_i: np.ndarray, K_j: np.ndarray,
                w2c_j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flow ``(H, W, 2) float32`` (pixels) a static scene with z-depth ``depth (H, W)`` in frame i
    induces from frame i to frame j (OpenCV cameras ``K`` 3x3, ``w2c`` 4x4; pixel ``[r, c]`` at
    ``(c + 0.5, r + 0.5)``), and where it is defined ``(H, W) bool`` (depth > 0, in front of
    camera j). Compiled, GIL-free."""
    height, width = depth.shape
    flow = np.empty((height, width, 2), np.float32)
    defined = np.empty((height, width), bool)
    relative = np.asarray(w2c_j, np.float64) @ np.linalg.inv(np.asarray(w2c_i, np.float64))
    _camera_flow_kernel(np.ascontiguousarray(depth), np.linalg.inv(np.asarray(K_i, np.float64)), relative,
                        np.ascontiguousarray(K_j, np.float64), flow, defined)
    return flow, defined


def resize_depth(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """Depth map ``(h0, w0)`` resized to ``(height, width)`` with nearest neighbour (no mixing
    across depth edges; 0 stays invalid)."""
    if depth.shape == (height, width):
        return depth
    return cv2.resize(depth, (width, height), interpolation=cv2.INTER_NEAREST)


def pair_residuals(flows: StageFlow, i: int, j: int, depth: np.ndarray, K: np.ndarray, w2c: np.ndarray,
                   posed: np.ndarray, static: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """Both directions of the flow pair (i, j): ``[(i, valid (h, w) bool, normalised residual
    (h, w) float32 or None), (j, ...)]``; the residual ``|flow - camera-induced flow|`` divided
    by the robust noise of the direction's static pixels, NaN where it is undefined (no depth,
    behind the camera, inconsistent flow), None when either frame has no pose (see
    :func:`residual_scores` for the arrays)."""
    pair = flows.read(i, j)
    result = []
    for a, b, flow, valid in ((i, j, pair["forward"], pair["valid_forward"]),
                              (j, i, pair["backward"], pair["valid_backward"])):
        if not (posed[a] and posed[b]):
            result.append((a, valid, None))
            continue
        predicted, defined = camera_flow(depth[a], K[a], w2c[a], K[b], w2c[b])
        residual = np.linalg.norm(flow - predicted, axis=-1)
        usable = valid & defined
        reference = residual[usable & static[a]]
        sigma = max(_NOISE_FLOOR_PX, 1.4826 * float(np.median(reference))) if reference.size else _NOISE_FLOOR_PX
        result.append((a, valid, np.where(usable, residual / sigma, np.nan).astype(np.float32)))
    return result


def residual_scores(flows: StageFlow, pairs: list[tuple[int, int]], depth: np.ndarray, K: np.ndarray,
                    w2c: np.ndarray, posed: np.ndarray, static: np.ndarray,
                    pool: ThreadPoolExecutor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame residual score ``(T, h, w) float32`` (largest noise-normalised residual over
    the pairs, 0 where none is defined), where it is defined ``(T, h, w) bool``, and the share
    of pairs with forward-backward consistent flow ``(T, h, w) float32``. ``depth (T, h, w)``
    and ``K (T, 3, 3)`` are at the working resolution; ``posed (T,)`` frames with a finite
    pose; ``static (T, h, w) bool`` the first pass's static pixels (for the noise estimate).
    The pairs run on ``pool``; their residuals are gathered in pair order."""
    shape = depth.shape
    scores = np.full(shape, -np.inf, np.float32)
    valid_count = np.zeros(shape, np.float32)
    pair_count = np.zeros(shape[0], np.float32)
    residuals = prefetch(lambda ij: pair_residuals(flows, *ij, depth, K, w2c, posed, static), pairs, pool,
                         _IN_FLIGHT)
    for directions in tqdm(residuals, total=len(pairs), desc="masks_refine: residual flow", unit="pair",
                           leave=False):
        for a, valid, normalised in directions:
            valid_count[a] += valid
            pair_count[a] += 1
            if normalised is not None:
                np.fmax(scores[a], normalised, out=scores[a])
    valid_share = valid_count / np.maximum(pair_count, 1)[:, None, None]
    defined_any = np.isfinite(scores)
    return np.where(defined_any, scores, 0.0).astype(np.float32), defined_any, valid_share


def working_cameras(K: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Intrinsics ``(T, 3, 3)`` of images resized by ``(scale_x, scale_y)`` (pixel edges map to edges)."""
    scaled = K.copy()
    scaled[:, 0] *= scale_x
    scaled[:, 1] *= scale_y
    return scaled


def copy_first_pass(first_dir: Path, out_dir: Path) -> None:
    """The first pass's masks, overlays and labels copied into ``out_dir`` unchanged."""
    for name in (MASKS_DIR, masks_stage.VIS_DIR):
        if (first_dir / name).is_dir():
            shutil.copytree(first_dir / name, out_dir / name, dirs_exist_ok=True)
    shutil.copy2(first_dir / LABELS_FILE, out_dir / LABELS_FILE)


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Refine ``inputs["masks"]`` (first pass) with the residual of ``inputs["flow"]`` against
    the flow induced by ``inputs["cameras"]`` and ``inputs["align"]`` (aligned z-depth) over
    ``inputs["frames"]``. Writes the masks stage's outputs into ``out_dir`` and returns figures:
    ``backend``, ``num_frames``, ``dynamic_fraction_mean``, ``fraction_dynamic``,
    ``first_pass_fraction_mean``, ``added_fraction``/``removed_fraction`` (pixels the residual
    added to / removed from the first pass), ``residual_defined_fraction``."""
    params.validate()
    out_dir = Path(out_dir)
    require_inputs(inputs, ("frames", "flow", "masks", "cameras", "align"), "refined masks")
    first_dir = Path(inputs["masks"])
    labels = read_labels(first_dir)
    backend = read_masks_meta(first_dir).get("backend", "")
    first = read_masks(first_dir)
    if backend != "motion":
        copy_first_pass(first_dir, out_dir)
        return {**masks_stage.figures(first, {k: v for k, v in labels.items() if k}, backend),
                "notes": [f"the first pass used the {backend} backend (given or prompted objects): "
                          "its masks are passed through unchanged"]}

    meta = frames_stage.read_frames_meta(Path(inputs["frames"]))
    num_frames, height, width = int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
    frames = frames_stage.load_frames(Path(inputs["frames"]))
    K, w2c, _ = read_cameras(inputs["cameras"])
    depth_full = read_aligned_depth(Path(inputs["align"]))
    if len(K) != num_frames or len(depth_full) != num_frames or len(first) != num_frames:
        raise InputError(f"the cameras ({len(K)}), aligned depth ({len(depth_full)}) and first-pass masks "
                         f"({len(first)}) do not all cover the {num_frames} frames",
                         "rerun the pipeline so every stage reads the same frames")
    scale = masks_stage.work_scale(height, width, params.work_max_side)
    flows = StageFlow(Path(inputs["flow"]), scale)
    require_consecutive_pairs(flows, num_frames)
    pairs = masks_stage.motion_pairs(flows, params.max_pair_offset)
    work_height, work_width = flows.pair(0, 1)["forward"].shape[:2]
    radius = morph_radius(work_height, work_width)
    min_area = int(round(params.min_area_fraction * work_height * work_width))
    depth = np.stack([resize_depth(d, work_height, work_width) for d in depth_full])
    K_work = working_cameras(K, work_width / width, work_height / height)
    posed = np.all(np.isfinite(w2c.reshape(num_frames, -1)), axis=1)
    first_work = np.stack([masks_stage.resize_labels(mask, work_height, work_width) > 0 for mask in first])
    static = ~np.stack([dilate_labels(mask.astype(np.uint8), 3 * radius) > 0 for mask in first_work])

    lab = masks_stage.lab_frames(frames, (work_width, work_height))
    names = {masks_stage.DYNAMIC_LABEL: "dynamic"}
    with worker_pool(worker_count()) as pool:
        raw, defined, valid_share = residual_scores(flows, pairs, depth, K_work, w2c, posed, static, pool)
        scores = masks_stage.temporal_mean(raw, flows, params.temporal_window, pool)
        confidence = masks_stage.flow_texture(lab, radius, pool) * valid_share
        dynamic, seeds = masks_stage.segment_frames(scores, confidence, flows, params.threshold,
                                                    params.temporal_window, radius, min_area, pool, _BOUNDARY_FRACTION)
        if params.keep_first_pass:
            explained = defined & (confidence >= 0.5) & (scores < params.threshold)
            dynamic |= first_work & ~explained
        dynamic[~posed] = first_work[~posed]
        dynamic = masks_stage.finish_masks(dynamic, seeds, confidence, lab, flows, params.temporal_window, radius,
                                           min_area, pool)
        refined = masks_stage.to_frame_size(dynamic, height, width)
        result_masks = np.stack([dilate_labels(mask.astype(np.uint8) * masks_stage.DYNAMIC_LABEL,
                                               params.dilate_px) for mask in refined])
        masks_stage.write_outputs(out_dir, result_masks, frames, names, BACKEND, pool)
        masks_stage.write_cues(out_dir / masks_stage.VIS_DIR, scores, confidence, params.threshold, (width, height),
                               pool)
    first_dynamic, now_dynamic = first > 0, result_masks > 0
    result = masks_stage.figures(result_masks, names, BACKEND)
    result.update({"first_pass_fraction_mean": round(float(first_dynamic.mean()), 6),
                   "added_fraction": round(float((now_dynamic & ~first_dynamic).mean()), 6),
                   "removed_fraction": round(float((first_dynamic & ~now_dynamic).mean()), 6),
                   "residual_defined_fraction": round(float(defined.mean()), 6),
                   "seed_fraction_mean": round(float(seeds.mean()), 6)})
    notes = []
    if not posed.all():
        notes.append(f"{int((~posed).sum())} frame(s) without a camera pose keep their first-pass masks")
    if result["residual_defined_fraction"] < 0.5:
        notes.append(f"the residual flow is defined on only {result['residual_defined_fraction']:.0%} of the pixels "
                     "(missing depth or poses): most of the masks come from the first pass")
    if notes:
        result["notes"] = notes
    logger.info("masks_refine: %.1f %% dynamic on average (first pass %.1f %%)", 100 * result["dynamic_fraction_mean"],
                100 * result["first_pass_fraction_mean"])
    return result
