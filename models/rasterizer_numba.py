"""Compiled, multi-threaded, tile-based CPU compositor of projected Gaussians (numba), with an exact
backward, and the choice of compiled stages of the numba rasterizer backend (:func:`kernels`).

The backend runs :func:`mono4d.models.rasterizer_torch.rasterize` with compiled stages: this compositor
always, and :mod:`mono4d.models.projection_numba`'s projection (pinhole cameras, covariances from quats
and scales) and spherical harmonics (degrees 0 to 3) when cameras are not optimised; otherwise
those stages are the torch backend's. Its images, alphas and ``info`` are the torch backend's to
float rounding. The compositing rules are the torch backend's (and gsplat's CUDA kernel's): per
pixel, front to back in camera depth order, ``alpha = min(0.999, o exp(-sigma))`` with ``sigma =
a dx^2 / 2 + b dx dy + c dy^2 / 2`` (conic ``(a, b, c)``, ``d`` the offset from the pixel centre
to the projected mean), a Gaussian is skipped where ``alpha < 1/255`` or outside its bounding box,
and a pixel stops before the Gaussian that would bring its transmittance to 1e-4.

How, as gsplat does it on the GPU: each visible entry (camera, Gaussian), already sorted by depth,
is binned into the image tiles (``tile_size`` square) its bounding box overlaps; a counting sort by
tile keeps depth order inside each tile's list. The entries' data (read from the projection's dense
[C, N, ...] arrays through the visible list, so that torch gathers nothing) are stored one row per
entry, grouped by their first tile, so that a tile reads them from a few runs of memory instead of
all over it (memory latency, not arithmetic, was most of the time). Tiles are rendered in parallel (``prange``) with
early termination; each entry evaluates ``exp(-sigma)`` only on its exact alpha >= 1/255 row
spans, by multiplicative recurrences along and between rows; each pixel keeps its list length.
The backward walks each pixel's list front to back again (transmittance as the forward's product,
no division to recover it) and accumulates gradients per (tile, entry) pair so that threads never
write to the same place; a parallel reduction per entry sums them and writes them straight to the
dense [C, N, ...] gradients of the projection (no ``index_put_`` in torch). Arithmetic is float64
throughout; results are returned in the input dtype.

The kernels are compiled on first use and cached on disk (``cache=True``, in ``__pycache__``), so
only the first run on a machine pays the compile time (about half a minute on 2 cores).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mono4d.data.errors import ParameterError
from mono4d.models.projection_numba import MAX_SH_DEGREE, project, set_threads, shade
from mono4d.models.rasterizer_torch import ALPHA_THRESHOLD, MAX_ALPHA, MIN_TRANSMITTANCE, Projection

DEFAULT_TILE_SIZE = 16
"""Tile side in pixels (gsplat's default)."""
SPLAT_FIELDS = 17
"""Values stored per entry before its features (:func:`_entries`)."""
SPLAT_GRADIENTS = 6
"""Gradient slots per pair before the features: mean x, mean y, conic a, b, c, opacity."""
DEFINITE_MARGIN = 1e-9
"""A conic with ``b^2 < a c (1 - margin)`` (and ``a > 0``) is positive definite with room for
float64 rounding: its sigma is never negative, so the per-pixel ``sigma < 0`` test is skipped."""
MAX_CURSOR_STEPS = 8
"""Furthest (in pixels) a row's first column is stepped to from the previous row's by recurrence;
further, ``exp(-sigma)`` is evaluated directly."""
CURSOR_RANGE = (1e-280, 1e280)
"""Recurrence values outside this range (far outside the Gaussian's ellipse, where they could
underflow) are evaluated directly instead."""


@njit(parallel=True, cache=True)
def _bin_tiles(boxes: np.ndarray, cameras: np.ndarray, n_cameras: int, tiles_x: int, tiles_y: int,
               tile_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Storage order and tile lists of the entries (sorted front to back) whose inclusive pixel box
    ``boxes`` [V, 4] (x0, x1, y0, y1) overlaps the tile; ``cameras`` [V] camera index of each entry.

    Entries are stored (``order`` [V]: the entry at each storage position; ``position`` [V]: the
    storage position of each entry) by the tile of their box's top-left corner, in depth order within
    it, so that a tile's list reads a few runs of neighbouring storage positions rather than
    positions scattered over all entries. Returns ``order``, ``position``, ``tile_offsets``
    [C * tiles_y * tiles_x + 1] and ``tile_entries`` [P] (tile ``t`` holds the storage positions
    ``tile_entries[tile_offsets[t]:tile_offsets[t + 1]]``, in depth order), and for the
    backward's reduction ``entry_offsets`` [V + 1] with ``entry_pairs`` [P]: for each storage
    position, the positions in ``tile_entries`` of its pairs.
    """
    n_entries = boxes.shape[0]
    n_tiles = n_cameras * tiles_x * tiles_y
    tile_boxes = np.empty((n_entries, 4), dtype=np.int64)  # inclusive tile columns and rows, camera offset
    for v in prange(n_entries):
        base = cameras[v] * tiles_x * tiles_y
        tile_boxes[v, 0], tile_boxes[v, 1] = base + boxes[v, 0] // tile_size, base + boxes[v, 1] // tile_size
        tile_boxes[v, 2], tile_boxes[v, 3] = boxes[v, 2] // tile_size * tiles_x, boxes[v, 3] // tile_size * tiles_x
    tile_offsets = np.zeros(n_tiles + 1, dtype=np.int64)
    corner_offsets = np.zeros(n_tiles + 1, dtype=np.int64)
    for v in range(n_entries):
        corner_offsets[tile_boxes[v, 2] + tile_boxes[v, 0] + 1] += 1
        for row in range(tile_boxes[v, 2], tile_boxes[v, 3] + 1, tiles_x):
            for tile in range(row + tile_boxes[v, 0], row + tile_boxes[v, 1] + 1):
                tile_offsets[tile + 1] += 1
    for t in range(n_tiles):
        tile_offsets[t + 1] += tile_offsets[t]
        corner_offsets[t + 1] += corner_offsets[t]
    order = np.empty(n_entries, dtype=np.int64)
    position = np.empty(n_entries, dtype=np.int64)
    for v in range(n_entries):
        corner = tile_boxes[v, 2] + tile_boxes[v, 0]
        order[corner_offsets[corner]] = v
        position[v] = corner_offsets[corner]
        corner_offsets[corner] += 1
    entry_offsets = np.zeros(n_entries + 1, dtype=np.int64)
    for u in range(n_entries):
        v = order[u]
        tiles_high = (tile_boxes[v, 3] - tile_boxes[v, 2]) // tiles_x + 1
        entry_offsets[u + 1] = entry_offsets[u] + (tile_boxes[v, 1] - tile_boxes[v, 0] + 1) * tiles_high
    n_pairs = entry_offsets[n_entries]
    tile_entries = np.empty(n_pairs, dtype=np.int64)
    entry_pairs = np.empty(n_pairs, dtype=np.int64)
    fill = tile_offsets[:-1].copy()
    for v in range(n_entries):
        pair = entry_offsets[position[v]]
        for row in range(tile_boxes[v, 2], tile_boxes[v, 3] + 1, tiles_x):
            for tile in range(row + tile_boxes[v, 0], row + tile_boxes[v, 1] + 1):
                tile_entries[fill[tile]] = position[v]
                entry_pairs[pair] = fill[tile]
                fill[tile] += 1
                pair += 1
    return order, position, tile_offsets, tile_entries, entry_offsets, entry_pairs


@njit(parallel=True, cache=True)
def _entries(position: np.ndarray, cameras: np.ndarray, gaussians: np.ndarray, means2d: np.ndarray,
             conics: np.ndarray, opacities: np.ndarray, depths: np.ndarray, with_depth: bool, features: np.ndarray,
             boxes: np.ndarray) -> np.ndarray:
    """The V visible entries (camera ``cameras[v]``, Gaussian ``gaussians[v]``) in storage order
    (``position``, :func:`_bin_tiles`), read from the projection's ``means2d`` [C, N, 2], ``conics``
    [C, N, 3], ``opacities`` [C, N] and ``depths`` [C, N], with their ``features`` [V, D] and
    ``boxes`` [V, 4]: one float64 row [V, SPLAT_FIELDS + D (+ 1 when ``with_depth``)] per entry, so
    that a tile reads each of its entries from one place: mx, my, a, b, c, o, log(255 o), 1 where
    the conic is safely positive definite (so that sigma cannot round below 0) else 0, the
    recurrence factors exp(-a), exp(-b), exp(-c), exp(a), exp(b) (:func:`_falloff`), the box x0,
    x1, y0, y1, then the features and the depth."""
    n_entries, n_features = position.shape[0], features.shape[1]
    splats = np.empty((n_entries, SPLAT_FIELDS + n_features + with_depth))
    for v in prange(n_entries):
        u, camera, gaussian = position[v], cameras[v], gaussians[v]
        a, b = float(conics[camera, gaussian, 0]), float(conics[camera, gaussian, 1])
        c = float(conics[camera, gaussian, 2])
        splats[u, 0], splats[u, 1] = means2d[camera, gaussian, 0], means2d[camera, gaussian, 1]
        splats[u, 2], splats[u, 3], splats[u, 4] = a, b, c
        splats[u, 5] = opacities[camera, gaussian]
        splats[u, 6] = np.log(splats[u, 5] / ALPHA_THRESHOLD)
        splats[u, 7] = 1.0 if a > 0.0 and b * b < a * c * (1.0 - DEFINITE_MARGIN) else 0.0
        # From the stored float64 values: float() keeps a float32 input's precision.
        a, b, c = splats[u, 2], splats[u, 3], splats[u, 4]
        splats[u, 8], splats[u, 9], splats[u, 10] = np.exp(-a), np.exp(-b), np.exp(-c)
        splats[u, 11], splats[u, 12] = np.exp(a), np.exp(b)
        for i in range(4):
            splats[u, 13 + i] = boxes[v, i]
        for d in range(n_features):
            splats[u, SPLAT_FIELDS + d] = features[v, d]
        if with_depth:
            splats[u, SPLAT_FIELDS + n_features] = depths[camera, gaussian]
    return splats


@njit(inline="always")
def _tile_bounds(tile: int, tiles_x: int, tiles_y: int, tile_size: int, width: int,
                 height: int) -> tuple[int, int, int, int, int]:
    """Camera and inclusive pixel bounds (x_first, x_last, y_first, y_last) of tile ``tile`` (tiles
    numbered camera-major, then row, then column), clipped to the image."""
    camera = tile // (tiles_x * tiles_y)
    y_first = (tile // tiles_x) % tiles_y * tile_size
    x_first = tile % tiles_x * tile_size
    return camera, x_first, min(x_first + tile_size, width) - 1, y_first, min(y_first + tile_size, height) - 1


@njit(inline="always")
def _row_span(splats: np.ndarray, v: int, py: int, x_first: int, x_last: int) -> tuple[int, int]:
    """Inclusive pixel columns of row ``py`` within ``[x_first, x_last]`` and entry ``v``'s box
    where its alpha can reach 1/255 (``sigma <= log(255 o)``, solved exactly and widened by 1e-6 px
    for rounding; the threshold itself is applied per pixel). Empty when first > last."""
    first, last = max(int(splats[v, 13]), x_first), min(int(splats[v, 14]), x_last)
    a, b, c = splats[v, 2], splats[v, 3], splats[v, 4]
    dy = splats[v, 1] - (py + 0.5)
    discriminant = dy * dy * (b * b - a * c) + 2.0 * a * splats[v, 6]
    if discriminant < 0.0 or a <= 0.0:
        return 1, 0
    half_span = np.sqrt(discriminant) / a
    centre = splats[v, 0] + b * dy / a - 0.5
    return max(first, int(np.ceil(centre - half_span - 1e-6))), min(last, int(np.floor(centre + half_span + 1e-6)))


@njit(cache=True)
def _schedule(tile_offsets: np.ndarray, n_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty tiles dealt to ``n_workers`` workers, longest lists first, each to the worker with
    the fewest entries so far. Returns ``worker_offsets`` [n_workers + 1] and ``worker_tiles``:
    worker ``w`` renders ``worker_tiles[worker_offsets[w]:worker_offsets[w + 1]]``."""
    lengths = tile_offsets[1:] - tile_offsets[:-1]
    order = np.argsort(-lengths, kind="mergesort")
    load = np.zeros(n_workers, dtype=np.int64)
    owner = np.full(lengths.shape[0], -1, dtype=np.int64)
    worker_offsets = np.zeros(n_workers + 1, dtype=np.int64)
    for tile in order:
        if lengths[tile] == 0:
            break
        worker = np.argmin(load)
        owner[tile] = worker
        load[worker] += lengths[tile]
        worker_offsets[worker + 1] += 1
    for worker in range(n_workers):
        worker_offsets[worker + 1] += worker_offsets[worker]
    worker_tiles = np.empty(worker_offsets[n_workers], dtype=np.int64)
    fill = worker_offsets[:-1].copy()
    for tile in order:
        if owner[tile] < 0:
            break
        worker_tiles[fill[owner[tile]]] = tile
        fill[owner[tile]] += 1
    return worker_offsets, worker_tiles


@njit(inline="always")
def _falloff(a: float, b: float, c: float, dx: float, dy: float) -> tuple[float, float, float]:
    """``exp(-sigma)`` at offset (dx, dy) and its ratios to the right neighbour's (``dx - 1``) and
    to the lower neighbour's (``dy - 1``). ``sigma`` is quadratic, so a step right multiplies the
    right ratio by ``exp(-a)`` and the lower one by ``exp(-b)``, and a step down the lower ratio by
    ``exp(-c)`` and the right one by ``exp(-b)``."""
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    return np.exp(-sigma), np.exp(a * dx + b * dy - 0.5 * a), np.exp(c * dy + b * dx - 0.5 * c)


@njit(inline="always")
def _row_falloff(gauss: float, right: float, down: float, column: int, first: int, a: float, b: float,
                 c: float, dx: float, dy: float,
                 steps: tuple[float, float, float, float, float]) -> tuple[float, float, float]:
    """:func:`_falloff` at a row's first column ``first`` (offset (dx, dy)), stepped from the cursor
    (``gauss``, ``right``, ``down`` at column ``column`` of this row; -1: no cursor yet) when it is
    near, else (or where the steps leave the safe float range) evaluated directly."""
    step_a, step_b, _, inverse_a, inverse_b = steps
    if column >= 0 and abs(first - column) <= MAX_CURSOR_STEPS:
        for _ in range(column, first):
            gauss *= right
            right *= step_a
            down *= step_b
        for _ in range(first, column):
            right *= inverse_a
            gauss /= right
            down *= inverse_b
        if (CURSOR_RANGE[0] < gauss < CURSOR_RANGE[1] and CURSOR_RANGE[0] < right < CURSOR_RANGE[1]
                and CURSOR_RANGE[0] < down < CURSOR_RANGE[1]):
            return gauss, right, down
    return _falloff(a, b, c, dx, dy)


@njit(inline="always")
def _next_row(splats: np.ndarray, v: int, py: int, x_first: int, x_last: int,
              cursor: tuple[int, float, float, float],
              steps: tuple[float, float, float, float, float]) -> tuple[int, int, tuple[int, float, float, float]]:
    """Entry ``v``'s span (first, last) on row ``py`` (:func:`_row_span`) and the cursor (column,
    ``exp(-sigma)``, right and lower ratios; column -1: none yet) moved from the previous row to
    the span's first column (:func:`_row_falloff`); rows must come in order."""
    column, gauss, right, down = cursor
    if column >= 0:
        gauss, right, down = gauss * down, right * steps[1], down * steps[2]
    first, last = _row_span(splats, v, py, x_first, x_last)
    if first <= last:
        mx, my, a, b, c = splats[v, 0], splats[v, 1], splats[v, 2], splats[v, 3], splats[v, 4]
        gauss, right, down = _row_falloff(gauss, right, down, column, first, a, b, c, mx - (first + 0.5),
                                          my - (py + 0.5), steps)
        column = first
    return first, last, (column, gauss, right, down)


@njit(cache=True)
def _forward_tile(tile: int, splats: np.ndarray, tile_offsets: np.ndarray, tile_entries: np.ndarray, tiles_x: int,
                  tiles_y: int, tile_size: int, colors: np.ndarray, alphas: np.ndarray, counts: np.ndarray,
                  transmittance: np.ndarray, color: np.ndarray, weights: np.ndarray, count: np.ndarray,
                  entry_features: np.ndarray) -> None:
    """Composite tile ``tile`` front to back into ``colors``, ``alphas`` and ``counts`` (see
    :func:`_forward`), using the tile-sized buffers ``transmittance``, ``color``, ``weights`` and
    ``count`` (a pixel that has stopped has ``count`` negated minus one), and ``entry_features`` [D]."""
    n_features = splats.shape[1] - SPLAT_FIELDS
    height, width = alphas.shape[1], alphas.shape[2]
    start, stop = tile_offsets[tile], tile_offsets[tile + 1]
    camera, x_first, x_last, y_first, y_last = _tile_bounds(tile, tiles_x, tiles_y, tile_size, width, height)
    rows, columns = y_last - y_first + 1, x_last - x_first + 1
    transmittance[:rows, :columns] = 1.0
    color[:rows, :columns] = 0.0
    weights[:rows, :columns] = 0.0
    count[:rows, :columns] = 0
    running = rows * columns
    for k in range(start, stop):
        v = tile_entries[k]
        mx, my, a, b, c, opacity = splats[v, 0], splats[v, 1], splats[v, 2], splats[v, 3], splats[v, 4], splats[v, 5]
        definite = splats[v, 7] > 0.0
        for d in range(n_features):
            entry_features[d] = splats[v, SPLAT_FIELDS + d]
        steps = (splats[v, 8], splats[v, 9], splats[v, 10], splats[v, 11], splats[v, 12])
        cursor = (-1, 0.0, 0.0, 0.0)
        for py in range(max(int(splats[v, 15]), y_first), min(int(splats[v, 16]), y_last) + 1):
            first, last, cursor = _next_row(splats, v, py, x_first, x_last, cursor, steps)
            if first <= last:
                ty, dy = py - y_first, my - (py + 0.5)
                pixel_gauss, ratio = cursor[1], cursor[2]
                for px in range(first, last + 1):
                    tx = px - x_first
                    alpha = min(MAX_ALPHA, opacity * pixel_gauss)
                    pixel_gauss *= ratio
                    ratio *= steps[0]
                    if count[ty, tx] < 0 or alpha < ALPHA_THRESHOLD:
                        continue
                    if not definite:
                        dx = mx - (px + 0.5)
                        if 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy < 0.0:
                            continue
                    before = transmittance[ty, tx]
                    after = before * (1.0 - alpha)
                    if after <= MIN_TRANSMITTANCE:
                        count[ty, tx] = -count[ty, tx] - 1
                        running -= 1
                        continue
                    weight = alpha * before
                    for d in range(n_features):
                        color[ty, tx, d] += weight * entry_features[d]
                    weights[ty, tx] += weight
                    transmittance[ty, tx] = after
                    count[ty, tx] = k - start + 1
        if running == 0:
            break
    for ty in range(rows):
        for tx in range(columns):
            py, px = y_first + ty, x_first + tx
            for d in range(n_features):
                colors[camera, py, px, d] = color[ty, tx, d]
            alphas[camera, py, px] = weights[ty, tx]
            counts[camera, py, px] = count[ty, tx] if count[ty, tx] >= 0 else -count[ty, tx] - 1


@njit(parallel=True, cache=True)
def _forward(splats: np.ndarray, tile_offsets: np.ndarray,
             tile_entries: np.ndarray, worker_offsets: np.ndarray, worker_tiles: np.ndarray, n_cameras: int,
             width: int, height: int, tiles_x: int, tiles_y: int,
             tile_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Composite every tile front to back, each worker its tiles (:func:`_schedule`) in parallel.
    ``splats`` [V, SPLAT_FIELDS + D] in storage order (:func:`_entries`).

    Within a tile, entries are taken in depth order and each updates only the pixels of its row
    spans, skipping pixels that have stopped; the tile ends when all its pixels have stopped. Along
    a row, and from one row's first column to the next's, ``exp(-sigma)`` follows multiplicative
    recurrences (:func:`_falloff`), so an entry needs a few ``exp`` per tile rather than per pixel.
    Pixels accumulate in tile-local buffers, written out once per tile.
    Returns float64 ``colors`` [C, H, W, D] (sum of weight * feature) and ``alphas`` [C, H, W] (sum
    of weights), and ``counts`` [C, H, W] how many entries of the pixel's tile list come up to and
    including its last blended one.
    """
    n_features = splats.shape[1] - SPLAT_FIELDS
    colors = np.zeros((n_cameras, height, width, n_features))
    alphas = np.zeros((n_cameras, height, width))
    counts = np.zeros((n_cameras, height, width), dtype=np.int64)
    for worker in prange(worker_offsets.shape[0] - 1):
        transmittance = np.empty((tile_size, tile_size))
        color = np.empty((tile_size, tile_size, n_features))
        weights = np.empty((tile_size, tile_size))
        count = np.empty((tile_size, tile_size), dtype=np.int64)
        entry_features = np.empty(n_features)
        for i in range(worker_offsets[worker], worker_offsets[worker + 1]):
            _forward_tile(worker_tiles[i], splats, tile_offsets, tile_entries, tiles_x, tiles_y,
                          tile_size, colors, alphas, counts, transmittance, color, weights, count, entry_features)
    return colors, alphas, counts


@njit(cache=True)
def _backward_tile(tile: int, splats: np.ndarray, tile_offsets: np.ndarray, tile_entries: np.ndarray,
                   colors: np.ndarray, alphas: np.ndarray, counts: np.ndarray, grad_colors: np.ndarray,
                   grad_alphas: np.ndarray, tiles_x: int, tiles_y: int, tile_size: int, pair_grads: np.ndarray,
                   transmittance: np.ndarray, rest: np.ndarray, pixel_grads: np.ndarray, count: np.ndarray,
                   entry_features: np.ndarray, feature_grads: np.ndarray) -> None:
    """Gradients of tile ``tile``'s pairs into ``pair_grads`` (see :func:`_backward`), using the
    tile-sized buffers ``transmittance``, ``rest``, ``pixel_grads`` (the pixels' colour and alpha
    gradients) and ``count``, and ``entry_features`` and ``feature_grads`` [D]."""
    n_features = splats.shape[1] - SPLAT_FIELDS
    height, width = alphas.shape[1], alphas.shape[2]
    start, stop = tile_offsets[tile], tile_offsets[tile + 1]
    camera, x_first, x_last, y_first, y_last = _tile_bounds(tile, tiles_x, tiles_y, tile_size, width, height)
    walked = 0
    for ty in range(y_last - y_first + 1):
        for tx in range(x_last - x_first + 1):
            py, px = y_first + ty, x_first + tx
            transmittance[ty, tx] = 1.0
            total = float(grad_alphas[camera, py, px])
            pixel_grads[ty, tx, n_features] = total
            total *= alphas[camera, py, px]
            for d in range(n_features):
                pixel_grads[ty, tx, d] = grad_colors[camera, py, px, d]
                total += colors[camera, py, px, d] * pixel_grads[ty, tx, d]
            rest[ty, tx] = total
            count[ty, tx] = counts[camera, py, px]
            walked = max(walked, count[ty, tx])
    for k in range(start, start + walked):
        v = tile_entries[k]
        mx, my, a, b, c, opacity = splats[v, 0], splats[v, 1], splats[v, 2], splats[v, 3], splats[v, 4], splats[v, 5]
        definite = splats[v, 7] > 0.0
        steps = (splats[v, 8], splats[v, 9], splats[v, 10], splats[v, 11], splats[v, 12])
        cursor = (-1, 0.0, 0.0, 0.0)
        grad_mx = grad_my = grad_a = grad_b = grad_c = grad_o = 0.0
        for d in range(n_features):
            entry_features[d] = splats[v, SPLAT_FIELDS + d]
            feature_grads[d] = 0.0
        for py in range(max(int(splats[v, 15]), y_first), min(int(splats[v, 16]), y_last) + 1):
            first, last, cursor = _next_row(splats, v, py, x_first, x_last, cursor, steps)
            if first <= last:
                ty, dy = py - y_first, my - (py + 0.5)
                pixel_gauss, ratio = cursor[1], cursor[2]
                for px in range(first, last + 1):
                    tx = px - x_first
                    this_gauss = pixel_gauss
                    alpha = min(MAX_ALPHA, opacity * pixel_gauss)
                    pixel_gauss *= ratio
                    ratio *= steps[0]
                    if k - start >= count[ty, tx] or alpha < ALPHA_THRESHOLD:
                        continue
                    dx = mx - (px + 0.5)
                    if not definite and 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy < 0.0:
                        continue
                    before = transmittance[ty, tx]
                    transmittance[ty, tx] = before * (1.0 - alpha)
                    weight = alpha * before
                    shade = pixel_grads[ty, tx, n_features]
                    for d in range(n_features):
                        grad = pixel_grads[ty, tx, d]
                        shade += entry_features[d] * grad
                        feature_grads[d] += weight * grad
                    rest[ty, tx] -= weight * shade
                    if opacity * this_gauss > MAX_ALPHA:
                        continue
                    grad_alpha = before * shade - rest[ty, tx] / (1.0 - alpha)
                    grad_o += grad_alpha * this_gauss
                    grad_sigma = -grad_alpha * alpha
                    grad_mx += grad_sigma * (a * dx + b * dy)
                    grad_my += grad_sigma * (b * dx + c * dy)
                    grad_a += grad_sigma * 0.5 * dx * dx
                    grad_b += grad_sigma * dx * dy
                    grad_c += grad_sigma * 0.5 * dy * dy
        pair_grads[k, 0], pair_grads[k, 1], pair_grads[k, 2] = grad_mx, grad_my, grad_a
        pair_grads[k, 3], pair_grads[k, 4], pair_grads[k, 5] = grad_b, grad_c, grad_o
        for d in range(n_features):
            pair_grads[k, SPLAT_GRADIENTS + d] = feature_grads[d]
    pair_grads[start + walked:stop] = 0.0


@njit(inline="always")
def _pair_sum(pair_grads: np.ndarray, entry_pairs: np.ndarray, first: int, stop: int, slot: int) -> float:
    """Sum of gradient slot ``slot`` over the pairs ``entry_pairs[first:stop]`` of one entry, in tile order."""
    total = 0.0
    for pair in range(first, stop):
        total += pair_grads[entry_pairs[pair], slot]
    return total


@njit(parallel=True, cache=True)
def _backward(splats: np.ndarray, order: np.ndarray, cameras: np.ndarray, gaussians: np.ndarray,
              tile_offsets: np.ndarray, tile_entries: np.ndarray, entry_offsets: np.ndarray,
              entry_pairs: np.ndarray, worker_offsets: np.ndarray, worker_tiles: np.ndarray, colors: np.ndarray,
              alphas: np.ndarray, counts: np.ndarray, grad_colors: np.ndarray, grad_alphas: np.ndarray,
              tiles_x: int, tiles_y: int, tile_size: int, grad_means2d: np.ndarray, grad_conics: np.ndarray,
              grad_opacities: np.ndarray, grad_depths: np.ndarray, grad_features: np.ndarray) -> None:
    """Exact gradients of ``_forward``'s colors and alphas (``grad_colors`` [C, H, W, D] and
    ``grad_alphas`` [C, H, W]) written, for the entries (camera ``cameras[v]``, Gaussian
    ``gaussians[v]``, in depth order as given to :func:`_bin_tiles`), into the projection's
    ``grad_means2d`` [C, N, 2], ``grad_conics`` [C, N, 3], ``grad_opacities`` [C, N] and (where the
    depth is the last feature, ``splats`` having one more feature than ``grad_features``)
    ``grad_depths`` [C, N], and into ``grad_features`` [V, D]; other places are left as they are.

    Each tile's list is walked front to back again, every pixel taking only the entries up to its
    last blended one, so that transmittance is the forward's product, not recovered by division.
    With ``rest`` the sum over the pixel's later blended entries of ``w_k (f_k . g + g_alpha)``
    (the pixel's total, ``colors . g + alphas g_alpha``, less the entries so far), ``dL/dalpha_i =
    T_i (f_i . g + g_alpha) - rest / (1 - alpha_i)``. Clamped alphas (0.999) pass no gradient to
    opacity or sigma. Gradients go to one slot per (tile, entry) pair, so that threads never write
    to the same place; a parallel reduction per entry sums them in tile order and writes them to
    the entry's own places (no two entries share a camera and Gaussian).
    """
    n_features = splats.shape[1] - SPLAT_FIELDS
    n_slots = SPLAT_GRADIENTS + n_features
    pair_grads = np.empty((tile_entries.shape[0], n_slots))
    for worker in prange(worker_offsets.shape[0] - 1):
        transmittance = np.empty((tile_size, tile_size))
        rest = np.empty((tile_size, tile_size))
        pixel_grads = np.empty((tile_size, tile_size, n_features + 1))
        count = np.empty((tile_size, tile_size), dtype=np.int64)
        entry_features = np.empty(n_features)
        feature_grads = np.empty(n_features)
        for i in range(worker_offsets[worker], worker_offsets[worker + 1]):
            _backward_tile(worker_tiles[i], splats, tile_offsets, tile_entries, colors, alphas,
                           counts, grad_colors, grad_alphas, tiles_x, tiles_y, tile_size, pair_grads, transmittance,
                           rest, pixel_grads, count, entry_features, feature_grads)
    n_colors = grad_features.shape[1]
    for u in prange(splats.shape[0]):
        v, first, stop = order[u], entry_offsets[u], entry_offsets[u + 1]
        camera, gaussian = cameras[v], gaussians[v]
        for i in range(2):
            grad_means2d[camera, gaussian, i] = _pair_sum(pair_grads, entry_pairs, first, stop, i)
        for i in range(3):
            grad_conics[camera, gaussian, i] = _pair_sum(pair_grads, entry_pairs, first, stop, 2 + i)
        grad_opacities[camera, gaussian] = _pair_sum(pair_grads, entry_pairs, first, stop, 5)
        for d in range(n_colors):
            grad_features[v, d] = _pair_sum(pair_grads, entry_pairs, first, stop, SPLAT_GRADIENTS + d)
        if n_features > n_colors:
            grad_depths[camera, gaussian] = _pair_sum(pair_grads, entry_pairs, first, stop, n_slots - 1)


class _Composite(torch.autograd.Function):
    """Autograd wrapper of the numba kernels (see :func:`composite`)."""

    @staticmethod
    def forward(ctx, means2d: Tensor, conics: Tensor, opacities: Tensor, depths: Tensor, features: Tensor,
                cameras: Tensor, gaussians: Tensor, boxes: Tensor, with_depth: bool, n_cameras: int, width: int,
                height: int, tile_size: int) -> tuple[Tensor, Tensor]:
        dense = tuple(value.detach().contiguous() for value in (means2d, conics, opacities, depths))
        indices = (cameras.to(torch.int64).contiguous().numpy(), gaussians.to(torch.int64).contiguous().numpy())
        boxes64 = boxes.to(torch.int64).contiguous().numpy()
        tiles_x, tiles_y = -(-width // tile_size), -(-height // tile_size)
        set_threads()
        order, position, *bins = _bin_tiles(boxes64, indices[0], n_cameras, tiles_x, tiles_y, tile_size)
        splats = _entries(position, *indices, *(value.numpy() for value in dense), with_depth,
                          features.detach().contiguous().numpy(), boxes64)
        workers = _schedule(bins[0], numba.get_num_threads())
        colors, alphas, counts = _forward(splats, bins[0], bins[1], *workers, n_cameras, width, height, tiles_x,
                                          tiles_y, tile_size)
        ctx.kernel_inputs = (splats, order, indices, bins, workers, colors, alphas, counts)
        ctx.sizes = (tiles_x, tiles_y, tile_size)
        ctx.like = (dense, features)
        # Copies: the backward reads the float64 sums, which the caller must not see change.
        return (torch.from_numpy(colors).to(means2d.dtype, copy=True),
                torch.from_numpy(alphas)[..., None].to(means2d.dtype, copy=True))

    @staticmethod
    def backward(ctx, grad_colors: Tensor, grad_alphas: Tensor) -> tuple[Tensor | None, ...]:
        splats, order, indices, bins, workers, colors, alphas, counts = ctx.kernel_inputs
        dense, features = ctx.like
        grads = [torch.zeros_like(value) for value in dense] + [torch.empty_like(features)]
        set_threads()
        _backward(splats, order, *indices, *bins, *workers, colors, alphas, counts, grad_colors.contiguous().numpy(),
                  grad_alphas[..., 0].contiguous().numpy(), *ctx.sizes, *(grad.numpy() for grad in grads))
        if splats.shape[1] == SPLAT_FIELDS + features.shape[1]:  # no depth feature
            grads[3] = None
        return (*grads, None, None, None, None, None, None, None, None)


def composite(projection: Projection, features: Tensor, with_depth: bool, n_cameras: int, width: int, height: int,
              tile_size: int = DEFAULT_TILE_SIZE) -> tuple[Tensor, Tensor]:
    """Alpha-composite the visible entries of ``projection`` (sorted front to back) with their
    ``features`` [V, D] (CPU tensors), and their camera depth as one more last channel when
    ``with_depth``, into C images, differentiably in the projection's dense ``means2d``,
    ``conics``, ``opacities`` and ``depths`` [C, N, ...] and in ``features``: the kernels read the
    entries' values through the visible list and write their gradients back to its places, so
    there is no gather (nor its backward) in torch.
    Returns ``colors`` [C, H, W, D (+ 1)] (sum of weight * feature) and ``alphas`` [C, H, W, 1],
    the torch backend compositor's outputs (:func:`mono4d.models.rasterizer_torch.composite_projection`).
    """
    if tile_size < 1:
        raise ParameterError(f"tile_size must be positive, got {tile_size}", "use e.g. 16 (the default)")
    return _Composite.apply(projection.means2d, projection.conics, projection.opacities, projection.depths, features,
                            projection.visible_cameras, projection.visible_gaussians, projection.boxes, with_depth,
                            n_cameras, width, height, tile_size)


def kernels(viewmats: Tensor, Ks: Tensor, camera_model: str, covars: Tensor | None, sh_degree: int | None,
            tile_size: int = DEFAULT_TILE_SIZE) -> dict[str, Callable]:
    """The compiled stages for :func:`mono4d.models.rasterizer_torch.rasterize` (its ``compositor``,
    ``projector`` and ``shader`` arguments) for one call: the compositor always; the projection
    for pinhole cameras from quats and scales; the spherical harmonics for degrees 0 to 3. Where
    ``viewmats`` (or, for the projection, ``Ks``) require gradients, the torch stages run instead,
    since the compiled ones do not differentiate with respect to cameras."""
    stages: dict[str, Callable] = {"compositor": functools.partial(composite, tile_size=tile_size)}
    if not viewmats.requires_grad:
        if not Ks.requires_grad and camera_model == "pinhole" and covars is None:
            stages["projector"] = project
        if sh_degree is not None and sh_degree <= MAX_SH_DEGREE:
            stages["shader"] = shade
    return stages
