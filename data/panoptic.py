"""CMU Panoptic sequences as prepared by Dynamic 3D Gaussians: ``train_meta.json`` / ``test_meta.json``.

A meta file holds ``w``, ``h`` (image size), and per timestep ``t`` and camera slot ``c``:
``k[t][c]`` (3x3 intrinsics), ``w2c[t][c]`` (4x4 world-to-camera, already OpenCV),
``fn[t][c]`` (image path under ``ims/``) and ``cam_id[t][c]``. For monocular use one camera
id is picked and its frames over time form the video.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mono4d.data.dataset_frames import DatasetFrames, linear_times, read_json
from mono4d.data.errors import InputError


def panoptic_camera_ids(meta_path: str | Path) -> list[int]:
    """The camera ids present at the first timestep of a meta file."""
    content = read_json(Path(meta_path))
    try:
        return [int(camera_id) for camera_id in content["cam_id"][0]]
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise InputError(f"{meta_path} has no usable cam_id table", "point to a train_meta.json / test_meta.json") from error


def read_panoptic(meta_path: str | Path, camera: int = -1) -> DatasetFrames:
    """The video of one camera of a Panoptic meta file, one frame per timestep.

    ``camera`` is a camera id (``cam_id`` value, not a slot index); -1 is allowed only for a file
    holding a single camera. Images are ``<meta folder>/ims/<fn>``; times are ``t / (T - 1)``.
    """
    meta_path = Path(meta_path)
    content = read_json(meta_path)
    available = panoptic_camera_ids(meta_path)
    if camera == -1:
        if len(available) != 1:
            raise InputError(f"{meta_path} holds {len(available)} cameras; pick one for a monocular video",
                             f"set the camera id (e.g. --set cameras.known_camera={available[0]}); ids: {available}")
        camera = available[0]
    try:
        width, height = int(content["w"]), int(content["h"])
        K, w2c, image_paths = [], [], []
        for t, ids in enumerate(content["cam_id"]):
            ids = [int(camera_id) for camera_id in ids]
            if camera not in ids:
                raise InputError(f"camera {camera} is missing at timestep {t} of {meta_path}",
                                 f"pick a camera id present in every timestep; ids at t=0: {available}")
            slot = ids.index(camera)
            K.append(content["k"][t][slot])
            w2c.append(content["w2c"][t][slot])
            image_paths.append(meta_path.parent / "ims" / content["fn"][t][slot])
        K_array = np.array(K, dtype=np.float64)
        w2c_array = np.array(w2c, dtype=np.float64)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise InputError(f"malformed Panoptic meta file {meta_path}: {error}",
                         "expected keys w, h, k[t][c], w2c[t][c], fn[t][c], cam_id[t][c]") from error
    if K_array.shape != (len(K), 3, 3) or w2c_array.shape != (len(K), 4, 4):
        raise InputError(f"{meta_path} has intrinsics/extrinsics of the wrong shape", "expected 3x3 k and 4x4 w2c")
    missing = [str(path) for path in image_paths if not path.is_file()]
    if missing:
        raise InputError(f"{len(missing)} images of camera {camera} are missing, e.g. {missing[0]}",
                         "check that the ims/ folder next to the meta file is complete")
    return DatasetFrames(image_paths=image_paths, K=K_array, w2c=w2c_array, times=linear_times(len(K)),
                         width=width, height=height, units="dataset", format="panoptic")
