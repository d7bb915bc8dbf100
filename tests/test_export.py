"""`mono4d export`: every format written from a small workspace (tiny synthetic scene, its frames
stage output, ground-truth cameras/depth/tracks in the stage formats, and a small Gaussian model
in the train stage's format) and read back by independent readers."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from mono4d.data import artifacts
from mono4d.data.errors import InputError, ParameterError

#: Pixel stride of the Gaussians lifted from the ground-truth depth of the key frames.
LIFT_STRIDE = 4
KEY_FRAMES = (0, 6, 11)


def lift(scene, frame: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """World points ``(M, 3)``, colours ``(M, 3)`` in [0, 1], footprint radii ``(M,)`` and dynamic
    flags of every ``stride``-th pixel of a frame, from its exact depth."""
    from mono4d.data.geometry import invert_rigid

    rows, cols = np.mgrid[stride // 2:scene.height:stride, stride // 2:scene.width:stride]
    rows, cols = rows.ravel(), cols.ravel()
    depth = scene.depth[frame][rows, cols].astype(np.float64)
    rays = np.linalg.inv(scene.K) @ np.stack([cols + 0.5, rows + 0.5, np.ones_like(rows, float)])
    camera_points = (rays * depth).T
    c2w = invert_rigid(scene.w2c[frame])
    world = camera_points @ c2w[:3, :3].T + c2w[:3, 3]
    radii = 0.6 * stride * depth / scene.K[0, 0]
    return world, scene.images[frame][rows, cols] / 255.0, radii, scene.masks[frame][rows, cols] > 0


def write_train_output(scene, train_dir: Path, seed: int = 0) -> None:
    """A ``model.pt`` in the train stage's format: Gaussians lifted from the key frames' depth
    (SH degree 1, random higher-order coefficients) and a deformation field with random output
    layers (so dynamic Gaussians really move)."""
    import torch

    from mono4d.models.deformation import DeformationConfig, DeformationField
    from mono4d.models.gaussians import SceneModel, create_params, save_model

    torch.manual_seed(seed)
    parts = [lift(scene, frame, LIFT_STRIDE) for frame in KEY_FRAMES]
    points, colors, radii, dynamic = (np.concatenate([part[k] for part in parts]) for k in range(4))
    params, variables = create_params(torch.as_tensor(points, dtype=torch.float32),
                                      torch.as_tensor(colors, dtype=torch.float32),
                                      torch.as_tensor(np.repeat(radii[:, None], 3, axis=1), dtype=torch.float32),
                                      torch.as_tensor(dynamic), sh_degree=1, opacity=0.95)
    with torch.no_grad():
        params["shN"].normal_(0.0, 0.05)
        params["quats"].add_(torch.randn_like(params["quats"]) * 0.2)
    moving = points[dynamic]
    field = DeformationField(DeformationConfig(num_layers=3, hidden=16, position_frequencies=2, time_frequencies=2),
                             torch.as_tensor(moving.mean(axis=0), dtype=torch.float32),
                             float(np.linalg.norm(moving.max(axis=0) - moving.min(axis=0))) / 2)
    with torch.no_grad():
        for layer in field.couplings:
            layer.net[-1].weight.normal_(0.0, 0.3)
        field.shape_head[-1].weight.normal_(0.0, 0.3)
    times = np.linspace(0.0, 1.0, scene.num_frames)
    meta = {"num_frames": scene.num_frames, "width": scene.width, "height": scene.height, "times": times.tolist(),
            "train_frames": list(range(scene.num_frames)), "holdout_frames": [],
            "scene_scale": float(np.median(scene.depth)), "units": "metric", "stage": "train",
            "train_params": {"background": "black"}}
    train_dir.mkdir(parents=True)
    save_model(train_dir / "model.pt", SceneModel(params, variables, field, meta))


def write_cameras_output(scene, cameras_dir: Path, unposed: int | None = None) -> None:
    """``cameras.json`` with the exact cameras (frame ``unposed`` without a pose) and
    ``points.npz``: static surface points of frame 0 with their projections in every frame."""
    from mono4d.data.geometry import project_points

    cameras_dir.mkdir(parents=True)
    w2c = scene.w2c.astype(np.float64)
    if unposed is not None:
        w2c[unposed] = np.nan
    artifacts.write_cameras(cameras_dir, np.repeat(scene.K[None], scene.num_frames, axis=0), w2c,
                            np.arange(scene.num_frames) != unposed, [f"images/{i:06d}.png" for i in range(scene.num_frames)],
                            scene.width, scene.height, units="metric")
    world, colors, _, dynamic = lift(scene, 0, 12)
    xyz = world[~dynamic].astype(np.float32)
    obs_frame, obs_point, obs_xy = [], [], []
    for frame in range(scene.num_frames):
        uv, depth = project_points(scene.K, scene.w2c[frame], xyz)
        inside = (depth > 0) & (uv[:, 0] > 0) & (uv[:, 0] < scene.width) & (uv[:, 1] > 0) & (uv[:, 1] < scene.height)
        obs_frame += [frame] * int(inside.sum())
        obs_point += list(np.flatnonzero(inside))
        obs_xy += list(uv[inside])
    artifacts.write_points(cameras_dir, {"xyz": xyz, "rgb": (colors[~dynamic] * 255).astype(np.uint8),
                                         "error": np.zeros(len(xyz), np.float32),
                                         "obs_frame": np.asarray(obs_frame, np.int32),
                                         "obs_point": np.asarray(obs_point, np.int32),
                                         "obs_xy": np.asarray(obs_xy, np.float32)})


def build_workspace(root: Path) -> tuple[Path, object]:
    """A workspace ``root/work`` with frames (frames stage run on the tiny scene), cameras,
    align and tracks (ground truth in the stage formats) and train (a small model); returns it
    and the scene."""
    from mono4d.data import synthetic
    from mono4d.stages import frames

    scene = synthetic.generate(root / "scene", preset="tiny", seed=0)
    work = root / "work"
    (work / "frames").mkdir(parents=True)
    frames.run({"source": scene.root / "images"}, frames.Params(), work / "frames")
    write_cameras_output(scene, work / "cameras")
    (work / "align" / "depth").mkdir(parents=True)
    for i in range(scene.num_frames):
        depth = scene.depth[i].copy()
        depth[:3, :5] = 0.0  # a few invalid pixels
        np.save(work / "align" / "depth" / f"{i:06d}.npy", depth)
    (work / "tracks").mkdir()
    xy = scene.tracks_xy.copy()
    xy[0, :3] = np.nan  # a track without an estimate on its first frames
    np.savez_compressed(work / "tracks" / "tracks.npz", xy=xy, visible=scene.tracks_visible,
                        query_frame=np.zeros(len(xy), np.int32))
    np.savez_compressed(work / "tracks" / "pairs3d.npz", src_xyz=scene.tracks_xyz[:, 0], dst_xyz=scene.tracks_xyz[:, 1],
                        src_frame=np.zeros(len(xy), np.int32), dst_frame=np.ones(len(xy), np.int32),
                        src_xy=scene.tracks_xy[:, 0], dst_xy=scene.tracks_xy[:, 1])
    write_train_output(scene, work / "train")
    return work, scene


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("export_ws"))


# ----------------------------------------------------------------------------------------------


def test_frame_selection():
    from mono4d.pipeline.export import parse_frame_selection

    assert parse_frame_selection("all", 5) == [0, 1, 2, 3, 4]
    assert parse_frame_selection("0,5,10", 24) == [0, 5, 10]
    assert parse_frame_selection("0:20:2", 24) == list(range(0, 20, 2))
    assert parse_frame_selection("20:", 24) == [20, 21, 22, 23]
    assert parse_frame_selection(":3, 10, 2", 24) == [0, 1, 2, 10]
    assert parse_frame_selection("0:100:10", 24) == [0, 10, 20]
    for bad in ("abc", "24", "-1", "5:2", "0:10:0", "1:2:3:4", ","):
        with pytest.raises(ParameterError) as error:
            parse_frame_selection(bad, 24)
        assert "0:20:2" in error.value.hint


def read_ply_independently(path: Path) -> tuple[list[str], np.ndarray]:
    """Minimal PLY reader: header lines up to ``end_header``, then rows of little-endian float32."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").split("\n")
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    count = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    names = []
    for line in header:
        if line.startswith("property"):
            kind, name = line.split()[1:]
            assert kind == "float"
            names.append(name)
    assert len(data) - end == count * len(names) * 4
    values = struct.unpack(f"<{count * len(names)}f", data[end:])
    return names, np.asarray(values, np.float32).reshape(count, len(names))


