"""Masks stage: per-frame label maps of what moves (0 = static background, k > 0 = dynamic label k).

Backends (``Params.backend``):

- ``motion`` (weights-free, the CPU default; needs the flow stage): a pixel is dynamic where
  its observed flow disagrees with the flow a rigid scene seen by a moving camera can produce.
  Per flow pair (up to ``max_pair_offset`` frames apart) a fundamental matrix is fitted
  robustly (OpenCV USAC MAGSAC) to a subsample of forward-backward-consistent correspondences
  and every pixel is scored by its Sampson distance (pixels) to that epipolar geometry,
  divided by a robust estimate of the static residual noise (optionally, for cameras turning
  in place, the homography transfer error where a homography explains the pair as well as
  F). A frame's score is the maximum over its pairs, averaged over ``temporal_window``
  flow-aligned frames. Flow on flat surfaces is interpolated noise, so each pixel also gets a
  flow confidence: texture (structure tensor, :func:`texture_confidence`) times the share of
  its pairs that pass the forward-backward check. Seeds are confident pixels above twice
  ``threshold`` that are seeds in the flow-aligned neighbouring frames too; a region is the
  connected set above ``threshold`` (through pixels of some confidence) holding enough seeds,
  cut at 25 % of its peak seed score (low enough to keep the slower parts of an articulated
  body, such as legs below a fast torso; the halo of the flow's smooth ramp across a motion
  boundary is trimmed afterwards by the vote and the snapping) and cleaned. The fits are then
  repeated without the pixels found (a moving object can drag a fit that is nearly
  degenerate, as for short baselines) and the
  segmentation redone; then a flow-aligned majority vote over the window, a colour-aware vote
  of the confident pixels for the unreliable ones (:func:`confident_vote`), and GrabCut in a
  band around each boundary (:func:`snap_boundary`) that pulls the halo of dragged flow on
  flat surroundings back onto the object's outline. Work happens at ``work_max_side``. No
  cameras or depth are needed, so COLMAP can ignore what moves; :mod:`mono4d.stages.masks_refine`
  redoes the masks with them. One label: 1 = "dynamic".
- ``file`` (needs only frames for a folder of masks; needs flow for a single first-frame mask):
  user masks, one image per frame (in name order; or one per source frame, picked through the
  frames stage's ``source_indices``), resized with nearest neighbour, or ONE mask of the first
  frame propagated through the video along the flow. For a dataset's frames (a Panoptic folder)
  the folder may mirror the dataset's image folder (``seg/<cam>/<t>.png`` beside
  ``ims/<cam>/<t>.jpg``); frames with no mask there (held-out cameras) are all static.
- ``sam`` / ``sam2`` (need frames; see :mod:`mono4d.stages.masks_sam`): prompted segment-anything
  with flow-guided re-prompting, or the SAM2 video model of transformers.

Outputs (masks and labels in the layout of :func:`mono4d.data.artifacts.write_masks`): ``masks/000000.png``
(uint8 label map per frame), ``labels.json`` =
``{"labels": {"0": "background", "1": ..., ...}, "backend": ...}``, ``vis/000000.png``
(labels drawn over the frame) and, for ``motion``, ``vis/cues/score_000000.png`` and
``vis/cues/confidence_000000.png`` (the score and flow confidence the decision rests on).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numba import njit
from tqdm import tqdm

from mono4d.data.artifacts import write_masks
from mono4d.data.errors import InputError, ParameterError
from mono4d.data.images import write_gray, write_rgb
from mono4d.data.visualize import colorize, overlay_labels
from mono4d.stages import frames as frames_stage
from mono4d.stages.flow import MAX_WORKERS, prefetch, worker_count
from mono4d.stages.masks_common import (StageFlow, clean_binary, clean_labels, dilate_labels, disk, morph_radius,
                                        pixel_grid, require_consecutive_pairs, warp_backward, worker_pool)

logger = logging.getLogger(__name__)

BACKENDS = ("motion", "file", "sam", "sam2")
SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
VIS_DIR = "vis"
CUES_DIR = "cues"  # under vis/: score_000000.png, confidence_000000.png (motion backend)
# Residual scores are drawn from 0 up to this many times the threshold.
CUE_SCORE_RANGE = 4.0
DYNAMIC_LABEL = 1
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Grey values above this in a user mask mean a binary 0/255 (or anti-aliased) mask, not label ids.
_MAX_LABEL_VALUE = 32
# motion backend: robust fits (inlier threshold in pixels, iterations, fewest correspondences).
_FIT_THRESHOLD_PX = 0.75
_FIT_ITERATIONS = 5000
_MIN_FIT_POINTS = 16
# A homography explains the pair when it keeps this share of the fundamental matrix's inliers.
_HOMOGRAPHY_INLIER_SHARE = 0.9
# Floor of the static residual noise (pixels): very accurate flow must not make noise count.
_NOISE_FLOOR_PX = 0.3
# A dynamic region ends where its score falls below this fraction of its peak (percentile). At
# 0.4 the slower limbs of a walking figure fell off its torso's region (walker IoU 0.59 -> 0.69,
# CI scene 0.64 -> 0.70 at 0.25, with no new background blobs on cat.mp4 or kitten.mp4).
_BOUNDARY_FRACTION = 0.25
_PEAK_PERCENTILE = 90
# Rounds of refitting the two-view geometry without the dynamic pixels found so far.
_REFIT_ROUNDS = 1
# Flow reliability: texture (square root of the structure tensor's smaller eigenvalue, grey levels
# per pixel) at which the texture confidence is one half; window radius in morphology radii.
_TEXTURE_HALF = 1.5
_TEXTURE_WINDOW = 2
# A seed of a dynamic region: score above twice the threshold where the flow is this reliable.
_SEED_CONFIDENCE = 0.5
# A region grows only through pixels whose flow is at least this reliable (unreliable pixels are
# decided afterwards by the colour-aware vote).
_GROW_CONFIDENCE = 0.2
# A region is kept only with at least this many seed pixels (fraction of its minimum area, >= 3).
_SEED_AREA_SHARE = 0.2
# Colour-aware vote for unreliable pixels: window radius (morphology radii, sampled every
# other pixel), colour sigma (8-bit Lab units), and the least confident weight (a pixel count)
# a vote needs; with less, the unreliable pixel is static.
_VOTE_RADIUS = 4
_VOTE_COLOUR_SIGMA = 10.0
_VOTE_MIN_WEIGHT = 2.0
# Boundary snapping: a mask's boundary may move this many morphology radii (at least 2 pixels)
# to where the colours of the object and its surroundings part; GrabCut iterations.
_SNAP_BAND = 5
_SNAP_ITERATIONS = 3
# Per-pair work items computed ahead on the worker pool (bounded memory).
_IN_FLIGHT = 2 * MAX_WORKERS


@dataclass(frozen=True)
class Params:
    """Parameters of the masks stage.

    backend: "motion" (flow vs. camera-induced flow, weights-free), "file" (user masks),
        "sam" (segment-anything with prompts) or "sam2" (transformers SAM2 video with prompts).
    threshold: motion: dynamic regions are where a pixel's epipolar/homography residual exceeds
        this many times the static residual noise (robust sigma, at least 0.3 px) and that hold
        seeds above twice as many where the flow is reliable; lower finds slower motion and
        more false alarms.
    min_area_fraction: connected dynamic regions smaller than this fraction of the image are
        dropped (all backends; 0 keeps everything).
    temporal_window: motion: frames (odd; 1 = none) over which scores are averaged and masks
        majority-voted after aligning them with the flow.
    dilate_px: grow every dynamic region by this many pixels at the end (a safety margin for
        COLMAP feature masking).
    homography_cue: motion: where a homography explains the static scene about as well as the
        epipolar geometry, score by the homography transfer error instead. Helps for a camera
        turning in place (no translation: F is undetermined); on scenes with a dominant plane
        it marks static things standing off the plane, hence off by default.
    fit_samples: motion: at most this many flow correspondences per pair for the robust fits.
    max_pair_offset: motion: use the flow stage's pairs up to this many frames apart (longer
        baselines show slow motion better; 1 = consecutive pairs only).
    work_max_side: motion: score and segment at this longer image side (flows area-resized),
        then resize the masks to the frames; 0 = full resolution (slower).
    prompts: sam/sam2: "FRAME:x,y[,LABEL];FRAME:neg:x,y[,LABEL];FRAME:box:x0,y0,x1,y1[,LABEL]"
        (pixels of the frames stage images; LABEL a name like "hand" or an id; default
        "object") or the path of a JSON prompts file (see :mod:`mono4d.stages.masks_sam`).
    sam_checkpoint: sam: path of the segment-anything checkpoint (.pth).
    sam_model_type: sam: "vit_b", "vit_l" or "vit_h" (must match the checkpoint).
    sam2_model: sam2: Hugging Face id or local folder of a transformers SAM2 video model.
    mask_path: file: a folder of masks (one image per frame) or one mask image of the first
        frame (propagated with the flow).
    device: sam/sam2: "auto" (CUDA when available), "cpu" or "cuda[:N]".
    """

    backend: str = "motion"
    threshold: float = 2.0
    min_area_fraction: float = 0.002
    temporal_window: int = 3
    dilate_px: int = 0
    homography_cue: bool = False
    fit_samples: int = 4000
    max_pair_offset: int = 8
    work_max_side: int = 480
    prompts: str = ""
    sam_checkpoint: str = ""
    sam_model_type: str = "vit_b"
    sam2_model: str = "facebook/sam2.1-hiera-tiny"
    mask_path: str = ""
    device: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot work."""
        if self.backend not in BACKENDS:
            raise ParameterError(f"masks.backend={self.backend!r} is not one of {', '.join(BACKENDS)}",
                                 "use --set masks.backend=motion (weights-free) or file/sam/sam2")
        if not self.threshold > 0:
            raise ParameterError(f"masks.threshold={self.threshold} must be > 0",
                                 "typical values are 1..4 (noise sigmas); raise it if static parts are marked")
        if not 0 <= self.min_area_fraction < 0.5:
            raise ParameterError(f"masks.min_area_fraction={self.min_area_fraction} must be in [0, 0.5)",
                                 "use e.g. 0.002 (0.2 % of the image) or 0 to keep every region")
        if self.temporal_window < 1 or self.temporal_window % 2 == 0:
            raise ParameterError(f"masks.temporal_window={self.temporal_window} must be an odd number >= 1",
                                 "use 1 (no temporal vote), 3 or 5")
        if not 0 <= self.dilate_px <= 256:
            raise ParameterError(f"masks.dilate_px={self.dilate_px} must be in 0..256", "use e.g. 0 or 4")
        if self.max_pair_offset < 1:
            raise ParameterError(f"masks.max_pair_offset={self.max_pair_offset} must be >= 1",
                                 "use e.g. 8 (consecutive pairs only: 1)")
        if self.work_max_side != 0 and self.work_max_side < 64:
            raise ParameterError(f"masks.work_max_side={self.work_max_side} is too small",
                                 "use 0 (full resolution) or at least 64, e.g. 480")
        if self.fit_samples < 100:
            raise ParameterError(f"masks.fit_samples={self.fit_samples} is too few for a robust fit",
                                 "use at least 100, e.g. 4000")
        if self.backend == "file" and not self.mask_path:
            raise ParameterError("masks.backend=file needs masks.mask_path",
                                 "--set masks.mask_path=DIR (one mask per frame) or FILE.png (first frame only)")
        if self.backend in ("sam", "sam2") and not self.prompts:
            raise ParameterError(f"masks.backend={self.backend} needs prompts",
                                 "--set masks.prompts='0:320,240,object' (frame:x,y,label) or a prompts JSON "
                                 "file, or use --set masks.backend=motion")
        if self.backend == "sam":
            if self.sam_model_type not in SAM_MODEL_TYPES:
                raise ParameterError(f"masks.sam_model_type={self.sam_model_type!r} is not one of "
                                     f"{', '.join(SAM_MODEL_TYPES)}", "use the type of your checkpoint, e.g. vit_b")
            if not self.sam_checkpoint:
                raise ParameterError("masks.backend=sam needs masks.sam_checkpoint (a segment-anything .pth)",
                                     "--set masks.sam_checkpoint=/path/sam_vit_b_01ec64.pth, or use "
                                     "--set masks.backend=sam2 or motion")
        if self.backend == "sam2" and not self.sam2_model:
            raise ParameterError("masks.backend=sam2 needs masks.sam2_model",
                                 "--set masks.sam2_model=facebook/sam2.1-hiera-tiny (or a local folder)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ParameterError(f"masks.device={self.device!r} is not auto, cpu, cuda or cuda:N",
                                 "use --set masks.device=auto")

    def needs_flow(self) -> bool:
        """Whether this configuration reads the flow stage (motion, or a single file mask)."""
        if self.backend == "motion":
            return True
        return self.backend == "file" and Path(self.mask_path).suffix.lower() in MASK_SUFFIXES


