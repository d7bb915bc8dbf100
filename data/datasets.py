"""Datasets with known cameras: recognise the format and read it with its reader.

Formats (one module each): D-NeRF / Blender ``transforms_*.json`` (:mod:`mono4d.data.dnerf`),
Panoptic as prepared by Dynamic 3D Gaussians ``train_meta.json`` (:mod:`mono4d.data.panoptic`),
nerfstudio ``transforms.json`` (:mod:`mono4d.data.nerfstudio`), COLMAP models (:mod:`mono4d.data.colmap`),
Nerfies / HyperNeRF ``dataset.json`` + ``camera/*.json`` (:mod:`mono4d.data.hypernerf`), DyCheck iPhone
(:mod:`mono4d.data.dycheck`) and DyNeRF / Neu3D ``poses_bounds.npy`` + ``camXX.mp4`` (:mod:`mono4d.data.dynerf`).
Every reader returns :class:`~mono4d.data.dataset_frames.DatasetFrames` with OpenCV cameras.
"""
from __future__ import annotations

from pathlib import Path

from mono4d.data.dataset_frames import DatasetFrames, read_json
from mono4d.data.errors import InputError

#: The formats :func:`read_dataset` recognises.
FORMATS = ("dnerf", "panoptic", "nerfstudio", "colmap", "hypernerf", "dycheck", "dynerf")


def detect_format(path: str | Path) -> str:
    """Name the format (one of :data:`FORMATS`) of a camera file or folder.

    A folder holding ``cameras.bin``/``cameras.txt`` (directly or under ``sparse/0`` or
    ``sparse``) is COLMAP; a folder holding ``transforms_train.json`` is D-NeRF; one holding
    ``poses_bounds.npy`` (or that file itself) is DyNeRF; one holding ``dataset.json`` and a
    ``camera/`` folder (or that ``dataset.json``) is DyCheck iPhone when ``splits/train.json``
    exists, else Nerfies/HyperNeRF; a JSON with ``k``/``w2c``/``fn`` is Panoptic; one with
    ``fl_x`` (top level or per frame) is nerfstudio; one with ``camera_angle_x`` is D-NeRF/Blender.
    """
    from mono4d.data.colmap import find_model_dir

    path = Path(path)
    if path.is_dir():
        if find_model_dir(path) is not None:
            return "colmap"
        if (path / "transforms_train.json").is_file():
            return "dnerf"
        if (path / "poses_bounds.npy").is_file():
            return "dynerf"
        if (path / "dataset.json").is_file() and (path / "camera").is_dir():
            return "dycheck" if (path / "splits" / "train.json").is_file() else "hypernerf"
        if (path / "transforms.json").is_file():
            return detect_format(path / "transforms.json")
        raise InputError(f"{path} holds no known camera format",
                         "point to a COLMAP model folder, a D-NeRF, Nerfies/HyperNeRF, DyCheck or DyNeRF "
                         "folder, or a transforms/meta JSON file")
    if not path.is_file():
        raise InputError(f"camera file {path} does not exist", "check the path given as cameras.known_path")
    if path.name == "poses_bounds.npy":
        return "dynerf"
    if path.name == "dataset.json" and (path.parent / "camera").is_dir():
        return detect_format(path.parent)
    content = read_json(path)
    frames = content.get("frames")
    first_frame = frames[0] if isinstance(frames, list) and frames and isinstance(frames[0], dict) else {}
    if {"k", "w2c", "fn"} <= content.keys():
        return "panoptic"
    if "fl_x" in content or "fl_x" in first_frame:
        return "nerfstudio"
    if "camera_angle_x" in content:
        return "dnerf"
    raise InputError(f"{path} is not a D-NeRF, Panoptic or nerfstudio camera file",
                     "expected keys: camera_angle_x + frames (D-NeRF), k/w2c/fn (Panoptic), "
                     "fl_x/fl_y/cx/cy + frames (nerfstudio); for Nerfies/HyperNeRF, DyCheck and DyNeRF "
                     "give the dataset folder")


def read_dataset(path: str | Path, camera: int = -1, split: str = "train") -> DatasetFrames:
    """Read the cameras (and image list) of any supported dataset.

    ``camera`` picks one camera id of a multi-camera Panoptic file or DyNeRF folder (-1: there
    must be a single camera) or of a Nerfies/HyperNeRF/DyCheck split (-1: every frame of the
    split); ``split`` picks the D-NeRF split when ``path`` is the dataset folder, and the
    Nerfies/HyperNeRF/DyCheck split (``train`` or ``val``).
    """
    from mono4d.data import colmap, dnerf, dycheck, dynerf, hypernerf, nerfstudio, panoptic

    kind = detect_format(path)
    if kind == "colmap":
        return colmap.read_colmap_model(path)
    if kind == "dnerf":
        return dnerf.read_dnerf(path, split=split)
    if kind == "panoptic":
        return panoptic.read_panoptic(path, camera=camera)
    if kind == "dynerf":
        return dynerf.read_dynerf(path, camera=camera)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    if kind == "hypernerf":
        return hypernerf.read_hypernerf(root, split=split, camera=camera)
    if kind == "dycheck":
        return dycheck.read_dycheck(root, split=split, camera=camera)
    return nerfstudio.read_nerfstudio(path)
