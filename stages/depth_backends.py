"""Depth backends of the depth stage: Hugging Face depth-estimation models, user depth maps
from files, and weights-free multi-view stereo from the SfM cameras.

All backends return ``(T, H, W) float32`` maps at frame size, with 0 (or a non-positive value)
marking pixels without depth. What the values mean (relative inverse depth, metric z-depth,
z-depth in SfM units) is the ``kind`` the caller records in ``depth.json``.

The ``sfm`` backend (:func:`estimate_sfm_depth`) is plane-sweep stereo between each frame and a
few neighbouring frames seen by the registered cameras:

1. Each frame is matched against up to ``num_neighbors`` registered frames chosen for a useful
   baseline (about ``target_baseline`` of the scene depth) and a similar viewing direction.
2. Fronto-parallel planes, uniform in inverse depth over the range of the SfM points seen in
   the frame (with a margin), warp each neighbour onto the frame; the matching score is the
   zero-mean normalised cross-correlation (ZNCC) over a ``window`` x ``window`` patch, averaged
   over the better half of the neighbours (tolerates occlusion in some of them).
3. Winner-take-all over the planes with a parabolic sub-plane refinement; a depth is kept when
   its score is high enough, the patch has texture and the winner is not at the ends of the range.
4. Multi-view geometric consistency: a depth survives only where it agrees (within
   ``consistency`` relative z error) with the depths computed independently for at least
   ``min_consistent`` of the frame's neighbours (fewer when the frame has fewer neighbours).
5. Temporal fusion through the cameras: the surviving depths of the frames within
   ``fuse_window`` frames are splatted into the frame (z-buffered); a pixel keeps a depth where at
   least two of its own and the splatted depths agree (averaged in inverse depth), which fills
   holes from neighbours, drops depths no neighbour confirms and steadies values over time.
6. Edge-aware densification at frame size: the fused stereo depths (weighted by how many views
   agree) and the sparse SfM points observed in the frame are spread by normalised domain-transform
   filtering guided by the RGB frame (:func:`edge_aware_fill`), so depth follows the image: it
   spreads within regions of similar colour and stops at image edges. Pixels walled off from every
   measurement by image edges (or far from all of them) get no depth (0) instead of a guess.

Limits: stereo assumes a static scene. Moving objects (people, hands, pets) break the
multi-view constraint: their matches are wrong or inconsistent and are mostly rejected by steps 4
and 5, so most of their pixels end up without depth (0); the few that survive are typically too
far. Frames whose camera was not registered by SfM get depth only when a pose is given for them
(e.g. interpolated); frames without any useful neighbour get depth from the sparse points alone.
Textureless regions (white walls) are filled from the SfM points and stereo around them where no
image edge separates them, and left at 0 where one does.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
from numba import njit

from mono4d.data.errors import InputError, ModelUnavailableError, ParameterError
from mono4d.data.geometry import camera_centers, invert_rigid, scale_intrinsics

logger = logging.getLogger(__name__)

WEIGHTS_FREE_HINT = ("use a weights-free backend instead: --set depth.backend=sfm (stereo from the SfM "
                     "cameras), --set depth.backend=file --set depth.file_path=DIR (your own depth maps), "
                     "or --preset cpu")

# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------

METRIC_MODEL_TYPES = ("zoedepth", "glpn", "depth_pro")
RELATIVE_INVERSE_MODEL_TYPES = ("dpt", "depth_anything", "prompt_depth_anything")


def depth_kind_from_config(config) -> str | None:
    """``"relative_inverse"`` or ``"metric"`` for a transformers depth model's config, or None
    when the config does not say (the caller then needs an explicit ``output_kind``).

    Depth Anything states it in ``depth_estimation_type`` ("relative" | "metric"); other model
    families are known by ``model_type`` (DPT predicts relative inverse depth; ZoeDepth, GLPN and
    DepthPro predict metres)."""
    estimation_type = getattr(config, "depth_estimation_type", None)
    if estimation_type == "metric":
        return "metric"
    if estimation_type == "relative":
        return "relative_inverse"
    model_type = getattr(config, "model_type", "")
    if model_type in METRIC_MODEL_TYPES:
        return "metric"
    if model_type in RELATIVE_INVERSE_MODEL_TYPES:
        return "relative_inverse"
    return None


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_unreachable_reason() -> str | None:
    """Why a download from the Hugging Face hub cannot work here (offline mode set, or the hub's
    host name does not resolve), or None when it may. Avoids minutes of retries without network."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"cannot resolve {host} (no network?)"
    return None


def _looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``namespace/name``; anything else is meant as a local folder."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_PROBE_SECONDS = 3.0


def _probe_hub(model: str, timeout: float) -> str | None:
    """Ask the hub for ``model``'s config.json within about ``timeout`` seconds; None when it
    answers, else why not. Runs in a daemon thread so a hanging name lookup cannot block."""
    import threading

    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    outcome: list[str | None] = []

    def ask() -> None:
        try:
            get_hf_file_metadata(hf_hub_url(model, "config.json"), timeout=timeout)
            outcome.append(None)
        except Exception as error:  # any failure (network, 404, auth) means: not reachable here
            outcome.append(f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}")

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"no answer from the Hugging Face hub within {timeout:.0f} s"