def carry_pair(carried: dict[int, np.ndarray], valid: dict[int, np.ndarray], flows: StageFlow, t: int,
               step: int) -> dict[int, tuple[int, np.ndarray, np.ndarray]]:
    """One step of :func:`temporal_mean` through the consecutive pair (t, t+1): the map
    ``carried[1][t+1]`` (frame t + step, already brought into frame t+1) warped into frame t
    along flow(t, t+1) and ``carried[-1][t]`` into frame t+1 along flow(t+1, t), with where the
    warped maps are valid (``valid[d]`` carried along, and inside the image). Returns ``{d:
    (frame, warped, valid)}`` for the directions whose end frame lies in the clip."""
    num_frames = len(carried[1])
    pair = flows.read(t, t + 1)
    moves = {1: (t, t + 1, pair["forward"]), -1: (t + 1, t, pair["backward"])}
    result = {}
    for d, (frame, source, step_flow) in moves.items():
        if not 0 <= frame + step * d < num_frames:
            continue
        warped, inside = warp_backward(np.dstack([carried[d][source], valid[d][source]]), step_flow)
        result[d] = (frame, warped[..., 0], (inside & (warped[..., 1] > 0.5)).astype(np.float32))
    return result


def temporal_mean(values: np.ndarray, flows: StageFlow, window: int, pool: ThreadPoolExecutor) -> np.ndarray:
    """Average of each map of ``values (T, H, W)`` with its ``window // 2`` neighbours on
    either side, warped into the frame along the consecutive flows (``flow(a, b)`` maps a to b,
    bilinear sampling, steps chained; each step's pairs on ``pool``, summed in frame order).
    A neighbour whose warp leaves the image at a pixel does not count there. Returns ``(T, H,
    W) float32``."""
    radius = window // 2
    values = values.astype(np.float32)
    if radius == 0 or len(values) < 2:
        return values.copy()
    num_frames = len(values)
    total = values.copy()
    counts = np.ones(values.shape, np.float32)
    # carried[d][t]: the map of frame t + step * d brought into frame t, and where it is valid
    carried = {d: values for d in (-1, 1)}
    valid = {d: np.ones(values.shape, np.float32) for d in (-1, 1)}
    for step in range(1, radius + 1):
        last = step == radius
        if not last:
            next_carried = {d: np.zeros_like(values) for d in (-1, 1)}
            next_valid = {d: np.zeros_like(values) for d in (-1, 1)}
        moved = prefetch(lambda t: carry_pair(carried, valid, flows, t, step), range(num_frames - 1), pool,
                         _IN_FLIGHT)
        for warps in moved:  # pair t brings frame t+1's direction -1 and frame t's direction +1
            for d, (frame, warped, kept) in sorted(warps.items()):
                total[frame] += warped * kept
                counts[frame] += kept
                if not last:
                    next_carried[d][frame], next_valid[d][frame] = warped, kept
        if not last:
            carried, valid = next_carried, next_valid
    return total / counts


