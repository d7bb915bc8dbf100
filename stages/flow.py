"""Flow stage: dense optical flow, forward and backward, for a set of frame pairs, with a
forward-backward consistency mask.

Pairs: every consecutive pair ``(i, i+1)`` plus longer-range pairs at offsets 2, 4, 8, ... up to
``max_offset`` (with ``sparse_long_range`` an offset-``o`` pair starts only at every
``o/2``-th frame, so the pair count stays under 3T whatever the cap), or, with ``exhaustive``,
every pair ``i < j`` (short clips only).

Backends: ``dis`` (OpenCV DIS, weights-free, CPU) and ``raft`` (torchvision RAFT, see
:mod:`mono4d.models.raft`).

Consistency: pixel ``x`` of frame i with forward flow ``F`` is valid when ``x + F(x)`` lies inside
frame j and ``|F(x) + B(x + F(x))| < fb_threshold + fb_relative * |F(x)|`` (``B`` the backward
flow sampled bilinearly); the same test, roles swapped, gives the backward mask.

Outputs: ``pairs.json`` {"pairs": [[i, j], ...], "backend", "width", "height", ...},
``pairs/{i:06d}_{j:06d}.npz`` (``forward``/``backward`` (H, W, 2) float16 pixels, stored
uncompressed: deflate saves a fifth of their size for as much CPU time as DIS itself;
``valid_forward``/``valid_backward`` (H, W) bool, deflated; written and read by
:func:`mono4d.data.artifacts.write_flow_pair`/:func:`~mono4d.data.artifacts.read_flow_pair`) and
``vis/{i:06d}_{j:06d}.png`` flow colour images of the consecutive pairs (invalid = black).
Flow vectors are (dx, dy) in pixels; ``flow[r, c]`` moves the pixel at row r, column c.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from tqdm import tqdm

from mono4d.data.artifacts import flow_pair_name, write_flow_meta, write_flow_pair
from mono4d.data.errors import InputError, ParameterError
from mono4d.data.images import read_rgb, write_rgb
from mono4d.data.visualize import flow_to_color
from mono4d.models import raft

logger = logging.getLogger(__name__)
T_item = TypeVar("T_item")
T_result = TypeVar("T_result")

VIS_DIR = "vis"
BACKENDS = ("dis", "raft")
DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
DEVICES = ("auto", "cpu", "cuda")
#: Smallest frame side (pixels) OpenCV DIS accepts: it refuses smaller frames, and crashes (segfault)
#: when its finest pyramid level is smaller than this (measured with OpenCV 5.1).
DIS_MIN_SIDE = 12
#: Smallest frame side (pixels) RAFT accepts: frames are padded to multiples of 8 and its 4-level
#: correlation pyramid needs feature maps (1/8 resolution) of at least 16 on each side.
RAFT_MIN_SIDE = 121
# DIS's auto finest level keeps at least this many pixels on the longer side of the working image.
_DIS_MIN_WORKING_SIDE = 480
#: Most threads computing and writing flow pairs at once (OpenCV and zlib release the GIL).
MAX_WORKERS = 4
# cv2.remap refuses maps with a side of 32767 or more: point sets are sampled in rows of this length.
_REMAP_ROW = 4096


@dataclass(frozen=True)
class Params:
    """Parameters of the flow stage.

    backend: "dis" (OpenCV DIS, weights-free, the CPU default) or "raft" (torchvision RAFT).
    dis_preset: DIS speed/quality preset, "ultrafast", "fast" or "medium".
    dis_finest_scale: finest pyramid level DIS computes (0 = full resolution, 1 = half, ...);
        -1 = auto: the preset's level, made finer until that level's longer side is at least
        480 pixels (full resolution for small frames, where the presets lose detail).
    dis_refine_iterations: DIS variational refinement iterations (0 = none; -1 = the preset's).
    dis_blur: sigma in pixels of a Gaussian blur applied to the grey frames before DIS (0 = none).
    max_offset: longest pair offset in frames; offsets used are 1, 2, 4, ... <= max_offset.
    sparse_long_range: offset-o pairs (o >= 2) start only at every (o/2)-th frame (< 3T pairs in
        all); False starts them at every frame (about T * (1 + log2(max_offset)) pairs).
    exhaustive: compute every pair i < j instead (T(T-1)/2 pairs; short clips only).
    exhaustive_max_frames: refuse ``exhaustive`` above this many frames.
    fb_threshold: forward-backward consistency tolerance in pixels.
    fb_relative: extra tolerance per pixel of flow magnitude (fast motion is checked less strictly).
    raft_model: "small", "large" (torchvision's weights) or a path to a RAFT checkpoint
        (torchvision layout or the original princeton-vl/RAFT layout).
    raft_iterations: RAFT refinement iterations.
    batch_size: flow pairs per RAFT forward pass (each pair runs forward and backward).
    device: "auto" (CUDA when available), "cpu" or "cuda" (RAFT only).
    """

    backend: str = "dis"
    dis_preset: str = "medium"
    dis_finest_scale: int = -1
    dis_refine_iterations: int = -1
    dis_blur: float = 0.0
    max_offset: int = 8
    sparse_long_range: bool = True
    exhaustive: bool = False
    exhaustive_max_frames: int = 64
    fb_threshold: float = 1.0
    fb_relative: float = 0.05
    raft_model: str = "small"
    raft_iterations: int = 12
    batch_size: int = 4
    device: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot make sense."""
        if self.backend not in BACKENDS:
            raise ParameterError(f"flow.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}",
                                 "use dis (weights-free) or raft (needs torchvision)")
        if self.dis_preset not in DIS_PRESETS:
            raise ParameterError(f"flow.dis_preset must be one of {', '.join(DIS_PRESETS)}, got {self.dis_preset!r}",
                                 "use medium (accurate) or fast/ultrafast (quicker)")
        if not -1 <= self.dis_finest_scale <= 8:
            raise ParameterError(f"flow.dis_finest_scale must be within -1..8, got {self.dis_finest_scale}",
                                 "use -1 (auto), 0 (full resolution) or 1 (half resolution)")
        if self.dis_refine_iterations < -1:
            raise ParameterError(f"flow.dis_refine_iterations must be >= -1, got {self.dis_refine_iterations}",
                                 "use -1 for the preset's value, 0 to turn refinement off, or e.g. 5")
        if not math.isfinite(self.dis_blur) or self.dis_blur < 0:
            raise ParameterError(f"flow.dis_blur must be >= 0 pixels, got {self.dis_blur}", "use 0 (off) or e.g. 1.0")
        if self.max_offset < 1:
            raise ParameterError(f"flow.max_offset must be >= 1, got {self.max_offset}",
                                 "use 1 for consecutive pairs only, or e.g. 8 for offsets 1, 2, 4, 8")
        if self.exhaustive_max_frames < 2:
            raise ParameterError(f"flow.exhaustive_max_frames must be >= 2, got {self.exhaustive_max_frames}",
                                 "use e.g. 64")
        if not math.isfinite(self.fb_threshold) or self.fb_threshold <= 0:
            raise ParameterError(f"flow.fb_threshold must be > 0 pixels, got {self.fb_threshold}", "use e.g. 1.0")
        if not math.isfinite(self.fb_relative) or self.fb_relative < 0:
            raise ParameterError(f"flow.fb_relative must be >= 0, got {self.fb_relative}", "use e.g. 0.05, or 0")
        if not self.raft_model:
            raise ParameterError("flow.raft_model is empty", "use small, large or a path to a RAFT checkpoint")
        if self.raft_iterations < 1:
            raise ParameterError(f"flow.raft_iterations must be >= 1, got {self.raft_iterations}", "use e.g. 12")
        if self.batch_size < 1:
            raise ParameterError(f"flow.batch_size must be >= 1, got {self.batch_size}", "use e.g. 4")
        if self.device not in DEVICES:
            raise ParameterError(f"flow.device must be one of {', '.join(DEVICES)}, got {self.device!r}",
                                 "use auto")


def select_pairs(num_frames: int, max_offset: int = 8, sparse_long_range: bool = True,
                 exhaustive: bool = False) -> list[tuple[int, int]]:
    """Frame pairs ``(i, j)``, ``i < j``, sorted by ``i`` then ``j``.

    Offsets 1, 2, 4, ... <= ``max_offset``; with ``sparse_long_range`` offset ``o >= 2`` pairs start
    at frames that are multiples of ``o // 2``. ``exhaustive`` gives all ``T(T-1)/2`` pairs.
    """
    if exhaustive:
        return [(i, j) for i in range(num_frames) for j in range(i + 1, num_frames)]
    pairs = []
    offset = 1
    while offset <= max_offset:
        step = max(1, offset // 2) if sparse_long_range else 1
        pairs += [(i, i + offset) for i in range(0, num_frames - offset, step)]
        offset *= 2
    return sorted(pairs)


def sample_bilinear(field: np.ndarray, x: np.ndarray, y: np.ndarray, outside: float = np.nan) -> np.ndarray:
    """Bilinear samples of ``field`` ``(H, W)`` or ``(H, W, C)`` (C <= 4) at array coordinates
    ``x`` (column), ``y`` (row) of any equal shape S; returns ``S`` or ``S + (C,)`` float32.
    Points outside ``[0, W-1] x [0, H-1]`` get ``outside`` (OpenCV interpolates at 1/32 pixel)."""
    field = np.asarray(field, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    shape = x.shape
    channels = field.shape[2:]
    if x.ndim == 2 and max(shape) < _REMAP_ROW:
        map_x, map_y = x, y
    else:
        count = x.size
        rows = max(1, -(-count // _REMAP_ROW))
        map_x = np.full(rows * _REMAP_ROW, -1.0, np.float32)
        map_y = np.full(rows * _REMAP_ROW, -1.0, np.float32)
        map_x[:count], map_y[:count] = x.ravel(), y.ravel()
        map_x, map_y = map_x.reshape(rows, _REMAP_ROW), map_y.reshape(rows, _REMAP_ROW)
    sampled = cv2.remap(field, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    sampled = sampled.reshape(-1, *channels)[:x.size].reshape(shape + channels)
    height, width = field.shape[:2]
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    sampled[~inside] = outside
    return sampled


def consistency_mask(forward: np.ndarray, backward: np.ndarray, threshold: float = 1.0,
                     relative: float = 0.05) -> np.ndarray:
    """Forward-backward check of ``forward`` ``(H, W, 2)`` (i->j) against ``backward`` (j->i).

    Returns ``(H, W)`` bool: True where ``x + F(x)`` is inside frame j and
    ``|F(x) + B(x + F(x))| < threshold + relative * |F(x)|`` (pixels).
    """
    height, width = forward.shape[:2]
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    target_x = cols + forward[..., 0]
    target_y = rows + forward[..., 1]
    back = sample_bilinear(backward, target_x, target_y)
    loop = forward + back
    error_squared = loop[..., 0] ** 2 + loop[..., 1] ** 2
    tolerance = threshold + relative * np.sqrt(forward[..., 0] ** 2 + forward[..., 1] ** 2)
    with np.errstate(invalid="ignore"):
        return np.isfinite(error_squared) & (error_squared < tolerance ** 2)


def motion_boundaries(flow: np.ndarray, threshold: float = 0.1, relative: float = 0.1) -> np.ndarray:
    """``(H, W)`` bool: pixels within one pixel of a discontinuity of ``flow`` ``(H, W, 2)``, where
    the flow gradient (Frobenius norm of the 2x2 Jacobian, smoothed 3x3 derivatives, pixels per
    pixel) exceeds ``sqrt(threshold**2 + (relative * |F|)**2)`` (Sundaram et al. 2010's test)."""
    flow = np.ascontiguousarray(flow, dtype=np.float32)
    dx = cv2.Sobel(flow, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
    dy = cv2.Sobel(flow, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    squares = cv2.multiply(dx, dx)
    squares += cv2.multiply(dy, dy)
    gradient = squares[..., 0] + squares[..., 1]
    boundary = gradient > threshold ** 2 + relative ** 2 * (flow[..., 0] ** 2 + flow[..., 1] ** 2)
    return cv2.dilate(boundary.view(np.uint8), np.ones((3, 3), np.uint8)) > 0


def prefetch(load: Callable[[T_item], T_result], items: Iterable[T_item], pool: ThreadPoolExecutor,
             depth: int) -> Iterator[T_result]:
    """``load(item)`` of every item, in order, computed on ``pool`` at most ``depth`` items ahead
    (bounded memory, unlike ``pool.map``)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(load, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class DisFlow:
    """OpenCV DIS optical flow on grey frames (optionally blurred)."""

    def __init__(self, preset: str = "medium", finest_scale: int = -1, refine_iterations: int = -1,
                 blur: float = 0.0) -> None:
        self.engine = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])
        self.preset_finest_scale = self.engine.getFinestScale()
        self.finest_scale = finest_scale
        if refine_iterations >= 0:
            self.engine.setVariationalRefinementIterations(int(refine_iterations))
        self.blur = float(blur)

    def finest_level(self, height: int, width: int) -> int:
        """The finest pyramid level for frames of this size (resolves ``finest_scale`` -1 = auto),
        coarsened no further than a working image of :data:`DIS_MIN_SIDE` pixels on its shorter side."""
        if self.finest_scale >= 0:
            level = self.finest_scale
        else:
            level = self.preset_finest_scale
            while level > 0 and max(height, width) / 2 ** level < _DIS_MIN_WORKING_SIDE:
                level -= 1
        while level > 0 and min(height, width) / 2 ** level < DIS_MIN_SIDE:
            level -= 1
        return level

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> the grey ``(H, W)`` uint8 frame DIS works on."""
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if self.blur > 0:
            gray = cv2.GaussianBlur(gray, (0, 0), self.blur)
        return gray

    def __call__(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Forward and backward flow ``(H, W, 2)`` float32 of each (prepared first, prepared second)."""
        self.engine.setFinestScale(self.finest_level(*pairs[0][0].shape[:2]))
        return [(self.engine.calc(first, second, None), self.engine.calc(second, first, None))
                for first, second in pairs]


class RaftFlow:
    """torchvision RAFT on RGB frames, forward and backward in one batch."""

    def __init__(self, model: str, device: str, iterations: int) -> None:
        self.device = raft.resolve_device(device)
        self.network = raft.load_raft(model, self.device)
        self.iterations = iterations

    @staticmethod
    def prepare(image: np.ndarray) -> np.ndarray:
        """RAFT takes the RGB frame as it is."""
        return image

    def __call__(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Forward and backward flow ``(H, W, 2)`` float32 of each (first, second) RGB frame pair."""
        firsts = np.stack([first for first, _ in pairs] + [second for _, second in pairs])
        seconds = np.stack([second for _, second in pairs] + [first for first, _ in pairs])
        flows = raft.raft_flow(self.network, firsts, seconds, self.device, self.iterations)
        count = len(pairs)
        return [(flows[k], flows[count + k]) for k in range(count)]


def make_backend(params: Params) -> tuple[DisFlow | RaftFlow, int]:
    """The flow engine for ``params.backend`` and how many pairs to give it at once."""
    if params.backend == "dis":
        return DisFlow(params.dis_preset, params.dis_finest_scale, params.dis_refine_iterations, params.dis_blur), 1
    return RaftFlow(params.raft_model, params.device, params.raft_iterations), params.batch_size


def worker_count() -> int:
    """Threads for the flow pairs: the CPU cores this process may use, at most :data:`MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


@contextlib.contextmanager
def opencv_threads(count: int) -> Iterator[None]:
    """OpenCV's own thread count set to ``count`` for the block (one per flow thread, not nested pools)."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def write_pair(out_dir: Path, i: int, j: int, forward: np.ndarray, backward: np.ndarray, params: Params) -> float:
    """Consistency masks and files of pair ``(i, j)`` (npz; a colour PNG for consecutive pairs).
    Returns the mean valid fraction of both directions."""
    valid_forward = consistency_mask(forward, backward, params.fb_threshold, params.fb_relative)
    valid_backward = consistency_mask(backward, forward, params.fb_threshold, params.fb_relative)
    write_flow_pair(out_dir, i, j, forward, backward, valid_forward, valid_backward)
    if j == i + 1:
        write_rgb(out_dir / VIS_DIR / f"{flow_pair_name(i, j)}.png", flow_to_color(forward, valid_forward))
    return 0.5 * (float(valid_forward.mean()) + float(valid_backward.mean()))


def compute_pairs(engine: DisFlow | RaftFlow, batch_size: int, paths: list[Path], pairs: list[tuple[int, int]],
                  params: Params, out_dir: Path, pool: ThreadPoolExecutor,
                  workers: int) -> tuple[tuple[int, int], list[float], float]:
    """Flow of every pair into ``out_dir``: DIS pairs run on the ``pool``'s threads (one DIS engine
    per thread), RAFT batches on the main thread with their files written by the pool. Frames are
    read once and kept while later pairs still need them. Returns the frame shape (H, W), each
    pair's valid fraction (in pair order) and the seconds spent computing flow (summed over threads)."""
    prepared: dict[int, np.ndarray] = {}
    local = threading.local()

    def frame(index: int) -> np.ndarray:
        if index not in prepared:
            prepared[index] = engine.prepare(read_rgb(paths[index]))
        return prepared[index]

    def dis_pair(i: int, j: int, first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
        if not hasattr(local, "engine"):
            local.engine = make_backend(params)[0]
        began = time.perf_counter()
        (forward, backward), = local.engine([(first, second)])
        seconds = time.perf_counter() - began
        return write_pair(out_dir, i, j, forward, backward, params), seconds

    def written_pair(i: int, j: int, forward: np.ndarray, backward: np.ndarray, seconds: float) -> tuple[float, float]:
        return write_pair(out_dir, i, j, forward, backward, params), seconds

    pending: deque[Future] = deque()
    valid_fractions: list[float] = []
    compute_seconds = 0.0
    progress = tqdm(total=len(pairs), desc=f"flow ({params.backend})", unit="pair")

    def collect() -> None:
        nonlocal compute_seconds
        valid, seconds = pending.popleft().result()
        valid_fractions.append(valid)
        compute_seconds += seconds
        progress.update(1)

    shape = frame(0).shape[:2]
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        for index in [k for k in prepared if k < batch[0][0]]:
            del prepared[index]
        inputs_batch = [(frame(i), frame(j)) for i, j in batch]
        if isinstance(engine, DisFlow):
            pending.extend(pool.submit(dis_pair, i, j, *images) for (i, j), images in zip(batch, inputs_batch))
        else:
            began = time.perf_counter()
            flows = engine(inputs_batch)
            seconds = (time.perf_counter() - began) / len(batch)
            pending.extend(pool.submit(written_pair, i, j, forward, backward, seconds)
                           for (i, j), (forward, backward) in zip(batch, flows))
        while len(pending) > 2 * workers:
            collect()
    while pending:
        collect()
    progress.close()
    return shape, valid_fractions, compute_seconds


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Compute flow for the selected pairs of ``inputs["frames"]`` into ``out_dir``.

    Returns ``{"backend", "num_frames", "num_pairs", "mean_valid_fraction", "ms_per_pair"}``
    (``ms_per_pair``: flow computation, both directions, without file writing) plus ``notes``.
    """
    from mono4d.stages import frames

    params.validate()
    if "frames" not in inputs:
        raise InputError("the flow stage needs the frames stage's output (inputs['frames'])",
                         "run the frames stage first")
    paths = frames.frame_paths(inputs["frames"])
    num_frames = len(paths)
    if num_frames < 2:
        raise InputError(f"the flow stage needs at least 2 frames, {inputs['frames']} has {num_frames}",
                         "select more frames in the frames stage (frames.max_frames, frames.stride)")
    if params.exhaustive and num_frames > params.exhaustive_max_frames:
        raise ParameterError(
            f"flow.exhaustive asks for all {num_frames * (num_frames - 1) // 2} pairs of {num_frames} frames "
            f"(limit: flow.exhaustive_max_frames={params.exhaustive_max_frames})",
            "turn flow.exhaustive off (offsets 1, 2, 4 ... up to flow.max_offset scale to long clips), "
            "or raise flow.exhaustive_max_frames")
    meta = frames.read_frames_meta(inputs["frames"])
    minimum = RAFT_MIN_SIDE if params.backend == "raft" else DIS_MIN_SIDE
    if min(int(meta["width"]), int(meta["height"])) < minimum:
        raise InputError(f"the frames are {meta['width']}x{meta['height']} pixels: flow.backend={params.backend} "
                         f"needs at least {minimum} pixels on each side",
                         "use flow.backend=dis (from 12 pixels) or larger frames (frames.max_side, a larger source)"
                         if params.backend == "raft" else "use larger frames (frames.max_side, a larger source)")
    pairs = select_pairs(num_frames, params.max_offset, params.sparse_long_range, params.exhaustive)
    engine, batch_size = make_backend(params)

    out_dir = Path(out_dir)
    (out_dir / VIS_DIR).mkdir(parents=True, exist_ok=True)
    workers = worker_count()
    with opencv_threads(1 if workers > 1 and isinstance(engine, DisFlow) else cv2.getNumThreads()), \
            ThreadPoolExecutor(workers, thread_name_prefix="flow") as pool:
        shape, valid_fractions, compute_seconds = compute_pairs(engine, batch_size, paths, pairs, params, out_dir,
                                                                pool, workers)

    meta = {"pairs": [[i, j] for i, j in pairs], "backend": params.backend, "num_frames": num_frames,
            "width": int(shape[1]), "height": int(shape[0]), "fb_threshold": params.fb_threshold,
            "fb_relative": params.fb_relative}
    if isinstance(engine, DisFlow):
        meta.update(dis_preset=params.dis_preset, dis_finest_level=engine.finest_level(*shape))
    else:
        meta.update(raft_model=params.raft_model, raft_iterations=params.raft_iterations)
    write_flow_meta(out_dir, meta)
    mean_valid = float(np.mean(valid_fractions))
    figures: dict = {"backend": params.backend, "num_frames": num_frames, "num_pairs": len(pairs),
                     "mean_valid_fraction": round(mean_valid, 4),
                     "ms_per_pair": round(1000.0 * compute_seconds / len(pairs), 2)}
    if mean_valid < 0.5:
        figures["notes"] = [f"only {mean_valid:.0%} of pixels pass the forward-backward check on average: "
                            "fast motion, blur or large occlusions; tracks and 3D flow will be sparse"]
    logger.info("flow: %d pairs of %d frames, %.0f%% consistent, %.1f ms/pair", len(pairs), num_frames,
                100 * mean_valid, figures["ms_per_pair"])
    return figures