def transformers_model_availability(model: str, hub_timeout: float = HUB_PROBE_SECONDS) -> tuple[bool, str]:
    """Whether :func:`load_transformers_depth_model` can be expected to find ``model`` here, and
    where (or why not), without loading it: a local folder with ``config.json``; a hub id whose
    config and weights are in the local Hugging Face cache; or a hub id the hub answers for
    within ``hub_timeout`` seconds (never tried when ``HF_HUB_OFFLINE`` is set)."""
    local = Path(model).expanduser()
    if local.exists():
        if (local / "config.json").is_file():
            return True, f"local folder {local}"
        return False, f"local folder {local} has no config.json"
    if _looks_like_path(model):
        return False, f"local folder {local} does not exist"
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError as error:
        return False, f"cannot import huggingface_hub: {error}"
    cached = [try_to_load_from_cache(model, name) for name in ("config.json",) + WEIGHT_FILES]
    if isinstance(cached[0], str) and any(isinstance(path, str) for path in cached[1:]):
        return True, f"Hugging Face cache {_hf_cache_dir()}"
    if constants.HF_HUB_OFFLINE:
        return False, f"not in the Hugging Face cache {_hf_cache_dir()} and HF_HUB_OFFLINE is set"
    failure = _probe_hub(model, hub_timeout)
    if failure is None:
        return True, "Hugging Face hub (downloaded on first use)"
    return False, f"not in the Hugging Face cache {_hf_cache_dir()} and the hub is not reachable ({failure})"


def load_transformers_depth_model(model: str):
    """Load ``(model, image_processor)`` from a local folder or a Hugging Face hub id.

    A hub id is first looked up in the local Hugging Face cache, then downloaded. Raises
    :class:`ModelUnavailableError` (naming the model, where it was looked for and the
    weights-free alternatives) when neither works."""
    try:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation
    except ImportError as error:  # transformers itself broken (e.g. a torchvision mismatch)
        raise ModelUnavailableError(f"cannot import transformers to load depth model '{model}': {error}",
                                    WEIGHTS_FREE_HINT) from error
    local = Path(model).expanduser()
    attempts: list[tuple[str, dict, str]] = []
    failures: list[str] = []
    unreachable = None
    if local.exists():
        attempts.append((str(local), {"local_files_only": True}, f"local folder {local}"))
    elif _looks_like_path(model):
        failures.append(f"local folder {local}: does not exist")
    else:
        attempts.append((model, {"local_files_only": True}, f"Hugging Face cache {_hf_cache_dir()}"))
        unreachable = _hub_unreachable_reason()
        if not unreachable:
            attempts.append((model, {}, f"Hugging Face hub id '{model}' (download)"))
    for name, kwargs, where in attempts:
        try:
            processor = AutoImageProcessor.from_pretrained(name, **kwargs)
            network = AutoModelForDepthEstimation.from_pretrained(name, **kwargs)
            logger.info("loaded depth model %s from %s", model, where)
            return network, processor
        except (OSError, ValueError, KeyError, ImportError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else ""
            failures.append(f"{where}: {type(error).__name__}: {reason[:200]}")
    if unreachable:
        failures.append(f"Hugging Face hub id '{model}' (download): skipped, {unreachable}")
    raise ModelUnavailableError(
        f"depth model '{model}' cannot be loaded; looked in:\n    " + "\n    ".join(failures),
        "give a local folder with the model (config.json, weights, preprocessor_config.json) via "
        "--set depth.model=PATH, or connect to the internet once to fill the Hugging Face cache; or "
        + WEIGHTS_FREE_HINT)


def resolve_torch_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; other values pass through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device '{device}' was asked for but CUDA is not available here",
                         "use --set depth.device=auto (or cpu)")
    return device


def estimate_transformers_depth(load_batch: Callable[[Sequence[int]], np.ndarray], num_frames: int,
                                size: tuple[int, int], model: str, batch_size: int = 4, device: str = "auto",
                                fp16: bool = True, input_size: int = 0,
                                progress: Callable[[Iterable], Iterable] = iter) -> tuple[np.ndarray, object]:
    """Run a transformers depth-estimation model over all frames.

    ``load_batch(indices)`` returns ``(B, H, W, 3)`` uint8 RGB frames; ``size`` is ``(H, W)``.
    ``input_size`` > 0 overrides the processor's resize target (pixels of the shorter side
    policy of the processor; Depth Anything keeps the aspect ratio and rounds to multiples of 14).
    Half precision is used only on CUDA. Returns the raw model output resized (bicubic) to
    ``(T, H, W)`` float32, and the model's config."""
    import torch
    import torch.nn.functional as F

    network, processor = load_transformers_depth_model(model)
    device = resolve_torch_device(device)
    half = fp16 and device.startswith("cuda")
    network = network.to(device=device, dtype=torch.float16 if half else torch.float32).eval()
    height, width = size
    out = np.zeros((num_frames, height, width), np.float32)
    batches = [list(range(start, min(start + batch_size, num_frames))) for start in range(0, num_frames, batch_size)]
    extra = {"size": {"height": input_size, "width": input_size}} if input_size > 0 else {}
    with torch.inference_mode():
        for indices in progress(batches):
            images = list(load_batch(indices))
            pixel_values = processor(images=images, return_tensors="pt", **extra)["pixel_values"]
            pixel_values = pixel_values.to(device=device, dtype=torch.float16 if half else torch.float32)
            predicted = network(pixel_values=pixel_values).predicted_depth.float()
            if predicted.ndim == 3:
                predicted = predicted[:, None]
            resized = F.interpolate(predicted, size=(height, width), mode="bicubic", align_corners=False)
            out[indices] = resized[:, 0].cpu().numpy()
    return out, network.config