def temporal_majority(masks: np.ndarray, flows: StageFlow, window: int, pool: ThreadPoolExecutor) -> np.ndarray:
    """Majority vote of each binary mask ``(T, H, W) bool`` with its flow-aligned neighbours
    (see :func:`temporal_mean`); a tie (at the clip's ends) counts as dynamic."""
    return temporal_mean(masks, flows, window, pool) >= 0.5


# ---------------------------------------------------------------------------------------------
# motion backend


@njit(cache=True, nogil=True, error_model="numpy")
def _sampson_kernel(f: np.ndarray, points_a: np.ndarray, points_b: np.ndarray, out: np.ndarray) -> None:
    """Sampson distances ``out (N,) float32`` of ``points_a (N, 2)`` -> ``points_b (N, 2)`` for
    the float64 fundamental matrix ``f``, computed in float64."""
    for n in range(out.shape[0]):
        xa, ya = np.float64(points_a[n, 0]), np.float64(points_a[n, 1])
        xb, yb = np.float64(points_b[n, 0]), np.float64(points_b[n, 1])
        # F a: epipolar line of a in image b; F^T b: epipolar line of b in image a
        lb0 = f[0, 0] * xa + f[0, 1] * ya + f[0, 2]
        lb1 = f[1, 0] * xa + f[1, 1] * ya + f[1, 2]
        lb2 = f[2, 0] * xa + f[2, 1] * ya + f[2, 2]
        la0 = f[0, 0] * xb + f[1, 0] * yb + f[2, 0]
        la1 = f[0, 1] * xb + f[1, 1] * yb + f[2, 1]
        algebraic = xb * lb0 + yb * lb1 + lb2
        norm = lb0 * lb0 + lb1 * lb1 + la0 * la0 + la1 * la1
        out[n] = abs(algebraic) / np.sqrt(max(norm, 1e-24))


def sampson_distance(fundamental: np.ndarray, points_a: np.ndarray, points_b: np.ndarray) -> np.ndarray:
    """First-order geometric distance (pixels) ``(...) float32`` of correspondences ``points_a
    (..., 2)`` -> ``points_b (..., 2)`` to the epipolar geometry ``points_b^T F points_a = 0``
    (compiled, GIL-free)."""
    shape = points_a.shape[:-1]
    out = np.empty(int(np.prod(shape)), np.float32)
    _sampson_kernel(np.ascontiguousarray(fundamental, np.float64), np.ascontiguousarray(points_a).reshape(-1, 2),
                    np.ascontiguousarray(points_b).reshape(-1, 2), out)
    return out.reshape(shape)


def transfer_error(homography: np.ndarray, points_a: np.ndarray, points_b: np.ndarray) -> np.ndarray:
    """Distance (pixels) between ``points_b (..., 2)`` and ``points_a`` mapped by the 3x3 homography."""
    mapped = cv2.perspectiveTransform(points_a.reshape(-1, 1, 2).astype(np.float64), homography)
    return np.linalg.norm(mapped.reshape(points_a.shape) - points_b, axis=-1).astype(np.float32)


@dataclass
class PairGeometry:
    """Robust two-view fit of one flow pair (i, j): ``fundamental`` (``x_j^T F x_i = 0``, None
    when the fit failed), ``homography`` i -> j (None when not fitted or failed) and whether the
    homography explains the static scene as well as F (then its transfer error is the residual)."""

    fundamental: np.ndarray | None
    homography: np.ndarray | None
    use_homography: bool