def test_ply_export(workspace, tmp_path):
    import torch

    from mono4d.data.ply import read_ply
    from mono4d.models.gaussians import gaussians_at
    from mono4d.pipeline.export import export_workspace
    from mono4d.stages.train import load_trained

    work, scene = workspace
    written = export_workspace(work, ["ply"], tmp_path / "out", frames="0:12:5")
    assert [path.name for path in written["ply"]] == ["000000.ply", "000005.ply", "000010.ply"]
    assert all(path.parent == tmp_path / "out" / "ply" for path in written["ply"])
    model = load_trained(work / "train")
    expected_names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                      + [f"f_rest_{i}" for i in range(9)]
                      + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    dynamic = model.variables["is_dynamic"].numpy()
    positions = {}
    for frame, path in zip((0, 5, 10), written["ply"]):
        names, table = read_ply_independently(path)
        assert names == expected_names
        column = {name: table[:, i] for i, name in enumerate(names)}
        with torch.no_grad():
            state = gaussians_at(model.params, model.variables, model.field, frame / (scene.num_frames - 1))
        means = np.stack([column[n] for n in ("x", "y", "z")], axis=1)
        np.testing.assert_allclose(means, state["means"].numpy(), atol=1e-6)
        quats = np.stack([column[f"rot_{i}"] for i in range(4)], axis=1)
        np.testing.assert_allclose(quats, state["quats"].numpy(), atol=1e-6)
        np.testing.assert_allclose(np.exp(np.stack([column[f"scale_{i}"] for i in range(3)], 1)),
                                   state["scales"].numpy(), rtol=1e-5)
        np.testing.assert_allclose(column["opacity"], model.params["opacities"].detach().numpy(), atol=1e-6)
        sh_rest = model.params["shN"].detach().numpy()  # (N, 3 coefficients, 3 channels), channel-major in PLY
        np.testing.assert_allclose(column["f_rest_4"], sh_rest[:, 1, 1], atol=1e-7)
        np.testing.assert_allclose(column["f_rest_6"], sh_rest[:, 0, 2], atol=1e-7)
        np.testing.assert_array_equal(table[:, 3:6], 0.0)
        ours = read_ply(path)
        np.testing.assert_array_equal(ours["means"], means)
        np.testing.assert_array_equal(ours["sh_rest"], sh_rest.astype(np.float32))
        positions[frame] = means
    moved = np.linalg.norm(positions[10] - positions[0], axis=1)
    assert np.all(moved[~dynamic] == 0.0)
    assert np.median(moved[dynamic]) > 1e-3


