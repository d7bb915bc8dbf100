"""Pure-PyTorch differentiable rasterizer of 3D Gaussians (runs on CPU, or on any device torch runs on).

It reproduces ``gsplat.rasterization`` (gsplat 1.5.3, ``packed=False``, ``rasterize_mode`` "classic"
or "antialiased") with plain autograd: projection and spherical harmonics reuse gsplat's own
pure-torch code (``gsplat.cuda._torch_impl``); only the compositing is written here.

Compositing, per camera and pixel, front to back in camera depth order (the rules of gsplat's CUDA
kernel): ``alpha = min(0.999, opacity * exp(-0.5 * d^T Sigma2d^-1 d))`` with ``d`` the offset from the
projected mean to the pixel centre (pixel ``(i, j)`` has its centre at ``(i + 0.5, j + 0.5)``), a
Gaussian with ``alpha < 1/255`` is skipped, and a pixel stops before the Gaussian that would bring its
transmittance ``T`` to 1e-4 or below. ``Sigma2d`` includes gsplat's ``eps2d`` blur.

How: on each image row of a visible Gaussian's opacity-aware bounding box (the box gsplat's CUDA
projection computes), the span of pixels where its alpha reaches 1/255 is solved in closed form and
expanded into (pixel, Gaussian) pairs; pairs are sorted by pixel and then depth, and transmittance is
a segmented exclusive cumulative sum of ``log(1 - alpha)`` (float64, so that sums over millions of
pairs keep their precision). Work is split into bands of image rows holding at most ``max_pairs``
bounding-box pairs each; with gradients enabled each band is checkpointed (recomputed in backward),
so peak memory stays bounded by one band's pairs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gsplat.cuda._torch_impl import (
    _fully_fused_projection,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
)
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mono4d.data.errors import ParameterError

ALPHA_THRESHOLD = 1.0 / 255.0
"""A Gaussian whose alpha at a pixel is below this is skipped there (gsplat's ALPHA_THRESHOLD)."""
MAX_ALPHA = 0.999
"""Per-pixel alpha of one Gaussian is clamped to this (as gsplat's kernel does)."""
MIN_TRANSMITTANCE = 1e-4
"""A pixel stops before the Gaussian that would bring its transmittance to this or below."""
MAX_EXTENT_SIGMAS = 3.33
"""Upper bound of the bounding-box half size in standard deviations (gsplat's projection)."""
DEFAULT_MAX_PAIRS = 1 << 22
"""Default bound on (pixel, Gaussian) box pairs processed at once (about 4.2 million)."""

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
CAMERA_MODELS = ("pinhole", "ortho", "fisheye")


@dataclass
class Projection:
    """Projected Gaussians: dense per (camera, Gaussian) tensors as gsplat returns them unpacked,
    and the visible subset, sorted by camera depth, that the compositor works on."""

    radii: Tensor  # [C, N, 2] int32, 0 where not visible
    means2d: Tensor  # [C, N, 2] pixels
    depths: Tensor  # [C, N] camera z
    conics: Tensor  # [C, N, 3] upper triangle of the inverse 2D covariance (a, b, c)
    opacities: Tensor  # [C, N] opacities (times the antialiasing compensation when used)
    visible_cameras: Tensor  # [V] int64 camera index of each visible entry, depth order
    visible_gaussians: Tensor  # [V] int64 Gaussian index of each visible entry, depth order
    boxes: Tensor  # [V, 4] int64 inclusive pixel bounds x0, x1, y0, y1 clipped to the image


def _project(means: Tensor, covars: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
             width: int, height: int, near_plane: float, far_plane: float, eps2d: float,
             radius_clip: float, antialiased: bool, camera_model: str) -> Projection:
    """Project N Gaussians (world ``means`` [N, 3], ``covars`` [N, 3, 3]) into C cameras.

    Only (camera, Gaussian) entries with ``near_plane < z < far_plane`` go through gsplat's torch
    projection, so Gaussians behind a camera never produce infinite values (or NaN gradients).
    Radii follow gsplat's CUDA projection: the half box size is ``ceil(e * sqrt(Sigma2d_ii))`` with
    ``e = min(3.33, sqrt(2 log(255 * opacity)))``; entries with opacity below 1/255, both radii at
    most ``radius_clip``, or a box entirely off the image get radii 0.
    """
    n_cameras, n_gaussians = viewmats.shape[0], means.shape[0]
    with torch.no_grad():
        z = means @ viewmats[:, 2, :3].T + viewmats[:, 2, 3]  # [N, C]
        in_range = ((z > near_plane) & (z < far_plane)).T  # [C, N]
    cam_ids, gs_ids = torch.nonzero(in_range, as_tuple=True)

    radii_p, means2d_p, depths_p, conics_p, compensations_p = _fully_fused_projection(
        means[gs_ids][:, None], covars[gs_ids][:, None], viewmats[cam_ids][:, None], Ks[cam_ids][:, None],
        width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane,
        calc_compensations=antialiased, camera_model=camera_model)
    means2d_p, depths_p, conics_p = means2d_p[:, 0, 0], depths_p[:, 0, 0], conics_p[:, 0, 0]
    opacities_p = opacities[gs_ids]
    if compensations_p is not None:
        opacities_p = opacities_p * compensations_p[:, 0, 0]

    with torch.no_grad():
        a, b, c = conics_p.unbind(-1)
        det = (a * c - b * b).clamp_min(1e-30)
        var_x, var_y = c / det, a / det  # diagonal of Sigma2d (blur included)
        opaque_enough = opacities_p >= ALPHA_THRESHOLD
        extent = torch.sqrt(2.0 * torch.log(opacities_p.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extent = extent.clamp(max=MAX_EXTENT_SIGMAS)
        radius_x = torch.ceil(extent * torch.sqrt(var_x))
        radius_y = torch.ceil(extent * torch.sqrt(var_y))
        mx, my = means2d_p[:, 0], means2d_p[:, 1]
        on_image = ((mx + radius_x > 0) & (mx - radius_x < width)
                    & (my + radius_y > 0) & (my - radius_y < height))
        large_enough = (radius_x > radius_clip) | (radius_y > radius_clip)
        valid = (radii_p[:, 0, 0] > 0).all(-1) & opaque_enough & on_image & large_enough
        radii_valid = torch.stack([radius_x, radius_y], -1) * valid[:, None]

    def dense(values: Tensor) -> Tensor:
        out = values.new_zeros((n_cameras, n_gaussians) + values.shape[1:])
        return out.index_put((cam_ids, gs_ids), values)

    means2d, depths, conics, dense_opacities = dense(means2d_p), dense(depths_p), dense(conics_p), dense(opacities_p)
    radii = dense(radii_valid.to(torch.int32))

    with torch.no_grad():
        order = torch.argsort(depths_p[valid], stable=True)
        visible = torch.nonzero(valid, as_tuple=True)[0][order]
        # Pixel (i, j) has its centre at (i + 0.5, j + 0.5): it lies in the box when |i + 0.5 - mx| <= rx.
        mx, my = means2d_p[visible, 0], means2d_p[visible, 1]
        rx, ry = radius_x[visible], radius_y[visible]
        boxes = torch.stack([
            torch.ceil(mx - rx - 0.5).clamp(0, width - 1), torch.floor(mx + rx - 0.5).clamp(0, width - 1),
            torch.ceil(my - ry - 0.5).clamp(0, height - 1), torch.floor(my + ry - 0.5).clamp(0, height - 1),
        ], -1).to(torch.int64)
        nonempty = (boxes[:, 1] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 2])
    visible, boxes = visible[nonempty], boxes[nonempty]
    return Projection(radii=radii, means2d=means2d, depths=depths, conics=conics, opacities=dense_opacities,
                       visible_cameras=cam_ids[visible], visible_gaussians=gs_ids[visible], boxes=boxes)


def _row_bands(boxes: Tensor, height: int, max_pairs: int) -> list[tuple[int, int]]:
    """Split image rows into bands ``[start, stop)`` holding at most ``max_pairs`` box pairs each
    (summed over all cameras; a single row above the bound becomes a band of its own)."""
    widths = boxes[:, 1] - boxes[:, 0] + 1
    changes = torch.zeros(height + 1, dtype=torch.int64, device=boxes.device)
    changes.index_add_(0, boxes[:, 2], widths)
    changes.index_add_(0, boxes[:, 3] + 1, -widths)
    pairs_per_row = torch.cumsum(changes, 0)[:height].tolist()
    bands, start, in_band = [], 0, 0
    for row, pairs in enumerate(pairs_per_row):
        if in_band and in_band + pairs > max_pairs:
            bands.append((start, row))
            start, in_band = row, 0
        in_band += pairs
    bands.append((start, height))
    return bands


def _composite_rows(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                    cameras: Tensor, boxes: Tensor, row_start: int, row_stop: int,
                    n_cameras: int, width: int) -> tuple[Tensor, Tensor]:
    """Alpha-composite visible entries (sorted front to back) into image rows ``[row_start, row_stop)``.

    ``means2d`` [V, 2] pixels, ``conics`` [V, 3], ``opacities`` [V], ``features`` [V, D],
    ``cameras`` [V] int64, ``boxes`` [V, 4] int64 inclusive x0, x1, y0, y1.
    Returns ``features`` [C, rows, W, D] (sum of weight * feature) and ``alphas`` [C, rows, W, 1].

    Pairs are generated row by row over each Gaussian's box, only across the span of the row where
    ``opacity * exp(-0.5 d^T conic d) >= 1/255`` (solved exactly, widened by a pixel for rounding);
    the alpha threshold is then applied exactly to the generated pairs.
    """
    rows = row_stop - row_start
    dtype, device = means2d.dtype, means2d.device
    splats = (means2d[:, 0], means2d[:, 1], conics[:, 0], conics[:, 1], conics[:, 2], opacities)  # 6 x [V]
    with torch.no_grad():
        y_first = boxes[:, 2].clamp(min=row_start)
        heights = (boxes[:, 3].clamp(max=row_stop - 1) - y_first + 1).clamp(min=0)
        row_entry = torch.repeat_interleave(torch.arange(len(heights), device=device), heights)
        row_y = torch.arange(len(row_entry), device=device) + torch.repeat_interleave(
            y_first - (torch.cumsum(heights, 0) - heights), heights)
        mx, my, a, b, c, opacity = torch.stack(splats, 0).detach().index_select(1, row_entry)
        x_min, x_max, camera = torch.stack([boxes[:, 0], boxes[:, 1], cameras], 0).index_select(1, row_entry)
        # Row span where a dx^2 + 2 b dx dy + c dy^2 <= 2 log(255 opacity), dx = x - mx, dy = y - my.
        dy = row_y.to(dtype) + 0.5 - my
        discriminant = dy * dy * (b * b - a * c) + 2.0 * a * torch.log(opacity / ALPHA_THRESHOLD)
        half_span = torch.sqrt(discriminant.clamp_min(0)) / a
        centre = mx - b * dy / a - 0.5
        span_first = torch.maximum(torch.ceil(centre - half_span).to(torch.int64) - 1, x_min)
        span_last = torch.minimum(torch.floor(centre + half_span).to(torch.int64) + 1, x_max)
        lengths = torch.where(discriminant >= 0, span_last - span_first + 1, 0).clamp(min=0)
        row_pixel = (camera * rows + row_y - row_start) * width + span_first
        pixel = torch.arange(int(lengths.sum()), device=device) + torch.repeat_interleave(
            row_pixel - (torch.cumsum(lengths, 0) - lengths), lengths)
        entry = torch.repeat_interleave(row_entry, lengths)
        # Pairs are generated in depth order, so a stable sort by pixel keeps depth order per pixel.
        pixel, by_pixel = torch.sort(pixel, stable=True)
        entry = entry.index_select(0, by_pixel)
        starts = torch.ones_like(pixel, dtype=torch.bool)
        starts[1:] = pixel[1:] != pixel[:-1]
        segment_start = torch.cummax(torch.where(starts, torch.arange(len(pixel), device=device), 0), 0).values
        x = (pixel % width).to(dtype) + 0.5
        y = (torch.div(pixel, width, rounding_mode="floor") % rows + row_start).to(dtype) + 0.5

    # Per-pair values are gathered and reduced one channel at a time: 1-D index_select/index_add
    # are several times faster on CPU than their [P, k] counterparts, backward included.
    mx, my, a, b, c, opacity = (values.index_select(0, entry) for values in splats)
    dx, dy = mx - x, my - y
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = torch.clamp(opacity * torch.exp(-sigma), max=MAX_ALPHA)
    with torch.no_grad():
        hit = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    alpha = alpha * hit  # skipped pairs: alpha 0, no effect on transmittance
    log_transmittance = torch.log1p(-alpha).to(torch.float64)
    exclusive = torch.cumsum(log_transmittance, 0) - log_transmittance
    transmittance = torch.exp(exclusive - exclusive.index_select(0, segment_start)).to(dtype)  # T before each pair
    with torch.no_grad():
        contributes = transmittance * (1.0 - alpha) > MIN_TRANSMITTANCE
    weights = alpha * transmittance * contributes

    image = torch.zeros(n_cameras * rows * width, dtype=dtype, device=device)
    sums = [image.index_add(0, pixel, weights * channel.index_select(0, entry)) for channel in features.unbind(-1)]
    out = torch.stack(sums + [image.index_add(0, pixel, weights)], -1).reshape(n_cameras, rows, width, -1)
    return out[..., :-1], out[..., -1:]


def composite_bands(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, cameras: Tensor,
                    boxes: Tensor, n_cameras: int, width: int, height: int,
                    max_pairs: int = DEFAULT_MAX_PAIRS) -> tuple[Tensor, Tensor]:
    """Alpha-composite visible entries (sorted front to back) into C images with torch autograd.

    ``means2d`` [V, 2] pixels, ``conics`` [V, 3], ``opacities`` [V], ``features`` [V, D],
    ``cameras`` [V] int64, ``boxes`` [V, 4] int64 inclusive x0, x1, y0, y1 clipped to the image.
    Returns ``colors`` [C, H, W, D] (sum of weight * feature) and ``alphas`` [C, H, W, 1]. Rows
    are done in bands of at most ``max_pairs`` box pairs, checkpointed when there are several.
    """
    bands = _row_bands(boxes, height, max_pairs)
    checkpointed = len(bands) > 1 and torch.is_grad_enabled()
    rendered, alphas = [], []
    for row_start, row_stop in bands:
        args = (means2d, conics, opacities, features, cameras, boxes, row_start, row_stop, n_cameras, width)
        band_colors, band_alphas = (checkpoint(_composite_rows, *args, use_reentrant=False)
                                    if checkpointed else _composite_rows(*args))
        rendered.append(band_colors)
        alphas.append(band_alphas)
    return torch.cat(rendered, 1), torch.cat(alphas, 1)


def composite_projection(projection: Projection, features: Tensor, with_depth: bool, n_cameras: int, width: int,
                         height: int, max_pairs: int = DEFAULT_MAX_PAIRS) -> tuple[Tensor, Tensor]:
    """Alpha-composite the visible entries of ``projection`` with their ``features`` [V, D], and
    their camera depth as one more last channel when ``with_depth``, into C images: the entries'
    values gathered from the dense [C, N, ...] projection, then :func:`composite_bands`.
    Returns ``colors`` [C, H, W, D (+ 1)] and ``alphas`` [C, H, W, 1]."""
    cams, gaussians = projection.visible_cameras, projection.visible_gaussians
    if with_depth:
        features = torch.cat([features, projection.depths[cams, gaussians][:, None]], -1)
    return composite_bands(projection.means2d[cams, gaussians], projection.conics[cams, gaussians],
                           projection.opacities[cams, gaussians], features, cams, projection.boxes, n_cameras,
                           width, height, max_pairs)


Compositor = Callable[[Projection, Tensor, bool, int, int, int], tuple[Tensor, Tensor]]
"""A compositor with :func:`composite_projection`'s arguments (without ``max_pairs``) and outputs."""
Projector = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int, float, float, float, float, bool],
                     Projection]
