"""DyNeRF / Neu3D multi-camera video scenes (Li et al. 2022): ``poses_bounds.npy`` and ``camXX.mp4``.

A scene folder holds one synchronised video per camera, ``cam00.mp4``, ``cam01.mp4``, ...
(some scenes skip a number), and ``poses_bounds.npy``: ``(N, 17)`` float64, row ``i`` for the
``i``-th video in sorted name order. A row is LLFF's: 15 values of a 3x5 matrix in row-major
order, ``[R | c | hwf]``, then the near and far depth bounds. ``R``'s columns are the camera's
*down*, *right* and *backward* axes in world coordinates, ``c`` is the camera centre and ``hwf``
the calibrated image height, width and focal length in pixels; the principal point is the image
centre. In OpenCV terms (x right, y down, z forward) the camera-to-world rotation is
``[R[:, 1], R[:, 0], -R[:, 2]]``. ``cam00`` is the held-out camera of the usual protocol.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mono4d.data.dataset_frames import DatasetFrames, linear_times
from mono4d.data.errors import InputError
from mono4d.data.geometry import intrinsics_matrix, invert_rigid, scale_intrinsics

#: Camera id of the view held out for evaluation in DyNeRF / 4DGS papers.
TEST_CAMERA = 0
_VIDEO_NAME = re.compile(r"cam(\d+)\.mp4", re.IGNORECASE)
#: Relative difference of the video's and the calibration's aspect ratios tolerated.
_ASPECT_TOLERANCE = 0.01


def scene_root(path: str | Path) -> Path:
    """The scene folder of ``path`` (the folder itself or its ``poses_bounds.npy``)."""
    path = Path(path)
    return path.parent if path.is_file() else path


def dynerf_videos(path: str | Path) -> dict[int, Path]:
    """Camera id -> ``camXX.mp4`` of a scene, in sorted name order (the order of ``poses_bounds.npy`` rows)."""
    root = scene_root(path)
    videos = sorted((item for item in root.iterdir() if _VIDEO_NAME.fullmatch(item.name)), key=lambda item: item.name)
    if not videos:
        raise InputError(f"{root} holds no camXX.mp4 video", "point to a DyNeRF/Neu3D scene folder")
    return {int(_VIDEO_NAME.fullmatch(video.name).group(1)): video for video in videos}


def dynerf_camera_ids(path: str | Path) -> list[int]:
    """The camera ids (``XX`` of ``camXX.mp4``) of a scene, ascending."""
    return sorted(dynerf_videos(path))


def read_poses_bounds(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cameras of a ``poses_bounds.npy``: ``(K (N, 3, 3), w2c (N, 4, 4), sizes (N, 2), bounds (N, 2))``.

    ``w2c`` are OpenCV world-to-camera; ``sizes`` the calibrated ``(width, height)`` in pixels;
    ``bounds`` the near/far depths.
    """
    path = scene_root(path) / "poses_bounds.npy"
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {path}: {error}", "point to a DyNeRF/Neu3D scene with poses_bounds.npy") from error
    if rows.ndim != 2 or rows.shape[1] != 17 or len(rows) == 0:
        raise InputError(f"{path} has shape {rows.shape}", "poses_bounds.npy holds one row of 17 values per camera")
    rows = rows.astype(np.float64)
    if not np.all(np.isfinite(rows)):
        raise InputError(f"{path} holds non-finite values", "fix or regenerate poses_bounds.npy")
    matrices = rows[:, :15].reshape(-1, 3, 5)
    down, right, backward, centre = (matrices[:, :, index] for index in range(4))
    height, width, focal = matrices[:, 0, 4], matrices[:, 1, 4], matrices[:, 2, 4]
    c2w = np.zeros((len(rows), 4, 4))
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, down, -backward, centre
    c2w[:, 3, 3] = 1.0
    rotation = c2w[:, :3, :3]
    if not np.allclose(rotation @ np.swapaxes(rotation, 1, 2), np.eye(3), atol=1e-4) or np.any(np.linalg.det(rotation) < 0):
        raise InputError(f"{path}: the pose rotations are not rotation matrices",
                         "expected LLFF's [down, right, backward | centre | hwf] 3x5 matrices")
    if np.any(focal <= 0) or np.any(width <= 0) or np.any(height <= 0):
        raise InputError(f"{path}: image size and focal length must be positive", "check the hwf column")
    K = np.stack([intrinsics_matrix(f, f, w / 2.0, h / 2.0) for f, w, h in zip(focal, width, height)])
    sizes = np.stack([width, height], axis=1)
    return K, invert_rigid(c2w), sizes, rows[:, 15:17]


def read_dynerf(path: str | Path, camera: int = -1) -> DatasetFrames:
    """The video of one camera of a DyNeRF scene as frames with a fixed camera.

    ``camera`` is a camera id (``XX`` of ``camXX.mp4``, see :func:`dynerf_camera_ids`); -1 is
    allowed only for a scene with a single video. The frames are the decoded frames of the video
    (``video``; ``image_paths`` is empty), counted by a decoding pass; intrinsics are scaled from
    the calibrated size to the video's. Times are ``i / (T - 1)``.
    """
    from mono4d.data.video import open_source, probe_video

    root = scene_root(path)
    videos = dynerf_videos(root)
    K, w2c, sizes, _ = read_poses_bounds(root)
    if len(K) != len(videos):
        raise InputError(f"{root / 'poses_bounds.npy'} has {len(K)} cameras but the folder holds {len(videos)} "
                         "camXX.mp4 videos", "rows are matched to the videos in name order; keep every video")
    ids = list(videos)
    if camera == -1:
        if len(ids) != 1:
            raise InputError(f"{root} holds {len(ids)} cameras; pick one for a monocular video",
                             f"set the camera id (e.g. --set cameras.known_camera={ids[min(1, len(ids) - 1)]}; "
                             f"cam{TEST_CAMERA:02d} is the usual held-out view); ids: {ids}")
        camera = ids[0]
    if camera not in videos:
        raise InputError(f"camera {camera} is not in {root}", f"pick one of the camera ids {ids}")
    row = ids.index(camera)
    video = videos[camera]
    probe = probe_video(video)
    width, height = (probe.width, probe.height) if probe.width > 0 and probe.height > 0 else tuple(sizes[row])
    scale_x, scale_y = width / sizes[row, 0], height / sizes[row, 1]
    if abs(scale_x / scale_y - 1.0) > _ASPECT_TOLERANCE:
        raise InputError(f"{video.name} is {width}x{height} but its calibration is for "
                         f"{sizes[row, 0]:g}x{sizes[row, 1]:g} images", "use the scene's original (or only resized) videos")
    notes = []
    if (width, height) != (int(sizes[row, 0]), int(sizes[row, 1])):
        notes.append(f"intrinsics calibrated for {sizes[row, 0]:g}x{sizes[row, 1]:g} scaled to {video.name}'s "
                     f"{width}x{height}")
    camera_K = scale_intrinsics(K[row], scale_x, scale_y)
    count = open_source(video).num_frames
    return DatasetFrames(image_paths=[], K=np.repeat(camera_K[None], count, axis=0),
                         w2c=np.repeat(w2c[row][None], count, axis=0), times=linear_times(count),
                         width=int(width), height=int(height), units="dataset", format="dynerf",
                         notes=tuple(notes), video=video)