def test_colmap_export_round_trip(workspace, tmp_path):
    import pycolmap

    from mono4d.data.colmap import read_colmap_model, read_colmap_points
    from mono4d.pipeline.export import export_workspace

    work, scene = workspace
    written = export_workspace(work, ["colmap"], tmp_path / "out")["colmap"]
    root = tmp_path / "out" / "colmap"
    assert {"cameras.bin", "images.bin", "points3D.bin", "cameras.txt", "images.txt", "points3D.txt"} <= {
        path.name for path in written}
    assert all(path.is_file() and root in path.parents for path in written)
    points = artifacts.read_points(work / "cameras")
    for folder in (root / "sparse" / "0", root / "text"):
        reconstruction = pycolmap.Reconstruction(str(folder))
        assert reconstruction.num_reg_images() == scene.num_frames
        assert len(reconstruction.points3D) == len(points["xyz"])
        for image in reconstruction.images.values():
            frame = int(Path(image.name).stem)
            w2c = np.eye(4)
            w2c[:3] = image.cam_from_world().matrix()
            np.testing.assert_allclose(w2c, scene.w2c[frame], atol=1e-6)
            np.testing.assert_allclose(reconstruction.cameras[image.camera_id].calibration_matrix(), scene.K, atol=1e-6)
    dataset = read_colmap_model(root)
    assert all(path.is_file() for path in dataset.image_paths)
    assert dataset.image_paths[3].resolve() == (work / "frames" / "images" / "000003.png").resolve()
    np.testing.assert_allclose(dataset.w2c, scene.w2c, atol=1e-6)
    read_back = read_colmap_points(root)
    np.testing.assert_allclose(read_back["xyz"], points["xyz"], atol=1e-6)
    assert len(read_back["obs_frame"]) == len(points["obs_frame"])