"""A projection of (means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane,
eps2d, radius_clip, antialiased) into a :class:`Projection`, as :func:`_project` after the covariances."""
Shader = Callable[[int, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""A spherical-harmonics colouring with :func:`shade`'s arguments and output."""


def shade(sh_degree: int, means: Tensor, coefficients: Tensor, camera_centres: Tensor, cameras: Tensor,
          gaussians: Tensor) -> Tensor:
    """Colours [V, 3] ``max(SH(dir) + 0.5, 0)`` of the V visible entries (``cameras``, ``gaussians``
    [V] int64) from ``coefficients`` [N, K, 3] or [C, N, K, 3], ``dir`` the vector from the camera
    centre (``camera_centres`` [C, 3]) to the mean (``means`` [N, 3]), normalised, as gsplat."""
    selected = coefficients[gaussians] if coefficients.dim() == 3 else coefficients[cameras, gaussians]
    directions = means[gaussians] - camera_centres[cameras]
    return torch.clamp_min(_spherical_harmonics(sh_degree, directions, selected) + 0.5, 0.0)


def rasterize(means: Tensor, quats: Tensor | None, scales: Tensor | None, opacities: Tensor, colors: Tensor,
              viewmats: Tensor, Ks: Tensor, width: int, height: int, near_plane: float = 0.01,
              far_plane: float = 1e10, sh_degree: int | None = None, backgrounds: Tensor | None = None,
              render_mode: str = "RGB+ED", eps2d: float = 0.3, radius_clip: float = 0.0,
              rasterize_mode: str = "classic", camera_model: str = "pinhole", covars: Tensor | None = None,
              max_pairs: int = DEFAULT_MAX_PAIRS,
              compositor: Compositor | None = None, projector: Projector | None = None,
              shader: Shader | None = None) -> tuple[Tensor, Tensor, dict]:
    """Render N Gaussians into C cameras with autograd, as ``gsplat.rasterization(..., packed=False)``.

    Args:
        means: [N, 3] world positions. quats: [N, 4] rotations, wxyz, need not be normalised.
        scales: [N, 3] standard deviations along the rotated axes (linear, world units).
        opacities: [N] in [0, 1].
        colors: [N, D] or [C, N, D] features; with ``sh_degree`` set, [N, K, 3] or [C, N, K, 3] SH
            coefficients with ``(sh_degree + 1)^2 <= K`` (colour = max(SH(dir) + 0.5, 0), as gsplat).
        viewmats: [C, 4, 4] world-to-camera (OpenCV: x right, y down, z forward).
        Ks: [C, 3, 3] pixel intrinsics (pixel centres at half-integers).
        backgrounds: [C, D] colour behind the Gaussians (depth channels get 0).
        render_mode: "RGB" (D channels), "D" accumulated depth sum(w z), "ED" expected depth
            sum(w z) / sum(w), "RGB+D" / "RGB+ED" (depth as the last channel).
        eps2d, radius_clip, rasterize_mode, camera_model, covars: as in gsplat (``covars`` [N, 3, 3]
            replaces quats and scales).
        max_pairs: bound on (pixel, Gaussian) bounding-box pairs composited at once (memory bound;
            about 200 bytes per pair with autograd).
        compositor: replaces :func:`composite_projection` (the numba backend passes its compiled
            one; ``max_pairs`` is then unused).
        projector: replaces the covariance from quats and scales and :func:`_project` (the numba
            backend passes its compiled pinhole projection when it applies; ``camera_model`` and
            ``covars`` are then unused).
        shader: replaces :func:`shade` for the spherical-harmonics colours.

    Returns:
        render_colors [C, H, W, X], render_alphas [C, H, W, 1], and gsplat's unpacked info dict:
        ``means2d`` [C, N, 2] (gradients retained), ``radii`` [C, N, 2] int32, ``depths`` [C, N],
        ``conics`` [C, N, 3], ``opacities`` [C, N], ``gaussian_ids``/``camera_ids``/``batch_ids``
        None, ``width``, ``height``, ``n_cameras``, ``n_batches``, ``backend`` "torch".
    """
    n_gaussians, n_cameras = means.shape[0], viewmats.shape[0]
    _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, sh_degree, backgrounds, render_mode,
                  rasterize_mode, camera_model, covars, max_pairs)
    antialiased = rasterize_mode == "antialiased"
    if projector is not None:
        projection = projector(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane,
                               eps2d, radius_clip, antialiased)
    else:
        if covars is None:
            covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
        projection = _project(means, covars, opacities, viewmats, Ks, width, height, near_plane, far_plane,
                              eps2d, radius_clip, antialiased, camera_model)
    cams, gaussians = projection.visible_cameras, projection.visible_gaussians

    if render_mode not in ("RGB", "RGB+D", "RGB+ED"):
        features = means.new_zeros(len(gaussians), 0)
    elif sh_degree is None:
        features = colors[gaussians] if colors.dim() == 2 else colors[cams, gaussians]
    else:
        camera_centres = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
        features = (shader or shade)(sh_degree, means, colors, camera_centres, cams, gaussians)
    visible = (projection, features, render_mode != "RGB", n_cameras, width, height)
    if compositor is None:
        render_colors, render_alphas = composite_projection(*visible, max_pairs=max_pairs)
    else:
        render_colors, render_alphas = compositor(*visible)

    if backgrounds is not None and render_mode in ("RGB", "RGB+D", "RGB+ED"):
        background = backgrounds
        if render_mode != "RGB":
            background = torch.cat([backgrounds, backgrounds.new_zeros(n_cameras, 1)], -1)
        render_colors = render_colors + (1.0 - render_alphas) * background[:, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], -1)

    if projection.means2d.requires_grad:
        projection.means2d.retain_grad()
    info = {
        "camera_ids": None, "gaussian_ids": None, "batch_ids": None,
        "radii": projection.radii, "means2d": projection.means2d, "depths": projection.depths,
        "conics": projection.conics, "opacities": projection.opacities,
        "width": width, "height": height, "n_cameras": n_cameras, "n_batches": 1,
        "n_gaussians": n_gaussians, "backend": "torch",
    }
    return render_colors, render_alphas, info


