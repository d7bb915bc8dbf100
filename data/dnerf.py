"""D-NeRF (and Blender NeRF-synthetic) datasets: ``transforms_{train,val,test}.json``.

Each file holds ``camera_angle_x`` (horizontal field of view, radians) and frames with
``file_path`` (relative, often without extension), ``transform_matrix`` (Blender/OpenGL
camera-to-world) and, for D-NeRF, ``time`` in [0, 1]. Images are square RGBA PNGs; the principal
point is the image centre.

A D-NeRF folder is also a pipeline input (``mono4d run FOLDER``): the frames stage writes the
:data:`PIPELINE_SPLITS` (train, then test: the held-out frames) composited over the protocol's
white :data:`BACKGROUND`, and :data:`PIPELINE_SETTINGS` are the configuration such a run starts
from (see :mod:`mono4d.pipeline.config`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from mono4d.data.dataset_frames import DatasetFrames, image_size, linear_times, read_json
from mono4d.data.errors import InputError
from mono4d.data.geometry import intrinsics_matrix, opengl_c2w_to_w2c

SPLITS = ("train", "val", "test")
#: The splits a pipeline run over a D-NeRF folder uses, in frame order; the last one is held out.
PIPELINE_SPLITS = ("train", "test")
#: Grey level in [0, 1] the RGBA images are composited over (white: the D-NeRF protocol).
BACKGROUND = 1.0
#: ``stage.param`` -> value of a pipeline run over a D-NeRF folder, applied after the preset and
#: before ``--set``: the folder's own cameras, the silhouette initialisation (no flow, masks or
#: depth needed), white background, the protocol's half resolution (400 x 400).
PIPELINE_SETTINGS = {
    "frames.max_side": "400",
    "cameras.mode": "known",
    "init.mode": "silhouette",
    "init.max_dynamic": "20000",
    "init.init_opacity": "0.1",
    "init.time_frequencies": "6",
    "train.downscale": "1",
    "train.background": "white",
    "train.ordinal_weight": "0",
    "train.use_depth": "false",
    "train.use_masks": "false",
}


def is_dnerf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a D-NeRF / Blender dataset folder (it holds ``transforms_train.json``)."""
    return (Path(path) / "transforms_train.json").is_file()


def transforms_path(path: str | Path, split: str = "train") -> Path:
    """The ``transforms_<split>.json`` for a dataset folder, or ``path`` itself when it is a file."""
    path = Path(path)
    if path.is_file():
        return path
    if split not in SPLITS:
        raise InputError(f"unknown D-NeRF split {split!r}", f"use one of {', '.join(SPLITS)}")
    candidate = path / f"transforms_{split}.json"
    if not candidate.is_file():
        raise InputError(f"{candidate} does not exist", "point to a D-NeRF folder with transforms_<split>.json")
    return candidate


def resolve_image(root: Path, file_path: str) -> Path:
    """Image file for a frame's ``file_path`` (relative to the JSON's folder; ``.png`` added when missing)."""
    candidate = (root / file_path).resolve()
    if candidate.suffix.lower() in (".png", ".jpg", ".jpeg") and candidate.is_file():
        return candidate
    for suffix in (".png", ".jpg", ".jpeg"):
        with_suffix = candidate.with_name(candidate.name + suffix)
        if with_suffix.is_file():
            return with_suffix
    raise InputError(f"image {candidate} listed in the transforms file does not exist",
                     "check that the dataset's image folders are complete")


def read_dnerf(path: str | Path, split: str = "train") -> DatasetFrames:
    """Read one split of a D-NeRF / Blender dataset (``path``: dataset folder or a transforms JSON).

    Frames keep the file's order. ``K`` uses ``f = 0.5 * W / tan(0.5 * camera_angle_x)`` and the
    image centre; cameras are converted from Blender (y up, z backward) to OpenCV. ``times`` are
    the frames' ``time`` values, or ``i / (T - 1)`` when the file has none.
    """
    json_path = transforms_path(path, split)
    content = read_json(json_path)
    frames = content.get("frames")
    if "camera_angle_x" not in content or not isinstance(frames, list) or not frames:
        raise InputError(f"{json_path} lacks camera_angle_x or frames", "point to a D-NeRF transforms_<split>.json")
    try:
        image_paths = [resolve_image(json_path.parent, frame["file_path"]) for frame in frames]
        c2w = np.array([frame["transform_matrix"] for frame in frames], dtype=np.float64)
        times = (np.array([frame["time"] for frame in frames], dtype=np.float64)
                 if all("time" in frame for frame in frames) else linear_times(len(frames)))
        angle_x = float(content["camera_angle_x"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"malformed frame entry in {json_path}: {error}",
                         "each frame needs file_path and a 4x4 transform_matrix") from error
    if c2w.shape != (len(frames), 4, 4):
        raise InputError(f"transform_matrix entries in {json_path} are not 4x4", "fix the transforms file")
    width, height = image_size(image_paths[0])
    focal = 0.5 * width / math.tan(0.5 * angle_x)
    K = np.repeat(intrinsics_matrix(focal, focal, width / 2.0, height / 2.0)[None], len(frames), axis=0)
    return DatasetFrames(image_paths=image_paths, K=K, w2c=opengl_c2w_to_w2c(c2w), times=times,
                         width=width, height=height, units="dataset", format="dnerf")


def read_dnerf_splits(path: str | Path, splits: Sequence[str] = PIPELINE_SPLITS) -> DatasetFrames:
    """The frames of several splits of a D-NeRF folder, one after the other (each as
    :func:`read_dnerf`; all splits must share the image size)."""
    parts = [read_dnerf(path, split) for split in splits]
    sizes = {(part.width, part.height) for part in parts}
    if len(sizes) > 1:
        raise InputError(f"the splits {', '.join(splits)} of {path} have different image sizes {sorted(sizes)}",
                         "use a D-NeRF folder whose splits share one image size")
    return replace(parts[0], image_paths=[image for part in parts for image in part.image_paths],
                   K=np.concatenate([part.K for part in parts]), w2c=np.concatenate([part.w2c for part in parts]),
                   times=np.concatenate([part.times for part in parts]))


def read_rgba(path: Path) -> np.ndarray:
    """``(H, W, 4)`` uint8 RGBA of an image file (opaque alpha for images without one)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"cannot read image {path}", "check the D-NeRF dataset's image folders")
    if image.dtype != np.uint8:
        raise InputError(f"image {path} is {image.dtype}, not 8-bit", "convert the dataset's images to 8-bit PNG")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGBA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGBA if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)


def composite(rgba: np.ndarray, background: float = BACKGROUND) -> np.ndarray:
    """``(..., 3)`` uint8 RGB of ``(..., 4)`` uint8 RGBA images over a grey level ``background``
    in [0, 1]."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * background * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