def test_colmap_and_nerfstudio_skip_unposed_frames(workspace, tmp_path):
    from mono4d.data.colmap import read_colmap_model
    from mono4d.data.nerfstudio import read_nerfstudio
    from mono4d.pipeline.export import export_workspace

    work, scene = workspace
    copy = tmp_path / "work"
    shutil.copytree(work / "frames", copy / "frames")
    write_cameras_output(scene, copy / "cameras", unposed=4)
    export_workspace(copy, "colmap,nerfstudio")
    dataset = read_colmap_model(copy / "export" / "colmap")
    assert [path.name for path in dataset.image_paths] == [f"{i:06d}.png" for i in range(scene.num_frames) if i != 4]
    np.testing.assert_allclose(dataset.w2c, np.delete(scene.w2c, 4, axis=0), atol=1e-6)
    nerfstudio = read_nerfstudio(copy / "export" / "nerfstudio" / "transforms.json")
    assert len(nerfstudio.image_paths) == scene.num_frames - 1
    np.testing.assert_allclose(nerfstudio.times, np.delete(np.linspace(0, 1, scene.num_frames), 4), atol=1e-9)


def test_nerfstudio_export_round_trip(workspace, tmp_path):
    from mono4d.data.nerfstudio import read_nerfstudio
    from mono4d.pipeline.export import export_workspace

    work, scene = workspace
    path = export_workspace(work, ["nerfstudio"], tmp_path / "elsewhere")["nerfstudio"][0]
    content = json.loads(path.read_text())
    assert all(not Path(frame["file_path"]).is_absolute() for frame in content["frames"])
    dataset = read_nerfstudio(path)
    np.testing.assert_allclose(dataset.K, np.broadcast_to(scene.K, dataset.K.shape), atol=1e-6)
    np.testing.assert_allclose(dataset.w2c, scene.w2c, atol=1e-6)
    for i, image_path in enumerate(dataset.image_paths):
        assert Path(image_path).resolve() == (work / "frames" / "images" / f"{i:06d}.png").resolve()
    np.testing.assert_allclose(dataset.times, np.linspace(0, 1, scene.num_frames), atol=1e-9)