def fit_pair_geometry(forward: np.ndarray, usable: np.ndarray, num_samples: int, homography_cue: bool,
                      rng: np.random.Generator) -> PairGeometry:
    """Fit F (and H) with USAC MAGSAC to at most ``num_samples`` correspondences ``x -> x +
    forward(x)`` drawn from the ``usable (H, W)`` pixels of ``forward (H, W, 2)`` (i -> j)."""
    height, width = usable.shape
    grid = pixel_grid(height, width)
    target = grid + forward
    inside = (target[..., 0] >= 0) & (target[..., 0] <= width - 1) & (target[..., 1] >= 0) & (target[..., 1] <= height - 1)
    candidates = np.flatnonzero(usable & inside)
    if candidates.size < _MIN_FIT_POINTS:
        return PairGeometry(None, None, False)
    chosen = rng.choice(candidates, size=min(num_samples, candidates.size), replace=False)
    points_a = grid.reshape(-1, 2)[chosen].astype(np.float64)
    points_b = target.reshape(-1, 2)[chosen].astype(np.float64)
    try:  # OpenCV's USAC raises instead of returning None on some degenerate samples
        fundamental, f_inliers = cv2.findFundamentalMat(points_a, points_b, cv2.USAC_MAGSAC, _FIT_THRESHOLD_PX,
                                                        0.999, _FIT_ITERATIONS)
    except cv2.error:
        fundamental, f_inliers = None, None
    if fundamental is None or fundamental.shape != (3, 3):
        fundamental, f_inliers = None, None
    homography, h_inliers = None, None
    if homography_cue or fundamental is None:
        try:
            homography, h_inliers = cv2.findHomography(points_a, points_b, cv2.USAC_MAGSAC, _FIT_THRESHOLD_PX,
                                                       maxIters=_FIT_ITERATIONS, confidence=0.999)
        except cv2.error:
            homography, h_inliers = None, None
    f_count = int(f_inliers.sum()) if f_inliers is not None else 0
    h_count = int(h_inliers.sum()) if homography is not None else 0
    use_homography = homography is not None and h_count >= _HOMOGRAPHY_INLIER_SHARE * f_count
    return PairGeometry(fundamental, homography, use_homography)


def geometric_residual(geometry: PairGeometry, flow: np.ndarray, from_i: bool) -> np.ndarray:
    """Residual (pixels) of every pixel's flow against the pair geometry: ``flow (H, W, 2)`` is
    the forward field i -> j when ``from_i`` and the backward field j -> i otherwise. NaN when
    the pair has no geometry."""
    height, width = flow.shape[:2]
    grid = pixel_grid(height, width)
    points_i, points_j = (grid, grid + flow) if from_i else (grid + flow, grid)
    if geometry.use_homography:
        return transfer_error(geometry.homography, points_i, points_j)
    if geometry.fundamental is None:
        return np.full((height, width), np.nan, np.float32)
    return sampson_distance(geometry.fundamental, points_i, points_j)


def noise_sigma(residual: np.ndarray, static: np.ndarray) -> float:
    """Robust standard deviation (1.4826 x median absolute value, pixels) of the residuals at
    the ``static`` pixels, at least the noise floor."""
    values = residual[static & np.isfinite(residual)]
    if values.size == 0:
        return _NOISE_FLOOR_PX
    return max(_NOISE_FLOOR_PX, 1.4826 * float(np.median(np.abs(values))))


def motion_pairs(flows: StageFlow, max_offset: int) -> list[tuple[int, int]]:
    """The flow stage's pairs (i, j), i < j, at most ``max_offset`` frames apart."""
    return sorted({(min(i, j), max(i, j)) for i, j in flows.pairs if 0 < abs(j - i) <= max_offset})


def pair_residuals(flows: StageFlow, i: int, j: int, params: Params,
                   dynamic: np.ndarray | None) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Noise-normalised residuals of the flow pair (i, j) against its robust two-view fit, for
    both frames: ``[(i, residual (H, W) float32, valid (H, W) bool), (j, ...)]`` (NaN where
    there is no geometry). The fit's random sample is seeded by the pair, so it does not depend
    on which pairs ran before (or on which thread)."""
    pair = flows.read(i, j)
    no_prior = np.zeros(pair["valid_forward"].shape, bool)
    priors = {frame: no_prior if dynamic is None else dynamic[frame] for frame in (i, j)}
    geometry = fit_pair_geometry(pair["forward"], pair["valid_forward"] & ~priors[i], params.fit_samples,
                                 params.homography_cue, np.random.default_rng((i, j)))
    result = []
    for frame, flow, valid, from_i in ((i, pair["forward"], pair["valid_forward"], True),
                                       (j, pair["backward"], pair["valid_backward"], False)):
        residual = geometric_residual(geometry, flow, from_i)
        result.append((frame, residual / noise_sigma(residual, valid & ~priors[frame]), valid))
    return result


def motion_scores(flows: StageFlow, pairs: list[tuple[int, int]], shape: tuple[int, int, int], params: Params,
                  pool: ThreadPoolExecutor, dynamic: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame motion score ``(T, H, W) float32``: the largest noise-normalised residual of a
    pixel's flow against the camera-induced two-view geometry, over the ``pairs`` the frame
    belongs to (0 where no pair has a valid flow), and the share of those pairs whose flow is
    forward-backward consistent at the pixel ``(T, H, W) float32`` in [0, 1]. ``dynamic (T, H,
    W) bool``, when given, is kept out of the fits and the noise estimates (a previous round's
    dilated masks). The pairs run on ``pool``; their residuals are gathered in pair order."""
    scores = np.full(shape, -np.inf, np.float32)
    valid_count = np.zeros(shape, np.float32)
    pair_count = np.zeros(shape[0], np.float32)
    residuals = prefetch(lambda ij: pair_residuals(flows, *ij, params, dynamic), pairs, pool, _IN_FLIGHT)
    for frames in tqdm(residuals, total=len(pairs), desc="masks: epipolar residuals", unit="pair", leave=False):
        for frame, normalised, valid in frames:
            np.maximum(scores[frame], normalised, out=scores[frame], where=valid & np.isfinite(normalised))
            valid_count[frame] += valid
            pair_count[frame] += 1
    valid_share = valid_count / np.maximum(pair_count, 1)[:, None, None]
    return np.where(np.isfinite(scores), scores, 0.0).astype(np.float32), valid_share


def texture_confidence(gray: np.ndarray, radius: int) -> np.ndarray:
    """How well optical flow is determined by the image ``gray (H, W)`` (0..255): ``s / (s +
    1.5)`` ``(H, W) float32`` in [0, 1) where ``s`` is the square root of the smaller eigenvalue
    of the structure tensor (grey levels per pixel) over a ``(2 radius + 1)^2`` window. Near 0
    on flat surfaces (flow there is interpolated, i.e. noise), near 1 on corners and texture;
    along a single straight edge it is low too (the aperture problem). The smallest value
    within ``radius`` is taken, so flat pixels bordering texture (where flow is dragged along
    by a moving textured object) are not made reliable by their neighbours' texture."""
    image = gray.astype(np.float32)
    gx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    size = (2 * radius + 1, 2 * radius + 1)
    jxx, jyy, jxy = (cv2.boxFilter(product, -1, size) for product in (gx * gx, gy * gy, gx * gy))
    smaller = 0.5 * (jxx + jyy - np.sqrt((jxx - jyy) ** 2 + 4.0 * jxy ** 2))
    strength = np.sqrt(np.maximum(smaller, 0.0))
    # the window's minimum: a flat pixel next to a textured one stays unreliable
    strength = cv2.erode(strength, disk(radius))
    return (strength / (strength + _TEXTURE_HALF)).astype(np.float32)


