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


@njit(inline="always")
def _alpha(a: float, b: float, c: float, opacity: float, dx: float, dy: float) -> tuple[float, float]:
    """Alpha of a splat with conic (a, b, c) and ``opacity`` at offset (dx, dy) from the pixel
    centre to its mean (0 where skipped), and ``exp(-sigma)``."""
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    if sigma < 0.0:
        return 0.0, 0.0
    gauss = np.exp(-sigma)
    alpha = min(MAX_ALPHA, opacity * gauss)
    if alpha < ALPHA_THRESHOLD:
        return 0.0, gauss
    return alpha, gauss


@njit(parallel=True, cache=True)
def _forward(splats: np.ndarray, features: np.ndarray, boxes: np.ndarray, tile_offsets: np.ndarray,
             tile_entries: np.ndarray, n_cameras: int, width: int, height: int, tiles_x: int, tiles_y: int,
             tile_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Composite every tile front to back. ``splats`` [V, 7] (mx, my, a, b, c, o, log(255 o)),
    ``features`` [V, D].

    Within a tile, entries are taken in depth order and each updates only the pixels of its row
    spans, skipping pixels that have stopped; the tile ends when all its pixels have stopped.
    Pixels accumulate in tile-local buffers, written out once per tile.
    Returns ``colors`` [C, H, W, D] (sum of weight * feature), ``alphas`` [C, H, W] (sum of weights),
    ``final_t`` [C, H, W] transmittance after the last blended entry, and ``counts`` [C, H, W] how
    many entries of the pixel's tile list come up to and including its last blended one.
    """
    n_features = features.shape[1]
    colors = np.zeros((n_cameras, height, width, n_features))
    alphas = np.zeros((n_cameras, height, width))
    final_t = np.ones((n_cameras, height, width))
    counts = np.zeros((n_cameras, height, width), dtype=np.int64)
    for tile in prange(n_cameras * tiles_y * tiles_x):
        start, stop = tile_offsets[tile], tile_offsets[tile + 1]
        if start == stop:
            continue
        camera, x_first, x_last, y_first, y_last = _tile_bounds(tile, tiles_x, tiles_y, tile_size, width, height)
        rows, columns = y_last - y_first + 1, x_last - x_first + 1
        transmittance = np.ones((rows, columns))
        color = np.zeros((rows, columns, n_features))
        weights = np.zeros((rows, columns))
        count = np.zeros((rows, columns), dtype=np.int64)
        stopped = np.zeros((rows, columns), dtype=np.bool_)
        running = rows * columns
        for k in range(start, stop):
            v = tile_entries[k]
            mx, my, a, b, c, opacity = splats[v, 0], splats[v, 1], splats[v, 2], splats[v, 3], splats[v, 4], splats[v, 5]
            for py in range(max(boxes[v, 2], y_first), min(boxes[v, 3], y_last) + 1):
                first, last = _row_span(splats, boxes, v, py, x_first, x_last)
                ty, dy = py - y_first, my - (py + 0.5)
                for px in range(first, last + 1):
                    tx = px - x_first
                    if stopped[ty, tx]:
                        continue
                    alpha, _ = _alpha(a, b, c, opacity, mx - (px + 0.5), dy)
                    if alpha == 0.0:
                        continue
                    before = transmittance[ty, tx]
                    after = before * (1.0 - alpha)
                    if after <= MIN_TRANSMITTANCE:
                        stopped[ty, tx] = True
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
                counts[camera, py, px] = count[ty, tx]
    return colors, alphas, final_t, counts


@njit(parallel=True, cache=True)
def _backward(splats: np.ndarray, features: np.ndarray, boxes: np.ndarray, tile_offsets: np.ndarray,
              tile_entries: np.ndarray, entry_offsets: np.ndarray, entry_pairs: np.ndarray,
              final_t: np.ndarray, counts: np.ndarray, grad_colors: np.ndarray, grad_alphas: np.ndarray,
              n_cameras: int, width: int, height: int, tiles_x: int, tiles_y: int,
              tile_size: int) -> np.ndarray:
    """Exact gradients of ``_forward``'s colors and alphas: ``grad_colors`` [C, H, W, D] and
    ``grad_alphas`` [C, H, W] in; [V, 6 + D] out (mean x, mean y, conic a, b, c, opacity, features).

    Each tile's list is walked back to front, every pixel starting from its final transmittance
    and taking only the entries up to its last blended one. With ``rest`` the sum over the pixel's
    later blended entries of ``w_k (f_k . g + g_alpha)``, ``dL/dalpha_i = T_i (f_i . g + g_alpha) -
    rest / (1 - alpha_i)``. Clamped alphas (0.999) pass no gradient to opacity or sigma.
    """
    n_features = features.shape[1]
    n_slots = SPLAT_GRADIENTS + n_features
    pair_grads = np.empty((tile_entries.shape[0], n_slots))
    for tile in prange(n_cameras * tiles_y * tiles_x):
        start, stop = tile_offsets[tile], tile_offsets[tile + 1]
        if start == stop:
            continue
        camera, x_first, x_last, y_first, y_last = _tile_bounds(tile, tiles_x, tiles_y, tile_size, width, height)
        transmittance = final_t[camera, y_first:y_last + 1, x_first:x_last + 1].copy()
        rest = np.zeros(transmittance.shape)
        walked = counts[camera, y_first:y_last + 1, x_first:x_last + 1].copy()
        tile_grad_colors = grad_colors[camera, y_first:y_last + 1, x_first:x_last + 1].copy()
        tile_grad_alphas = grad_alphas[camera, y_first:y_last + 1, x_first:x_last + 1].copy()
        feature_grads = np.zeros(n_features)
        last_walked = start + walked.max() - 1
        pair_grads[last_walked + 1:stop] = 0.0
        for k in range(last_walked, start - 1, -1):
            v = tile_entries[k]
            mx, my, a, b, c, opacity = splats[v, 0], splats[v, 1], splats[v, 2], splats[v, 3], splats[v, 4], splats[v, 5]
            grad_mx = grad_my = grad_a = grad_b = grad_c = grad_o = 0.0
            feature_grads[:] = 0.0
            for py in range(max(boxes[v, 2], y_first), min(boxes[v, 3], y_last) + 1):
                first, last = _row_span(splats, boxes, v, py, x_first, x_last)
                ty, dy = py - y_first, my - (py + 0.5)
                for px in range(first, last + 1):
                    tx = px - x_first
                    if k - start >= walked[ty, tx]:
                        continue
                    dx = mx - (px + 0.5)
                    alpha, gauss = _alpha(a, b, c, opacity, dx, dy)
                    if alpha == 0.0:
                        continue
                    before = transmittance[ty, tx] / (1.0 - alpha)
                    transmittance[ty, tx] = before
                    weight = alpha * before
                    shade = tile_grad_alphas[ty, tx]
                    for d in range(n_features):
                        grad = tile_grad_colors[ty, tx, d]
                        shade += features[v, d] * grad
                        feature_grads[d] += weight * grad
                    grad_alpha = before * shade - rest[ty, tx] / (1.0 - alpha)
                    rest[ty, tx] += weight * shade
                    if opacity * gauss > MAX_ALPHA:
                        continue
                    grad_o += grad_alpha * gauss
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
    n_entries = splats.shape[0]
    grads = np.zeros((n_entries, n_slots))
    for v in prange(n_entries):
        for pair in range(entry_offsets[v], entry_offsets[v + 1]):
            position = entry_pairs[pair]
            for slot in range(n_slots):
                grads[v, slot] += pair_grads[position, slot]
    return grads


class _Composite(torch.autograd.Function):
    """Autograd wrapper of the numba kernels (see :func:`composite`)."""

    @staticmethod
    def forward(ctx, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, cameras: Tensor,
                boxes: Tensor, n_cameras: int, width: int, height: int,
                tile_size: int) -> tuple[Tensor, Tensor]:
        splats = torch.cat([means2d, conics, opacities[:, None], opacities[:, None]], 1).detach().to(torch.float64)
        splats[:, 6] = torch.log(splats[:, 5] / ALPHA_THRESHOLD)
        splats = splats.numpy()
        features64 = features.detach().to(torch.float64).contiguous().numpy()
        boxes64 = boxes.to(torch.int64).contiguous().numpy()
        tiles_x, tiles_y = -(-width // tile_size), -(-height // tile_size)
        set_threads()
        bins = _bin_tiles(boxes64, cameras.to(torch.int64).contiguous().numpy(), n_cameras, tiles_x, tiles_y, tile_size)
        with numba.parallel_chunksize(1):
            colors, alphas, final_t, counts = _forward(splats, features64, boxes64, bins[0], bins[1], n_cameras,
                                                       width, height, tiles_x, tiles_y, tile_size)
        ctx.kernel_inputs = (splats, features64, boxes64, bins, final_t, counts)
        ctx.sizes = (n_cameras, width, height, tiles_x, tiles_y, tile_size)
        ctx.dtype = means2d.dtype
        return (torch.from_numpy(colors).to(means2d.dtype), torch.from_numpy(alphas)[..., None].to(means2d.dtype))

    @staticmethod
    def backward(ctx, grad_colors: Tensor, grad_alphas: Tensor) -> tuple[Tensor | None, ...]:
        splats, features64, boxes64, (tile_offsets, tile_entries, entry_offsets, entry_pairs), final_t, counts = (
            ctx.kernel_inputs)
        set_threads()
        with numba.parallel_chunksize(1):
            grads = _backward(splats, features64, boxes64, tile_offsets, tile_entries, entry_offsets, entry_pairs,
                              final_t, counts, grad_colors.to(torch.float64).contiguous().numpy(),
                              grad_alphas[..., 0].to(torch.float64).contiguous().numpy(), *ctx.sizes)
        grads = torch.from_numpy(grads).to(ctx.dtype)
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