def test_tracks_export(workspace, tmp_path):
    from mono4d.pipeline.export import export_workspace

    work, scene = workspace
    written = export_workspace(work, ["tracks"], tmp_path / "out")["tracks"]
    assert [path.name for path in written] == ["tracks.npz", "tracks.csv", "pairs3d.npz", "pairs3d.csv"]
    folder = tmp_path / "out" / "tracks"
    with np.load(folder / "tracks.npz") as copied, np.load(work / "tracks" / "tracks.npz") as original:
        np.testing.assert_array_equal(copied["xy"], original["xy"])
        xy, visible = original["xy"], original["visible"]
    table = np.loadtxt(folder / "tracks.csv", delimiter=",", skiprows=1)
    assert (folder / "tracks.csv").read_text().splitlines()[0] == "track_id,frame,x,y,visible"
    assert len(table) == int(np.isfinite(xy).all(axis=2).sum()) == xy.shape[0] * xy.shape[1] - 3
    track, frame = table[:, 0].astype(int), table[:, 1].astype(int)
    np.testing.assert_allclose(table[:, 2:4], xy[track, frame], atol=1e-4)
    np.testing.assert_array_equal(table[:, 4].astype(bool), visible[track, frame])
    assert not np.any((track == 0) & (frame < 3))
    pairs = np.loadtxt(folder / "pairs3d.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(pairs[:, 1], 1)
    np.testing.assert_allclose(pairs[:, 2:4], scene.tracks_xy[:, 0], atol=1e-4)
    np.testing.assert_allclose(pairs[:, 9:12], scene.tracks_xyz[:, 1], rtol=1e-5, atol=1e-5)


def test_depth_export_round_trip(workspace, tmp_path):
    from mono4d.data.images import read_gray
    from mono4d.pipeline.export import export_workspace

    work, _ = workspace
    written = export_workspace(work, ["depth"], tmp_path / "out", frames="0,3")["depth"]
    assert [path.name for path in written] == ["000000.png", "000003.png", "scale.json"]
    meta = json.loads(written[-1].read_text())
    depth = artifacts.read_aligned_depth(work / "align")
    assert meta["source"] == "align" and meta["units"] == "metric" and meta["frames"] == [0, 3]
    assert meta["scale"] == pytest.approx(max(depth[0].max(), depth[3].max()) / 65535, rel=1e-6)
    for frame, path in zip((0, 3), written):
        values = read_gray(path)
        assert values.dtype == np.uint16
        restored = values.astype(np.float64) * meta["scale"]
        valid = depth[frame] > 0
        np.testing.assert_array_equal(values == 0, ~valid)
        assert np.abs(restored[valid] - depth[frame][valid]).max() < meta["scale"]


def test_depth_export_falls_back_to_depth_stage(workspace, tmp_path):
    from mono4d.data.images import read_gray
    from mono4d.pipeline.export import export_workspace

    _, scene = workspace
    work = tmp_path / "work"
    inverse = np.where(scene.masks > 0, 0.0, 1.0 / scene.depth).astype(np.float32)
    artifacts.write_depth(work / "depth", inverse, "relative_inverse", "test")
    written = export_workspace(work, ["depth"])["depth"]
    meta = json.loads(written[-1].read_text())
    assert meta["source"] == "depth" and meta["kind"] == "relative_inverse"
    restored = read_gray(written[5]).astype(np.float64) * meta["scale"]
    valid = inverse[5] > 0
    assert np.abs(restored[valid] - inverse[5][valid]).max() < meta["scale"]
    assert np.all(restored[~valid] == 0)


def test_video_export(workspace, tmp_path, monkeypatch):
    from mono4d.pipeline import export
    from mono4d.pipeline.export import ORBIT_TIMES, export_workspace, render_rgb
    from mono4d.stages.train import load_trained

    work, scene = workspace
    monkeypatch.setattr(export, "ORBIT_FRAMES", 12)  # fewer renders; the path's shape does not change
    written = export_workspace(work, ["video"], tmp_path / "out", backend="torch")["video"]
    assert [path.name for path in written] == ["orbit.mp4", "time_sweep.mp4"]
    counts = {}
    for path in written:
        capture = cv2.VideoCapture(str(path))
        frames = []
        ok, image = capture.read()
        while ok and len(frames) < 1000:
            frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            ok, image = capture.read()
        capture.release()
        assert frames and frames[0].shape == (scene.height, scene.width, 3)
        counts[path.name] = frames
    assert len(counts["orbit.mp4"]) == 12 * len(ORBIT_TIMES)
    assert len(counts["time_sweep.mp4"]) == 24
    # The first orbit frame (no swing, t = 0) is the middle input camera's view at t = 0.
    model = load_trained(work / "train")
    expected = render_rgb(model, 0.0, scene.K, scene.w2c[scene.num_frames // 2], scene.width, scene.height, "torch")
    below_label = slice(scene.height // 3, None)
    difference = np.abs(counts["orbit.mp4"][0][below_label].astype(float) - expected[below_label]).mean()
    assert difference < 12.0
    # The render resembles the input frame (static background lifted from exact depth).
    assert np.abs(expected.astype(float) - scene.images[scene.num_frames // 2]).mean() < 40.0
    # Orbit frames differ from each other (the camera moves).
    quarter = counts["orbit.mp4"][3][below_label].astype(float)
    assert np.abs(quarter - counts["orbit.mp4"][0][below_label]).mean() > 3.0


def test_missing_prerequisites_name_the_stage(workspace, tmp_path):
    from mono4d.pipeline.export import export_workspace

    work, _ = workspace
    partial = tmp_path / "work"
    shutil.copytree(work / "frames", partial / "frames")
    for formats, stage in ((["ply"], "train"), (["video"], "train"), (["colmap"], "cameras"),
                           (["nerfstudio"], "cameras"), (["tracks"], "tracks"), (["depth"], "align"),
                           (["colmap", "ply"], "cameras")):
        with pytest.raises(InputError) as error:
            export_workspace(partial, formats)
        assert f"--until {stage}" in error.value.hint
    assert not (partial / "export").exists()
    with pytest.raises(ParameterError):
        export_workspace(work, ["ply", "gltf"], tmp_path / "out")
    with pytest.raises(ParameterError):
        export_workspace(work, ["ply"], tmp_path / "out", frames="0:99:0")
    with pytest.raises(InputError):
        export_workspace(tmp_path / "nowhere", ["ply"])
    assert not (tmp_path / "out").exists()


def test_exports_replace_atomically(workspace, tmp_path, monkeypatch):
    from mono4d.pipeline import export

    work, _ = workspace
    first = export.export_workspace(work, ["depth"], tmp_path / "out", frames="0:4")["depth"]
    assert len(first) == 5
    second = export.export_workspace(work, ["depth"], tmp_path / "out", frames="2")["depth"]
    assert sorted(path.name for path in (tmp_path / "out" / "depth").iterdir()) == ["000002.png", "scale.json"]
    assert second[0].is_file()

    def broken(work, out, frames):
        (out / "000000.png").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "export_depth", broken)
    with pytest.raises(RuntimeError):
        export.export_workspace(work, ["depth"], tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["depth"]
    assert sorted(path.name for path in (tmp_path / "out" / "depth").iterdir()) == ["000002.png", "scale.json"]