def snap_boundary(mask: np.ndarray, colours: np.ndarray, band: int, sure: np.ndarray | None = None) -> np.ndarray:
    """``mask (H, W) bool`` with its boundary moved, within ``band`` pixels of where it was, to
    where the colours ``colours (H, W, 3)`` (0..255) of the masked object and of its
    surroundings part: GrabCut (colour mixture models and a contrast-sensitive smoothness term)
    with the mask eroded by ``band`` and the ``sure (H, W) bool`` pixels of the mask (confident
    seeds: thin limbs have no eroded core) as sure object, beyond the mask dilated by ``band`` as sure
    background and the band in between to decide, in the box around it. Flow-based masks
    bleed over flat surroundings (flow there is dragged along by the object); this pulls them
    back onto the object's outline. Returns ``(H, W) bool``."""
    if not mask.any() or mask.all():
        return mask
    binary = mask.astype(np.uint8)
    inner = cv2.erode(binary, disk(band)) > 0
    outer = cv2.dilate(binary, disk(band)) > 0
    rows, cols = np.nonzero(outer)
    top, bottom = max(0, rows.min() - band), min(mask.shape[0], rows.max() + band + 1)
    left, right = max(0, cols.min() - band), min(mask.shape[1], cols.max() + band + 1)
    labels = np.full(mask.shape, cv2.GC_BGD, np.uint8)
    labels[outer] = cv2.GC_PR_BGD
    labels[mask] = cv2.GC_PR_FGD
    labels[inner] = cv2.GC_FGD
    if sure is not None:
        labels[(cv2.erode(sure.astype(np.uint8), disk(1)) > 0) & mask] = cv2.GC_FGD
    crop = labels[top:bottom, left:right].copy()
    if not (crop == cv2.GC_BGD).any() or not np.isin(crop, (cv2.GC_FGD, cv2.GC_PR_FGD)).any():
        return mask
    image = np.ascontiguousarray(np.clip(colours[top:bottom, left:right], 0, 255).astype(np.uint8))
    background_model, object_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's colour models start from k-means on OpenCV's global RNG: same masks every run
    try:
        cv2.grabCut(image, crop, None, background_model, object_model, _SNAP_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # too few pixels of one kind for its colour model: keep the mask as it is
        return mask
    snapped = mask.copy()
    snapped[top:bottom, left:right] = (crop == cv2.GC_FGD) | (crop == cv2.GC_PR_FGD)
    return snapped


def segment_scores(score: np.ndarray, seeds: np.ndarray, confidence: np.ndarray, threshold: float, radius: int,
                   min_area: int, boundary_fraction: float = _BOUNDARY_FRACTION) -> np.ndarray:
    """Dynamic pixels ``(H, W) bool`` of one score map: regions above ``threshold`` (through
    pixels of ``confidence`` >= 0.2 only, so a region cannot spread over a flat wall) that hold
    enough ``seeds (H, W) bool`` (confident pixels above twice the threshold; hysteresis), each
    cut at ``boundary_fraction`` of its peak seed score (at 25 %, parts that move slower than
    the region's fastest part stay in it), then cleaned."""
    weak = ((score > threshold) & (confidence >= _GROW_CONFIDENCE)).astype(np.uint8)
    count, components = cv2.connectedComponents(weak, connectivity=8)
    result = np.zeros(score.shape, bool)
    seed_counts = np.bincount(components[seeds], minlength=count)
    min_seeds = max(3, int(round(_SEED_AREA_SHARE * min_area)))
    for component in np.flatnonzero(seed_counts >= min_seeds):
        if component == 0:
            continue
        region = components == component
        peak = float(np.percentile(score[region & seeds], _PEAK_PERCENTILE))
        result |= region & (score >= boundary_fraction * peak)
    return clean_binary(result, radius, min_area)


def work_scale(height: int, width: int, max_side: int) -> float:
    """Factor that brings the longer side to at most ``max_side`` (0 = no limit; never > 1)."""
    return 1.0 if max_side <= 0 or max(height, width) <= max_side else max_side / max(height, width)


@dataclass
class MotionCues:
    """What the motion backend based its decision on, per frame at the working resolution:
    ``score (T, h, w)`` noise-normalised residual of the flow against the camera-induced
    motion (flow-aligned temporal mean), ``confidence (T, h, w)`` in [0, 1] flow reliability
    (texture x share of forward-backward consistent pairs), ``seeds (T, h, w) bool`` confident
    dynamic pixels confirmed by their flow-aligned neighbours."""

    score: np.ndarray
    confidence: np.ndarray
    seeds: np.ndarray


def lab_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(T, h, w, 3) float32`` 8-bit CIE Lab (L, a, b in 0..255; L is the lightness) of
    ``frames (T, H, W, 3)`` RGB, area-resized to ``size`` (w, h)."""
    return np.stack([cv2.cvtColor(cv2.resize(frame, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2LAB)
                     for frame in frames]).astype(np.float32)


@njit(cache=True, nogil=True, error_model="numpy")
def _vote_kernel(mask: np.ndarray, confidence: np.ndarray, lab: np.ndarray, offsets: np.ndarray,
                 inv_sigma2: np.float32, total: np.ndarray, dynamic: np.ndarray) -> None:
    """For every pixel of ``mask (H, W) bool``: ``total`` = sum over the ``offsets (K, 2)``
    (dy, dx) neighbours inside the image of ``confidence x exp(-|lab difference|^2 x
    inv_sigma2)`` and ``dynamic`` = the same sum over the masked neighbours (``(H, W) float32``)."""
    height, width = mask.shape
    zero = np.float32(0.0)
    for row in range(height):
        for col in range(width):
            weight_sum, dynamic_sum = zero, zero
            for k in range(offsets.shape[0]):
                r, c = row + offsets[k, 0], col + offsets[k, 1]
                if r < 0 or r >= height or c < 0 or c >= width:
                    continue
                d0 = lab[r, c, 0] - lab[row, col, 0]
                d1 = lab[r, c, 1] - lab[row, col, 1]
                d2 = lab[r, c, 2] - lab[row, col, 2]
                weight = confidence[r, c] * np.exp(-(d0 * d0 + d1 * d1 + d2 * d2) * inv_sigma2)
                weight_sum += weight
                if mask[r, c]:
                    dynamic_sum += weight
            total[row, col] = weight_sum
            dynamic[row, col] = dynamic_sum


def confident_vote(mask: np.ndarray, confidence: np.ndarray, lab: np.ndarray, radius: int) -> np.ndarray:
    """Re-decide the pixels of ``mask (H, W) bool`` where the flow is unreliable: each pixel
    takes the confidence-weighted vote of the pixels around it (within ``radius``, every other
    pixel) weighted by colour similarity in ``lab (H, W, 3)``; a pixel is dynamic when the
    dynamic share of the vote, mixed with its own decision by its own confidence, is above one
    half; with too little confident weight of similar colour around it (a flat wall next to a
    moving body, whose interpolated flow is dragged along), it is static. Confident pixels keep
    their decision. Returns ``(H, W) bool``."""
    offsets = np.array([(dy, dx) for dy in range(-radius, radius + 1, 2) for dx in range(-radius, radius + 1, 2)
                        if dx * dx + dy * dy <= radius * radius], np.int64)
    total = np.empty(mask.shape, np.float32)
    dynamic = np.empty(mask.shape, np.float32)
    _vote_kernel(np.ascontiguousarray(mask), np.ascontiguousarray(confidence, np.float32),
                 np.ascontiguousarray(lab, np.float32), offsets, np.float32(1.0 / (2.0 * _VOTE_COLOUR_SIGMA ** 2)),
                 total, dynamic)
    share = dynamic / np.maximum(total, 1e-6)
    own = np.clip(confidence, 0.0, 1.0)
    mixed = own * mask + (1.0 - own) * share
    return np.where(total >= _VOTE_MIN_WEIGHT, mixed > 0.5, mask & (own >= _SEED_CONFIDENCE))


def flow_texture(lab: np.ndarray, radius: int, pool: ThreadPoolExecutor) -> np.ndarray:
    """Texture confidence ``(T, h, w) float32`` (:func:`texture_confidence`) of the lightness of
    ``lab (T, h, w, 3)`` frames, over a window of two morphology radii ``radius`` (frames on ``pool``)."""
    return np.stack(list(pool.map(lambda frame: texture_confidence(frame[..., 0], _TEXTURE_WINDOW * radius), lab)))


def confident_seeds(score: np.ndarray, confidence: np.ndarray, flows: StageFlow, threshold: float, radius: int,
                    window: int, pool: ThreadPoolExecutor) -> np.ndarray:
    """Seeds ``(T, h, w) bool``: pixels above twice ``threshold`` whose flow is reliable
    (confidence >= 0.5) and that are seeds (within ``radius``) in most frames of the
    flow-aligned temporal window too, so flicker does not start a region."""
    raw = (score > 2 * threshold) & (confidence >= _SEED_CONFIDENCE)
    if window <= 1:
        return raw
    near = np.stack([cv2.dilate(mask.astype(np.uint8), disk(radius)) for mask in raw]).astype(np.float32)
    return raw & (temporal_mean(near, flows, window, pool) >= 0.5)


def segment_frames(scores: np.ndarray, confidence: np.ndarray, flows: StageFlow, threshold: float, window: int,
                   radius: int, min_area: int, pool: ThreadPoolExecutor,
                   boundary_fraction: float = _BOUNDARY_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic pixels ``(T, h, w) bool`` of the score maps ``(T, h, w)`` (see
    :func:`segment_scores`, regions cut at ``boundary_fraction`` of their peak; frames on
    ``pool``) and the temporally confirmed confident seeds they grew from."""
    seeds = confident_seeds(scores, confidence, flows, threshold, radius, window, pool)
    dynamic = np.stack(list(pool.map(
        lambda score, seed, conf: segment_scores(score, seed, conf, threshold, radius, min_area, boundary_fraction),
        scores, seeds, confidence)))
    return dynamic, seeds


def finish_frame(mask: np.ndarray, seeds: np.ndarray, confidence: np.ndarray, colours: np.ndarray, radius: int,
                 min_area: int) -> np.ndarray:
    """One frame of :func:`finish_masks`: the colour-aware vote, boundary snapping and cleaning
    of ``mask (h, w) bool``."""
    voted = confident_vote(mask, confidence, colours, _VOTE_RADIUS * radius)
    return clean_binary(snap_boundary(voted, colours, max(2, _SNAP_BAND * radius), seeds), radius, min_area)


def finish_masks(dynamic: np.ndarray, seeds: np.ndarray, confidence: np.ndarray, lab: np.ndarray, flows: StageFlow,
                 window: int, radius: int, min_area: int, pool: ThreadPoolExecutor) -> np.ndarray:
    """Final ``(T, h, w) bool`` masks from segmented ones: flow-aligned majority vote over
    ``window`` frames, unreliable pixels re-decided by a colour-aware vote of the reliable ones
    (:func:`confident_vote`), boundaries snapped to the colour edges of ``lab (T, h, w, 3)``
    (:func:`snap_boundary`, keeping the ``seeds (T, h, w) bool``), cleaned; frames on ``pool``."""
    if window > 1:
        dynamic = temporal_majority(dynamic, flows, window, pool)
    return np.stack(list(pool.map(lambda mask, seed, conf, colours: finish_frame(mask, seed, conf, colours, radius,
                                                                                  min_area),
                                  dynamic, seeds, confidence, lab)))


def to_frame_size(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(T, h, w) bool`` masks resized (bilinear, cut at one half) to ``(T, height, width) bool``."""
    if masks.shape[1:] == (height, width):
        return masks.astype(bool)
    return np.stack([cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5
                     for mask in masks])


def motion_masks(flow_dir: Path, frames: np.ndarray, params: Params,
                 pool: ThreadPoolExecutor) -> tuple[np.ndarray, MotionCues]:
    """Dynamic masks ``(T, H, W) uint8`` (0 static, 1 dynamic) of ``frames (T, H, W, 3)`` RGB
    from the flow stage output (no cameras), computed at ``params.work_max_side`` and resized
    to the frames, and the cues at the working resolution. Pairs and frames run on ``pool``;
    the result is the same for any number of workers.

    Scores (averaged over ``temporal_window`` flow-aligned frames); keeps the regions above the
    threshold that hold enough temporally confirmed confident seeds (flow on flat surfaces
    is interpolated noise and never seeds a region, but can belong to one); then refits the
    two-view geometry without the dynamic pixels found (dilated) and segments again, which
    frees the fits from moving objects that dragged them; a flow-aligned majority vote over
    the same window; last, the colour-aware vote and GrabCut boundary snapping (see
    :func:`finish_masks`)."""
    num_frames, height, width = frames.shape[:3]
    scale = work_scale(height, width, params.work_max_side)
    flows = StageFlow(flow_dir, scale)
    require_consecutive_pairs(flows, num_frames)
    pairs = motion_pairs(flows, params.max_pair_offset)
    work_height, work_width = flows.pair(0, 1)["forward"].shape[:2]
    shape = (num_frames, work_height, work_width)
    radius = morph_radius(work_height, work_width)
    min_area = int(round(params.min_area_fraction * work_height * work_width))
    lab = lab_frames(frames, (work_width, work_height))
    texture = flow_texture(lab, radius, pool)
    dynamic = None
    for _ in range(1 + _REFIT_ROUNDS):
        prior = None if dynamic is None else np.stack([cv2.dilate(mask.astype(np.uint8), disk(3 * radius)) > 0
                                                       for mask in dynamic])
        raw_scores, valid_share = motion_scores(flows, pairs, shape, params, pool, prior)
        scores = temporal_mean(raw_scores, flows, params.temporal_window, pool)
        confidence = texture * valid_share
        dynamic, seeds = segment_frames(scores, confidence, flows, params.threshold, params.temporal_window, radius,
                                        min_area, pool)
    dynamic = finish_masks(dynamic, seeds, confidence, lab, flows, params.temporal_window, radius, min_area, pool)
    masks = to_frame_size(dynamic, height, width).astype(np.uint8) * DYNAMIC_LABEL
    return masks, MotionCues(scores, confidence, seeds)


# ---------------------------------------------------------------------------------------------
# file backend


def read_user_mask(path: Path, palette: dict[tuple[int, int, int], int]) -> np.ndarray:
    """A user mask as a ``(H, W) uint8`` label map. Grey masks: when the largest value is above
    32 the mask is binary (0/255, anti-aliased or JPEG): label 1 where >= half the largest
    value; otherwise the values are label ids. Colour masks: each non-black colour is a label,
    numbered 1, 2, ... through ``palette`` (colour -> id, shared by the frames of a video and
    extended here), so ids stay the same across frames."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"cannot read mask image {path}", "masks must be PNG/JPEG images, 0 = static")
    if image.ndim == 3 and image.shape[2] >= 3 and not (np.array_equal(image[..., 0], image[..., 1])
                                                         and np.array_equal(image[..., 1], image[..., 2])):
        colors, inverse = np.unique(image[..., :3].reshape(-1, 3), axis=0, return_inverse=True)
        ids = np.zeros(len(colors), np.uint8)
        for index, color in enumerate(map(tuple, colors.tolist())):
            if any(color):
                if color not in palette:
                    if len(palette) >= 255:
                        raise InputError(f"the colour masks use more than 255 colours (at {path})",
                                         "give label-id masks (0 = static, 1..255) or binary 0/255 masks")
                    palette[color] = len(palette) + 1
                ids[index] = palette[color]
        return ids[inverse.reshape(-1)].reshape(image.shape[:2])
    gray = image[..., 0] if image.ndim == 3 else image
    if float(gray.max()) > _MAX_LABEL_VALUE:
        return (gray >= float(gray.max()) / 2).astype(np.uint8)
    return gray.astype(np.uint8)


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``(height, width)``."""
    if labels.shape == (height, width):
        return labels
    return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)


def list_mask_files(folder: Path) -> list[Path]:
    """Image files of a mask folder, sorted by name."""
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in MASK_SUFFIXES)


def match_mask_files(files: list[Path], frames_meta: dict) -> list[Path]:
    """Pick one mask file per frame from ``files`` (sorted by name): with as many files as
    frames, in order; with masks for every source frame (more files than the frames stage's
    largest ``source_indices`` entry), the ones of the picked source frames. Raises
    :class:`InputError` otherwise."""
    num_frames = int(frames_meta["num_frames"])
    if len(files) == num_frames:
        return files
    source_indices = [int(index) for index in frames_meta["source_indices"]]
    if source_indices and len(files) > max(source_indices):
        return [files[index] for index in source_indices]
    raise InputError(f"the mask folder has {len(files)} image(s) but the video has {num_frames} frame(s) "
                     f"(picked from {max(source_indices) + 1 if source_indices else 0} source frames)",
                     "give one mask per extracted frame (sorted by name like frames/images/), one per source "
                     "frame, or a single first-frame mask file")


def mirrored_mask_files(folder: Path, frames_meta: dict) -> list[Path | None] | None:
    """Per frame, its mask in a folder that mirrors a dataset's image folder (Panoptic's ``seg/``
    beside ``ims/``): ``folder/<the frame's source file, suffix .png>`` when that file exists, else
    None. None (not a list) when the frames stage recorded no ``source_files`` or no frame has such a mask."""
    sources = frames_meta.get("source_files")
    if not sources:
        return None
    files = [path if (path := (folder / source).with_suffix(".png")).is_file() else None for source in sources]
    return files if any(path is not None for path in files) else None


def folder_masks(folder: Path, frames_meta: dict, notes: list[str]) -> np.ndarray:
    """User masks ``(T, H, W) uint8`` read from ``folder`` and resized to the frames: one per
    frame in name order, or, for a dataset's frames, the folder mirroring its image folder
    (:func:`mirrored_mask_files`; frames without a mask there are all static, named in ``notes``)."""
    height, width = int(frames_meta["height"]), int(frames_meta["width"])
    palette: dict[tuple[int, int, int], int] = {}
    mirrored = mirrored_mask_files(folder, frames_meta)
    if mirrored is not None:
        missing = [index for index, path in enumerate(mirrored) if path is None]
        if missing:
            notes.append(f"{len(missing)} of {len(mirrored)} frames have no mask in {folder} (e.g. frame "
                         f"{missing[0]}, {frames_meta['source_files'][missing[0]]}): all static there")
        return np.stack([np.zeros((height, width), np.uint8) if path is None
                         else resize_labels(read_user_mask(path, palette), height, width) for path in mirrored])
    files = list_mask_files(folder)
    if not files:
        raise InputError(f"the mask folder {folder} holds no images ({', '.join(MASK_SUFFIXES)})",
                         "put one mask PNG per frame there (0 = static, 255 or label ids = dynamic)")
    chosen = match_mask_files(files, frames_meta)
    return np.stack([resize_labels(read_user_mask(path, palette), height, width) for path in chosen])


def propagate_first_mask(first: np.ndarray, flows: StageFlow, num_frames: int, radius: int,
                         min_area: int) -> np.ndarray:
    """Carry a first-frame label map ``(H, W) uint8`` through the video: frame t+1 samples the
    map of frame t at ``x + flow(t+1 -> t)(x)`` (per label, bilinear, >= 0.5); pixels whose
    flow fails the forward-backward check (revealed background, whose flow is dragged along by
    the object that uncovered it) are left out, then the map is cleaned (which closes such gaps
    inside objects). Returns ``(T, H, W) uint8``."""
    masks = np.zeros((num_frames,) + first.shape, np.uint8)
    masks[0] = first
    label_ids = [int(label) for label in np.unique(first) if label]
    for t in tqdm(range(num_frames - 1), desc="masks: propagating", unit="frame"):
        step = flows.pair(t + 1, t)
        warped = np.zeros_like(first)
        for label in label_ids:
            soft, _ = warp_backward((masks[t] == label).astype(np.float32), step["forward"])
            warped[(soft >= 0.5) & step["valid_forward"]] = label
        masks[t + 1] = clean_labels(warped, radius, min_area)
    return masks


def file_masks(mask_path: Path, frames_meta: dict, flow_dir: Path | None, params: Params,
               notes: list[str]) -> np.ndarray:
    """The ``file`` backend: ``(T, H, W) uint8`` label maps from a mask folder
    (:func:`folder_masks`, which adds to ``notes``) or one first-frame mask propagated along the
    flow stage's consecutive flows."""
    if not mask_path.exists():
        raise InputError(f"masks.mask_path {mask_path} does not exist",
                         "give a folder of per-frame masks or one mask image of the first frame")
    if mask_path.is_dir():
        return folder_masks(mask_path, frames_meta, notes)
    if mask_path.suffix.lower() not in MASK_SUFFIXES:
        raise InputError(f"masks.mask_path {mask_path} is neither a folder nor an image",
                         f"give a folder of masks or one mask image ({', '.join(MASK_SUFFIXES)})")
    if flow_dir is None:
        raise InputError("a single first-frame mask is propagated with the flow, but no flow stage output was given",
                         "run the masks stage through the pipeline (it adds the flow stage for a mask file)")
    height, width = int(frames_meta["height"]), int(frames_meta["width"])
    first = resize_labels(read_user_mask(mask_path, {}), height, width)
    if not first.any():
        raise InputError(f"the mask {mask_path} marks nothing (all pixels are 0)",
                         "draw the moving object(s) as non-zero (e.g. 255) in the first frame's mask")
    flows = StageFlow(flow_dir)
    num_frames = int(frames_meta["num_frames"])
    require_consecutive_pairs(flows, num_frames)
    return propagate_first_mask(first, flows, num_frames, morph_radius(height, width),
                                int(round(params.min_area_fraction * height * width)))


def file_label_names(masks: np.ndarray) -> dict[int, str]:
    """Names of the labels found in user masks: 1 = "object" when alone, else "object<k>"."""
    ids = [int(label) for label in np.unique(masks) if label]
    return {label: ("object" if ids == [1] else f"object{label}") for label in ids}


# ---------------------------------------------------------------------------------------------
# Stage entry point and outputs


def write_outputs(out_dir: Path, masks: np.ndarray, frames: np.ndarray, names: dict[int, str], backend: str,
                  pool: ThreadPoolExecutor) -> None:
    """Write ``vis/`` (the labels over each frame, frames on ``pool``) and then the masks
    artifact (``masks/`` and, last, ``labels.json``; see :func:`mono4d.data.artifacts.write_masks`)."""
    (out_dir / VIS_DIR).mkdir(parents=True, exist_ok=True)

    def write_overlay(t: int) -> None:
        write_rgb(out_dir / VIS_DIR / f"{t:06d}.png", overlay_labels(frames[t], masks[t]))

    for _ in tqdm(pool.map(write_overlay, range(len(masks))), total=len(masks), desc="masks: writing", unit="frame"):
        pass
    write_masks(out_dir, masks, names, backend)


def write_cues(vis_dir: Path, score: np.ndarray, confidence: np.ndarray, threshold: float,
               size: tuple[int, int], pool: ThreadPoolExecutor) -> None:
    """Cue pictures of every frame into ``vis_dir/cues/``: ``score_{t:06d}.png`` (turbo colours,
    0 to ``4 x threshold`` noise sigmas; red = far above the threshold) and
    ``confidence_{t:06d}.png`` (grey, black = unreliable flow, white = reliable), resized to
    ``size`` (w, h) with nearest neighbour; frames on ``pool``. ``score``/``confidence`` are ``(T, h, w)``."""
    folder = Path(vis_dir) / CUES_DIR
    folder.mkdir(parents=True, exist_ok=True)

    def write_frame(t: int) -> None:
        coloured = colorize(score[t], vmin=0.0, vmax=CUE_SCORE_RANGE * threshold)
        grey = np.clip(confidence[t] * 255.0, 0, 255).astype(np.uint8)
        write_rgb(folder / f"score_{t:06d}.png", cv2.resize(coloured, size, interpolation=cv2.INTER_NEAREST))
        write_gray(folder / f"confidence_{t:06d}.png", cv2.resize(grey, size, interpolation=cv2.INTER_NEAREST))

    list(pool.map(write_frame, range(len(score))))


def figures(masks: np.ndarray, names: dict[int, str], backend: str) -> dict:
    """Key figures: frame count, mean dynamic fraction, pixel fraction per label name."""
    result: dict = {"backend": backend, "num_frames": int(len(masks)),
                    "dynamic_fraction_mean": round(float((masks > 0).mean()), 6)}
    for label, name in sorted(names.items()):
        result[f"fraction_{name}"] = round(float((masks == label).mean()), 6)
    return result


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Compute the dynamic label maps of ``inputs["frames"]`` with the chosen backend
    (``inputs["flow"]`` is read by motion and the single-mask file backend; sam/sam2 use it for
    re-prompting when present). Writes ``masks/``, ``vis/``, ``labels.json`` into ``out_dir``."""
    params.validate()
    out_dir = Path(out_dir)
    frames_dir = Path(inputs["frames"])
    meta = frames_stage.read_frames_meta(frames_dir)
    num_frames, height, width = int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
    flow_dir = Path(inputs["flow"]) if "flow" in inputs else None
    notes: list[str] = []
    if params.needs_flow() and flow_dir is None:
        raise InputError(f"masks.backend={params.backend} needs the flow stage output, which was not given",
                         "run the masks stage through the pipeline (it schedules flow first)")

    frames = frames_stage.load_frames(frames_dir)
    if params.backend == "motion":
        with worker_pool(worker_count()) as pool:
            masks, cues = motion_masks(flow_dir, frames, params, pool)
        names = {DYNAMIC_LABEL: "dynamic"}
    elif params.backend == "file":
        masks = file_masks(Path(params.mask_path).expanduser(), meta, flow_dir, params, notes)
        names = file_label_names(masks)
    else:
        from mono4d.stages import masks_sam

        masks, names, sam_notes = masks_sam.run_prompted(frames, flow_dir, params)
        notes.extend(sam_notes)
    masks = np.stack([dilate_labels(mask, params.dilate_px) for mask in masks]).astype(np.uint8)
    if masks.shape != (num_frames, height, width):
        raise InputError(f"the {params.backend} backend produced masks of shape {masks.shape}, expected "
                         f"{(num_frames, height, width)}", "check the mask inputs against the frames stage output")
    if not masks.any():
        notes.append("no dynamic pixels in any frame: the whole scene is treated as static")
    with worker_pool(worker_count()) as pool:
        write_outputs(out_dir, masks, frames, names, params.backend, pool)
        result = figures(masks, names, params.backend)
        if params.backend == "motion":
            write_cues(out_dir / VIS_DIR, cues.score, cues.confidence, params.threshold, (width, height), pool)
            result["seed_fraction_mean"] = round(float(cues.seeds.mean()), 6)
    logger.info("masks (%s): %d frames, %.1f %% dynamic on average", params.backend, num_frames,
                100 * result["dynamic_fraction_mean"])
    if notes:
        result["notes"] = notes
    return result
