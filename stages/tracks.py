"""Tracks stage: long-term 2D point tracks by chaining consecutive optical flow, and 3D flow pairs
(MoDGS-style) by lifting flow correspondences to world space with aligned depth and cameras.

2D tracks: query points (a grid every ``grid_step`` pixels plus up to ``corners_per_query``
Shi-Tomasi corners) are seeded on query frames (every ``query_every``-th frame and the last),
only in grid cells that no live track occupies (so later query frames re-seed what earlier
tracks lost: disocclusions, new content). Each query point is followed forward and backward in
time through the consecutive flows of the flow stage; a track stops when it reaches a pixel that
fails the forward-backward check, lies on a motion boundary (see ``motion_boundary``), or leaves
the image.

3D pairs: for every flow pair (i, j) and both directions, each pixel p of frame i that passes the
same checks is lifted with the aligned depth of frame i and its flow target p + F(p) with the
(bilinearly sampled) aligned depth of frame j, away from depth edges; at most ``points_per_pair``
per direction are kept (uniform random subsample). Pairs whose frames the cameras stage did
not register are skipped.

Image coordinates follow data/geometry.py: x right, y down, pixel (row r, column c) has its
centre at (c + 0.5, r + 0.5).

Outputs: ``tracks.npz`` (``xy (N, T, 2)`` float32 image coordinates, NaN where the track has no
estimate, ``visible (N, T)`` bool, ``query_frame (N,)`` int32), ``tracks.mp4`` (overlay video,
with ``make_video``), ``tracks.png`` (paths over +-20 frames of the tracks seen on the middle frame),
and with align + cameras inputs ``pairs3d.npz`` (``src_xyz``, ``dst_xyz`` (M, 3) float32 world,
``src_frame``, ``dst_frame`` (M,) int32, ``src_xy``, ``dst_xy`` (M, 2) float32) and ``pairs3d.json``
(``{"counts": {"i_j": [forward, backward]}, "total": M}``); all written and read by
:mod:`mono4d.data.artifacts` (``write_tracks``/``read_tracks``, ``write_pairs3d``/``read_pairs3d``).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mono4d.data.artifacts import (PAIRS3D_ARRAYS, flow_pair_name, list_flow_pairs, read_aligned_depth, read_cameras,
                                   read_flow_meta, read_flow_pair, write_pairs3d, write_tracks)
from mono4d.data.errors import InputError, ParameterError, require_inputs
from mono4d.data.images import read_rgb, write_rgb
from mono4d.data.video import write_video
from mono4d.stages import flow as flow_stage

logger = logging.getLogger(__name__)

VIDEO_FILE = "tracks.mp4"
STILL_FILE = "tracks.png"
#: Image coordinate of the centre of pixel (0, 0) (data/geometry.py convention).
PIXEL_CENTER = 0.5
# A tracked point moves on when the bilinearly sampled validity mask reaches this value.
_VALID_LEVEL = 0.5
# Overlay pictures: tail length (frames) of the trajectories in the video, image area (pixels)
# per drawn track, and dot radius per pixel of the longer image side.
_TAIL_FRAMES = 10
_AREA_PER_DRAWN_TRACK = 400
_DOT_RADIUS_PER_SIDE = 1 / 320
# Share of the flow magnitude added to the motion-boundary gradient threshold.
_BOUNDARY_RELATIVE = 0.1

PairLoader = Callable[[int, int], dict]

@dataclass(frozen=True)
class Params:
    """Parameters of the tracks stage.

    grid_step: spacing in pixels of the query grid (and size of the occupancy cells for re-seeding).
    corners_per_query: Shi-Tomasi corners added per query frame (0 = grid only).
    query_every: seed query points on every ``query_every``-th frame (and the last frame).
    max_tracks: at most this many tracks in all (seeding stops at the limit).
    min_track_length: drop tracks visible in fewer frames than this.
    motion_boundary: tracks stop, and 3D pairs are not taken, within a pixel of flow
        discontinuities: flow gradient above this (pixels per pixel) plus 10% of the flow
        magnitude (where occlusions begin and flow is smoothed across objects); 0 = off.
    depth_edge_threshold: 3D pairs avoid pixels whose 3x3 neighbourhood spans more than this
        fraction of their depth (depth discontinuities, where lifting is ambiguous).
    points_per_pair: 3D pairs kept per flow pair and direction (uniform random subsample).
    make_video: write the overlay video tracks.mp4.
    seed: random seed of the subsampling.
    """

    grid_step: int = 8
    corners_per_query: int = 200
    query_every: int = 8
    max_tracks: int = 40000
    min_track_length: int = 2
    motion_boundary: float = 0.1
    depth_edge_threshold: float = 0.05
    points_per_pair: int = 1000
    make_video: bool = True
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot make sense."""
        if self.grid_step < 1:
            raise ParameterError(f"tracks.grid_step must be >= 1 pixel, got {self.grid_step}", "use e.g. 8")
        if self.corners_per_query < 0:
            raise ParameterError(f"tracks.corners_per_query must be >= 0, got {self.corners_per_query}",
                                 "use 0 (grid only) or e.g. 200")
        if self.query_every < 1:
            raise ParameterError(f"tracks.query_every must be >= 1 frame, got {self.query_every}", "use e.g. 8")
        if self.max_tracks < 1:
            raise ParameterError(f"tracks.max_tracks must be >= 1, got {self.max_tracks}", "use e.g. 40000")
        if self.min_track_length < 1:
            raise ParameterError(f"tracks.min_track_length must be >= 1 frame, got {self.min_track_length}",
                                 "use e.g. 2")
        if not math.isfinite(self.motion_boundary) or self.motion_boundary < 0:
            raise ParameterError(f"tracks.motion_boundary must be >= 0 pixels per pixel, got {self.motion_boundary}",
                                 "use 0 (off) or e.g. 0.1")
        if not math.isfinite(self.depth_edge_threshold) or self.depth_edge_threshold <= 0:
            raise ParameterError(f"tracks.depth_edge_threshold must be > 0, got {self.depth_edge_threshold}",
                                 "use e.g. 0.05 (5% of the depth)")
        if self.points_per_pair < 1:
            raise ParameterError(f"tracks.points_per_pair must be >= 1, got {self.points_per_pair}", "use e.g. 1000")


