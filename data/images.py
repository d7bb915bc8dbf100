"""Reading and writing images as RGB arrays (OpenCV underneath, which works in BGR)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mono4d.data.errors import InputError


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3) uint8`` RGB. Raises :class:`InputError` if unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"cannot read image {path}", "check that the file exists and is a PNG/JPEG image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_rgb(path: str | Path, image: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write an ``(H, W, 3) uint8`` RGB image; the format follows the file suffix."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if str(path).lower().endswith((".jpg", ".jpeg")) else []
    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR), params):
        raise OSError(f"could not write image {path}")


def write_gray(path: str | Path, image: np.ndarray) -> None:
    """Write a single-channel ``(H, W)`` uint8 or uint16 image (PNG keeps 16 bits)."""
    if not cv2.imwrite(str(path), np.ascontiguousarray(image)):
        raise OSError(f"could not write image {path}")


def read_gray(path: str | Path) -> np.ndarray:
    """Read a single-channel image unchanged (uint8 or uint16 ``(H, W)``)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"cannot read image {path}", "check that the file exists and is a PNG image")
    if image.ndim == 3:
        image = image[..., 0]
    return image
