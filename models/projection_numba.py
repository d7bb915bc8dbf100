"""Compiled, multi-threaded CPU projection of 3D Gaussians and spherical-harmonics colours (numba),
with exact analytic backwards, for the numba rasterizer backend.

:func:`project` replaces, for pinhole cameras whose poses and intrinsics are not optimised, the torch
backend's covariance (quaternion and scales to ``R S S^T R^T``), world-to-camera transform,
perspective projection, 2D covariance with gsplat's ``eps2d`` blur, conic, antialiasing
compensation ``sqrt(det_orig / det_blurred)``, near/far culling, radii and pixel boxes
(:func:`mono4d.models.rasterizer_torch._project` documents the rules; they are gsplat 1.5.3's, pixel
centres at half-integers). :func:`shade` replaces the spherical-harmonics colour of degree 0 to 3,
``max(SH(dir) + 0.5, 0)`` with ``dir`` the normalised vector from the camera centre to the mean.
Both follow gsplat's pure-torch code operation by operation (clamps, ``1e-12`` normalisation
floors, ``1e-10`` determinant floor) so that values and gradients match the torch backend to float
rounding.

Kernels read the inputs in their dtype, compute in float64 over Gaussians in parallel (``prange``;
each thread owns its Gaussians' gradient rows, so results do not depend on the thread count) and
write results in the input dtype; they are cached on disk (``cache=True``).
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mono4d.models.rasterizer_torch import ALPHA_THRESHOLD, MAX_EXTENT_SIGMAS, Projection

NORMALIZE_EPS = 1e-12
"""Floor of a vector's norm when normalising it (``torch.nn.functional.normalize``'s default)."""
MIN_DETERMINANT = 1e-10
"""Floor of the blurred 2D covariance's determinant (gsplat's projection)."""
FOV_MARGIN = 0.3
"""Camera-space x/tz and y/tz are clamped to the field of view widened by this fraction of its
half-tangent before the projection Jacobian is formed (gsplat's ``_persp_proj``)."""
MAX_SH_DEGREE = 3
"""Highest spherical-harmonics degree :func:`shade` evaluates."""


def set_threads() -> None:
    """Run numba's parallel loops on as many threads as torch uses (at most numba's pool size)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@njit(cache=True)
def _mm(a: tuple, b: tuple) -> tuple:
    """Product of two row-major 3x3 matrices given as 9-tuples."""
    return (a[0] * b[0] + a[1] * b[3] + a[2] * b[6], a[0] * b[1] + a[1] * b[4] + a[2] * b[7],
            a[0] * b[2] + a[1] * b[5] + a[2] * b[8],
            a[3] * b[0] + a[4] * b[3] + a[5] * b[6], a[3] * b[1] + a[4] * b[4] + a[5] * b[7],
            a[3] * b[2] + a[4] * b[5] + a[5] * b[8],
            a[6] * b[0] + a[7] * b[3] + a[8] * b[6], a[6] * b[1] + a[7] * b[4] + a[8] * b[7],
            a[6] * b[2] + a[7] * b[5] + a[8] * b[8])


@njit(cache=True)
def _t(a: tuple) -> tuple:
    """Transpose of a row-major 3x3 matrix given as a 9-tuple."""
    return (a[0], a[3], a[6], a[1], a[4], a[7], a[2], a[5], a[8])


@njit(cache=True)
def _gaussian_frame(quats: np.ndarray, scales: np.ndarray, n: int) -> tuple:
    """Gaussian ``n``'s quaternion norm, normalised quaternion (w, x, y, z), rotation R and
    ``M = R diag(scales)`` (row-major 9-tuples), so that its covariance is ``M M^T``."""
    w, x, y, z = float(quats[n, 0]), float(quats[n, 1]), float(quats[n, 2]), float(quats[n, 3])
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    inverse = 1.0 / max(norm, NORMALIZE_EPS)
    w, x, y, z = w * inverse, x * inverse, y * inverse, z * inverse
    r = (1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y),
         2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x),
         2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y))
    sx, sy, sz = float(scales[n, 0]), float(scales[n, 1]), float(scales[n, 2])
    m = (r[0] * sx, r[1] * sy, r[2] * sz, r[3] * sx, r[4] * sy, r[5] * sz, r[6] * sx, r[7] * sy, r[8] * sz)
    return norm, (w, x, y, z), r, m


@njit(cache=True)
def _rotation(viewmats: np.ndarray, c: int) -> tuple:
    """Camera ``c``'s world-to-camera rotation as a row-major 9-tuple."""
    v = viewmats[c]
    return (v[0, 0], v[0, 1], v[0, 2], v[1, 0], v[1, 1], v[1, 2], v[2, 0], v[2, 1], v[2, 2])


@njit(cache=True)
def _camera_point(means: np.ndarray, viewmats: np.ndarray, n: int, c: int) -> tuple[float, float, float]:
    """Gaussian ``n``'s mean in camera ``c``'s coordinates."""
    v, x, y, z = viewmats[c], float(means[n, 0]), float(means[n, 1]), float(means[n, 2])
    return (v[0, 0] * x + v[0, 1] * y + v[0, 2] * z + v[0, 3],
            v[1, 0] * x + v[1, 1] * y + v[1, 2] * z + v[1, 3],
            v[2, 0] * x + v[2, 1] * y + v[2, 2] * z + v[2, 3])


@njit(cache=True)
def _clamp_ratio(value: float, tz: float, focal: float, centre: float, size: int) -> tuple[float, bool]:
    """``value / tz`` clamped to the widened field of view, and whether it was inside (gradient passes)."""
    tan_fov = 0.5 * size / focal
    low, high = -(centre / focal + FOV_MARGIN * tan_fov), (size - centre) / focal + FOV_MARGIN * tan_fov
    ratio = value / tz
    if ratio < low:
        return low, False
    if ratio > high:
        return high, False
    return ratio, True


@njit(cache=True)
def _screen_frame(viewmats: np.ndarray, Ks: np.ndarray, m: tuple, tx: float, ty: float, tz: float, c: int,
                  width: int, height: int) -> tuple:
    """Camera ``c``'s view of a Gaussian with ``M`` (covariance ``M M^T``) and camera-space mean
    (tx, ty, tz): the camera rotation V, ``V M`` and the camera covariance ``S = (V M)(V M)^T``
    (9-tuples), the clamped ratios tx/tz and ty/tz each with whether it was inside its bounds, the
    pinhole Jacobian ``J = [[j00, 0, j02], [0, j11, j12]]`` as (j00, j02, j11, j12), and the 2D
    covariance ``J S J^T`` as (c00, c01, c11)."""
    k = Ks[c]
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    rot = _rotation(viewmats, c)
    vm = _mm(rot, m)
    s = _mm(vm, _t(vm))
    u, u_inside = _clamp_ratio(tx, tz, fx, cx, width)
    w, w_inside = _clamp_ratio(ty, tz, fy, cy, height)
    j00, j02, j11, j12 = fx / tz, -fx * u / tz, fy / tz, -fy * w / tz
    c00 = j00 * j00 * s[0] + 2.0 * j00 * j02 * s[2] + j02 * j02 * s[8]
    c01 = j00 * j11 * s[1] + j00 * j12 * s[2] + j02 * j11 * s[5] + j02 * j12 * s[8]
    c11 = j11 * j11 * s[4] + 2.0 * j11 * j12 * s[5] + j12 * j12 * s[8]
    return rot, vm, s, u, u_inside, w, w_inside, (j00, j02, j11, j12), (c00, c01, c11)


@njit(parallel=True, cache=True)
def _project_forward(means: np.ndarray, quats: np.ndarray, scales: np.ndarray, opacities: np.ndarray,
                     viewmats: np.ndarray, Ks: np.ndarray, width: int, height: int, near_plane: float,
                     far_plane: float, eps2d: float, radius_clip: float,
                     antialiased: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray, np.ndarray]:
    """Project N Gaussians into C pinhole cameras (world ``means`` [N, 3], ``quats`` [N, 4] wxyz,
    ``scales`` [N, 3], ``opacities`` [N], all of one float dtype; float64 ``viewmats`` [C, 4, 4]
    and ``Ks`` [C, 3, 3]). Arithmetic is float64; the float outputs have the inputs' dtype.

    Returns dense [C, N, ...] ``means2d`` (pixels), ``depths`` (camera z), ``conics`` (a, b, c of
    the inverse blurred 2D covariance), ``opacities`` (times the compensation when antialiased),
    all zero where ``z`` is outside (near_plane, far_plane); ``radii`` [C, N, 2] int32 (0 where not
    visible), ``boxes`` [C, N, 4] inclusive pixel bounds x0, x1, y0, y1 clipped to the image, and
    ``drawn`` [C, N]: visible with a non-empty box.
    """
    n_cameras, n_gaussians = viewmats.shape[0], means.shape[0]
    means2d = np.zeros((n_cameras, n_gaussians, 2), dtype=means.dtype)
    depths = np.zeros((n_cameras, n_gaussians), dtype=means.dtype)
    conics = np.zeros((n_cameras, n_gaussians, 3), dtype=means.dtype)
    projected_opacities = np.zeros((n_cameras, n_gaussians), dtype=means.dtype)
    radii = np.zeros((n_cameras, n_gaussians, 2), dtype=np.int32)
    boxes = np.zeros((n_cameras, n_gaussians, 4), dtype=np.int64)
    drawn = np.zeros((n_cameras, n_gaussians), dtype=np.bool_)
    log_threshold = np.log(ALPHA_THRESHOLD)
    for n in prange(n_gaussians):
        _, _, _, m = _gaussian_frame(quats, scales, n)
        for c in range(n_cameras):
            tx, ty, tz = _camera_point(means, viewmats, n, c)
            if not (near_plane < tz < far_plane):
                continue
            k = Ks[c]
            _, _, _, _, _, _, _, _, (c00, c01, c11) = _screen_frame(viewmats, Ks, m, tx, ty, tz, c, width, height)
            det_orig = c00 * c11 - c01 * c01
            b00, b11 = c00 + eps2d, c11 + eps2d
            det = max(b00 * b11 - c01 * c01, MIN_DETERMINANT)
            opacity = float(opacities[n])
            if antialiased:
                opacity *= np.sqrt(max(det_orig / det, 0.0))
            mx = (k[0, 0] * tx + k[0, 1] * ty + k[0, 2] * tz) / tz
            my = (k[1, 0] * tx + k[1, 1] * ty + k[1, 2] * tz) / tz
            a, b, cc = b11 / det, -c01 / det, b00 / det
            means2d[c, n, 0], means2d[c, n, 1], depths[c, n] = mx, my, tz
            conics[c, n, 0], conics[c, n, 1], conics[c, n, 2] = a, b, cc
            projected_opacities[c, n] = opacity
            # gsplat's projection: 3.33-sigma radii from the blurred covariance must be positive and reach the image.
            rx3, ry3 = np.ceil(MAX_EXTENT_SIGMAS * np.sqrt(b00)), np.ceil(MAX_EXTENT_SIGMAS * np.sqrt(b11))
            if not (rx3 > 0 and ry3 > 0 and mx + rx3 > 0 and mx - rx3 < width and my + ry3 > 0
                    and my - ry3 < height) or opacity < ALPHA_THRESHOLD:
                continue
            # Opacity-aware radii (gsplat's CUDA rule) from the conic's inverse.
            det_conic = max(a * cc - b * b, 1e-30)
            extent = min(MAX_EXTENT_SIGMAS, np.sqrt(2.0 * (np.log(max(opacity, ALPHA_THRESHOLD)) - log_threshold)))
            rx, ry = np.ceil(extent * np.sqrt(cc / det_conic)), np.ceil(extent * np.sqrt(a / det_conic))
            if not (mx + rx > 0 and mx - rx < width and my + ry > 0 and my - ry < height
                    and (rx > radius_clip or ry > radius_clip)):
                continue
            radii[c, n, 0], radii[c, n, 1] = int(rx), int(ry)
            x0 = min(max(np.ceil(mx - rx - 0.5), 0.0), width - 1.0)
            x1 = min(max(np.floor(mx + rx - 0.5), 0.0), width - 1.0)
            y0 = min(max(np.ceil(my - ry - 0.5), 0.0), height - 1.0)
            y1 = min(max(np.floor(my + ry - 0.5), 0.0), height - 1.0)
            boxes[c, n, 0], boxes[c, n, 1], boxes[c, n, 2], boxes[c, n, 3] = int(x0), int(x1), int(y0), int(y1)
            drawn[c, n] = x1 >= x0 and y1 >= y0
    return means2d, depths, conics, projected_opacities, radii, boxes, drawn


@njit(parallel=True, cache=True)
def _project_backward(means: np.ndarray, quats: np.ndarray, scales: np.ndarray, opacities: np.ndarray,
                      viewmats: np.ndarray, Ks: np.ndarray, width: int, height: int, near_plane: float,
                      far_plane: float, eps2d: float, antialiased: bool, grad_means2d: np.ndarray,
                      grad_depths: np.ndarray, grad_conics: np.ndarray,
                      grad_opacities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact gradients of :func:`_project_forward`'s means2d, depths, conics and opacities
    (``grad_*`` [C, N, ...]) with respect to means [N, 3], quats [N, 4], scales [N, 3] and
    opacities [N], in the inputs' dtype (summed over cameras in float64). Clamps pass gradient
    where torch's do (inside the bounds, bounds included)."""
    n_cameras, n_gaussians = viewmats.shape[0], means.shape[0]
    grad_means = np.zeros((n_gaussians, 3), dtype=means.dtype)
    grad_quats = np.zeros((n_gaussians, 4), dtype=means.dtype)
    grad_scales = np.zeros((n_gaussians, 3), dtype=means.dtype)
    grad_opac = np.zeros(n_gaussians, dtype=means.dtype)
    for n in prange(n_gaussians):
        norm, q, r, m = _gaussian_frame(quats, scales, n)
        gm = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # dL/dM, summed over cameras
        g_mean_x = g_mean_y = g_mean_z = g_opacity_total = 0.0
        for c in range(n_cameras):
            tx, ty, tz = _camera_point(means, viewmats, n, c)
            if not (near_plane < tz < far_plane):
                continue
            k = Ks[c]
            fx, fy = k[0, 0], k[1, 1]
            rot, vm, s, u, u_inside, w, w_inside, (j00, j02, j11, j12), (c00, c01, c11) = _screen_frame(
                viewmats, Ks, m, tx, ty, tz, c, width, height)
            det_orig = c00 * c11 - c01 * c01
            b00, b11 = c00 + eps2d, c11 + eps2d
            det_raw = b00 * b11 - c01 * c01
            det = max(det_raw, MIN_DETERMINANT)
            ga, gb, gc = grad_conics[c, n, 0], grad_conics[c, n, 1], grad_conics[c, n, 2]
            g_det = -(ga * b11 - gb * c01 + gc * b00) / (det * det)
            g_det_orig = 0.0
            g_opacity = grad_opacities[c, n]
            if antialiased:
                ratio = det_orig / det
                compensation = np.sqrt(max(ratio, 0.0))
                g_opacity_total += g_opacity * compensation
                if ratio > 0.0:
                    g_ratio = g_opacity * float(opacities[n]) * 0.5 / compensation
                    g_det_orig = g_ratio / det
                    g_det -= g_ratio * ratio / det
            else:
                g_opacity_total += g_opacity
            if det_raw < MIN_DETERMINANT:
                g_det = 0.0
            # dL/dcov2d (each entry of the symmetric 2x2; 01 and 10 get the same).
            g00 = gc / det + g_det * b11 + g_det_orig * c11
            g11 = ga / det + g_det * b00 + g_det_orig * c00
            g01 = -0.5 * gb / det - g_det * c01 - g_det_orig * c01
            # cov2d = J S J^T: dL/dS = J^T G J, dL/dJ = 2 G J S.
            gs = (j00 * j00 * g00, j00 * j11 * g01, j00 * (g00 * j02 + g01 * j12),
                  j00 * j11 * g01, j11 * j11 * g11, j11 * (g01 * j02 + g11 * j12),
                  j00 * (g00 * j02 + g01 * j12), j11 * (g01 * j02 + g11 * j12),
                  j02 * j02 * g00 + 2.0 * j02 * j12 * g01 + j12 * j12 * g11)
            js0 = (j00 * s[0] + j02 * s[6], j00 * s[1] + j02 * s[7], j00 * s[2] + j02 * s[8])
            js1 = (j11 * s[3] + j12 * s[6], j11 * s[4] + j12 * s[7], j11 * s[5] + j12 * s[8])
            g_j00 = 2.0 * (g00 * js0[0] + g01 * js1[0])
            g_j02 = 2.0 * (g00 * js0[2] + g01 * js1[2])
            g_j11 = 2.0 * (g01 * js0[1] + g11 * js1[1])
            g_j12 = 2.0 * (g01 * js0[2] + g11 * js1[2])
            tz2 = tz * tz
            g_tz = (-fx * g_j00 - fy * g_j11 + 2.0 * fx * u * g_j02 + 2.0 * fy * w * g_j12) / tz2
            g_tx = g_ty = 0.0
            # J uses tz * clamp(tx / tz); the clamp passes gradient only inside its bounds.
            g_txc, g_tyc = -fx * g_j02 / tz2, -fy * g_j12 / tz2
            g_tz += g_txc * u + g_tyc * w
            if u_inside:
                g_tx += g_txc
                g_tz -= g_txc * tx / tz
            if w_inside:
                g_ty += g_tyc
                g_tz -= g_tyc * ty / tz
            gmx, gmy = grad_means2d[c, n, 0], grad_means2d[c, n, 1]
            g_tx += (gmx * k[0, 0] + gmy * k[1, 0]) / tz
            g_ty += (gmx * k[0, 1] + gmy * k[1, 1]) / tz
            g_tz -= (gmx * (k[0, 0] * tx + k[0, 1] * ty) + gmy * (k[1, 0] * tx + k[1, 1] * ty)) / tz2
            g_tz += grad_depths[c, n]
            g_mean_x += rot[0] * g_tx + rot[3] * g_ty + rot[6] * g_tz
            g_mean_y += rot[1] * g_tx + rot[4] * g_ty + rot[7] * g_tz
            g_mean_z += rot[2] * g_tx + rot[5] * g_ty + rot[8] * g_tz
            # S = (V M)(V M)^T: dL/d(VM) = 2 G_S VM, dL/dM = V^T dL/d(VM).
            g_vm = _mm(gs, vm)
            g_m = _mm(_t(rot), g_vm)
            gm = (gm[0] + 2.0 * g_m[0], gm[1] + 2.0 * g_m[1], gm[2] + 2.0 * g_m[2],
                  gm[3] + 2.0 * g_m[3], gm[4] + 2.0 * g_m[4], gm[5] + 2.0 * g_m[5],
                  gm[6] + 2.0 * g_m[6], gm[7] + 2.0 * g_m[7], gm[8] + 2.0 * g_m[8])
        grad_means[n, 0], grad_means[n, 1], grad_means[n, 2] = g_mean_x, g_mean_y, g_mean_z
        grad_opac[n] = g_opacity_total
        # M = R diag(s).
        sx, sy, sz = float(scales[n, 0]), float(scales[n, 1]), float(scales[n, 2])
        grad_scales[n, 0] = gm[0] * r[0] + gm[3] * r[3] + gm[6] * r[6]
        grad_scales[n, 1] = gm[1] * r[1] + gm[4] * r[4] + gm[7] * r[7]
        grad_scales[n, 2] = gm[2] * r[2] + gm[5] * r[5] + gm[8] * r[8]
        g = (gm[0] * sx, gm[1] * sy, gm[2] * sz, gm[3] * sx, gm[4] * sy, gm[5] * sz, gm[6] * sx, gm[7] * sy,
             gm[8] * sz)
        qw, qx, qy, qz = q
        gw = 2.0 * (-qz * g[1] + qy * g[2] + qz * g[3] - qx * g[5] - qy * g[6] + qx * g[7])
        gx = 2.0 * (qy * g[1] + qz * g[2] + qy * g[3] - 2.0 * qx * g[4] - qw * g[5] + qz * g[6] + qw * g[7]
                    - 2.0 * qx * g[8])
        gy = 2.0 * (-2.0 * qy * g[0] + qx * g[1] + qw * g[2] + qx * g[3] + qz * g[5] - qw * g[6] + qz * g[7]
                    - 2.0 * qy * g[8])
        gz = 2.0 * (-2.0 * qz * g[0] - qw * g[1] + qx * g[2] + qw * g[3] - 2.0 * qz * g[4] + qy * g[5]
                    + qx * g[6] + qy * g[7])
        # q / max(|q|, eps).
        if norm > NORMALIZE_EPS:
            dot = qw * gw + qx * gx + qy * gy + qz * gz
            gw, gx, gy, gz = (gw - qw * dot) / norm, (gx - qx * dot) / norm, (gy - qy * dot) / norm, (gz - qz * dot) / norm
        else:
            gw, gx, gy, gz = gw / NORMALIZE_EPS, gx / NORMALIZE_EPS, gy / NORMALIZE_EPS, gz / NORMALIZE_EPS
        grad_quats[n, 0], grad_quats[n, 1], grad_quats[n, 2], grad_quats[n, 3] = gw, gx, gy, gz
    return grad_means, grad_quats, grad_scales, grad_opac


RADIX_BITS = 11
"""Bits per pass of :func:`_stable_order`'s radix sort."""


@njit(cache=True)
def _stable_order(keys: np.ndarray) -> np.ndarray:
    """Stable ascending order of float64 ``keys`` [V] (no NaN; -0 equals +0), as
    ``np.argsort(keys, kind="stable")``: a least-significant-digit radix sort of the keys' bit
    patterns mapped to unsigned integers of the same order, skipping digits all keys share."""
    n = keys.shape[0]
    bits = (keys + 0.0).view(np.uint64)  # + 0.0 turns -0 into +0
    sign = np.uint64(1) << np.uint64(63)
    current = np.empty(n, dtype=np.uint64)
    for i in range(n):
        current[i] = ~bits[i] if bits[i] & sign else bits[i] | sign
    order = np.arange(n)
    spare_keys, spare_order = np.empty_like(current), np.empty_like(order)
    n_buckets = 1 << RADIX_BITS
    mask = np.uint64(n_buckets - 1)
    for shift in range(0, 64, RADIX_BITS):
        offsets = np.zeros(n_buckets + 1, dtype=np.int64)
        for i in range(n):
            offsets[((current[i] >> np.uint64(shift)) & mask) + 1] += 1
        if offsets.max() == n:
            continue
        for bucket in range(n_buckets):
            offsets[bucket + 1] += offsets[bucket]
        for i in range(n):
            bucket = (current[i] >> np.uint64(shift)) & mask
            spare_keys[offsets[bucket]], spare_order[offsets[bucket]] = current[i], order[i]
            offsets[bucket] += 1
        current, spare_keys = spare_keys, current
        order, spare_order = spare_order, order
    return order


@njit(cache=True)
def _visible_list(drawn: np.ndarray, depths: np.ndarray,
                  boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Camera and Gaussian indices [V] of the ``drawn`` [C, N] entries sorted by ``depths`` [C, N]
    (stable, from camera-major order, as the torch backend's ``argsort``), and their ``boxes``
    [V, 4] (from [C, N, 4])."""
    n_cameras, n_gaussians = drawn.shape
    n_visible = 0
    for c in range(n_cameras):
        for n in range(n_gaussians):
            n_visible += drawn[c, n]
    entries = np.empty(n_visible, dtype=np.int64)
    keys = np.empty(n_visible)
    v = 0
    for c in range(n_cameras):
        for n in range(n_gaussians):
            if drawn[c, n]:
                entries[v], keys[v] = c * n_gaussians + n, depths[c, n]
                v += 1
    order = _stable_order(keys)
    cameras = np.empty(n_visible, dtype=np.int64)
    gaussians = np.empty(n_visible, dtype=np.int64)
    visible_boxes = np.empty((n_visible, 4), dtype=np.int64)
    for v in range(n_visible):
        c, n = divmod(entries[order[v]], n_gaussians)
        cameras[v], gaussians[v] = c, n
        for i in range(4):
            visible_boxes[v, i] = boxes[c, n, i]
    return cameras, gaussians, visible_boxes


def _native(tensor: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A detached, contiguous numpy view (or copy) of a CPU tensor in ``dtype``."""
    return tensor.detach().to(dtype).contiguous().numpy()


class _Project(torch.autograd.Function):
    """Autograd wrapper of the projection kernels (see :func:`project`)."""

    @staticmethod
    def forward(ctx, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
                settings: tuple) -> tuple[Tensor, ...]:
        dtype = means.dtype
        inputs = tuple(_native(value, dtype) for value in (means, quats, scales, opacities)) + (
            _native(viewmats, torch.float64), _native(Ks, torch.float64))
        set_threads()
        outputs = _project_forward(*inputs, *settings)
        ctx.inputs, ctx.settings, ctx.dtype = inputs, settings, dtype
        outputs = tuple(torch.from_numpy(value) for value in outputs)
        ctx.mark_non_differentiable(*outputs[4:])
        return outputs

    @staticmethod
    def backward(ctx, grad_means2d: Tensor, grad_depths: Tensor, grad_conics: Tensor, grad_opacities: Tensor,
                 *_: Tensor) -> tuple[Tensor | None, ...]:
        width, height, near_plane, far_plane, eps2d, _, antialiased = ctx.settings
        set_threads()
        grads = _project_backward(*ctx.inputs, width, height, near_plane, far_plane, eps2d, antialiased,
                                  *(_native(grad, ctx.dtype) for grad in (grad_means2d, grad_depths, grad_conics,
                                                                          grad_opacities)))
        return tuple(torch.from_numpy(grad) for grad in grads) + (None, None, None)


def project(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
            width: int, height: int, near_plane: float, far_plane: float, eps2d: float, radius_clip: float,
            antialiased: bool) -> Projection:
    """Project N Gaussians into C pinhole cameras, differentiably in means [N, 3], quats [N, 4]
    (wxyz, unnormalised), scales [N, 3] and opacities [N] (not in ``viewmats`` [C, 4, 4] or
    ``Ks`` [C, 3, 3]): the torch backend's :func:`mono4d.models.rasterizer_torch._project` for
    ``camera_model="pinhole"``, with the covariances built from quats and scales.

    The visible list is sorted by depth (stable, in the output dtype) from the camera-major
    (camera, Gaussian) order, as the torch backend does.
    """
    settings = (int(width), int(height), float(near_plane), float(far_plane), float(eps2d), float(radius_clip),
                bool(antialiased))
    means2d, depths, conics, projected, radii, boxes, drawn = _Project.apply(means, quats, scales, opacities,
                                                                             viewmats, Ks, settings)
    cameras, gaussians, visible_boxes = _visible_list(drawn.numpy(), depths.detach().numpy(), boxes.numpy())
    return Projection(radii=radii, means2d=means2d, depths=depths, conics=conics, opacities=projected,
                      visible_cameras=torch.from_numpy(cameras), visible_gaussians=torch.from_numpy(gaussians),
                      boxes=torch.from_numpy(visible_boxes))


SH_C1 = 0.48860251190292
SH_C2 = (1.092548430592079, 0.5462742152960395, 0.9461746957575601, 0.3153915652525201)
SH_C3 = (2.285228997322329, 0.4570457994644658, 1.445305721320277, 0.5900435899266435, 1.865881662950577,
         1.119528997770346)
"""Real spherical-harmonics constants of degrees 1 to 3 (Sloan's evaluation, as gsplat's)."""


@njit(cache=True)
def _direction(means: np.ndarray, centres: np.ndarray, n: int, c: int) -> tuple[float, float, float, float]:
    """Norm of the vector from camera ``c``'s centre to Gaussian ``n``'s mean, and the vector
    divided by ``max(norm, 1e-12)``."""
    dx, dy, dz = means[n, 0] - centres[c, 0], means[n, 1] - centres[c, 1], means[n, 2] - centres[c, 2]
    norm = np.sqrt(dx * dx + dy * dy + dz * dz)
    inverse = 1.0 / max(norm, NORMALIZE_EPS)
    return norm, dx * inverse, dy * inverse, dz * inverse


@njit(cache=True)
def _sh_bases(degree: int, x: float, y: float, z: float, out: np.ndarray) -> None:
    """SH basis values at the unit direction (x, y, z) into ``out[:(degree + 1)^2]``."""
    out[0] = 0.2820947917738781
    if degree < 1:
        return
    out[1], out[2], out[3] = -SH_C1 * y, SH_C1 * z, -SH_C1 * x
    if degree < 2:
        return
    c1, s1 = x * x - y * y, 2.0 * x * y
    out[4], out[5] = SH_C2[1] * s1, -SH_C2[0] * z * y
    out[6], out[7], out[8] = SH_C2[2] * z * z - SH_C2[3], -SH_C2[0] * z * x, SH_C2[1] * c1
    if degree < 3:
        return
    c2, s2 = x * c1 - y * s1, x * s1 + y * c1
    tmp = -SH_C3[0] * z * z + SH_C3[1]
    out[9], out[10], out[11] = -SH_C3[3] * s2, SH_C3[2] * z * s1, tmp * y
    out[12], out[13] = z * (SH_C3[4] * z * z - SH_C3[5]), tmp * x
    out[14], out[15] = SH_C3[2] * z * c1, -SH_C3[3] * c2


@njit(cache=True)
def _sh_bases_backward(degree: int, x: float, y: float, z: float,
                       g: np.ndarray) -> tuple[float, float, float]:
    """Gradient with respect to (x, y, z) of ``sum_k g[k] * basis_k(x, y, z)``."""
    gx = gy = gz = 0.0
    if degree < 1:
        return gx, gy, gz
    gx, gy, gz = -SH_C1 * g[3], -SH_C1 * g[1], SH_C1 * g[2]
    if degree < 2:
        return gx, gy, gz
    b, a, e = SH_C2[0], SH_C2[1], SH_C2[2]
    gx += 2.0 * a * y * g[4] - b * z * g[7] + 2.0 * a * x * g[8]
    gy += 2.0 * a * x * g[4] - b * z * g[5] - 2.0 * a * y * g[8]
    gz += -b * y * g[5] + 2.0 * e * z * g[6] - b * x * g[7]
    if degree < 3:
        return gx, gy, gz
    c1, s1 = x * x - y * y, 2.0 * x * y
    p, q, sc, t, uu, ww = SH_C3
    tmp = -p * z * z + q
    gx += (-3.0 * t * s1 * g[9] + 2.0 * sc * z * y * g[10] + tmp * g[13] + 2.0 * sc * z * x * g[14]
           - 3.0 * t * c1 * g[15])
    gy += (-3.0 * t * c1 * g[9] + 2.0 * sc * z * x * g[10] + tmp * g[11] - 2.0 * sc * z * y * g[14]
           + 3.0 * t * s1 * g[15])
    gz += (sc * s1 * g[10] - 2.0 * p * z * y * g[11] + (3.0 * uu * z * z - ww) * g[12] - 2.0 * p * z * x * g[13]
           + sc * c1 * g[14])
    return gx, gy, gz


SH_CHUNK = 1024
"""Entries per parallel chunk of the spherical-harmonics kernels (each chunk reuses its basis buffers)."""


@njit(cache=True)
def _row_order(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """The entries [V] in ascending order of ``rows`` [V] (values below ``n_rows``; a counting sort),
    so that the spherical-harmonics kernels read and write the coefficients' rows in memory order
    rather than in depth order, all over them."""
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    for v in range(rows.shape[0]):
        offsets[rows[v] + 1] += 1
    for row in range(n_rows):
        offsets[row + 1] += offsets[row]
    order = np.empty(rows.shape[0], dtype=np.int64)
    for v in range(rows.shape[0]):
        order[offsets[rows[v]]] = v
        offsets[rows[v]] += 1
    return order


@njit(parallel=True, cache=True)
def _shade_forward(degree: int, means: np.ndarray, coefficients: np.ndarray, centres: np.ndarray,
                   cameras: np.ndarray, gaussians: np.ndarray, rows: np.ndarray, by_row: np.ndarray) -> np.ndarray:
    """Colours [V, 3] ``max(sum_k basis_k(dir) coefficients[rows[v], k] + 0.5, 0)`` of the V entries
    (camera ``cameras[v]``, Gaussian ``gaussians[v]``), taken in the order ``by_row``
    (:func:`_row_order`); ``coefficients`` [R, K, 3] (and the output) in the dtype of ``means``
    [N, 3], float64 ``centres`` [C, 3]; arithmetic in float64."""
    n_entries, n_bases = cameras.shape[0], (degree + 1) ** 2
    colors = np.empty((n_entries, 3), dtype=means.dtype)
    for chunk in prange((n_entries + SH_CHUNK - 1) // SH_CHUNK):
        bases = np.empty(16)
        for i in range(chunk * SH_CHUNK, min(n_entries, (chunk + 1) * SH_CHUNK)):
            v = by_row[i]
            _, x, y, z = _direction(means, centres, gaussians[v], cameras[v])
            _sh_bases(degree, x, y, z, bases)
            row = rows[v]
            for channel in range(3):
                total = 0.5
                for k in range(n_bases):
                    total += bases[k] * coefficients[row, k, channel]
                colors[v, channel] = max(total, 0.0)
    return colors


@njit(parallel=True, cache=True)
def _shade_backward(degree: int, means: np.ndarray, coefficients: np.ndarray, centres: np.ndarray,
                    cameras: np.ndarray, gaussians: np.ndarray, rows: np.ndarray, by_row: np.ndarray,
                    slots: np.ndarray, n_slots: int, grad_colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`_shade_forward` for ``grad_colors`` [V, 3]: per camera and Gaussian for
    the means ([C, N, 3], summed over cameras by the caller) and per slot and row for the
    coefficients ([n_slots, R, K, 3]; ``slots[v]`` makes (slot, row) unique per entry), in the
    dtype of ``means``."""
    n_entries, n_bases = cameras.shape[0], (degree + 1) ** 2
    grad_means = np.zeros((centres.shape[0], means.shape[0], 3), dtype=means.dtype)
    grad_coefficients = np.zeros((n_slots,) + coefficients.shape, dtype=means.dtype)
    for chunk in prange((n_entries + SH_CHUNK - 1) // SH_CHUNK):
        bases, grad_bases = np.empty(16), np.empty(16)
        for i in range(chunk * SH_CHUNK, min(n_entries, (chunk + 1) * SH_CHUNK)):
            v = by_row[i]
            n, c, row = gaussians[v], cameras[v], rows[v]
            norm, x, y, z = _direction(means, centres, n, c)
            _sh_bases(degree, x, y, z, bases)
            grad_bases[:] = 0.0
            for channel in range(3):
                total = 0.5
                for k in range(n_bases):
                    total += bases[k] * coefficients[row, k, channel]
                grad = grad_colors[v, channel] if total >= 0.0 else 0.0
                for k in range(n_bases):
                    grad_coefficients[slots[v], row, k, channel] = grad * bases[k]
                    grad_bases[k] += grad * coefficients[row, k, channel]
            gx, gy, gz = _sh_bases_backward(degree, x, y, z, grad_bases)
            if norm > NORMALIZE_EPS:
                dot = x * gx + y * gy + z * gz
                gx, gy, gz = (gx - x * dot) / norm, (gy - y * dot) / norm, (gz - z * dot) / norm
            else:
                gx, gy, gz = gx / NORMALIZE_EPS, gy / NORMALIZE_EPS, gz / NORMALIZE_EPS
            grad_means[c, n, 0], grad_means[c, n, 1], grad_means[c, n, 2] = gx, gy, gz
    return grad_means, grad_coefficients


class _Shade(torch.autograd.Function):
    """Autograd wrapper of the spherical-harmonics kernels (see :func:`shade`)."""

    @staticmethod
    def forward(ctx, means: Tensor, coefficients: Tensor, centres: Tensor, cameras: Tensor, gaussians: Tensor,
                degree: int) -> Tensor:
        n_gaussians = means.shape[0]
        per_camera = coefficients.dim() == 4
        flat = coefficients.reshape(-1, *coefficients.shape[-2:])
        rows = cameras * n_gaussians + gaussians if per_camera else gaussians
        # Shared coefficients seen from several cameras get one gradient slot per camera.
        shared = not per_camera and centres.shape[0] > 1
        rows = rows.contiguous().numpy()
        inputs = (degree, _native(means, means.dtype), _native(flat, means.dtype), _native(centres, torch.float64),
                  cameras.contiguous().numpy(), gaussians.contiguous().numpy(), rows, _row_order(rows, flat.shape[0]))
        set_threads()
        colors = _shade_forward(*inputs)
        ctx.inputs, ctx.dtype, ctx.shape = inputs, means.dtype, coefficients.shape
        ctx.slots = (cameras if shared else torch.zeros_like(cameras)).contiguous().numpy()
        ctx.n_slots = centres.shape[0] if shared else 1
        return torch.from_numpy(colors)

    @staticmethod
    def backward(ctx, grad_colors: Tensor) -> tuple[Tensor | None, ...]:
        set_threads()
        grad_means, grad_coefficients = _shade_backward(*ctx.inputs, ctx.slots, ctx.n_slots,
                                                        _native(grad_colors, ctx.dtype))
        return _sum_first(grad_means), _sum_first(grad_coefficients).reshape(ctx.shape), None, None, None, None


def _sum_first(values: np.ndarray) -> Tensor:
    """``values`` [S, ...] summed over its first axis, as a tensor (a view when S is 1)."""
    return torch.from_numpy(values[0]) if values.shape[0] == 1 else torch.from_numpy(values).sum(0)


def shade(sh_degree: int, means: Tensor, coefficients: Tensor, camera_centres: Tensor, cameras: Tensor,
          gaussians: Tensor) -> Tensor:
    """Spherical-harmonics colours [V, 3] of the V visible entries (``cameras`` [V], ``gaussians``
    [V] int64) for ``sh_degree`` 0 to 3, differentiable in ``means`` [N, 3] and ``coefficients``
    [N, K, 3] or [C, N, K, 3] (not in ``camera_centres`` [C, 3]): ``max(SH(dir) + 0.5, 0)`` with
    ``dir`` the normalised vector from the entry's camera centre to its mean, as gsplat."""
    if not 0 <= sh_degree <= MAX_SH_DEGREE:
        raise ValueError(f"the numba spherical harmonics take degrees 0 to {MAX_SH_DEGREE}, got {sh_degree}")
    return _Shade.apply(means, coefficients, camera_centres.detach(), cameras, gaussians, sh_degree)
