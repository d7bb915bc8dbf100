"""DyCheck iPhone scenes (Gao et al. 2022), and the masked metrics reported on them.

A scene folder holds the Nerfies layout (:mod:`mono4d.data.hypernerf`: ``dataset.json``,
``metadata.json``, ``scene.json``, ``camera/<name>.json``, ``points.npy``) plus

- ``splits/train.json``, ``splits/val.json``: ``frame_names``, ``time_ids``, ``camera_ids``
  (train: the moving iPhone, camera 0; val: the static held-out iPhones, cameras 1 and 2, at
  the time steps they recorded);
- ``rgb/<f>x/<name>.png``: RGBA images (alpha 0 marks invalid pixels), ``f`` 1 or 2;
- ``depth/<f>x/<name>.npy``: ``(H, W, 1)`` float32 lidar z-depth of the training frames in the
  dataset's world units (metres; 0 = no measurement);
- ``covisible/<f>x/val/<name>.png``: 255 where a pixel of a val frame is seen by the training
  frames, 0 elsewhere;
- ``extra.json`` (``factor``, ``fps``, ``bbox``, ``lookat``, ``up``), ``emf.json`` (effective
  multi-view factors), ``keypoint/`` annotations: not read here.

Evaluation as in DyCheck and Shape of Motion: each val frame is scored on the pixels that are
covisible and valid (alpha > 0); mPSNR is the mean over frames of the masked PSNR, mSSIM the mean
over frames of :func:`masked_ssim`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mono4d.data.dataset_frames import DatasetFrames, read_json
from mono4d.data.errors import InputError
from mono4d.data.hypernerf import keep_camera, nerfies_frames

if TYPE_CHECKING:
    from torch import Tensor

SPLITS = ("train", "val")
#: SSIM constants of DyCheck / Shape of Motion (tf.image.ssim's): Gaussian window side and sigma, k1, k2.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def read_split(root: str | Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(frame_names, time_ids (N,) int64, camera_ids (N,) int64)`` of ``splits/<split>.json``."""
    if split not in SPLITS:
        raise InputError(f"unknown DyCheck split {split!r}", f"use one of {', '.join(SPLITS)}")
    path = Path(root) / "splits" / f"{split}.json"
    if not path.is_file():
        raise InputError(f"{path} does not exist", "a DyCheck iPhone folder has splits/train.json and splits/val.json")
    content = read_json(path)
    try:
        names = [str(name) for name in content["frame_names"]]
        time_ids = np.asarray(content["time_ids"], dtype=np.int64)
        camera_ids = np.asarray(content["camera_ids"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"malformed {path}: {error}", "a split file needs frame_names, time_ids and camera_ids lists") from error
    if time_ids.shape != (len(names),) or camera_ids.shape != (len(names),):
        raise InputError(f"{path}: frame_names, time_ids and camera_ids have different lengths "
                         f"({len(names)}, {time_ids.size}, {camera_ids.size})", "fix the split file")
    if not names:
        raise InputError(f"{path} lists no frame", "this scene has no such split")
    return names, time_ids, camera_ids


def num_time_steps(root: str | Path) -> int:
    """Number of time steps of a scene: ``num_exemplars`` of ``dataset.json``, else 1 + the largest split time id."""
    root = Path(root)
    dataset = read_json(root / "dataset.json") if (root / "dataset.json").is_file() else {}
    if isinstance(dataset.get("num_exemplars"), int) and dataset["num_exemplars"] > 0:
        return int(dataset["num_exemplars"])
    largest = [int(read_split(root, split)[1].max()) for split in SPLITS if (root / "splits" / f"{split}.json").is_file()]
    return 1 + max(largest, default=0)


def dycheck_camera_ids(root: str | Path, split: str = "train") -> list[int]:
    """The camera ids of a split, sorted (train: ``[0]``; val: usually ``[1, 2]``)."""
    return sorted({int(camera) for camera in read_split(root, split)[2]})


def read_dycheck(root: str | Path, split: str = "train", factor: int = 0, camera: int = -1) -> DatasetFrames:
    """The frames of one split of a DyCheck iPhone scene, in the split file's order.

    ``factor`` picks ``rgb/<factor>x`` (cameras scaled to match; 0: the smallest factor present);
    ``camera`` keeps one camera id (-1: every frame of the split; a note says when it holds
    several cameras). ``times`` are ``time_id / (num_time_steps - 1)``, shared by train and val.
    """
    root = Path(root)
    names, time_ids, camera_ids = read_split(root, split)
    names, time_ids, notes = keep_camera(names, time_ids, camera_ids, camera, split, root)
    if split == "val":
        notes.append("score val frames on their covisible, valid pixels (mono4d.data.dycheck.evaluation_mask), "
                     "as DyCheck and Shape of Motion report mPSNR/mSSIM")
    steps = num_time_steps(root)
    return nerfies_frames(root, names, time_ids / max(steps - 1, 1), factor, "dycheck", notes)


def evaluation_mask(root: str | Path, name: str, factor: int = 1) -> np.ndarray:
    """``(H, W)`` bool pixels of val frame ``name`` that count in mPSNR/mSSIM.

    Covisible (``covisible/<factor>x/val/<name>.png`` > 127) and valid (alpha of
    ``rgb/<factor>x/<name>.png`` > 0, when the image has an alpha channel).
    """
    import cv2

    root = Path(root)
    covisible_path = root / "covisible" / f"{factor}x" / "val" / f"{name}.png"
    image_path = root / "rgb" / f"{factor}x" / f"{name}.png"
    covisible = cv2.imread(str(covisible_path), cv2.IMREAD_UNCHANGED)
    if covisible is None:
        raise InputError(f"cannot read covisible mask {covisible_path}",
                         "DyCheck releases covisible/<f>x/val/ masks for the val frames; check the factor")
    image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"cannot read image {image_path}", "check that the rgb/<f>x folder is complete")
    mask = (covisible if covisible.ndim == 2 else covisible[..., 0]) > 127
    if mask.shape != image.shape[:2]:
        raise InputError(f"covisible mask {covisible_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                         f"{image.shape[1]}x{image.shape[0]}", "use the masks of the same downsampling factor")
    if image.ndim == 3 and image.shape[2] == 4:
        mask &= image[..., 3] > 0
    return mask


def read_depth(root: str | Path, name: str, factor: int = 1) -> np.ndarray:
    """``(H, W)`` float32 lidar z-depth of training frame ``name`` (world units; 0 = none)."""
    path = Path(root) / "depth" / f"{factor}x" / f"{name}.npy"
    try:
        depth = np.load(path)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read depth map {path}: {error}", "check the depth/<f>x folder and the factor") from error
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise InputError(f"depth map {path} has shape {depth.shape}", "expected (H, W, 1) or (H, W)")
    return depth.astype(np.float32)


def masked_ssim(image: "Tensor", target: "Tensor", mask: "Tensor") -> "Tensor":
    """DyCheck's masked SSIM of two ``(H, W, 3)`` images in [0, 1] over ``mask (H, W)`` (bool or 0/1).

    The Gaussian means and (co)variances are partial convolutions (Liu et al. 2018): each 1D
    pass (width, then height; window :data:`SSIM_WINDOW`, sigma :data:`SSIM_SIGMA`, no padding)
    sums the masked values and rescales by ``window / (valid pixels in the window)``; windows
    without a valid pixel give 0. The result is the mean of the SSIM map over all
    ``(H - 10) x (W - 10)`` window positions, so windows that hold no masked pixel count as 1,
    exactly as DyCheck and Shape of Motion report it. With a full mask it is the standard SSIM.
    """
    import torch
    import torch.nn.functional as F

    dtype = image.dtype
    offsets = torch.arange(SSIM_WINDOW, dtype=dtype, device=image.device) - (SSIM_WINDOW - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    weight0 = mask.to(dtype)[None]

    def blur(values: "Tensor") -> "Tensor":
        channels = values.permute(2, 0, 1)
        weight = weight0
        for shape in ((1, SSIM_WINDOW), (SSIM_WINDOW, 1)):
            summed = F.conv2d((channels * weight)[:, None], kernel.reshape(1, 1, *shape))[:, 0]
            count = F.conv2d(weight[:, None], torch.ones(1, 1, *shape, dtype=dtype, device=image.device))[:, 0]
            channels = torch.where(count > 0, summed * SSIM_WINDOW / count.clamp_min(1e-12), torch.zeros_like(summed))
            weight = (count > 0).to(dtype)
        return channels

    mu0, mu1 = blur(image), blur(target)
    sigma00 = (blur(image * image) - mu0 * mu0).clamp_min(0.0)
    sigma11 = (blur(target * target) - mu1 * mu1).clamp_min(0.0)
    sigma01 = blur(image * target) - mu0 * mu1
    sigma01 = torch.sign(sigma01) * torch.minimum(torch.sqrt(sigma00 * sigma11), sigma01.abs())
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu0 * mu1 + c1) * (2 * sigma01 + c2)) / ((mu0 * mu0 + mu1 * mu1 + c1) * (sigma00 + sigma11 + c2))
    return ssim_map.mean()


def masked_scores(image: "Tensor", target: "Tensor", mask: "Tensor") -> dict[str, float]:
    """``{"mpsnr", "mssim"}`` of one frame: PSNR (dB) over the masked pixels and :func:`masked_ssim`.

    ``image``, ``target`` ``(H, W, 3)`` in [0, 1]; ``mask (H, W)`` bool (e.g. :func:`evaluation_mask`).
    Average these over the val frames for the scene's mPSNR / mSSIM.
    """
    from mono4d.models.losses import psnr

    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("the evaluation mask selects no pixel")
    return {"mpsnr": float(psnr(image, target, mask)), "mssim": float(masked_ssim(image, target, mask))}
