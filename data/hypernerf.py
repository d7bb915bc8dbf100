"""Nerfies / HyperNeRF datasets: ``dataset.json``, ``metadata.json`` and one ``camera/<id>.json`` per frame.

A scene folder holds

- ``dataset.json``: ``count``, ``num_exemplars``, ``ids`` (every frame), ``train_ids`` and
  ``val_ids`` (empty for scenes without a held-out camera);
- ``metadata.json``: per id ``warp_id``, ``appearance_id``, ``camera_id`` (HyperNeRF may add
  ``time_id``; the time step is ``time_id`` where present, else ``warp_id``);
- ``scene.json``: ``scale``, ``center``, ``near``, ``far``: the normalisation
  ``(x - center) * scale`` that Nerfies-style training applies to the world. It is *not* applied
  here: cameras stay in the dataset's own world, the one of ``points.npy`` and of DyCheck's depth maps;
- ``camera/<id>.json``: the Nerfies camera of each frame (below);
- ``rgb/<f>x/<id>.png``: the images downsampled by ``f`` (1x, 2x, 4x, ...);
- ``points.npy``: background points in the same world.

A Nerfies camera (also DyCheck's format) is an OpenCV camera: ``orientation`` is the 3x3
world-to-camera rotation (its rows are the camera's x right, y down, z forward axes in world
coordinates), ``position`` the camera centre in the world, ``focal_length`` in pixels,
``pixel_aspect_ratio`` (``fy = focal_length * pixel_aspect_ratio``), ``skew``,
``principal_point`` in pixels with pixel centres at half-integers (as in this project),
``image_size`` ``[width, height]``, ``radial_distortion`` ``[k1, k2, k3]`` and
``tangential_distortion`` ``[p1, p2]`` (older files call it ``tangential``). A world point ``X``
projects to ``x_c = orientation @ (X - position)``, ``(x, y) = x_c[:2] / x_c[2]``, distorted by
k1..k3, p1, p2 as in OpenCV, then ``u = f x + skew y + cx``, ``v = f aspect y + cy``. Downsampling
by ``f`` divides focal length, principal point and image size (rounded) by ``f``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mono4d.data.dataset_frames import DatasetFrames, image_size, read_json
from mono4d.data.errors import InputError
from mono4d.data.geometry import intrinsics_matrix

SPLITS = ("train", "val")
#: Keys every Nerfies camera file must hold.
CAMERA_KEYS = ("orientation", "position", "focal_length", "principal_point", "image_size")


@dataclass(frozen=True)
class NerfiesCamera:
    """One camera file in this project's conventions.

    ``K`` ``(3, 3)`` (skew and pixel aspect ratio included, distortion not), ``w2c`` ``(4, 4)``
    OpenCV world-to-camera, image ``width`` x ``height`` in pixels, ``distortion``
    ``(k1, k2, k3, p1, p2)``.
    """

    K: np.ndarray
    w2c: np.ndarray
    width: int
    height: int
    distortion: np.ndarray

    def downsampled(self, factor: int) -> "NerfiesCamera":
        """The camera of the images downsampled by ``factor`` (``rgb/<factor>x``)."""
        K = np.array(self.K, copy=True)
        K[:2] /= factor
        return NerfiesCamera(K=K, w2c=self.w2c, width=int(round(self.width / factor)),
                             height=int(round(self.height / factor)), distortion=self.distortion)


def read_nerfies_camera(path: str | Path) -> NerfiesCamera:
    """Read a Nerfies camera JSON (see the module docstring). Raises :class:`InputError` when malformed."""
    path = Path(path)
    content = read_json(path)
    missing = [key for key in CAMERA_KEYS if key not in content]
    if missing:
        raise InputError(f"camera file {path} lacks {', '.join(missing)}",
                         f"a Nerfies camera needs {', '.join(CAMERA_KEYS)}")
    try:
        orientation = np.asarray(content["orientation"], dtype=np.float64)
        position = np.asarray(content["position"], dtype=np.float64)
        focal = float(content["focal_length"])
        principal = np.asarray(content["principal_point"], dtype=np.float64)
        size = np.asarray(content["image_size"], dtype=np.float64)
        skew = float(content.get("skew", 0.0))
        aspect = float(content.get("pixel_aspect_ratio", 1.0))
        radial = np.asarray(content.get("radial_distortion", [0.0, 0.0, 0.0]), dtype=np.float64)
        tangential = np.asarray(content.get("tangential_distortion", content.get("tangential", [0.0, 0.0])),
                                dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(f"malformed camera file {path}: {error}", "values must be numbers and number lists") from error
    shapes = {"orientation": (orientation.shape, (3, 3)), "position": (position.shape, (3,)),
              "principal_point": (principal.shape, (2,)), "image_size": (size.shape, (2,)),
              "radial_distortion": (radial.shape, (3,)), "tangential_distortion": (tangential.shape, (2,))}
    wrong = [f"{key} has shape {found}, expected {expected}" for key, (found, expected) in shapes.items()
             if found != expected]
    if wrong:
        raise InputError(f"camera file {path}: {'; '.join(wrong)}", "fix the camera file")
    if not np.allclose(orientation @ orientation.T, np.eye(3), atol=1e-4) or np.linalg.det(orientation) < 0:
        raise InputError(f"camera file {path}: orientation is not a rotation matrix", "fix the camera file")
    if focal <= 0 or aspect <= 0 or np.any(size <= 0):
        raise InputError(f"camera file {path}: focal_length, pixel_aspect_ratio and image_size must be positive",
                         "fix the camera file")
    K = intrinsics_matrix(focal, focal * aspect, principal[0], principal[1])
    K[0, 1] = skew
    w2c = np.eye(4)
    w2c[:3, :3] = orientation
    w2c[:3, 3] = -orientation @ position
    return NerfiesCamera(K=K, w2c=w2c, width=int(size[0]), height=int(size[1]),
                         distortion=np.concatenate([radial, tangential]))


def image_factors(root: Path) -> list[int]:
    """The downsampling factors ``f`` with an ``rgb/<f>x`` folder, ascending."""
    folders = (root / "rgb").glob("*x") if (root / "rgb").is_dir() else []
    return sorted(int(folder.name[:-1]) for folder in folders if folder.is_dir() and folder.name[:-1].isdigit())


def nerfies_frames(root: Path, names: Sequence[str], times: np.ndarray, factor: int, kind: str,
                   notes: Sequence[str] = ()) -> DatasetFrames:
    """Frames ``names`` of a Nerfies-layout folder: ``camera/<name>.json`` and ``rgb/<factor>x/<name>.png``.

    ``times`` ``(T,)`` in [0, 1]; ``kind`` the :data:`mono4d.data.datasets.FORMATS` name; ``factor`` 0
    picks the smallest factor present. All frames must share one image size, and the images
    must have the cameras' size divided by ``factor``. Distortion is left out of ``K`` and noted.
    """
    factors = image_factors(root)
    if factor == 0:
        if not factors:
            raise InputError(f"{root} has no rgb/<f>x image folder",
                             "a Nerfies-layout scene keeps its images in rgb/1x, rgb/2x, ...")
        factor = factors[0]
    if factor < 1:
        raise InputError(f"image downsampling factor {factor} is not a positive integer",
                         "use 1, 2, 4, ... (0: the smallest present)")
    cameras = []
    for name in names:
        camera_path = root / "camera" / f"{name}.json"
        if not camera_path.is_file():
            raise InputError(f"camera file {camera_path} of frame {name!r} does not exist",
                             "check that the camera/ folder is complete")
        cameras.append(read_nerfies_camera(camera_path).downsampled(factor))
    sizes = sorted({(camera.width, camera.height) for camera in cameras})
    if len(sizes) != 1:
        raise InputError(f"the cameras of {root} mix image sizes {sizes}", "read one camera (camera=ID) at a time")
    width, height = sizes[0]
    image_dir = root / "rgb" / f"{factor}x"
    image_paths = [image_dir / f"{name}.png" for name in names]
    missing = [str(path) for path in image_paths if not path.is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(names)} images are missing, e.g. {missing[0]}",
                         f"pick a downsampling factor whose rgb/<f>x folder is complete (present: {factors})")
    found = image_size(image_paths[0])
    if found != (width, height):
        raise InputError(f"{image_paths[0]} is {found[0]}x{found[1]} but its camera at factor {factor} is "
                         f"{width}x{height}", "check the downsampling factor against the rgb/<f>x folder")
    notes = list(notes)
    if any(np.any(camera.distortion != 0) for camera in cameras):
        notes.append(f"the cameras of {root.name} have lens distortion; K ignores it (undistort the images first "
                     "for exact projections)")
    return DatasetFrames(image_paths=image_paths, K=np.stack([camera.K for camera in cameras]),
                         w2c=np.stack([camera.w2c for camera in cameras]), times=np.asarray(times, np.float64),
                         width=width, height=height, units="dataset", format=kind, notes=tuple(notes))


def read_metadata(root: Path, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(time_ids, camera_ids)`` ``(N,)`` int64 of frames ``ids`` from ``metadata.json``."""
    path = root / "metadata.json"
    if not path.is_file():
        raise InputError(f"{path} does not exist", "a Nerfies/HyperNeRF folder needs metadata.json next to dataset.json")
    content = read_json(path)
    try:
        entries = [content[name] for name in ids]
        time_ids = [entry["time_id"] if "time_id" in entry else entry["warp_id"] for entry in entries]
        camera_ids = [entry["camera_id"] for entry in entries]
        return np.asarray(time_ids, dtype=np.int64), np.asarray(camera_ids, dtype=np.int64)
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"malformed {path}: {error}",
                         "every id of dataset.json needs an entry with warp_id (or time_id) and camera_id") from error


