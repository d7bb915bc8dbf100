"""What every masks backend shares: flow access and warping, and label-map cleaning.

A module of its own so :mod:`mono4d.stages.masks` (which dispatches to the backends) and the backends
in :mod:`mono4d.stages.masks_sam` and :mod:`mono4d.stages.masks_refine` import it without importing each other.
Label maps are ``(H, W) uint8`` (0 = static, k > 0 = label k); flow fields ``(H, W, 2)`` float32
pixels (dx, dy), pixel (row r, column c) at image coordinates (c, r) here.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from mono4d.data.artifacts import list_flow_pairs, read_flow_pair
from mono4d.data.errors import InputError
from mono4d.stages.flow import opencv_threads

# Flow pairs kept in memory by StageFlow.
_FLOW_CACHE_PAIRS = 3
# Morphological structuring radius as a fraction of the image diagonal (at least 1 pixel).
_MORPH_RADIUS_FRACTION = 0.004

#: ``flow(a, b)``: ``(H, W, 2)`` float32 pixels mapping frame a to frame b.
FlowFn = Callable[[int, int], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Worker pool, flow access and warping


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` threads for the per-frame and per-pair work of the mask stages
    (OpenCV, numpy and the compiled kernels release the GIL), with OpenCV's own threads at one
    while there are several workers (no nested pools). Callers collect results in a fixed order,
    so the output does not depend on ``workers``."""
    with opencv_threads(1 if workers > 1 else cv2.getNumThreads()), \
            ThreadPoolExecutor(workers, thread_name_prefix="masks") as pool:
        yield pool


