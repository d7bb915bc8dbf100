"""Gaussian rasterization with interchangeable backends: gsplat's CUDA kernels, a compiled
multi-threaded tile-based CPU compositor (``mono4d.models.rasterizer_numba``, numba) and the pure-PyTorch
reference (``mono4d.models.rasterizer_torch``) that runs on any torch device.

All take and return what ``gsplat.rasterization`` does, so the training code (and gsplat's
``DefaultStrategy``) is the same for each. The numba backend runs the torch backend's pipeline with
compiled stages (compositing always; pinhole projection and spherical harmonics unless cameras are
optimised, see ``mono4d.models.rasterizer_numba.kernels``), so their outputs and ``info`` agree to float
rounding. Conventions: OpenCV cameras (x right, y down,
z forward), ``viewmats`` world-to-camera 4x4, ``Ks`` 3x3 pixel intrinsics with pixel centres at
half-integers (as gsplat and COLMAP), quaternions wxyz, linear scales, opacities in [0, 1].

torch, numba and gsplat are imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from mono4d.data.errors import ModelUnavailableError, ParameterError

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "gsplat", "numba", "torch")

GSPLAT_BUILD_HINT = (
    "use the pure-PyTorch rasterizer (backend 'torch', e.g. --preset cpu), or build gsplat's CUDA "
    "extension ahead of time on the GPU machine: gsplat 1.5.3 compiles it just in time on first use, "
    "which fails against torch 2.13; install a gsplat wheel built for this torch and CUDA, or build it "
    "from source (`pip install --no-build-isolation git+https://github.com/nerfstudio-project/gsplat` "
    "with nvcc matching torch.version.cuda)")

TORCH_BACKEND_OPTIONS = ("eps2d", "radius_clip", "rasterize_mode", "camera_model", "covars", "max_pairs")
"""gsplat keyword arguments the torch backend implements (``max_pairs`` is its own memory bound)."""
TORCH_BACKEND_NEUTRAL = {"packed": False, "absgrad": False, "sparse_grad": False, "distributed": False,
                         "with_ut": False, "with_eval3d": False}
"""gsplat keyword arguments the torch (and numba) backend accepts only at these values."""
TORCH_BACKEND_IGNORED = ("tile_size", "channel_chunk", "segmented")
"""gsplat keyword arguments that only tune gsplat's kernels and do not change the result (the numba
backend uses ``tile_size`` for its own tiles and ignores ``max_pairs``, the torch backend's memory bound)."""


@functools.lru_cache(maxsize=1)
def gsplat_cuda_status() -> tuple[bool, str]:
    """Whether gsplat's CUDA rasterizer can run here, and why not when it cannot.

    Loading gsplat's extension may compile it just in time (minutes on first use); the answer is
    cached for the process.
    """
    import torch

    if not torch.cuda.is_available():
        return False, "CUDA is not available to torch"
    try:
        from gsplat.cuda._backend import _C
    except Exception as error:  # a failed just-in-time build raises compiler/linker errors of many kinds
        return False, f"gsplat's CUDA extension failed to load: {type(error).__name__}: {error}"
    if _C is None:
        return False, "gsplat's CUDA extension is not built and no CUDA toolkit was found to compile it"
    return True, "gsplat CUDA extension loaded"


