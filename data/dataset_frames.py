"""The record every dataset reader returns, and the helpers the format readers share.

Kept apart from :mod:`mono4d.data.datasets` (which recognises a format and calls its reader) so the
format modules (:mod:`mono4d.data.colmap`, :mod:`mono4d.data.dnerf`, ...) import only this module and
:mod:`mono4d.data.datasets` imports them: no import cycle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mono4d.data.errors import InputError


@dataclass(frozen=True)
class DatasetFrames:
    """The frames of one camera stream with known cameras.

    ``image_paths``: T image files in frame order, or empty when the frames are the decoded frames
    ``0 .. T-1`` of the video file ``video`` (DyNeRF); ``K`` ``(T, 3, 3)`` float64 pixel intrinsics
    for images of ``width`` x ``height``; ``w2c`` ``(T, 4, 4)`` float64 OpenCV world-to-camera;
    ``times`` ``(T,)`` float64 normalised time in [0, 1] (from the dataset where it has one, else
    ``i / (T - 1)``); ``units`` is ``"dataset"`` (the dataset's own world scale) or ``"sfm"``
    (arbitrary scale of a structure-from-motion model); ``format`` is one of :data:`mono4d.data.datasets.FORMATS`;
    ``notes`` are caveats worth passing on to the user (e.g. lens distortion that ``K`` ignores).
    """

    image_paths: list[Path]
    K: np.ndarray
    w2c: np.ndarray
    times: np.ndarray
    width: int
    height: int
    units: str
    format: str
    notes: tuple[str, ...] = ()
    video: Path | None = None

    @property
    def num_frames(self) -> int:
        """Number of frames T."""
        return len(self.times)


def linear_times(count: int) -> np.ndarray:
    """``(count,)`` float64 times ``i / (count - 1)`` in [0, 1] (0 for a single frame)."""
    return np.linspace(0.0, 1.0, count) if count > 1 else np.zeros(count)


def read_json(path: Path) -> dict:
    """Parse a JSON file, turning unreadable or malformed files into :class:`InputError`."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read camera file {path}: {error}", "point to a readable JSON file") from error
    if not isinstance(content, dict):
        raise InputError(f"camera file {path} does not hold a JSON object", "point to a transforms/meta JSON file")
    return content


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return int(image.width), int(image.height)
    except (OSError, UnidentifiedImageError) as error:
        raise InputError(f"cannot read image {path}: {error}", "check that the dataset's images are present") from error
