"""COLMAP sparse models (``cameras``, ``images``, ``points3D`` in .bin or .txt) via pycolmap.

COLMAP stores ``cam_from_world`` poses, which are OpenCV world-to-camera transforms, and
intrinsics whose pixel centres sit at half-integers: the same conventions as this project, so
no conversion is needed. Images are matched to frames by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from mono4d.data.dataset_frames import DatasetFrames, linear_times
from mono4d.data.errors import InputError

if TYPE_CHECKING:
    import pycolmap

MODEL_FILES = ("cameras", "images", "points3D")


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a COLMAP model (all of cameras/images/points3D as .bin or as .txt)."""
    return any(all((path / f"{name}{suffix}").is_file() for name in MODEL_FILES) for suffix in (".bin", ".txt"))


def find_model_dir(path: str | Path) -> Path | None:
    """The model folder at ``path``, or under ``path/sparse/0``, ``path/sparse``, ``path/0``; None if absent."""
    path = Path(path)
    for candidate in (path, path / "sparse" / "0", path / "sparse", path / "0"):
        if candidate.is_dir() and is_model_dir(candidate):
            return candidate
    return None


def load_reconstruction(path: str | Path) -> "pycolmap.Reconstruction":
    """Read a COLMAP model (see :func:`find_model_dir` for where it is looked for)."""
    import pycolmap

    model_dir = find_model_dir(path)
    if model_dir is None:
        raise InputError(f"no COLMAP model (cameras, images, points3D .bin/.txt) in {path}",
                         "point to the folder holding cameras.bin/images.bin/points3D.bin (or the .txt files)")
    try:
        return pycolmap.Reconstruction(model_dir)
    except (ValueError, RuntimeError) as error:
        raise InputError(f"cannot read the COLMAP model in {model_dir}: {error}", "check that the model files are intact") from error


def camera_matrix(camera: "pycolmap.Camera") -> np.ndarray:
    """``(3, 3)`` pinhole part of a COLMAP camera (focal lengths, principal point; distortion dropped)."""
    return np.asarray(camera.calibration_matrix(), dtype=np.float64)