# ----------------------------------------------------------------------------------------------
# file
# ----------------------------------------------------------------------------------------------

DEPTH_FILE_SUFFIXES = (".npy", ".png", ".tif", ".tiff")


def find_depth_files(root: Path) -> list[Path]:
    """Depth map files under ``root`` (itself, or the common ``depth_gt/`` / ``depth/`` subfolders),
    sorted by name. ``root`` may also be a single ``(T, H, W)`` ``.npy`` file."""
    if root.is_file():
        return [root]
    for folder in (root, root / "depth_gt", root / "depth"):
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in DEPTH_FILE_SUFFIXES)
            if files:
                return files
    raise InputError(f"no depth maps ({', '.join(DEPTH_FILE_SUFFIXES)}) found in {root}, {root / 'depth_gt'} "
                     f"or {root / 'depth'}",
                     "point --set depth.file_path at the folder of per-frame depth maps")


def _read_depth_file(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path).astype(np.float32)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read depth map {path}: {error}",
                             "check the file is a NumPy .npy array") from error
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise InputError(f"cannot read depth map {path}", "check the file is a 16-bit PNG or float TIFF")
    return (image[..., 0] if image.ndim == 3 else image).astype(np.float32)


def read_depth_files(root: Path, num_frames: int, size: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """User depth maps, one per frame in sorted order, as ``(T, H, W)`` float32 = stored value x
    ``scale``, resized to ``size = (H, W)`` with nearest neighbour. Non-finite or non-positive
    values become 0 (invalid). Raises :class:`InputError` when the count does not match."""
    files = find_depth_files(root)
    if len(files) == 1 and files[0].suffix.lower() == ".npy":
        stack = _read_depth_file(files[0])
        maps = list(stack) if stack.ndim == 3 else [stack]
    else:
        maps = None
    count = len(maps) if maps is not None else len(files)
    if count != num_frames:
        raise InputError(f"{count} depth maps in {root} but {num_frames} frames",
                         "give exactly one depth map per extracted frame (same order as the frames; "
                         "check the frames stage's fps / frame limits)")
    height, width = size
    out = np.zeros((num_frames, height, width), np.float32)
    for index in range(num_frames):
        depth = maps[index] if maps is not None else _read_depth_file(files[index])
        if depth.ndim != 2:
            raise InputError(f"depth map {index} in {root} has shape {depth.shape}, expected (H, W)",
                             "store one single-channel map per frame")
        depth = np.where(np.isfinite(depth), depth * np.float32(scale), 0.0).astype(np.float32)
        if depth.shape != (height, width):
            depth = cv2.resize(depth, (width, height), interpolation=cv2.INTER_NEAREST)
        out[index] = np.maximum(depth, 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# sfm: plane-sweep stereo from the registered cameras
# ----------------------------------------------------------------------------------------------

MIN_TEXTURE_STD = 0.01   # grey-level std (0..1) of a patch below which ZNCC is meaningless
MIN_RANGE_POINTS = 8     # SfM points a frame needs to set its own depth range
SPARSE_WEIGHT = 1.0      # fill weight of an SfM point (a stereo depth weighs n / (n + 1), n agreeing views)
MAX_THREADS = 4          # frames processed at once


def observed_point_depths(points: dict, w2c: np.ndarray, num_frames: int) -> list[np.ndarray]:
    """Per frame, the SfM points observed in it in that frame's camera coordinates: a list of
    ``(M_t, 3)`` arrays (x right, y down, z forward), only points in front (z > 0)."""
    xyz = np.asarray(points["xyz"], np.float64)
    obs_frame = np.asarray(points["obs_frame"], np.int64)
    obs_point = np.asarray(points["obs_point"], np.int64)
    out = []
    for frame in range(num_frames):
        world = xyz[obs_point[obs_frame == frame]]
        cam = world @ w2c[frame, :3, :3].T + w2c[frame, :3, 3]
        out.append(cam[cam[:, 2] > 1e-9])
    return out


def pixel_indices(K: np.ndarray, camera_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column and row ``(M,)`` int of the pixels that camera points ``(M, 3)`` (z > 0) project into
    (``K`` with pixel centres at half-integers, so pixel ``[r, c]`` spans ``[c, c+1) x [r, r+1)``)."""
    projected = camera_points @ np.asarray(K, np.float64).T
    return (np.floor(projected[:, 0] / projected[:, 2]).astype(np.int64),
            np.floor(projected[:, 1] / projected[:, 2]).astype(np.int64))


def choose_neighbors(w2c: np.ndarray, usable: np.ndarray, scene_depth: np.ndarray, num_neighbors: int,
                     max_gap: int, target_baseline: float) -> list[list[int]]:
    """For each frame, up to ``num_neighbors`` usable frames within ``max_gap`` frames whose
    baseline relative to the frame's scene depth is closest (in log ratio) to ``target_baseline``,
    among those with an optical axis within 45 degrees and at least a tenth of the target baseline."""
    centers = camera_centers(w2c)
    axes = w2c[:, 2, :3]
    neighbors: list[list[int]] = []
    for frame in range(len(w2c)):
        low, high = max(0, frame - max_gap), min(len(w2c), frame + max_gap + 1)
        candidates = [j for j in range(low, high) if j != frame and usable[j]]
        scored = []
        for j in candidates:
            ratio = np.linalg.norm(centers[j] - centers[frame]) / scene_depth[frame]
            if axes[j] @ axes[frame] > np.cos(np.radians(45)) and ratio > 0.1 * target_baseline:
                scored.append((abs(np.log(ratio / target_baseline)), j))
        neighbors.append([j for _, j in sorted(scored)[:num_neighbors]])
    return neighbors


def _box(image: np.ndarray, window: int, out: np.ndarray | None = None) -> np.ndarray:
    """Mean over ``window`` x ``window`` patches (reflected border), into ``out`` when given."""
    return cv2.boxFilter(image, -1, (window, window), dst=out, borderType=cv2.BORDER_REFLECT)


# Compiled element-wise passes of the plane sweep over flattened (h * w) float32 images. They
# repeat the NumPy expressions they replace in float32 (identical results), branch-free so they
# vectorise (error_model="numpy": no zero-division checks), and release the GIL.

@njit(cache=True, nogil=True, error_model="numpy")
def _plane_maps(base: np.ndarray, step: np.ndarray, width: int, height: int, map_x: np.ndarray,
                map_y: np.ndarray, inside: np.ndarray) -> None:
    """Sampling maps of one plane and source for cv2.remap (pixel centres at integers): ``base``
    ``(3, N)`` direction term plus ``step`` ``(3,)`` translation term x 1/z are homogeneous
    source pixels; ``inside`` ``(N,)``: in front of the source and within [-0.5, size - 0.5]."""
    near, half, one = np.float32(1e-6), np.float32(0.5), np.float32(1.0)
    right, bottom = np.float32(width - 0.5), np.float32(height - 0.5)
    for i in range(map_x.shape[0]):
        z = base[2, i] + step[2]
        front = z > near
        safe = z if front else one
        x = (base[0, i] + step[0]) / safe - half
        y = (base[1, i] + step[1]) / safe - half
        map_x[i] = x
        map_y[i] = y
        inside[i] = front & (x >= -half) & (x <= right) & (y >= -half) & (y <= bottom)


@njit(cache=True, nogil=True, error_model="numpy")
def _squares_and_products(reference: np.ndarray, warped: np.ndarray, squares: np.ndarray,
                          products: np.ndarray) -> None:
    """``squares = warped * warped`` and ``products = reference * warped`` ``(N,)`` in one pass."""
    for i in range(warped.shape[0]):
        value = warped[i]
        squares[i] = value * value
        products[i] = reference[i] * value


@njit(cache=True, nogil=True, error_model="numpy")
def _insert_zncc(ref_mean: np.ndarray, ref_var: np.ndarray, warped_mean: np.ndarray, squares_mean: np.ndarray,
                 products_mean: np.ndarray, inside: np.ndarray, min_var: np.float32, score: np.ndarray,
                 top: np.ndarray) -> None:
    """ZNCC ``score`` ``(N,)`` of one plane and source from the patch means of the reference, the
    warped source, its square and the product, -1 outside the source or where the warped patch's
    variance is at most ``min_var``; then inserted into the plane's descending running top-k
    ``top`` ``(k, N)`` (``score`` is left holding what fell out)."""
    zero, tiny, missing = np.float32(0.0), np.float32(1e-8), np.float32(-1.0)
    for i in range(score.shape[0]):
        mean = warped_mean[i]
        difference = squares_mean[i] - mean * mean
        variance = difference if difference > zero else zero
        covariance = products_mean[i] - ref_mean[i] * mean
        zncc = covariance / np.sqrt(ref_var[i] * variance + tiny)
        score[i] = zncc if inside[i] & (variance > min_var) else missing
    for rank in range(top.shape[0]):
        best = top[rank]
        for i in range(score.shape[0]):
            current, value = best[i], score[i]
            best[i] = value if value > current else current
            score[i] = current if value > current else value


def plane_sweep(reference: np.ndarray, sources: Sequence[np.ndarray], K_ref: np.ndarray, w2c_ref: np.ndarray,
                K_src: Sequence[np.ndarray], w2c_src: Sequence[np.ndarray], inverse_depths: np.ndarray,
                window: int) -> tuple[np.ndarray, np.ndarray]:
    """Winner-take-all plane sweep of one reference frame.

    ``reference`` and ``sources`` are ``(h, w)`` float32 grey images in [0, 1]; ``inverse_depths``
    ``(D,)`` are the planes (1/z in the reference camera), increasing. Returns the z-depth map
    ``(h, w)`` (sub-plane refined) and the aggregated ZNCC score ``(h, w)`` of the winner
    (-1 where no plane could be scored; the winner at index 0 or D-1 gets score -1 too)."""
    height, width = reference.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    pixels = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    ref_mean = _box(reference, window)
    ref_var = np.maximum(_box(reference * reference, window) - ref_mean * ref_mean, 0.0)
    num_planes = len(inverse_depths)
    keep = max(1, (len(sources) + 1) // 2)
    volume = np.full((num_planes, height, width), -1.0, np.float32)
    rays = np.linalg.inv(K_ref) @ pixels
    per_source = []
    for source, K_j, w2c_j in zip(sources, K_src, w2c_src):
        relative = w2c_j @ invert_rigid(w2c_ref)
        base = (K_j @ relative[:3, :3] @ rays).astype(np.float32)      # (3, N): direction term
        offset = (K_j @ relative[:3, 3]).astype(np.float32)            # (3,): translation term x 1/z
        per_source.append((source, base, offset))
    # Flattened buffers reused over every (plane, source); the element-wise work runs in the
    # compiled passes above, without the GIL, so the frames on :func:`_map_frames`' threads run in
    # parallel.
    count = height * width
    map_x, map_y, warped, squares, products, warped_mean, squares_mean, products_mean, score = (
        np.empty(count, np.float32) for _ in range(9))
    inside = np.empty(count, bool)
    top = np.empty((keep, count), np.float32)   # best scores per pixel, descending
    images = {name: buffer.reshape(height, width) for name, buffer in
              (("map_x", map_x), ("map_y", map_y), ("warped", warped), ("squares", squares), ("products", products),
               ("warped_mean", warped_mean), ("squares_mean", squares_mean), ("products_mean", products_mean))}
    reference_flat, ref_mean_flat, ref_var_flat = (np.ascontiguousarray(a, np.float32).ravel()
                                                   for a in (reference, ref_mean, ref_var))
    min_var = np.float32(MIN_TEXTURE_STD ** 2)
    for plane, inverse_depth in enumerate(inverse_depths):
        top.fill(-1.0)
        for source, base, offset in per_source:
            _plane_maps(base, offset * np.float32(inverse_depth), width, height, map_x, map_y, inside)
            cv2.remap(source, images["map_x"], images["map_y"], cv2.INTER_LINEAR, dst=images["warped"],
                      borderMode=cv2.BORDER_REPLICATE)
            _squares_and_products(reference_flat, warped, squares, products)
            for name in ("warped", "squares", "products"):
                _box(images[name], window, out=images[f"{name}_mean"])
            _insert_zncc(ref_mean_flat, ref_var_flat, warped_mean, squares_mean, products_mean, inside, min_var,
                         score, top)
        total = volume[plane].reshape(count)
        np.copyto(total, top[0])
        for rank in range(1, keep):
            np.add(total, top[rank], out=total)
        np.divide(total, np.float32(keep), out=total)
    best = np.argmax(volume, axis=0)
    best_score = np.take_along_axis(volume, best[None], axis=0)[0]
    # Parabolic refinement in plane index (uniform in inverse depth).
    lower = np.take_along_axis(volume, np.clip(best - 1, 0, num_planes - 1)[None], axis=0)[0]
    upper = np.take_along_axis(volume, np.clip(best + 1, 0, num_planes - 1)[None], axis=0)[0]
    curvature = lower - 2.0 * best_score + upper
    step = np.where(curvature < -1e-6, 0.5 * (lower - upper) / np.where(curvature < -1e-6, curvature, -1.0), 0.0)
    fractional = best + np.clip(step, -0.5, 0.5)
    inverse = np.interp(fractional.ravel(), np.arange(num_planes), inverse_depths).reshape(height, width)
    depth = (1.0 / inverse).astype(np.float32)
    interior = (best > 0) & (best < num_planes - 1) & (ref_var > MIN_TEXTURE_STD ** 2)
    return depth, np.where(interior, best_score, -1.0).astype(np.float32)


def consistency_count(depths: np.ndarray, K: np.ndarray, w2c: np.ndarray, neighbors: list[list[int]],
                      tolerance: float) -> np.ndarray:
    """For each frame's valid depth pixel, the number of neighbouring frames whose own depth at the
    reprojected pixel agrees within ``tolerance`` relative z error. ``depths`` ``(T, h, w)``, 0 =
    invalid. Returns ``(T, h, w)`` int."""
    num_frames, height, width = depths.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    pixels = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])

    def count(frame: int) -> np.ndarray:
        agreeing = np.zeros((height, width), np.int32)
        depth = depths[frame].ravel().astype(np.float64)
        cam = (np.linalg.inv(K[frame]) @ pixels) * depth
        for j in neighbors[frame]:
            relative = w2c[j] @ invert_rigid(w2c[frame])
            proj = K[j] @ (relative[:3, :3] @ cam + relative[:3, 3:4])
            z = proj[2]
            ok = (depth > 0) & (z > 1e-9)
            u = np.floor(np.where(ok, proj[0] / np.where(ok, z, 1.0), -1)).astype(np.int64)
            v = np.floor(np.where(ok, proj[1] / np.where(ok, z, 1.0), -1)).astype(np.int64)
            ok &= (u >= 0) & (u < width) & (v >= 0) & (v < height)
            other = np.zeros_like(depth)
            other[ok] = depths[j][v[ok], u[ok]]
            agree = ok & (other > 0) & (np.abs(other - z) <= tolerance * z)
            agreeing += agree.reshape(height, width)
        return agreeing

    if not num_frames:
        return np.zeros(depths.shape, np.int32)
    return np.stack(_map_frames(count, range(num_frames)))


def forward_project_depth(depth: np.ndarray, K_src: np.ndarray, w2c_src: np.ndarray, K_dst: np.ndarray,
                          w2c_dst: np.ndarray) -> np.ndarray:
    """Splat a source frame's depth map ``(h, w)`` (0 = invalid) into a destination camera of the
    same image size: ``(h, w)`` z-depth in the destination camera, nearest surface kept per pixel
    (a z-buffer), 0 where nothing lands."""
    height, width = depth.shape
    rows, cols = np.nonzero(depth > 0)
    z_src = depth[rows, cols].astype(np.float64)
    pixels = np.stack([cols + 0.5, rows + 0.5, np.ones(len(rows))])
    cam = (np.linalg.inv(K_src) @ pixels) * z_src
    relative = w2c_dst @ invert_rigid(w2c_src)
    proj = K_dst @ (relative[:3, :3] @ cam + relative[:3, 3:4])
    z = proj[2]
    ok = z > 1e-9
    u = np.floor(proj[0, ok] / z[ok]).astype(np.int64)
    v = np.floor(proj[1, ok] / z[ok]).astype(np.int64)
    z = z[ok]
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    out = np.full(height * width, np.inf)
    np.minimum.at(out, v[inside] * width + u[inside], z[inside])
    return np.where(np.isfinite(out), out, 0.0).reshape(height, width).astype(np.float32)


def fuse_temporal(measured: np.ndarray, K: np.ndarray, w2c: np.ndarray, sources: list[list[int]],
                  tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Temporal fusion of per-frame stereo depths through the cameras.

    Each frame's ``measured`` depth ``(T, h, w)`` (0 = none) is compared with the depths of its
    ``sources`` frames splatted into it (:func:`forward_project_depth`). A frame's own depth is
    kept and averaged (in inverse depth) with the splatted depths within ``tolerance`` relative z
    of it; where the frame has none, the median of the splatted depths is taken when at least two
    of them agree with it. Returns fused depth ``(T, h, w)`` and the number of agreeing
    measurements per pixel ``(T, h, w)`` int (0 = no depth)."""
    fused = np.zeros_like(measured)
    support = np.zeros(measured.shape, np.int32)

    def fuse(frame: int) -> None:   # writes only row `frame` of fused and support
        own = measured[frame]
        splats = [forward_project_depth(measured[j], K[j], w2c[j], K[frame], w2c[frame]) for j in sources[frame]]
        if not splats:
            fused[frame], support[frame] = own, (own > 0)
            return
        stacked = np.stack(splats)
        present = (stacked > 0).sum(axis=0)
        ordered = np.sort(np.where(stacked > 0, stacked, np.inf), axis=0)     # valid depths first
        middle = np.take_along_axis(ordered, np.maximum(present - 1, 0)[None] // 2, axis=0)[0]
        reference = np.where(own > 0, own, np.where(present > 0, middle, 0.0))
        agree = (stacked > 0) & (np.abs(stacked - reference) <= tolerance * reference)
        count = agree.sum(axis=0) + (own > 0)
        inverse_sum = np.where(agree, 1.0 / np.where(agree, stacked, 1.0), 0.0).sum(axis=0)
        inverse_sum += np.where(own > 0, 1.0 / np.where(own > 0, own, 1.0), 0.0)
        keep = count >= 2
        fused[frame] = np.where(keep & (count > 0), count / np.where(keep, inverse_sum, 1.0), 0.0)
        support[frame] = np.where(keep, count, 0)

    _map_frames(fuse, range(len(measured)))
    return fused, support


@njit(cache=True, nogil=True)
def _recursive_pass(signal: np.ndarray, feedback: np.ndarray) -> np.ndarray:
    """One causal and one anti-causal first-order recursive pass along axis 0 of ``signal``
    ``(L, k, M)`` float32: ``J[n] = I[n] + a_n (J[n-1] - I[n])`` with ``a_n = feedback[n-1]``
    ``(L-1, M)``, then the same backwards. In place (compiled, float32); returns ``signal``."""
    length, channels, count = signal.shape
    for n in range(1, length):
        for c in range(channels):
            for m in range(count):
                signal[n, c, m] += (signal[n - 1, c, m] - signal[n, c, m]) * feedback[n - 1, m]
    for n in range(length - 2, -1, -1):
        for c in range(channels):
            for m in range(count):
                signal[n, c, m] += (signal[n + 1, c, m] - signal[n, c, m]) * feedback[n, m]
    return signal


def domain_transform_filter(signals: np.ndarray, guide: np.ndarray | None, sigma_space: float,
                            sigma_color: float, iterations: int = 3) -> np.ndarray:
    """Edge-aware smoothing of ``signals`` ``(k, H, W)`` float32 guided by an image, by the
    recursive domain transform filter (Gastal and Oliveira, 2011): pixels are spread along rows
    and columns over a distance that grows by ``sigma_space / sigma_color`` per unit of colour
    change of ``guide`` ``(H, W, C)`` (values in [0, 1], summed absolute channel differences), so
    smoothing stops at image edges. ``sigma_space`` in pixels; ``guide=None`` gives the same
    filter without edges. Returns the filtered ``(k, H, W)`` float32."""
    _, height, width = signals.shape
    if guide is None:
        dx, dy = np.ones((height, width - 1), np.float32), np.ones((height - 1, width), np.float32)
    else:
        ratio = np.float32(sigma_space / sigma_color)
        dx = 1.0 + ratio * np.abs(np.diff(guide, axis=1)).sum(axis=2, dtype=np.float32)
        dy = 1.0 + ratio * np.abs(np.diff(guide, axis=0)).sum(axis=2, dtype=np.float32)
    rows = np.ascontiguousarray(signals.transpose(2, 0, 1), dtype=np.float32)   # (W, k, H)
    dx_t = np.ascontiguousarray(dx.T)                                              # (W-1, H)
    for index in range(iterations):
        sigma = sigma_space * np.sqrt(3.0) * 2.0 ** (iterations - index - 1) / np.sqrt(4.0 ** iterations - 1.0)
        a = np.float32(np.exp(-np.sqrt(2.0) / sigma))
        _recursive_pass(rows, a ** dx_t)
        columns = np.ascontiguousarray(rows.transpose(2, 1, 0))                   # (H, k, W)
        _recursive_pass(columns, a ** dy)
        rows = np.ascontiguousarray(columns.transpose(2, 1, 0))
    return np.ascontiguousarray(rows.transpose(1, 2, 0))


def edge_aware_fill(guide: np.ndarray, inverse_depth: np.ndarray, weights: np.ndarray, sigma_space: float,
                    sigma_color: float, min_support: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense inverse depth ``(H, W)`` float32 and where it is known ``(H, W)`` bool, from confidence-weighted measurements (``weights`` > 0 where
    ``inverse_depth`` is known) by normalised edge-aware filtering with ``guide`` ``(H, W, 3)`` in
    [0, 1]: ``F(w x) / F(w)`` with :func:`domain_transform_filter`, so values spread within
    regions of similar colour and not across image edges. A pixel is unknown when the
    measurement weight reaching it along the image is below ``min_support`` times what reaches
    it ignoring edges (it is walled off from every measurement by edges), or when no measurement
    is within a few ``sigma_space`` at all."""
    weights = weights.astype(np.float32)
    edge = domain_transform_filter(np.stack([weights * inverse_depth, weights]), guide, sigma_space, sigma_color)
    plain = domain_transform_filter(weights[None], None, sigma_space, sigma_color)[0]
    reach = edge[1]
    filled = edge[0] / np.maximum(reach, 1e-12)
    floor = 1e-6 * max(float(weights.max()), 1e-12)
    known = (reach >= min_support * plain) & (plain > floor) & (reach > floor)
    return filled.astype(np.float32), known


def _thread_count() -> int:
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def _map_frames(function: Callable[[int], object], frames: Sequence[int],
                progress: Callable[[Iterable], Iterable] = iter) -> list:
    """``[function(frame) for frame in frames]`` on a bounded thread pool (OpenCV and NumPy's
    array loops release the GIL), in order, ``progress`` wrapped around the results."""
    with ThreadPoolExecutor(_thread_count()) as pool:
        futures = [pool.submit(function, frame) for frame in frames]
        return [future.result() for future in progress(futures)]


def estimate_sfm_depth(images: np.ndarray, K: np.ndarray, w2c: np.ndarray, registered: np.ndarray, points: dict,
                       num_neighbors: int = 4, num_planes: int = 64, window: int = 7, max_side: int = 320,
                       min_score: float = 0.5, consistency: float = 0.02, min_consistent: int = 2, max_gap: int = 10,
                       target_baseline: float = 0.08, fuse_window: int = 3, fill_sigma: float = 0.1,
                       fill_color: float = 0.1, min_support: float = 0.1, median: int = 0,
                       progress: Callable[[Iterable], Iterable] = iter) -> tuple[np.ndarray, dict]:
    """Depth from the registered cameras by plane-sweep stereo (see the module docstring).

    ``images`` ``(T, H, W, 3)`` uint8 RGB; ``K`` ``(T, 3, 3)``, ``w2c`` ``(T, 4, 4)`` (OpenCV),
    ``registered`` ``(T,)`` bool; ``points`` the cameras stage's ``points.npz`` arrays. Stereo runs
    at ``max_side`` pixels on the longer side; temporal fusion over ``fuse_window`` frames on each
    side (0 = off); the edge-aware fill at frame size with a spatial sigma of ``fill_sigma`` x the
    longer side and a colour sigma ``fill_color``, leaving 0 where the measurement support is below
    ``min_support`` (see :func:`edge_aware_fill`); ``median`` (0, 3 or 5) filters the filled
    inverse depth. Returns z-depth ``(T, H, W)`` float32 in the cameras' units (0 = no depth) and
    statistics: fractions of pixels measured by stereo, after fusion, and left without depth."""
    num_frames, height, width = images.shape[:3]
    factor = min(1.0, max_side / max(height, width))
    small = (max(8, int(round(height * factor))), max(8, int(round(width * factor))))
    K_small = scale_intrinsics(K, small[1] / width, small[0] / height)
    grey = np.stack([cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (small[1], small[0]),
                                interpolation=cv2.INTER_AREA) for image in images]).astype(np.float32) / 255.0
    has_pose = np.isfinite(w2c).all(axis=(1, 2))
    usable = np.asarray(registered, bool) & has_pose
    observed = observed_point_depths(points, np.where(has_pose[:, None, None], w2c, np.eye(4)), num_frames)
    all_z = np.concatenate([o[:, 2] for o in observed]) if observed else np.zeros(0)
    if all_z.size < MIN_RANGE_POINTS:
        raise InputError(f"the cameras stage gave only {all_z.size} observed 3D points; the sfm depth "
                         "backend needs them for its depth range",
                         "check the cameras stage output (cameras/points.npz), or use --set depth.backend=transformers")
    global_range = np.percentile(all_z, [2, 98])
    scene_depth = np.array([np.median(o[:, 2]) if len(o) >= MIN_RANGE_POINTS else np.median(all_z) for o in observed])
    neighbors = choose_neighbors(w2c, usable, scene_depth, num_neighbors, max_gap, target_baseline)

    def sweep(frame: int) -> np.ndarray:
        if not has_pose[frame] or not neighbors[frame]:
            return np.zeros(small, np.float32)
        z = observed[frame][:, 2]
        near, far = np.percentile(z, [2, 98]) if len(z) >= MIN_RANGE_POINTS else global_range
        inverse_depths = np.linspace(1.0 / (far * 1.5), 1.0 / (near / 1.5), num_planes)
        nbrs = neighbors[frame]
        depth, score = plane_sweep(grey[frame], [grey[j] for j in nbrs], K_small[frame], w2c[frame],
                                   [K_small[j] for j in nbrs], [w2c[j] for j in nbrs], inverse_depths, window)
        return np.where(score >= min_score, depth, 0.0).astype(np.float32)

    raw = np.stack(_map_frames(sweep, range(num_frames), progress))
    if consistency > 0:
        agreeing = consistency_count(raw, K_small, w2c, neighbors, consistency)
        required = np.array([max(1, min(min_consistent, len(n))) for n in neighbors])[:, None, None]
        measured = np.where(agreeing >= required, raw, 0.0).astype(np.float32)
    else:
        measured = raw
    if fuse_window > 0:
        sources = [[j for j in range(max(0, t - fuse_window), min(num_frames, t + fuse_window + 1))
                    if j != t and has_pose[j] and has_pose[t]] for t in range(num_frames)]
        fused, support = fuse_temporal(measured, K_small, np.where(has_pose[:, None, None], w2c, np.eye(4)), sources,
                                       max(consistency, 0.01))
    else:
        fused, support = measured, (measured > 0).astype(np.int32)
    sigma_space = fill_sigma * max(height, width)

    def fill(frame: int) -> np.ndarray:
        if not has_pose[frame]:
            return np.zeros((height, width), np.float32)
        weight = cv2.resize(support[frame] / (support[frame] + 1.0), (width, height),
                            interpolation=cv2.INTER_NEAREST).astype(np.float32)
        depth = cv2.resize(fused[frame], (width, height), interpolation=cv2.INTER_NEAREST)
        inverse = np.where(weight > 0, 1.0 / np.maximum(depth, 1e-12), 0.0).astype(np.float32)
        sparse = observed[frame]
        if len(sparse):
            sx, sy = pixel_indices(K[frame], sparse)
            inside = (sx >= 0) & (sx < width) & (sy >= 0) & (sy < height)
            sx, sy, sz = sx[inside], sy[inside], sparse[inside, 2]
            free = weight[sy, sx] == 0
            inverse[sy[free], sx[free]] = 1.0 / sz[free]
            weight[sy[free], sx[free]] = SPARSE_WEIGHT
        if not weight.any():
            return np.zeros((height, width), np.float32)
        filled, known = edge_aware_fill(images[frame].astype(np.float32) / 255.0, inverse, weight, sigma_space,
                                        fill_color, min_support)
        if median >= 3:
            filled = cv2.medianBlur(filled, median)
        return np.where(known & (filled > 0), 1.0 / np.maximum(filled, 1e-12), 0.0).astype(np.float32)

    out = np.stack(_map_frames(fill, range(num_frames)))
    stats = {"stereo_fraction": float((measured > 0).mean()), "fused_fraction": float((fused > 0).mean()),
             "unknown_fraction": float((out <= 0).mean()),
             "frames_without_neighbors": int(sum(1 for n in neighbors if not n))}
    return out, stats