def read_split_ids(root: Path, split: str) -> tuple[list[str], list[str]]:
    """``(all ids, ids of split)`` from ``dataset.json``."""
    if split not in SPLITS:
        raise InputError(f"unknown Nerfies/HyperNeRF split {split!r}", f"use one of {', '.join(SPLITS)}")
    path = root / "dataset.json"
    content = read_json(path)
    try:
        ids = [str(name) for name in content["ids"]]
        chosen = [str(name) for name in content[f"{split}_ids"]]
    except (KeyError, TypeError) as error:
        raise InputError(f"malformed {path}: {error}", "dataset.json needs ids, train_ids and val_ids lists") from error
    unknown = sorted(set(chosen) - set(ids))
    if unknown:
        raise InputError(f"{path}: {split}_ids lists {len(unknown)} ids missing from ids, e.g. {unknown[0]!r}",
                         "fix dataset.json")
    if not chosen:
        raise InputError(f"{path} has no {split} frames", "this scene has no held-out camera; use split=train")
    return ids, chosen


def keep_camera(names: list[str], time_ids: np.ndarray, camera_ids: np.ndarray, camera: int, split: str,
                root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """The frames of one camera id (``camera``; -1 keeps every frame), their time ids, and notes.

    Raises :class:`InputError` naming the split's cameras when ``camera`` has no frame; with -1,
    a note says when the split mixes several cameras.
    """
    present = sorted(set(camera_ids.tolist()))
    if camera == -1:
        notes = [f"the {split} split of {root.name} interleaves cameras {present}"] if len(present) > 1 else []
        return names, time_ids, notes
    keep = camera_ids == camera
    if not keep.any():
        raise InputError(f"camera {camera} has no {split} frame in {root}", f"pick one of the split's cameras: {present}")
    return [name for name, kept in zip(names, keep) if kept], time_ids[keep], []


def hypernerf_camera_ids(root: str | Path, split: str = "train") -> list[int]:
    """The camera ids (``metadata.json`` ``camera_id``) of a split, sorted."""
    root = Path(root)
    _, chosen = read_split_ids(root, split)
    return sorted({int(camera) for camera in read_metadata(root, chosen)[1]})


def read_hypernerf(root: str | Path, split: str = "train", factor: int = 0, camera: int = -1) -> DatasetFrames:
    """The frames of one split of a Nerfies / HyperNeRF scene, in ``dataset.json`` order.

    ``factor`` picks the images ``rgb/<factor>x`` (cameras scaled to match; 0: the smallest
    factor present, i.e. the largest images); ``camera`` keeps one
    ``camera_id`` (-1: every frame of the split; a note says when it mixes cameras). ``times``
    are the time steps divided by the largest time step of the whole scene.
    """
    root = Path(root)
    ids, chosen = read_split_ids(root, split)
    all_times, _ = read_metadata(root, ids)
    time_ids, camera_ids = read_metadata(root, chosen)
    chosen, time_ids, notes = keep_camera(chosen, time_ids, camera_ids, camera, split, root)
    scale = max(int(all_times.max()), 1)
    return nerfies_frames(root, chosen, time_ids / scale, factor, "hypernerf", notes)