def reconstruction_cameras(reconstruction: "pycolmap.Reconstruction", names: Sequence[str]
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cameras of the images called ``names`` (in that order) in a reconstruction.

    Returns ``K (T, 3, 3)``, ``w2c (T, 4, 4)`` and ``registered (T,)`` bool. Images missing from
    the model or without a pose get ``registered`` False, a NaN ``w2c`` and the intrinsics of the
    model's first camera.
    """
    by_name = {image.name: image for image in reconstruction.images.values()}
    default_K = camera_matrix(next(iter(reconstruction.cameras.values())))
    K = np.repeat(default_K[None], len(names), axis=0)
    w2c = np.full((len(names), 4, 4), np.nan)
    registered = np.zeros(len(names), dtype=bool)
    for index, name in enumerate(names):
        image = by_name.get(name)
        if image is None:
            continue
        K[index] = camera_matrix(reconstruction.cameras[image.camera_id])
        if image.has_pose:
            w2c[index] = np.eye(4)
            w2c[index, :3, :] = image.cam_from_world().matrix()
            registered[index] = True
    return K, w2c, registered


def reconstruction_points(reconstruction: "pycolmap.Reconstruction", frame_of_image: Mapping[int, int]
                          ) -> dict[str, np.ndarray]:
    """3D points and their observations as arrays (the ``points.npz`` layout of the cameras stage).

    ``frame_of_image`` maps COLMAP image ids to frame indices; observations in other images are
    dropped. Returns ``xyz (P, 3) float32``, ``rgb (P, 3) uint8``, ``error (P,) float32`` (mean
    reprojection error, px; -1 when unknown), ``obs_frame (M,) int32``, ``obs_point (M,) int32``
    (row in ``xyz``), ``obs_xy (M, 2) float32`` (pixels).
    """
    point_ids = sorted(reconstruction.points3D.keys())
    xyz = np.zeros((len(point_ids), 3), dtype=np.float32)
    rgb = np.zeros((len(point_ids), 3), dtype=np.uint8)
    error = np.zeros(len(point_ids), dtype=np.float32)
    obs_frame, obs_point, obs_xy = [], [], []
    keypoints = {image_id: image.points2D for image_id, image in reconstruction.images.items()}
    for row, point_id in enumerate(point_ids):
        point = reconstruction.points3D[point_id]
        xyz[row], rgb[row], error[row] = point.xyz, point.color, point.error
        for element in point.track.elements:
            frame = frame_of_image.get(element.image_id)
            if frame is None:
                continue
            obs_frame.append(frame)
            obs_point.append(row)
            obs_xy.append(keypoints[element.image_id][element.point2D_idx].xy)
    return {
        "xyz": xyz, "rgb": rgb, "error": error,
        "obs_frame": np.asarray(obs_frame, dtype=np.int32),
        "obs_point": np.asarray(obs_point, dtype=np.int32),
        "obs_xy": np.asarray(obs_xy, dtype=np.float32).reshape(-1, 2),
    }


def find_image_folder(model_dir: Path) -> Path:
    """Where a model's images probably are: an ``images`` folder up to three levels above, else the model folder."""
    for parent in (model_dir.parent, *model_dir.parents[1:3]):
        if (parent / "images").is_dir():
            return parent / "images"
    return model_dir


def read_colmap_model(path: str | Path) -> DatasetFrames:
    """The registered images of a COLMAP model as frames, sorted by image name.

    Image paths point into the nearest ``images`` folder (see :func:`find_image_folder`); they may
    not exist. All cameras must share one image size. Distortion is dropped from ``K`` and noted.
    Units are ``"sfm"`` (arbitrary scale).
    """
    model_dir = find_model_dir(path)
    reconstruction = load_reconstruction(path)
    names = sorted(image.name for image in reconstruction.images.values() if image.has_pose)
    if not names:
        raise InputError(f"the COLMAP model in {model_dir} has no registered images", "point to a model with posed images")
    K, w2c, _ = reconstruction_cameras(reconstruction, names)
    sizes = {(camera.width, camera.height) for camera in reconstruction.cameras.values()}
    if len(sizes) != 1:
        raise InputError(f"the COLMAP model in {model_dir} mixes image sizes {sorted(sizes)}",
                         "use a model whose images all have one size")
    width, height = sizes.pop()
    distorted = sorted({camera.model_name for camera in reconstruction.cameras.values() if not camera.is_undistorted()})
    notes = (f"COLMAP camera model(s) {', '.join(distorted)} have lens distortion; K ignores it "
             "(undistort the images first for exact projections)",) if distorted else ()
    image_folder = find_image_folder(model_dir)
    return DatasetFrames(image_paths=[image_folder / name for name in names], K=K, w2c=w2c,
                         times=linear_times(len(names)), width=int(width), height=int(height),
                         units="sfm", format="colmap", notes=notes)


def read_colmap_points(path: str | Path) -> dict[str, np.ndarray]:
    """Points of a COLMAP model, observations indexed by frame = position in the name-sorted posed images."""
    reconstruction = load_reconstruction(path)
    posed = sorted((image.name, image_id) for image_id, image in reconstruction.images.items() if image.has_pose)
    return reconstruction_points(reconstruction, {image_id: frame for frame, (_, image_id) in enumerate(posed)})


def write_colmap_model(out_dir: str | Path, K: np.ndarray, w2c: np.ndarray, width: int, height: int,
                       names: Sequence[str], points: Mapping[str, np.ndarray] | None = None,
                       text: bool = False) -> "pycolmap.Reconstruction":
    """Write cameras (and optionally points) as a COLMAP model in ``out_dir`` (binary, or text).

    ``K``: ``(3, 3)`` shared or ``(T, 3, 3)`` per image (one PINHOLE camera when all are equal, one
    per image otherwise); ``w2c``: ``(T, 4, 4)`` OpenCV world-to-camera; ``names``: T image names.
    ``points`` (optional) uses the ``points.npz`` layout: ``xyz``, ``rgb`` and optionally the
    observations ``obs_frame``/``obs_point``/``obs_xy``, which become keypoints and tracks.
    Returns the pycolmap reconstruction that was written.
    """
    import pycolmap

    w2c = np.asarray(w2c, dtype=np.float64)
    K = np.broadcast_to(np.asarray(K, dtype=np.float64), (len(w2c), 3, 3))
    if len(names) != len(w2c):
        raise ValueError(f"{len(w2c)} cameras but {len(names)} image names")
    shared = bool(np.all(K == K[0]))
    reconstruction = pycolmap.Reconstruction()
    for index in range(1 if shared else len(K)):
        fx, fy, cx, cy = K[index, 0, 0], K[index, 1, 1], K[index, 0, 2], K[index, 1, 2]
        reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
            model="PINHOLE", width=int(width), height=int(height), params=[fx, fy, cx, cy], camera_id=index + 1))

    has_observations = points is not None and "obs_frame" in points and len(points["obs_frame"]) > 0
    observations_of_frame: list[np.ndarray] = []
    if has_observations:
        obs_frame = np.asarray(points["obs_frame"])
        observations_of_frame = [np.flatnonzero(obs_frame == frame) for frame in range(len(names))]
    for frame, name in enumerate(names):
        keypoints = (np.asarray(points["obs_xy"], dtype=np.float64)[observations_of_frame[frame]]
                     if has_observations else np.zeros((0, 2)))
        image = pycolmap.Image(name=str(name), keypoints=keypoints, camera_id=1 if shared else frame + 1,
                               image_id=frame + 1)
        reconstruction.add_image_with_trivial_frame(image, pycolmap.Rigid3d(w2c[frame, :3, :]))

    if points is not None:
        xyz = np.asarray(points["xyz"], dtype=np.float64)
        rgb = np.asarray(points.get("rgb", np.zeros((len(xyz), 3))), dtype=np.uint8)
        elements: list[list] = [[] for _ in range(len(xyz))]
        if has_observations:
            obs_point = np.asarray(points["obs_point"])
            for frame, rows in enumerate(observations_of_frame):
                for keypoint_index, observation in enumerate(rows):
                    elements[obs_point[observation]].append(pycolmap.TrackElement(frame + 1, keypoint_index))
        for row in range(len(xyz)):
            reconstruction.add_point3D(xyz[row], pycolmap.Track(elements[row]), rgb[row])
        reconstruction.update_point_3d_errors()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if text:
        reconstruction.write_text(out_dir)
    else:
        reconstruction.write(out_dir)
    return reconstruction