# ----------------------------------------------------------------------------- 2D tracks

def _advance(points: np.ndarray, flow: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move image points ``(K, 2)`` by ``flow`` ``(H, W, 2)``; returns the new points and a
    ``(K,)`` bool: the point sat on consistent flow and lands inside the image."""
    height, width = flow.shape[:2]
    x, y = points[:, 0] - PIXEL_CENTER, points[:, 1] - PIXEL_CENTER
    step = flow_stage.sample_bilinear(flow, x, y)
    consistent = flow_stage.sample_bilinear(valid.astype(np.float32), x, y, outside=0.0) >= _VALID_LEVEL
    moved = points + step
    inside = ((moved[:, 0] >= PIXEL_CENTER) & (moved[:, 0] <= width - 1 + PIXEL_CENTER)
              & (moved[:, 1] >= PIXEL_CENTER) & (moved[:, 1] <= height - 1 + PIXEL_CENTER))
    return moved, consistent & inside & np.isfinite(step).all(axis=1)


Seeder = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def chain_flow_tracks(load_pair: PairLoader, num_frames: int, seeder: Seeder,
                      max_tracks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Follow query points through consecutive flows, forward then backward in time.

    ``load_pair(t, t + 1)`` returns the flow stage's dict for that pair (``forward``, ``backward``,
    ``valid_forward``, ``valid_backward``). ``seeder(t, live_xy, seedable)`` is called for every
    frame t during the forward sweep with the image points ``(L, 2)`` of tracks alive at t and an
    ``(H, W)`` bool of pixels whose flow to t+1 or t-1 is consistent; it returns new query points
    ``(K, 2)`` on frame t (in order; beyond ``max_tracks`` in all they are dropped).

    Returns ``xy (N, T, 2)`` float32 (NaN where not tracked), ``visible (N, T)`` bool,
    ``query_frame (N,)`` int32, tracks in the order they were seeded.
    """
    capacity = max_tracks
    xy = np.full((capacity, num_frames, 2), np.nan, np.float32)
    visible = np.zeros((capacity, num_frames), bool)
    query_frame = np.zeros(capacity, np.int32)
    alive = np.zeros(capacity, bool)
    count = 0
    previous: dict | None = None
    for t in tqdm(range(num_frames), desc="tracks forward", unit="frame", leave=False):
        current = load_pair(t, t + 1) if t + 1 < num_frames else None
        masks = ([current["valid_forward"]] if current is not None else []) + \
            ([previous["valid_backward"]] if previous is not None else [])
        seedable = np.logical_or.reduce(masks)
        live = np.flatnonzero(alive)
        new_points = np.asarray(seeder(t, xy[live, t], seedable), np.float32).reshape(-1, 2)
        new_points = new_points[:max(0, capacity - count)]
        if len(new_points):
            added = slice(count, count + len(new_points))
            xy[added, t] = new_points
            visible[added, t] = True
            query_frame[added] = t
            alive[added] = True
            count += len(new_points)
        if current is None:
            break
        live = np.flatnonzero(alive)
        moved, ok = _advance(xy[live, t], current["forward"], current["valid_forward"])
        xy[live[ok], t + 1] = moved[ok]
        visible[live[ok], t + 1] = True
        alive[live[~ok]] = False
        previous = current

    alive[:] = False
    for t in tqdm(range(num_frames - 1, 0, -1), desc="tracks backward", unit="frame", leave=False):
        alive[:count] |= query_frame[:count] == t
        live = np.flatnonzero(alive)
        if not len(live):
            continue
        pair = load_pair(t - 1, t)
        moved, ok = _advance(xy[live, t], pair["backward"], pair["valid_backward"])
        xy[live[ok], t - 1] = moved[ok]
        visible[live[ok], t - 1] = True
        alive[live[~ok]] = False
    return xy[:count], visible[:count], query_frame[:count]


class GridSeeder:
    """Seeder for :func:`chain_flow_tracks`: on each query frame, corners (when ``images`` gives
    the RGB frame ``(H, W, 3)`` and ``corners_per_query`` > 0) then grid points, each only in a
    ``grid_step`` cell that holds no live track nor an earlier seed, and only on seedable pixels.

    ``budget`` seeds in all are shared fairly over time: a query frame gets at most the budget
    left divided by the query frames left (a uniform random subset when it has more candidates),
    so late frames are never starved. ``capped_frames`` lists the frames that were thinned.
    """

    def __init__(self, images: Callable[[int], np.ndarray] | None, query_frames: set[int], grid_step: int,
                 corners_per_query: int, height: int, width: int, budget: int, rng: np.random.Generator) -> None:
        self.images = images
        self.query_frames = sorted(query_frames)
        self.grid_step = grid_step
        self.corners_per_query = corners_per_query
        self.height, self.width = height, width
        self.budget = budget
        self.rng = rng
        self.produced = 0
        self.capped_frames: list[int] = []
        offset = grid_step / 2.0
        grid_x, grid_y = np.meshgrid(np.arange(offset, width, grid_step), np.arange(offset, height, grid_step))
        self.grid = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.float32) + PIXEL_CENTER
        self.cells_x, self.cells_y = -(-width // grid_step), -(-height // grid_step)

    def cell_index(self, points: np.ndarray) -> np.ndarray:
        """Occupancy cell of each image point ``(K, 2)``: ``(K,)`` int64."""
        cx = np.clip((points[:, 0] - PIXEL_CENTER) // self.grid_step, 0, self.cells_x - 1).astype(np.int64)
        cy = np.clip((points[:, 1] - PIXEL_CENTER) // self.grid_step, 0, self.cells_y - 1).astype(np.int64)
        return cy * self.cells_x + cx

    def candidates(self, t: int) -> list[np.ndarray]:
        """Candidate query points of frame ``t``, best first: corners, then the grid."""
        found = [self.grid]
        if self.images is not None and self.corners_per_query > 0:
            gray = cv2.cvtColor(self.images(t), cv2.COLOR_RGB2GRAY)
            corners = cv2.goodFeaturesToTrack(gray, self.corners_per_query, 0.01, max(1.0, self.grid_step / 2.0))
            if corners is not None:
                found.insert(0, corners.reshape(-1, 2).astype(np.float32) + PIXEL_CENTER)
        return found

    def __call__(self, t: int, live_xy: np.ndarray, seedable: np.ndarray) -> np.ndarray:
        """New query points ``(K, 2)`` of frame ``t`` (none off the query frames)."""
        if t not in self.query_frames:
            return np.zeros((0, 2), np.float32)
        occupied = np.zeros(self.cells_x * self.cells_y, bool)
        occupied[self.cell_index(live_xy)] = True
        chosen = []
        for points in self.candidates(t):
            rows = np.clip(np.rint(points[:, 1] - PIXEL_CENTER).astype(np.int64), 0, self.height - 1)
            cols = np.clip(np.rint(points[:, 0] - PIXEL_CENTER).astype(np.int64), 0, self.width - 1)
            points = points[seedable[rows, cols]]
            cells = self.cell_index(points)
            first = np.unique(cells, return_index=True)[1]
            keep = np.sort(first[~occupied[cells[first]]])
            occupied[cells[keep]] = True
            chosen.append(points[keep])
        seeds = np.concatenate(chosen)
        frames_left = len(self.query_frames) - self.query_frames.index(t)
        share = max(0, self.budget - self.produced) // frames_left
        if len(seeds) > share:
            seeds = seeds[np.sort(self.rng.choice(len(seeds), share, replace=False))]
            self.capped_frames.append(t)
        self.produced += len(seeds)
        return seeds


def query_frame_set(num_frames: int, query_every: int) -> set[int]:
    """Frames that get query points: every ``query_every``-th frame and the last one."""
    return set(range(0, num_frames, query_every)) | {num_frames - 1}


# ----------------------------------------------------------------------------- 3D pairs

def depth_edges(depth: np.ndarray, threshold: float) -> np.ndarray:
    """``(H, W)`` bool: pixels whose 3x3 neighbourhood spans more than ``threshold`` times their
    depth, or holds an invalid depth (<= 0 or non-finite)."""
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
    kernel = np.ones((3, 3), np.uint8)
    spread = cv2.dilate(depth, kernel) - cv2.erode(depth, kernel)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ~(spread <= threshold * depth) | (depth <= 0)


def unproject(xy: np.ndarray, depth: np.ndarray, K: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """World points ``(N, 3)`` float64 of image points ``(N, 2)`` with z-depth ``(N,)`` seen by a
    camera with intrinsics ``K`` (3, 3) and world-to-camera ``w2c`` (4, 4)."""
    homogeneous = np.concatenate([np.asarray(xy, np.float64), np.ones((len(xy), 1))], axis=1)
    camera = (homogeneous @ np.linalg.inv(K).T) * np.asarray(depth, np.float64)[:, None]
    rotation, translation = w2c[:3, :3], w2c[:3, 3]
    return (camera - translation) @ rotation


def lift_flow_pairs(flow_fwd: np.ndarray, valid: np.ndarray, depth_i: np.ndarray, depth_j: np.ndarray,
                    K: np.ndarray, w2c_i: np.ndarray, w2c_j: np.ndarray, depth_edge_threshold: float = 0.05,
                    max_points: int = 1000, rng: np.random.Generator | None = None,
                    K_j: np.ndarray | None = None, edges_i: np.ndarray | None = None,
                    edges_j: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """3D correspondences of one flow direction i -> j.

    ``flow_fwd`` ``(H, W, 2)`` pixels, ``valid`` ``(H, W)`` bool (consistency), ``depth_i``/``depth_j``
    ``(H, W)`` z-depth (<= 0 or NaN invalid), ``K`` (3, 3) intrinsics of frame i (``K_j`` of frame j,
    default ``K``), ``w2c_i``/``w2c_j`` (4, 4). Keeps pixels p with valid flow, p + F(p) inside the
    image, valid depth and no depth edge at p (frame i) nor at p + F(p) (frame j); at most
    ``max_points`` of them, drawn uniformly with ``rng``. ``edges_i``/``edges_j``: the frames'
    :func:`depth_edges` at ``depth_edge_threshold`` when the caller already has them.

    Returns ``src_xy``, ``dst_xy`` (M, 2) float32 image coordinates and ``src_xyz``, ``dst_xyz``
    (M, 3) float32 world points (dst: depth of frame j bilinearly sampled at p + F(p)).
    """
    height, width = flow_fwd.shape[:2]
    edges_i = depth_edges(depth_i, depth_edge_threshold) if edges_i is None else edges_i
    edges_j = depth_edges(depth_j, depth_edge_threshold) if edges_j is None else edges_j
    rows, cols = np.nonzero(valid & ~edges_i)
    step = flow_fwd[rows, cols].astype(np.float64)
    target_x, target_y = cols + step[:, 0], rows + step[:, 1]
    inside = (target_x >= 0) & (target_x <= width - 1) & (target_y >= 0) & (target_y <= height - 1)
    rows, cols, target_x, target_y = rows[inside], cols[inside], target_x[inside], target_y[inside]
    near_rows = np.rint(target_y).astype(np.int64)
    near_cols = np.rint(target_x).astype(np.int64)
    keep = ~edges_j[near_rows, near_cols]
    rows, cols, target_x, target_y = rows[keep], cols[keep], target_x[keep], target_y[keep]
    if len(rows) > max_points:
        rng = rng if rng is not None else np.random.default_rng(0)
        picked = np.sort(rng.choice(len(rows), size=max_points, replace=False))
        rows, cols, target_x, target_y = rows[picked], cols[picked], target_x[picked], target_y[picked]
    depth_j = np.where(np.isfinite(depth_j) & (depth_j > 0), depth_j, 0.0)
    target_depth = flow_stage.sample_bilinear(depth_j, target_x, target_y).astype(np.float64)
    src_xy = np.stack([cols, rows], axis=1).astype(np.float64) + PIXEL_CENTER
    dst_xy = np.stack([target_x, target_y], axis=1) + PIXEL_CENTER
    src_xyz = unproject(src_xy, depth_i[rows, cols], K, w2c_i)
    dst_xyz = unproject(dst_xy, target_depth, K if K_j is None else K_j, w2c_j)
    return {"src_xy": src_xy.astype(np.float32), "dst_xy": dst_xy.astype(np.float32),
            "src_xyz": src_xyz.astype(np.float32), "dst_xyz": dst_xyz.astype(np.float32)}


def lift_all_pairs(pairs: list[tuple[int, int]], load_pair: PairLoader, depth: np.ndarray, K: np.ndarray,
                   w2c: np.ndarray, registered: np.ndarray,
                   params: Params) -> tuple[dict[str, np.ndarray], dict[str, list[int]], int]:
    """Lift flow ``pairs`` (both directions) with ``depth`` ``(T, H, W)``, ``K`` ``(T, 3, 3)``,
    ``w2c`` ``(T, 4, 4)``; pairs with a frame not ``registered`` ``(T,)`` are skipped. Returns the
    concatenated arrays of the pairs3d.npz format, the per-pair ``[forward, backward]`` counts,
    and how many pairs were skipped."""
    rng = np.random.default_rng(params.seed)
    parts: list[dict[str, np.ndarray]] = []
    counts: dict[str, list[int]] = {}
    skipped = 0
    edges: dict[int, np.ndarray] = {}   # depth edges per frame, computed once (a frame is in many pairs)

    def frame_edges(frame: int) -> np.ndarray:
        if frame not in edges:
            edges[frame] = depth_edges(depth[frame], params.depth_edge_threshold)
        return edges[frame]
    for i, j in tqdm(pairs, desc="3D flow pairs", unit="pair"):
        if not (registered[i] and registered[j]):
            skipped += 1
            continue
        pair = load_pair(i, j)
        directions = ((i, j, pair["forward"], pair["valid_forward"]), (j, i, pair["backward"], pair["valid_backward"]))
        sizes = []
        for src, dst, flow, valid in directions:
            lifted = lift_flow_pairs(flow, valid, depth[src], depth[dst], K[src], w2c[src], w2c[dst],
                                     params.depth_edge_threshold, params.points_per_pair, rng, K_j=K[dst],
                                     edges_i=frame_edges(src), edges_j=frame_edges(dst))
            count = len(lifted["src_xy"])
            lifted["src_frame"] = np.full(count, src, np.int32)
            lifted["dst_frame"] = np.full(count, dst, np.int32)
            parts.append(lifted)
            sizes.append(count)
        counts[flow_pair_name(i, j)] = sizes
    arrays = {key: np.concatenate([part[key] for part in parts]) if parts else np.zeros((0, *shape), dtype)
              for key, (shape, dtype) in PAIRS3D_ARRAYS.items()}
    return arrays, counts, skipped


# ----------------------------------------------------------------------------- pictures

def track_colors(xy: np.ndarray, query_frame: np.ndarray, width: int) -> np.ndarray:
    """``(N, 3)`` uint8 RGB per track: hue from the x coordinate at its query frame."""
    start = xy[np.arange(len(xy)), query_frame, 0]
    ramp = np.clip(np.nan_to_num(start / max(width, 1)) * 255, 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(ramp.reshape(-1, 1), cv2.COLORMAP_HSV).reshape(-1, 3)
    return bgr[:, ::-1].copy()


def draw_tracks(image: np.ndarray, xy: np.ndarray, visible: np.ndarray, colors: np.ndarray, start: int,
                end: int, dot_frame: int) -> np.ndarray:
    """Frame ``image`` (H, W, 3) uint8 RGB with each track visible at ``dot_frame``: its path over
    frames ``start..end`` (between consecutive visible frames) and a dot at ``dot_frame``."""
    canvas = image.copy()
    scale = 16  # cv2 draws with 4 fractional bits: sub-pixel positions
    radius = int(round(max(1.0, max(image.shape[:2]) * _DOT_RADIUS_PER_SIDE) * scale))
    for track in np.flatnonzero(visible[:, dot_frame]):
        color = tuple(int(c) for c in colors[track])
        points = np.rint((np.nan_to_num(xy[track]) - PIXEL_CENTER) * scale).astype(np.int32)
        for a in range(start, end):
            if visible[track, a] and visible[track, a + 1]:
                cv2.line(canvas, tuple(points[a]), tuple(points[a + 1]), color, 1, cv2.LINE_AA, shift=4)
        cv2.circle(canvas, tuple(points[dot_frame]), radius, color, -1, cv2.LINE_AA, shift=4)
    return canvas


def write_pictures(out_dir: Path, images: Callable[[int], np.ndarray], xy: np.ndarray, visible: np.ndarray,
                   query_frame: np.ndarray, fps: float, make_video: bool, rng: np.random.Generator) -> list[str]:
    """Write ``tracks.png`` (the paths over +-20 frames of the tracks seen on the middle frame) and, with
    ``make_video``, ``tracks.mp4`` (the last frames of each track), for a random subset of about
    one track per 20x20 pixels; returns notes about what could not be written."""
    notes: list[str] = []
    num_frames = xy.shape[1]
    first = images(0)
    height, width = first.shape[:2]
    budget = max(1, height * width // _AREA_PER_DRAWN_TRACK)
    if len(xy) > budget:
        drawn = np.sort(rng.choice(len(xy), budget, replace=False))
        xy, visible, query_frame = xy[drawn], visible[drawn], query_frame[drawn]
    colors = track_colors(xy, query_frame, width)
    middle = num_frames // 2
    window = (max(0, middle - 2 * _TAIL_FRAMES), min(num_frames - 1, middle + 2 * _TAIL_FRAMES))
    write_rgb(out_dir / STILL_FILE, draw_tracks(images(middle), xy, visible, colors, *window, middle))
    if make_video:
        frames = (draw_tracks(images(t), xy, visible, colors, max(0, t - _TAIL_FRAMES), t, t)
                  for t in tqdm(range(num_frames), desc="tracks video", unit="frame", leave=False))
        try:
            write_video(out_dir / VIDEO_FILE, frames, fps)
        except OSError as error:
            notes.append(f"{error}: {VIDEO_FILE} was not written")
    return notes


# ----------------------------------------------------------------------------- stage

def tracking_pair_loader(flow_dir: str | Path, params: Params) -> PairLoader:
    """``load(i, j)``: the flow stage's pair with the validity masks that tracks and 3D pairs use:
    the flow stage's forward-backward masks less motion boundaries (``params.motion_boundary``),
    where occlusions begin but smoothed flow still passes the forward-backward check."""
    flow_dir = Path(flow_dir)

    def load(i: int, j: int) -> dict:
        pair = read_flow_pair(flow_dir, i, j)
        if params.motion_boundary > 0:
            for direction in ("forward", "backward"):
                boundary = flow_stage.motion_boundaries(pair[direction], params.motion_boundary, _BOUNDARY_RELATIVE)
                pair[f"valid_{direction}"] &= ~boundary
        return pair

    return load


def prefetching_loader(load: PairLoader, order: list[tuple[int, int]], pool: ThreadPoolExecutor,
                       depth: int) -> PairLoader:
    """``load`` as a :data:`PairLoader` whose pairs are loaded on ``pool``'s threads up to ``depth``
    ahead, in ``order`` (the order they will be asked for). Pairs asked for out of that order drop
    the prefetched ones before them; pairs not in it are loaded directly."""
    upcoming = deque(order)
    pending: deque[tuple[tuple[int, int], Future]] = deque()

    def fill() -> None:
        while upcoming and len(pending) < depth:
            key = upcoming.popleft()
            pending.append((key, pool.submit(load, *key)))

    def get(i: int, j: int) -> dict:
        fill()
        if all(key != (i, j) for key, _ in pending):
            if (i, j) not in upcoming:
                return load(i, j)
            pending.clear()  # skipped further than ``depth`` ahead: restart at the pair asked for
            while upcoming[0] != (i, j):
                upcoming.popleft()
            fill()
        while pending[0][0] != (i, j):
            pending.popleft()
        pair = pending.popleft()[1].result()
        fill()
        return pair

    return get


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """2D tracks from ``inputs["flow"]`` (and ``inputs["frames"]``), plus 3D flow pairs when
    ``inputs`` has ``"align"`` and ``"cameras"``.

    Returns ``{"num_tracks", "mean_track_length", "tracked_fraction"}`` (mean fraction of frames
    in which a track is visible) and, with 3D inputs, ``{"num_pairs3d", "pairs3d_per_pair"}``.
    """
    from mono4d.stages import frames as frames_stage

    params.validate()
    require_inputs(inputs, ("frames", "flow"), "tracks")
    out_dir = Path(out_dir)
    flow_dir = Path(inputs["flow"])
    meta = read_flow_meta(flow_dir)
    num_frames, height, width = int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
    stored = set(list_flow_pairs(flow_dir))
    missing = [(t, t + 1) for t in range(num_frames - 1) if (t, t + 1) not in stored]
    if missing:
        raise InputError(f"the flow stage in {flow_dir} lacks consecutive pairs, e.g. {missing[0]}",
                         "rerun the flow stage (consecutive pairs are always computed)")
    paths = frames_stage.frame_paths(inputs["frames"])
    if len(paths) != num_frames:
        raise InputError(f"the frames stage has {len(paths)} frames but the flow stage {num_frames}",
                         "rerun the flow stage on the current frames")

    workers = flow_stage.worker_count()
    with ThreadPoolExecutor(workers, thread_name_prefix="tracks") as pool:
        return _run(inputs, params, out_dir, flow_dir, num_frames, height, width, stored, paths, pool, 2 * workers)


def _run(inputs: Mapping[str, Path], params: Params, out_dir: Path, flow_dir: Path, num_frames: int, height: int,
         width: int, stored: set[tuple[int, int]], paths: list[Path], pool: ThreadPoolExecutor, depth: int) -> dict:
    """:func:`run` after its input checks, with flow pairs loaded up to ``depth`` ahead on ``pool``."""
    from mono4d.stages import frames as frames_stage

    cache: dict[int, np.ndarray] = {}

    def image(index: int) -> np.ndarray:
        if index not in cache:
            cache.clear()
            cache[index] = read_rgb(paths[index])
        return cache[index]

    lifted = "align" in inputs and "cameras" in inputs
    consecutive = [(t, t + 1) for t in range(num_frames - 1)]
    order = consecutive + consecutive[::-1] + (sorted(stored) if lifted else [])
    load_pair = prefetching_loader(tracking_pair_loader(flow_dir, params), order, pool, depth)
    rng = np.random.default_rng(params.seed)
    seeder = GridSeeder(image, query_frame_set(num_frames, params.query_every), params.grid_step,
                        params.corners_per_query, height, width, params.max_tracks, rng)
    xy, visible, query_frame = chain_flow_tracks(load_pair, num_frames, seeder, params.max_tracks)
    lengths = visible.sum(axis=1)
    keep = lengths >= params.min_track_length
    xy, visible, query_frame, lengths = xy[keep], visible[keep], query_frame[keep], lengths[keep]
    write_tracks(out_dir, xy, visible, query_frame)

    notes: list[str] = []
    if seeder.capped_frames:
        notes.append(f"the track budget (tracks.max_tracks={params.max_tracks}) thinned the query points of "
                     f"{len(seeder.capped_frames)} query frames")
    if len(xy):
        fps = float(frames_stage.read_frames_meta(inputs["frames"]).get("fps", 10.0))
        notes += write_pictures(out_dir, image, xy, visible, query_frame, fps, params.make_video, rng)
    else:
        notes.append("no track survived: the flow is inconsistent everywhere")
    figures: dict = {"num_tracks": int(len(xy)),
                     "mean_track_length": round(float(lengths.mean()), 2) if len(xy) else 0.0,
                     "tracked_fraction": round(float(lengths.mean()) / num_frames, 4) if len(xy) else 0.0}

    if lifted:
        depth = read_aligned_depth(inputs["align"])
        K, w2c, registered = read_cameras(inputs["cameras"])
        if depth.shape != (num_frames, height, width) or len(K) != num_frames:
            raise InputError(f"aligned depth {depth.shape} / cameras ({len(K)} frames) do not match the flow "
                             f"({num_frames} frames of {width}x{height})",
                             "rerun the align and cameras stages on the same frames as the flow stage")
        arrays, counts, skipped = lift_all_pairs(sorted(stored), load_pair, depth, K, w2c,
                                                 np.asarray(registered, bool), params)
        write_pairs3d(out_dir, arrays, counts)
        total = int(len(arrays["src_xyz"]))
        figures["num_pairs3d"] = total
        figures["pairs3d_per_pair"] = round(total / max(len(counts), 1), 1)
        if skipped:
            notes.append(f"{skipped} flow pairs were not lifted to 3D: a frame of theirs was not registered by the "
                         "cameras stage")
        if total == 0:
            notes.append("no 3D flow pair survived (no consistent flow on valid, edge-free depth)")
    if notes:
        figures["notes"] = notes
    logger.info("tracks: %d tracks, mean length %.1f frames", figures["num_tracks"], figures["mean_track_length"])
    return figures
