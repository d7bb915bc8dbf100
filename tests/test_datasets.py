"""Dataset readers and writers with known cameras: D-NeRF, Panoptic, nerfstudio, COLMAP."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mono4d.data.colmap import read_colmap_model, read_colmap_points, write_colmap_model
from mono4d.data.datasets import detect_format, read_dataset
from mono4d.data.dnerf import is_dnerf_folder, read_dnerf, read_dnerf_splits
from mono4d.data.errors import InputError
from mono4d.data.geometry import OPENGL_TO_OPENCV, camera_centers, invert_rigid, project_points
from mono4d.data.nerfstudio import read_nerfstudio, write_nerfstudio_transforms
from mono4d.data.panoptic import panoptic_camera_ids, read_panoptic
from tests.conftest import shared_path


def test_dnerf_mutant_train_split():
    root = shared_path("dnerf/mutant")
    dataset = read_dnerf(root, split="train")
    assert dataset.num_frames == 150 and (dataset.width, dataset.height) == (800, 800)
    assert detect_format(root) == "dnerf" and detect_format(root / "transforms_train.json") == "dnerf"
    angle_x = json.loads((root / "transforms_train.json").read_text())["camera_angle_x"]
    focal = 400.0 / math.tan(angle_x / 2)
    np.testing.assert_allclose(dataset.K, np.broadcast_to([[focal, 0, 400], [0, focal, 400], [0, 0, 1]], (150, 3, 3)))
    assert all(path.is_file() and path.suffix == ".png" for path in dataset.image_paths)
    assert dataset.times[0] == 0.0 and dataset.times[-1] == pytest.approx(1.0) and np.all(np.diff(dataset.times) > 0)
    # The cameras orbit the object at the origin and look at it: it projects near the image
    # centre, in front of every camera.
    for K, w2c in zip(dataset.K, dataset.w2c):
        uv, depth = project_points(K, w2c, np.zeros((1, 3)))
        assert depth[0] > 1.0
        assert np.abs(uv[0] - 400.0).max() < 20.0
    np.testing.assert_allclose(dataset.w2c[:, :3, :3] @ np.swapaxes(dataset.w2c[:, :3, :3], 1, 2),
                               np.broadcast_to(np.eye(3), (150, 3, 3)), atol=1e-5)
    assert read_dataset(root / "transforms_test.json").num_frames == 20
    with pytest.raises(InputError, match="split"):
        read_dnerf(root, split="holdout")
    # what a pipeline run over the folder uses: train, then test (held out)
    both = read_dnerf_splits(root)
    test = read_dnerf(root, split="test")
    assert both.num_frames == 170 and both.image_paths[150:] == test.image_paths and is_dnerf_folder(root)
    np.testing.assert_array_equal(both.w2c[:150], dataset.w2c)
    np.testing.assert_array_equal(both.times[150:], test.times)
    assert not is_dnerf_folder(root / "train")


def test_panoptic_basketball_single_camera():
    meta = shared_path("panoptic/basketball/train_meta.json")
    ids = panoptic_camera_ids(meta)
    assert len(ids) == 27 and detect_format(meta) == "panoptic"
    dataset = read_panoptic(meta, camera=ids[0])
    assert dataset.num_frames == 50 and (dataset.width, dataset.height) == (640, 360)
    assert dataset.image_paths[0].is_file() and dataset.image_paths[0].parent.name == str(ids[0])
    raw = json.loads(meta.read_text())
    np.testing.assert_allclose(dataset.w2c[7], raw["w2c"][7][0])
    np.testing.assert_allclose(dataset.K[7], raw["k"][7][0])
    # All training cameras look at the court: the point nearest to their optical axes lies in
    # front of each of them and projects inside every image.
    all_w2c = np.array(raw["w2c"][0], dtype=np.float64)
    c2w = invert_rigid(all_w2c)
    centres, axes = c2w[:, :3, 3], c2w[:, :3, 2]
    projector = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
    focus = np.linalg.solve(projector.sum(0), np.einsum("nij,nj->i", projector, centres))
    for K, w2c in zip(np.array(raw["k"][0]), all_w2c):
        uv, depth = project_points(K, w2c, focus[None])
        assert depth[0] > 0
        assert 0 <= uv[0, 0] <= 640 and 0 <= uv[0, 1] <= 360
    with pytest.raises(InputError, match="27 cameras") as failure:
        read_panoptic(meta)
    assert "known_camera" in failure.value.hint
    with pytest.raises(InputError, match="camera 0 is missing"):
        read_panoptic(meta, camera=0)


def test_nerfstudio_round_trip(synthetic_scene, tmp_path):
    scene = synthetic_scene
    files = [f"images/{index:06d}.png" for index in range(scene.num_frames)]
    times = np.linspace(0.0, 1.0, scene.num_frames)
    path = tmp_path / "transforms.json"
    write_nerfstudio_transforms(path, scene.K, scene.w2c, scene.width, scene.height, files, times=times)
    content = json.loads(path.read_text())
    assert content["fl_x"] == pytest.approx(scene.K[0, 0]) and "fl_x" not in content["frames"][0]
    # transform_matrix is an OpenGL camera-to-world matrix.
    c2w = np.array(content["frames"][3]["transform_matrix"])
    np.testing.assert_allclose(invert_rigid(c2w @ OPENGL_TO_OPENCV), scene.w2c[3], atol=1e-9)

    dataset = read_dataset(tmp_path)
    assert dataset.format == "nerfstudio" and (dataset.width, dataset.height) == (scene.width, scene.height)
    np.testing.assert_allclose(dataset.w2c, scene.w2c, atol=1e-6)
    np.testing.assert_allclose(dataset.K, np.broadcast_to(scene.K, dataset.K.shape), atol=1e-6)
    np.testing.assert_allclose(dataset.times, times)
    assert dataset.image_paths[2] == (tmp_path / files[2]).resolve() and dataset.notes == ()

    # Per-frame intrinsics survive too.
    per_frame = np.repeat(scene.K[None], scene.num_frames, axis=0)
    per_frame[:, 0, 0] += np.arange(scene.num_frames)
    write_nerfstudio_transforms(path, per_frame, scene.w2c, scene.width, scene.height, files)
    assert "fl_x" in json.loads(path.read_text())["frames"][0]
    np.testing.assert_allclose(read_nerfstudio(path).K, per_frame, atol=1e-6)


def test_nerfstudio_distortion_is_noted(tmp_path):
    path = tmp_path / "transforms.json"
    path.write_text(json.dumps({"fl_x": 100.0, "fl_y": 100.0, "cx": 50, "cy": 40, "w": 100, "h": 80, "k1": -0.1,
                                "frames": [{"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}]}))
    dataset = read_nerfstudio(path)
    assert dataset.num_frames == 1 and "distortion" in dataset.notes[0]


def static_track_points(scene) -> dict[str, np.ndarray]:
    """Tracked points of the static background, with their visible observations."""
    motion = np.ptp(scene.tracks_xyz, axis=1).max(axis=1)
    static = np.flatnonzero((motion < 1e-9) & (scene.tracks_visible.sum(1) >= 2))
    frame, point = np.nonzero(scene.tracks_visible[static].T)
    return {
        "xyz": scene.tracks_xyz[static, 0].astype(np.float32),
        "rgb": np.full((len(static), 3), 200, np.uint8),
        "obs_frame": frame.astype(np.int32),
        "obs_point": point.astype(np.int32),
        "obs_xy": scene.tracks_xy[static[point], frame].astype(np.float32),
    }


@pytest.mark.parametrize("text", [False, True])
def test_colmap_round_trip(synthetic_scene, tmp_path, text):
    scene = synthetic_scene
    names = [f"{index:06d}.png" for index in range(scene.num_frames)]
    points = static_track_points(scene)
    assert len(points["xyz"]) > 10
    model_dir = tmp_path / "scene" / "sparse" / "0"
    write_colmap_model(model_dir, scene.K, scene.w2c, scene.width, scene.height, names, points=points, text=text)
    assert (model_dir / ("cameras.txt" if text else "cameras.bin")).is_file()
    (tmp_path / "scene" / "images").mkdir()

    dataset = read_dataset(tmp_path / "scene")
    assert dataset.format == "colmap" and dataset.units == "sfm" and dataset.num_frames == scene.num_frames
    assert dataset.image_paths[4] == tmp_path / "scene" / "images" / names[4]
    np.testing.assert_allclose(dataset.w2c, scene.w2c, atol=1e-6)
    np.testing.assert_allclose(dataset.K, np.broadcast_to(scene.K, dataset.K.shape), atol=1e-6)
    np.testing.assert_allclose(camera_centers(dataset.w2c), camera_centers(scene.w2c), atol=1e-6)

    read_back = read_colmap_points(model_dir)
    np.testing.assert_allclose(read_back["xyz"], points["xyz"], atol=1e-6)
    np.testing.assert_array_equal(read_back["rgb"], points["rgb"])
    written = sorted(zip(points["obs_point"], points["obs_frame"], *points["obs_xy"].T))
    found = sorted(zip(read_back["obs_point"], read_back["obs_frame"], *read_back["obs_xy"].T))
    np.testing.assert_allclose(np.array(found), np.array(written), atol=1e-6)
    # Exact ground-truth cameras and points: reprojection errors are tiny.
    assert np.all(read_back["error"] < 1e-3)


def test_colmap_per_image_cameras_and_models_without_points(synthetic_scene, tmp_path):
    scene = synthetic_scene
    per_frame = np.repeat(scene.K[None], 3, axis=0)
    per_frame[:, 1, 1] *= [1.0, 1.1, 1.2]
    write_colmap_model(tmp_path, per_frame, scene.w2c[:3], scene.width, scene.height, ["b.png", "a.png", "c.png"])
    dataset = read_colmap_model(tmp_path)
    assert [path.name for path in dataset.image_paths] == ["a.png", "b.png", "c.png"]
    np.testing.assert_allclose(dataset.K, per_frame[[1, 0, 2]], atol=1e-9)
    np.testing.assert_allclose(dataset.w2c, scene.w2c[[1, 0, 2]], atol=1e-9)
    assert len(read_colmap_points(tmp_path)["xyz"]) == 0


def test_unknown_formats_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        detect_format(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(InputError, match="not a D-NeRF, Panoptic or nerfstudio"):
        detect_format(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="cannot read"):
        read_dataset(tmp_path / "broken.json")
    with pytest.raises(InputError, match="no known camera format"):
        read_dataset(tmp_path)
