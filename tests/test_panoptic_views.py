"""Multi-view reading of a Panoptic meta file (:func:`mono4d.data.panoptic.read_panoptic_views`)
on a tiny scene written in the real layout (ims/<cam>/<t>.jpg, seg/<cam>/<t>.png, train_meta.json)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mono4d.data.errors import InputError
from mono4d.data.panoptic import read_panoptic_views


def write_scene(root: Path, cameras: list[int], timesteps: int, with_seg: bool) -> Path:
    """A ``timesteps`` x ``len(cameras)`` Panoptic meta file with 8x6 images; returns its path."""
    from PIL import Image

    k = [[[10.0 + c, 0, 4], [0, 10.0 + c, 3], [0, 0, 1]] for c in cameras]
    w2c = [np.eye(4).tolist() for _ in cameras]
    for t in range(timesteps):
        for c in cameras:
            (root / "ims" / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 8, 3), t * 10 + c, np.uint8)).save(root / "ims" / str(c) / f"{t:06d}.jpg")
            if with_seg:
                (root / "seg" / str(c)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "seg" / str(c) / f"{t:06d}.png")
    meta = {"w": 8, "h": 6, "k": [k] * timesteps, "w2c": [w2c] * timesteps,
            "fn": [[f"{c}/{t:06d}.jpg" for c in cameras] for t in range(timesteps)],
            "cam_id": [cameras] * timesteps}
    path = root / "train_meta.json"
    path.write_text(json.dumps(meta))
    return path


def test_reads_every_camera_of_the_first_timesteps(tmp_path):
    path = write_scene(tmp_path, [1, 3], timesteps=4, with_seg=True)
    views = read_panoptic_views(path, timesteps=2)
    assert views.camera_ids == [1, 3] and views.K.shape == (2, 2, 3, 3) and views.w2c.shape == (2, 2, 4, 4)
    assert views.image_paths[1][1] == tmp_path / "ims" / "3" / "000001.jpg"
    assert views.seg_paths[1][0] == tmp_path / "seg" / "1" / "000001.png"
    assert views.K[0, 1, 0, 0] == 13.0 and (views.width, views.height) == (8, 6)
    np.testing.assert_allclose(views.times, [0.0, 1.0 / 3.0])  # times over the file's 4 timesteps
    assert read_panoptic_views(path).K.shape[0] == 4


def test_cameras_without_masks_have_none(tmp_path):
    views = read_panoptic_views(write_scene(tmp_path, [0, 10], timesteps=1, with_seg=False))
    assert views.seg_paths == [[None, None]]


def test_missing_image_and_changing_cameras_are_input_errors(tmp_path):
    path = write_scene(tmp_path, [1, 2], timesteps=2, with_seg=False)
    (tmp_path / "ims" / "2" / "000001.jpg").unlink()
    with pytest.raises(InputError, match="missing"):
        read_panoptic_views(path)
    meta = json.loads(path.read_text())
    meta["cam_id"][1] = [2, 1]
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="timestep 1"):
        read_panoptic_views(path)
