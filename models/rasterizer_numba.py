"""Compiled, multi-threaded, tile-based CPU compositor of projected Gaussians (numba), with an exact
backward, and the choice of compiled stages of the numba rasterizer backend (:func:`kernels`).

The backend runs :func:`models.rasterizer_torch.rasterize` with compiled stages: this compositor
always, and :mod:`models.projection_numba`'s projection (pinhole cameras, covariances from quats
and scales) and spherical harmonics (degrees 0 to 3) when cameras are not optimised; otherwise
those stages are the torch backend's. Its images, alphas and ``info`` are the torch backend's to
float rounding. The compositing rules are the torch backend's (and gsplat's CUDA kernel's): per pixel, front to back in camera depth order, ``alpha = min(0.999, o exp(-sigma))``
with ``sigma = a dx^2 / 2 + b dx dy + c dy^2 / 2`` (conic ``(a, b, c)``, ``d`` the offset from the
pixel centre to the projected mean), a Gaussian is skipped where ``alpha < 1/255`` or outside its
bounding box, and a pixel stops before the Gaussian that would bring its transmittance to 1e-4.

How, as gsplat does it on the GPU: each visible entry (camera, Gaussian), already sorted by depth,
is binned into the image tiles (``tile_size`` square) its bounding box overlaps; a counting sort by
tile keeps depth order inside each tile's list. Tiles are rendered in parallel (``prange``) with
early termination; each pixel keeps its final transmittance and list length. The backward walks
each pixel's list back to front, recovering transmittance by division, and accumulates gradients
per (tile, entry) pair so that threads never write to the same place; a parallel reduction per
entry sums them. Arithmetic is float64 throughout; results are returned in the input dtype.

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

from data.errors import ParameterError
from models.projection_numba import MAX_SH_DEGREE, project, set_threads, shade
from models.rasterizer_torch import ALPHA_THRESHOLD, MAX_ALPHA, MIN_TRANSMITTANCE

DEFAULT_TILE_SIZE = 16
"""Tile side in pixels (gsplat's default)."""
SPLAT_GRADIENTS = 6
"""Gradient slots per pair before the features: mean x, mean y, conic a, b, c, opacity."""


@njit(cache=True)
def _bin_tiles(boxes: np.ndarray, cameras: np.ndarray, n_cameras: int, tiles_x: int, tiles_y: int,
               tile_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tile lists of the entries (sorted front to back) whose inclusive pixel box ``boxes`` [V, 4]
    (x0, x1, y0, y1) overlaps the tile; ``cameras`` [V] camera index of each entry.

    Returns ``tile_offsets`` [C * tiles_y * tiles_x + 1] and ``tile_entries`` [P] (tile ``t`` holds
    ``tile_entries[tile_offsets[t]:tile_offsets[t + 1]]`` in depth order), and for the backward's
    reduction ``entry_offsets`` [V + 1] with ``entry_pairs`` [P]: the positions in ``tile_entries``
    of each entry's pairs.
    """
    n_entries = boxes.shape[0]
    n_tiles = n_cameras * tiles_x * tiles_y
    tile_offsets = np.zeros(n_tiles + 1, dtype=np.int64)
    entry_offsets = np.zeros(n_entries + 1, dtype=np.int64)
    for v in range(n_entries):
        tx0, tx1 = boxes[v, 0] // tile_size, boxes[v, 1] // tile_size
        ty0, ty1 = boxes[v, 2] // tile_size, boxes[v, 3] // tile_size
        base = cameras[v] * tiles_x * tiles_y
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                tile_offsets[base + ty * tiles_x + tx + 1] += 1
        entry_offsets[v + 1] = entry_offsets[v] + (tx1 - tx0 + 1) * (ty1 - ty0 + 1)
    for t in range(n_tiles):
        tile_offsets[t + 1] += tile_offsets[t]
    n_pairs = entry_offsets[n_entries]
    tile_entries = np.empty(n_pairs, dtype=np.int64)
    entry_pairs = np.empty(n_pairs, dtype=np.int64)
    fill = tile_offsets[:-1].copy()
    for v in range(n_entries):
        tx0, tx1 = boxes[v, 0] // tile_size, boxes[v, 1] // tile_size
        ty0, ty1 = boxes[v, 2] // tile_size, boxes[v, 3] // tile_size
        base = cameras[v] * tiles_x * tiles_y
        pair = entry_offsets[v]
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                tile = base + ty * tiles_x + tx
                tile_entries[fill[tile]] = v
                entry_pairs[pair] = fill[tile]
                fill[tile] += 1
                pair += 1
    return tile_offsets, tile_entries, entry_offsets, entry_pairs


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
def _row_span(splats: np.ndarray, boxes: np.ndarray, v: int, py: int, x_first: int,
              x_last: int) -> tuple[int, int]:
    """Inclusive pixel columns of row ``py`` within ``[x_first, x_last]`` and entry ``v``'s box
    where its alpha can reach 1/255 (``sigma <= log(255 o)``, solved exactly and widened by 1e-6 px
    for rounding; the threshold itself is applied per pixel). Empty when first > last."""
    first, last = max(boxes[v, 0], x_first), min(boxes[v, 1], x_last)
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


@njit(cache=True)
def _splats(means2d: np.ndarray, conics: np.ndarray, opacities: np.ndarray) -> np.ndarray:
    """``splats`` [V, 7] float64 (mx, my, a, b, c, o, log(255 o)) of the visible entries' ``means2d``
    [V, 2], ``conics`` [V, 3] and ``opacities`` [V]."""
    splats = np.empty((means2d.shape[0], 7))
    for v in range(means2d.shape[0]):
        splats[v, 0], splats[v, 1] = means2d[v, 0], means2d[v, 1]
        splats[v, 2], splats[v, 3], splats[v, 4] = conics[v, 0], conics[v, 1], conics[v, 2]
        splats[v, 5] = opacities[v]
        splats[v, 6] = np.log(splats[v, 5] / ALPHA_THRESHOLD)
    return splats


@njit(inline="always")
def _row_start(a: float, b: float, c: float, dx: float, dy: float) -> tuple[float, float]:
    """``exp(-sigma)`` at offset (dx, dy) and its ratio to the next pixel's (``dx - 1``): along a row
    ``sigma`` is quadratic, so the next ratio is this one times ``exp(-a)``."""
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    return np.exp(-sigma), np.exp(a * dx + b * dy - 0.5 * a)


@njit(cache=True)
def _forward_tile(tile: int, splats: np.ndarray, features: np.ndarray, boxes: np.ndarray,
                  tile_offsets: np.ndarray, tile_entries: np.ndarray, tiles_x: int, tiles_y: int, tile_size: int,
                  colors: np.ndarray, alphas: np.ndarray, final_t: np.ndarray, counts: np.ndarray,
                  transmittance: np.ndarray, color: np.ndarray, weights: np.ndarray, count: np.ndarray) -> None:
    """Composite tile ``tile`` front to back into ``colors``, ``alphas``, ``final_t`` and ``counts``
    (see :func:`_forward`), using the tile-sized buffers ``transmittance``, ``color``, ``weights`` and
    ``count`` (a pixel that has stopped has ``count`` negated minus one)."""
    n_features = features.shape[1]
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
        step_ratio = np.exp(-a)
        for py in range(max(boxes[v, 2], y_first), min(boxes[v, 3], y_last) + 1):
            first, last = _row_span(splats, boxes, v, py, x_first, x_last)
            if first > last:
                continue
            ty, dy = py - y_first, my - (py + 0.5)
            gauss, ratio = _row_start(a, b, c, mx - (first + 0.5), dy)
            for px in range(first, last + 1):
                tx = px - x_first
                alpha = min(MAX_ALPHA, opacity * gauss)
                gauss *= ratio
                ratio *= step_ratio
                if count[ty, tx] < 0 or alpha < ALPHA_THRESHOLD:
                    continue
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
                    color[ty, tx, d] += weight * features[v, d]
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
            final_t[camera, py, px] = transmittance[ty, tx]
            counts[camera, py, px] = count[ty, tx] if count[ty, tx] >= 0 else -count[ty, tx] - 1


@njit(parallel=True, cache=True)
def _forward(splats: np.ndarray, features: np.ndarray, boxes: np.ndarray, tile_offsets: np.ndarray,
             tile_entries: np.ndarray, worker_offsets: np.ndarray, worker_tiles: np.ndarray, n_cameras: int,
             width: int, height: int, tiles_x: int, tiles_y: int,
             tile_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Composite every tile front to back, each worker its tiles (:func:`_schedule`) in parallel.
    ``splats`` [V, 7] (:func:`_splats`), ``features`` [V, D].

    Within a tile, entries are taken in depth order and each updates only the pixels of its row
    spans, skipping pixels that have stopped; the tile ends when all its pixels have stopped.
    Pixels accumulate in tile-local buffers, written out once per tile.
    Returns ``colors`` [C, H, W, D] (sum of weight * feature) and ``alphas`` [C, H, W] (sum of
    weights) in the features' dtype, ``final_t`` [C, H, W] transmittance after the last blended
    entry, and ``counts`` [C, H, W] how many entries of the pixel's tile list come up to and
    including its last blended one.
    """
    n_features = features.shape[1]
    colors = np.zeros((n_cameras, height, width, n_features), dtype=features.dtype)
    alphas = np.zeros((n_cameras, height, width), dtype=features.dtype)
    final_t = np.ones((n_cameras, height, width))
    counts = np.zeros((n_cameras, height, width), dtype=np.int64)
    for worker in prange(worker_offsets.shape[0] - 1):
        transmittance = np.empty((tile_size, tile_size))
        color = np.empty((tile_size, tile_size, n_features))
        weights = np.empty((tile_size, tile_size))
        count = np.empty((tile_size, tile_size), dtype=np.int64)
        for i in range(worker_offsets[worker], worker_offsets[worker + 1]):
            _forward_tile(worker_tiles[i], splats, features, boxes, tile_offsets, tile_entries, tiles_x, tiles_y,
                          tile_size, colors, alphas, final_t, counts, transmittance, color, weights, count)
    return colors, alphas, final_t, counts


@njit(cache=True)
def _backward_tile(tile: int, splats: np.ndarray, features: np.ndarray, boxes: np.ndarray,
                   tile_offsets: np.ndarray, tile_entries: np.ndarray, final_t: np.ndarray, counts: np.ndarray,
                   grad_colors: np.ndarray, grad_alphas: np.ndarray, tiles_x: int, tiles_y: int, tile_size: int,
                   pair_grads: np.ndarray, transmittance: np.ndarray, rest: np.ndarray,
                   feature_grads: np.ndarray) -> None:
    """Gradients of tile ``tile``'s pairs into ``pair_grads`` (see :func:`_backward`), using the
    tile-sized buffers ``transmittance`` and ``rest`` and ``feature_grads`` [D]."""
    n_features = features.shape[1]
    height, width = final_t.shape[1], final_t.shape[2]
    start, stop = tile_offsets[tile], tile_offsets[tile + 1]
    camera, x_first, x_last, y_first, y_last = _tile_bounds(tile, tiles_x, tiles_y, tile_size, width, height)
    walked = 0
    for py in range(y_first, y_last + 1):
        for px in range(x_first, x_last + 1):
            transmittance[py - y_first, px - x_first] = final_t[camera, py, px]
            rest[py - y_first, px - x_first] = 0.0
            walked = max(walked, counts[camera, py, px])
    pair_grads[start + walked:stop] = 0.0
    for k in range(start + walked - 1, start - 1, -1):
        v = tile_entries[k]
        mx, my, a, b, c, opacity = splats[v, 0], splats[v, 1], splats[v, 2], splats[v, 3], splats[v, 4], splats[v, 5]
        step_ratio = np.exp(-a)
        grad_mx = grad_my = grad_a = grad_b = grad_c = grad_o = 0.0
        feature_grads[:] = 0.0
        for py in range(max(boxes[v, 2], y_first), min(boxes[v, 3], y_last) + 1):
            first, last = _row_span(splats, boxes, v, py, x_first, x_last)
            if first > last:
                continue
            ty, dy = py - y_first, my - (py + 0.5)
            gauss, ratio = _row_start(a, b, c, mx - (first + 0.5), dy)
            for px in range(first, last + 1):
                tx = px - x_first
                pixel_gauss = gauss
                alpha = min(MAX_ALPHA, opacity * gauss)
                gauss *= ratio
                ratio *= step_ratio
                if k - start >= counts[camera, py, px] or alpha < ALPHA_THRESHOLD:
                    continue
                dx = mx - (px + 0.5)
                if 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy < 0.0:
                    continue
                inverse = 1.0 / (1.0 - alpha)
                before = transmittance[ty, tx] * inverse
                transmittance[ty, tx] = before
                weight = alpha * before
                shade = float(grad_alphas[camera, py, px])
                for d in range(n_features):
                    grad = grad_colors[camera, py, px, d]
                    shade += features[v, d] * grad
                    feature_grads[d] += weight * grad
                grad_alpha = before * shade - rest[ty, tx] * inverse
                rest[ty, tx] += weight * shade
                if opacity * pixel_gauss > MAX_ALPHA:
                    continue
                grad_o += grad_alpha * pixel_gauss
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


@njit(parallel=True, cache=True)
def _backward(splats: np.ndarray, features: np.ndarray, boxes: np.ndarray, tile_offsets: np.ndarray,
              tile_entries: np.ndarray, entry_offsets: np.ndarray, entry_pairs: np.ndarray,
              worker_offsets: np.ndarray, worker_tiles: np.ndarray, final_t: np.ndarray, counts: np.ndarray,
              grad_colors: np.ndarray, grad_alphas: np.ndarray, tiles_x: int, tiles_y: int,
              tile_size: int) -> np.ndarray:
    """Exact gradients of ``_forward``'s colors and alphas: ``grad_colors`` [C, H, W, D] and
    ``grad_alphas`` [C, H, W] in; [V, 6 + D] out in the features' dtype (mean x, mean y, conic a,
    b, c, opacity, features).

    Each tile's list is walked back to front, every pixel starting from its final transmittance
    and taking only the entries up to its last blended one. With ``rest`` the sum over the pixel's
    later blended entries of ``w_k (f_k . g + g_alpha)``, ``dL/dalpha_i = T_i (f_i . g + g_alpha) -
    rest / (1 - alpha_i)``. Clamped alphas (0.999) pass no gradient to opacity or sigma. Gradients
    go to one slot per (tile, entry) pair, so that threads never write to the same place; a
    parallel reduction per entry sums them in tile order.
    """
    n_features = features.shape[1]
    n_slots = SPLAT_GRADIENTS + n_features
    pair_grads = np.empty((tile_entries.shape[0], n_slots))
    for worker in prange(worker_offsets.shape[0] - 1):
        transmittance = np.empty((tile_size, tile_size))
        rest = np.empty((tile_size, tile_size))
        feature_grads = np.empty(n_features)
        for i in range(worker_offsets[worker], worker_offsets[worker + 1]):
            _backward_tile(worker_tiles[i], splats, features, boxes, tile_offsets, tile_entries, final_t, counts,
                           grad_colors, grad_alphas, tiles_x, tiles_y, tile_size, pair_grads, transmittance, rest,
                           feature_grads)
    n_entries = splats.shape[0]
    grads = np.empty((n_entries, n_slots), dtype=features.dtype)
    for v in prange(n_entries):
        for slot in range(n_slots):
            total = 0.0
            for pair in range(entry_offsets[v], entry_offsets[v + 1]):
                total += pair_grads[entry_pairs[pair], slot]
            grads[v, slot] = total
    return grads


class _Composite(torch.autograd.Function):
    """Autograd wrapper of the numba kernels (see :func:`composite`)."""

    @staticmethod
    def forward(ctx, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, cameras: Tensor,
                boxes: Tensor, n_cameras: int, width: int, height: int,
                tile_size: int) -> tuple[Tensor, Tensor]:
        splats = _splats(*(value.detach().contiguous().numpy() for value in (means2d, conics, opacities)))
        features_array = features.detach().contiguous().numpy()
        boxes64 = boxes.to(torch.int64).contiguous().numpy()
        tiles_x, tiles_y = -(-width // tile_size), -(-height // tile_size)
        set_threads()
        bins = _bin_tiles(boxes64, cameras.to(torch.int64).contiguous().numpy(), n_cameras, tiles_x, tiles_y, tile_size)
        workers = _schedule(bins[0], numba.get_num_threads())
        colors, alphas, final_t, counts = _forward(splats, features_array, boxes64, bins[0], bins[1], *workers,
                                                   n_cameras, width, height, tiles_x, tiles_y, tile_size)
        ctx.kernel_inputs = (splats, features_array, boxes64, bins, workers, final_t, counts)
        ctx.sizes = (tiles_x, tiles_y, tile_size)
        return (torch.from_numpy(colors).to(means2d.dtype), torch.from_numpy(alphas)[..., None].to(means2d.dtype))

    @staticmethod
    def backward(ctx, grad_colors: Tensor, grad_alphas: Tensor) -> tuple[Tensor | None, ...]:
        splats, features_array, boxes64, bins, workers, final_t, counts = ctx.kernel_inputs
        set_threads()
        grads = _backward(splats, features_array, boxes64, *bins, *workers, final_t, counts,
                          grad_colors.contiguous().numpy(), grad_alphas[..., 0].contiguous().numpy(), *ctx.sizes)
        grads = torch.from_numpy(grads)
        return (grads[:, 0:2], grads[:, 2:5], grads[:, 5], grads[:, SPLAT_GRADIENTS:],
                None, None, None, None, None, None)


def composite(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, cameras: Tensor,
              boxes: Tensor, n_cameras: int, width: int, height: int,
              tile_size: int = DEFAULT_TILE_SIZE) -> tuple[Tensor, Tensor]:
    """Alpha-composite visible entries (sorted front to back) into C images, differentiably.

    ``means2d`` [V, 2] pixels, ``conics`` [V, 3], ``opacities`` [V], ``features`` [V, D] (CPU
    tensors), ``cameras`` [V] int64, ``boxes`` [V, 4] int64 inclusive pixel bounds x0, x1, y0, y1.
    Returns ``colors`` [C, H, W, D] (sum of weight * feature) and ``alphas`` [C, H, W, 1], the
    torch backend compositor's outputs (:func:`models.rasterizer_torch.composite_bands`).
    """
    if tile_size < 1:
        raise ParameterError(f"tile_size must be positive, got {tile_size}", "use e.g. 16 (the default)")
    return _Composite.apply(means2d, conics, opacities, features, cameras, boxes, n_cameras, width, height,
                            tile_size)


def kernels(viewmats: Tensor, Ks: Tensor, camera_model: str, covars: Tensor | None, sh_degree: int | None,
            tile_size: int = DEFAULT_TILE_SIZE) -> dict[str, Callable]:
    """The compiled stages for :func:`models.rasterizer_torch.rasterize` (its ``compositor``,
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