@functools.lru_cache(maxsize=4)
def pixel_grid(height: int, width: int) -> np.ndarray:
    """``(H, W, 2)`` float32 pixel coordinates (x, y) of the pixels (x right, y down), read-only."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    grid = np.stack([xs, ys], axis=-1)
    grid.flags.writeable = False
    return grid


def warp_backward(values: np.ndarray, flow: np.ndarray, nearest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``values`` (``(H, W)`` or ``(H, W, C)``, of frame b) at ``x + flow(x)`` for every
    pixel x of frame a, where ``flow`` ``(H, W, 2)`` maps a -> b. Returns the warped values and
    ``inside (H, W) bool`` (the target fell inside frame b)."""
    height, width = flow.shape[:2]
    grid = pixel_grid(height, width) + flow
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    warped = cv2.remap(np.ascontiguousarray(values), grid[..., 0], grid[..., 1], interpolation,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inside = (grid[..., 0] >= -0.5) & (grid[..., 0] <= width - 0.5) & (grid[..., 1] >= -0.5) & (grid[..., 1] <= height - 0.5)
    return warped, inside


def resize_pair(pair: dict, scale: float) -> dict:
    """A flow pair (``forward``/``backward`` ``(H, W, 2)`` pixels, ``valid_*`` ``(H, W)`` bool)
    resized by ``scale``: fields area-averaged and their vectors scaled; a resized pixel is
    valid only where all the pixels it averages were."""
    if scale == 1.0:
        return pair
    height, width = pair["forward"].shape[:2]
    size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    resized = {}
    for key in ("forward", "backward"):
        field = cv2.resize(pair[key], size, interpolation=cv2.INTER_AREA)
        field[..., 0] *= size[0] / width
        field[..., 1] *= size[1] / height
        resized[key] = field
    for key in ("valid_forward", "valid_backward"):
        resized[key] = cv2.resize(pair[key].astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.999
    return resized


class StageFlow:
    """Dense flow between frames from the flow stage's pairs: ``flow(a, b)`` is ``(H, W, 2)``
    float32 pixels mapping frame a to frame b (the stored pair's forward or backward field),
    resized by ``scale`` (fields and vectors; see :func:`resize_pair`) when it is not 1.

    Keeps the last few loaded pairs, so sweeps that ask for (t-1, t) and (t, t+1) read each
    file once; :meth:`read` bypasses that cache and may be called from several threads."""

    def __init__(self, flow_dir: Path, scale: float = 1.0) -> None:
        self.flow_dir = Path(flow_dir)
        self.scale = float(scale)
        self.pairs = list_flow_pairs(self.flow_dir)
        self._stored = set(self.pairs)
        self._cache: dict[tuple[int, int], dict] = {}

    def has(self, a: int, b: int) -> bool:
        """Whether the flow stage computed the pair (a, b) in either direction."""
        return (a, b) in self._stored or (b, a) in self._stored

    def read(self, a: int, b: int) -> dict:
        """Pair (a, b), ``a < b``, read from its file and resized, not cached (thread-safe)."""
        if not self.has(a, b):
            raise InputError(f"the flow stage in {self.flow_dir} has no pair between frames {a} and {b}",
                             "rerun the flow stage with its default pairs (every consecutive pair) and rerun masks")
        return resize_pair(read_flow_pair(self.flow_dir, a, b), self.scale)

    def pair(self, a: int, b: int) -> dict:
        """Pair (a, b): ``forward`` (a -> b), ``backward``, ``valid_forward``, ``valid_backward``."""
        key = (min(a, b), max(a, b))
        if key not in self._cache:
            stored = self.read(*key)
            if len(self._cache) >= _FLOW_CACHE_PAIRS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = stored
        stored = self._cache[key]
        if a < b:
            return stored
        return {"forward": stored["backward"], "backward": stored["forward"],
                "valid_forward": stored["valid_backward"], "valid_backward": stored["valid_forward"]}

    def __call__(self, a: int, b: int) -> np.ndarray:
        return self.pair(a, b)["forward"]


def require_consecutive_pairs(flows: StageFlow, num_frames: int) -> None:
    """Raise :class:`InputError` unless the flow stage holds every pair (t, t+1)."""
    missing = [t for t in range(num_frames - 1) if not flows.has(t, t + 1)]
    if missing:
        raise InputError(f"the flow stage output {flows.flow_dir} lacks {len(missing)} consecutive pair(s), "
                         f"e.g. ({missing[0]}, {missing[0] + 1})",
                         "rerun the flow stage so it computes every consecutive pair (t, t+1)")


# ---------------------------------------------------------------------------------------------
# Mask cleaning (shared by all backends)


def morph_radius(height: int, width: int) -> int:
    """Radius (pixels) of the morphological cleaning, proportional to the image diagonal."""
    return max(1, int(round(_MORPH_RADIUS_FRACTION * float(np.hypot(height, width)))))


def disk(radius: int) -> np.ndarray:
    """Elliptic structuring element of ``radius`` pixels (``(2r+1, 2r+1)`` uint8)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def fill_holes(binary: np.ndarray) -> np.ndarray:
    """Fill background regions of a ``(H, W) bool`` mask that do not touch the image border."""
    background = (~binary).astype(np.uint8)
    count, components = cv2.connectedComponents(background, connectivity=4)
    border = np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]]))
    enclosed = ~np.isin(components, border) & (background > 0)
    return binary | enclosed


def remove_small_components(binary: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected regions of a ``(H, W) bool`` mask with fewer than ``min_area`` pixels."""
    if min_area <= 1 or not binary.any():
        return binary
    count, components, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return keep[components]


def clean_binary(binary: np.ndarray, radius: int, min_area: int) -> np.ndarray:
    """Open (drop specks) and close (bridge gaps) with a disk of ``radius`` pixels (0 = skip),
    remove regions under ``min_area`` pixels and fill holes of a ``(H, W) bool`` mask."""
    mask = binary.astype(np.uint8)
    if radius > 0:
        kernel = disk(radius)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return fill_holes(remove_small_components(mask > 0, min_area))


def clean_labels(labels: np.ndarray, radius: int, min_area: int) -> np.ndarray:
    """:func:`clean_binary` applied to each label of a ``(H, W) uint8`` label map; where cleaned
    regions overlap, the higher label id wins."""
    out = np.zeros_like(labels)
    for label in np.unique(labels):
        if label == 0:
            continue
        out[clean_binary(labels == label, radius, min_area)] = label
    return out


def dilate_labels(labels: np.ndarray, pixels: int) -> np.ndarray:
    """Grow every labelled region of a ``(H, W) uint8`` map by ``pixels`` into the background."""
    if pixels <= 0 or not labels.any():
        return labels
    grown = cv2.dilate(labels, disk(pixels))
    return np.where(labels > 0, labels, grown).astype(np.uint8)