def resolve_backend(backend: str, device: Any) -> str:
    """Pick the backend ("gsplat", "numba" or "torch") for tensors on ``device`` (a torch.device).

    "auto" means numba for CPU tensors, gsplat for CUDA tensors when gsplat's CUDA code loads, and
    torch otherwise (other devices, or CUDA without gsplat). "gsplat" raises ModelUnavailableError
    when that is impossible; "numba" raises ParameterError for tensors that are not on the CPU.
    """
    if backend not in BACKENDS:
        raise ParameterError(f"unknown rasterizer backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    device_type = getattr(device, "type", str(device))
    if backend == "numba" or (backend == "auto" and device_type == "cpu"):
        if device_type != "cpu":
            raise ParameterError(f"the numba rasterizer renders CPU tensors, these are on {device}",
                                 "use backend 'auto' (gsplat on CUDA) or 'torch', or move the tensors to the CPU")
        return "numba"
    on_cuda = device_type == "cuda"
    available, reason = gsplat_cuda_status() if on_cuda else (False, f"the tensors are on {device}, not CUDA")
    if available:
        return "gsplat"
    if backend == "gsplat":
        raise ModelUnavailableError(f"gsplat's CUDA rasterizer cannot be used: {reason}", GSPLAT_BUILD_HINT)
    if on_cuda:
        _warn_torch_fallback(reason)
    return "torch"


@functools.lru_cache(maxsize=None)
def _warn_torch_fallback(reason: str) -> None:
    """Log once per reason that CUDA tensors are rendered by the slower torch backend."""
    logger.warning("rendering CUDA tensors with the pure-PyTorch rasterizer: %s", reason)


def rasterization(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
                  viewmats: Tensor, Ks: Tensor, width: int, height: int, near_plane: float = 0.01,
                  far_plane: float = 1e10, sh_degree: int | None = None, backgrounds: Tensor | None = None,
                  render_mode: str = "RGB+ED", backend: str = "auto",
                  **gsplat_kwargs: Any) -> tuple[Tensor, Tensor, dict]:
    """Render N 3D Gaussians into C cameras: ``gsplat.rasterization``'s call, shapes and outputs.

    Args:
        means: [N, 3] world positions. quats: [N, 4] wxyz (unnormalised is fine).
        scales: [N, 3] linear standard deviations. opacities: [N] in [0, 1].
        colors: [N, D] or [C, N, D]; with ``sh_degree`` set, SH coefficients [N, K, 3] or [C, N, K, 3].
        viewmats: [C, 4, 4] world-to-camera (OpenCV). Ks: [C, 3, 3] pixel intrinsics.
        width, height: image size in pixels. near_plane, far_plane: camera-z clipping range.
        backgrounds: [C, D] optional background colour.
        render_mode: "RGB", "D" (accumulated depth), "ED" (expected depth), "RGB+D", "RGB+ED"
            (depth as the last channel).
        backend: "auto" (numba on CPU tensors; gsplat on CUDA tensors when its CUDA code loads, else
            torch), "gsplat", "numba" (compiled CPU compositor), "torch" (pure-PyTorch reference).
        **gsplat_kwargs: further ``gsplat.rasterization`` arguments. The gsplat backend defaults to
            ``packed=False`` so that ``info`` has the same [C, N, ...] layout as the torch backend
            (call ``DefaultStrategy.step_post_backward(..., packed=False)``). The torch backend
            implements eps2d, radius_clip, rasterize_mode, camera_model (pinhole, ortho, fisheye),
            covars and its own ``max_pairs``; it ignores tile_size, channel_chunk, segmented, and
            raises ParameterError for packed/absgrad/sparse_grad/distributed/with_ut/with_eval3d.
            The numba backend takes the same arguments, renders in ``tile_size`` tiles (default
            16) and ignores ``max_pairs``.

    Returns:
        ``render_colors`` [C, H, W, X] (X = D, 1 or D + 1 by render_mode), ``render_alphas``
        [C, H, W, 1], ``info`` (gsplat's meta dict: ``means2d`` [C, N, 2], ``radii`` [C, N, 2] int32,
        ``depths`` [C, N], ``width``, ``height``, ``n_cameras``, ``gaussian_ids`` None, ...,
        plus ``backend``: which one ran).
    """
    chosen = resolve_backend(backend, means.device)
    if chosen == "gsplat":
        import gsplat

        options = {"packed": False, **gsplat_kwargs}
        render_colors, render_alphas, info = gsplat.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
            far_plane=far_plane, sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode,
            **options)
        info["backend"] = "gsplat"
        return render_colors, render_alphas, info

    from mono4d.models import rasterizer_torch

    options, tile_size = {}, 16
    for name, value in gsplat_kwargs.items():
        if name == "tile_size":
            tile_size = value
        elif name in TORCH_BACKEND_OPTIONS:
            options[name] = value
        elif name in TORCH_BACKEND_NEUTRAL:
            if value != TORCH_BACKEND_NEUTRAL[name]:
                raise ParameterError(f"the {chosen} rasterizer does not support {name}={value!r}",
                                     f"leave {name}={TORCH_BACKEND_NEUTRAL[name]!r}, or use backend='gsplat' "
                                     "on a CUDA machine")
        elif name not in TORCH_BACKEND_IGNORED:
            raise ParameterError(f"unknown rasterization argument {name!r}",
                                 f"the {chosen} rasterizer takes {', '.join(TORCH_BACKEND_OPTIONS)}")
    stages = {}
    if chosen == "numba":
        from mono4d.models import rasterizer_numba

        stages = rasterizer_numba.kernels(viewmats, Ks, options.get("camera_model", "pinhole"),
                                          options.get("covars"), sh_degree, tile_size)
    render_colors, render_alphas, info = rasterizer_torch.rasterize(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
        far_plane=far_plane, sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode,
        **stages, **options)
    info["backend"] = chosen
    return render_colors, render_alphas, info