def _check_inputs(means: Tensor, quats: Tensor | None, scales: Tensor | None, opacities: Tensor, colors: Tensor,
                  viewmats: Tensor, Ks: Tensor, sh_degree: int | None, backgrounds: Tensor | None,
                  render_mode: str, rasterize_mode: str, camera_model: str, covars: Tensor | None,
                  max_pairs: int) -> None:
    """Raise ValueError for inconsistent shapes, ParameterError for unsupported options."""
    if render_mode not in RENDER_MODES:
        raise ParameterError(f"unknown render_mode {render_mode!r}", f"use one of {', '.join(RENDER_MODES)}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ParameterError(f"unknown rasterize_mode {rasterize_mode!r}", "use 'classic' or 'antialiased'")
    if camera_model not in CAMERA_MODELS:
        raise ParameterError(f"camera_model {camera_model!r} is not supported by the torch rasterizer",
                             f"use one of {', '.join(CAMERA_MODELS)}, or backend='gsplat' on a CUDA machine")
    if max_pairs < 1:
        raise ParameterError(f"max_pairs must be positive, got {max_pairs}", "use e.g. 4194304")
    n, c = means.shape[0], viewmats.shape[0]
    expected = {"means": (means, (n, 3)), "opacities": (opacities, (n,)), "viewmats": (viewmats, (c, 4, 4)),
                "Ks": (Ks, (c, 3, 3))}
    if covars is None:
        if quats is None or scales is None:
            raise ValueError("quats and scales are required when covars is not given")
        expected.update(quats=(quats, (n, 4)), scales=(scales, (n, 3)))
    else:
        expected["covars"] = (covars, (n, 3, 3))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if sh_degree is None:
        if colors.shape[:-1] not in ((n,), (c, n)):
            raise ValueError(f"colors has shape {tuple(colors.shape)}, expected [N, D] or [C, N, D] with N={n}, C={c}")
    elif colors.shape[:-2] not in ((n,), (c, n)) or colors.shape[-1] != 3 or (sh_degree + 1) ** 2 > colors.shape[-2]:
        raise ValueError(f"colors has shape {tuple(colors.shape)}, expected SH coefficients [N, K, 3] or "
                         f"[C, N, K, 3] with K >= {(sh_degree + 1) ** 2} for sh_degree {sh_degree}")
    if backgrounds is not None and render_mode in ("RGB", "RGB+D", "RGB+ED"):
        channels = 3 if sh_degree is not None else colors.shape[-1]
        if tuple(backgrounds.shape) != (c, channels):
            raise ValueError(f"backgrounds has shape {tuple(backgrounds.shape)}, expected {(c, channels)}")
