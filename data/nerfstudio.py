"""nerfstudio ``transforms.json``: read and write.

Shared intrinsics at the top level (``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h``, optional
distortion ``k1 k2 k3 k4 p1 p2``, ``camera_model``), each of which a frame may override; frames
hold ``file_path`` (relative to the JSON's folder) and ``transform_matrix`` (OpenGL camera-to-world,
as in Blender), optionally ``time``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mono4d.data.dataset_frames import DatasetFrames, image_size, linear_times, read_json
from mono4d.data.errors import InputError
from mono4d.data.geometry import intrinsics_matrix, opengl_c2w_to_w2c, w2c_to_opengl_c2w

DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def read_nerfstudio(path: str | Path) -> DatasetFrames:
    """Read a nerfstudio ``transforms.json`` (or the folder holding it).

    Frames are sorted by ``file_path`` as nerfstudio's own data parser does. All frames must share
    one image size (``w``/``h``, or the first image's size when absent). Distortion coefficients
    are not applied to ``K``; when any is non-zero the result carries a note saying so.
    """
    path = Path(path)
    json_path = path / "transforms.json" if path.is_dir() else path
    content = read_json(json_path)
    frames = content.get("frames")
    if not isinstance(frames, list) or not frames:
        raise InputError(f"{json_path} has no frames", "point to a nerfstudio transforms.json with a frames list")
    try:
        frames = sorted(frames, key=lambda frame: str(frame["file_path"]))
        image_paths = [(json_path.parent / frame["file_path"]).resolve() for frame in frames]

        def value(frame: dict, key: str) -> float | None:
            found = frame.get(key, content.get(key))
            return None if found is None else float(found)

        sizes = {(value(frame, "w"), value(frame, "h")) for frame in frames}
        if len(sizes) != 1:
            raise InputError(f"{json_path} mixes image sizes {sorted(sizes)}", "use frames of one image size")
        width, height = sizes.pop()
        if width is None or height is None:
            width, height = image_size(image_paths[0])
        K = []
        for frame in frames:
            fx, fy, cx, cy = (value(frame, key) for key in ("fl_x", "fl_y", "cx", "cy"))
            if fx is None:
                raise InputError(f"a frame of {json_path} has no fl_x", "give fl_x (and fl_y, cx, cy) per file or frame")
            K.append(intrinsics_matrix(fx, fx if fy is None else fy,
                                       width / 2.0 if cx is None else cx, height / 2.0 if cy is None else cy))
        c2w = np.array([frame["transform_matrix"] for frame in frames], dtype=np.float64)
        distorted = any(value(frame, key) not in (None, 0.0) for frame in frames for key in DISTORTION_KEYS)
        times = (np.array([frame["time"] for frame in frames], dtype=np.float64)
                 if all("time" in frame for frame in frames) else linear_times(len(frames)))
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"malformed nerfstudio file {json_path}: {error}",
                         "each frame needs file_path and a 4x4 transform_matrix") from error
    if c2w.shape != (len(frames), 4, 4):
        raise InputError(f"transform_matrix entries in {json_path} are not 4x4", "fix the transforms file")
    notes = (f"{json_path.name} has lens distortion coefficients; K ignores them (undistort the images first "
             "for exact projections)",) if distorted else ()
    return DatasetFrames(image_paths=image_paths, K=np.stack(K), w2c=opengl_c2w_to_w2c(c2w), times=times,
                         width=int(width), height=int(height), units="dataset", format="nerfstudio", notes=notes)


def write_nerfstudio_transforms(path: str | Path, K: np.ndarray, w2c: np.ndarray, width: int, height: int,
                                file_paths: Sequence[str], times: np.ndarray | None = None) -> None:
    """Write cameras as a nerfstudio ``transforms.json`` (``camera_model`` OPENCV, no distortion).

    ``K``: ``(3, 3)`` shared or ``(T, 3, 3)`` per frame (written at the top level when all are equal,
    per frame otherwise); ``w2c``: ``(T, 4, 4)`` OpenCV world-to-camera; ``file_paths``: T image paths
    relative to the JSON's folder; ``times``: optional ``(T,)`` values written as ``time``.
    """
    w2c = np.asarray(w2c, dtype=np.float64)
    K = np.broadcast_to(np.asarray(K, dtype=np.float64), (len(w2c), 3, 3))
    if len(file_paths) != len(w2c) or (times is not None and len(times) != len(w2c)):
        raise ValueError(f"{len(w2c)} cameras but {len(file_paths)} file paths"
                         + ("" if times is None else f" and {len(times)} times"))

    def intrinsics(matrix: np.ndarray) -> dict[str, float]:
        return {"fl_x": float(matrix[0, 0]), "fl_y": float(matrix[1, 1]),
                "cx": float(matrix[0, 2]), "cy": float(matrix[1, 2])}

    shared = bool(np.allclose(K, K[0], rtol=0.0, atol=0.0))
    content: dict = {"camera_model": "OPENCV", "w": int(width), "h": int(height),
                     **(intrinsics(K[0]) if shared else {}),
                     "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0}
    c2w = w2c_to_opengl_c2w(w2c)
    frames = []
    for index, file_path in enumerate(file_paths):
        frame: dict = {"file_path": str(file_path), "transform_matrix": c2w[index].tolist()}
        if not shared:
            frame.update(intrinsics(K[index]))
        if times is not None:
            frame["time"] = float(times[index])
        frames.append(frame)
    content["frames"] = frames
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
