"""Multi-view input and online training (issue 12): a Panoptic folder through the DAG (frames per
camera and timestep, known cameras, seg/ masks through the file backend, the multi-view
initialisation, Dynamic 3D Gaussians' online training, held-out cameras scored per camera), on a
small scene rendered in the real layout, and on the real basketball sequence when ../shared has it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mono4d.data.errors import InputError, ParameterError
from tests.conftest import shared_path

#: The rendered scene: image size, training and held-out camera ids, timesteps, and how far the
#: foreground ball moves along x per timestep (world units).
WIDTH, HEIGHT = 96, 64
TRAIN_CAMERAS = [1, 2, 3, 4, 6, 7, 8, 9]
TEST_CAMERAS = [0, 5]
TIMESTEPS = 3
BALL_STEP = 0.12
BALL_RADIUS = 0.35


def ring_camera(index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(K (3, 3), w2c (4, 4))`` of camera ``index`` of ``count`` on a ring of radius 3 at height
    1.2 above the origin (the world is y-down, as Panoptic's), looking at the origin."""
    angle = 2.0 * np.pi * index / count
    centre = np.array([3.0 * np.cos(angle), -1.2 + 0.3 * np.sin(3 * angle), 3.0 * np.sin(angle)])
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, np.array([0.0, -1.0, 0.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([right, down, forward])
    w2c[:3, 3] = -w2c[:3, :3] @ centre
    K = np.array([[80.0, 0.0, WIDTH / 2], [0.0, 80.0, HEIGHT / 2], [0.0, 0.0, 1.0]])
    return K, w2c


def scene_gaussians(timestep: int, rng: np.random.Generator) -> tuple[dict, int]:
    """The Gaussians at ``timestep`` (arrays of means, colours, scales) and how many of them, the
    first ones, are the ball: a two-coloured ball moving along +x, a checkered floor and wall."""
    ball = rng.normal(size=(600, 3))
    ball = ball / np.linalg.norm(ball, axis=1, keepdims=True) * BALL_RADIUS * rng.uniform(0.2, 1.0, (600, 1)) ** 0.33
    ball_colours = np.where(ball[:, :1] > 0, [0.9, 0.2, 0.1], [0.1, 0.3, 0.9])
    ball = ball + np.array([BALL_STEP * timestep, 0.0, 0.0])
    floor = np.column_stack([rng.uniform(-4.5, 4.5, 3000), np.full(3000, 0.6), rng.uniform(-4.5, 4.5, 3000)])
    angle = rng.uniform(0, 2 * np.pi, 4000)
    wall = np.column_stack([4.5 * np.cos(angle), rng.uniform(-3.0, 0.6, 4000), 4.5 * np.sin(angle)])
    checker = lambda a, b: ((np.floor(a) + np.floor(b)) % 2)[:, None]  # noqa: E731
    floor_colours = 0.35 + 0.4 * checker(floor[:, 0] * 1.5, floor[:, 2] * 1.5) * np.array([[1.0, 0.9, 0.6]])
    wall_colours = 0.3 + 0.5 * checker(angle * 4, wall[:, 1] * 2) * np.array([[0.5, 0.9, 0.6]])
    means = np.concatenate([ball, floor, wall])
    colours = np.concatenate([ball_colours, floor_colours, wall_colours])
    scales = np.concatenate([np.full(600, 0.06), np.full(7000, 0.15)])
    return {"means": means, "colours": colours, "scales": scales}, len(ball)


def render_scene(gaussians: dict, K: np.ndarray, w2c: np.ndarray, count: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb (H, W, 3) uint8, alpha (H, W) float)`` of the first ``count`` Gaussians (None: all)."""
    import torch

    from mono4d.models.rasterizer import rasterization

    picked = slice(None) if count is None else slice(0, count)
    means = torch.as_tensor(gaussians["means"][picked], dtype=torch.float32)
    scales = torch.as_tensor(gaussians["scales"][picked], dtype=torch.float32)[:, None].repeat(1, 3)
    quats = torch.zeros(len(means), 4)
    quats[:, 0] = 1.0
    colours, alphas, _ = rasterization(means, quats, scales, torch.full((len(means),), 0.95),
                                       torch.as_tensor(gaussians["colours"][picked], dtype=torch.float32),
                                       torch.as_tensor(w2c, dtype=torch.float32)[None],
                                       torch.as_tensor(K, dtype=torch.float32)[None], WIDTH, HEIGHT,
                                       render_mode="RGB", backgrounds=torch.zeros(1, 3))
    rgb = (colours[0].clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    return rgb, alphas[0, ..., 0].numpy()


def write_multiview_scene(root: Path, timesteps: int = TIMESTEPS, test_seg: bool = True) -> Path:
    """The scene in Dynamic 3D Gaussians' Panoptic layout: ``ims/<cam>/<t>.jpg``, ``seg/<cam>/<t>.png``
    (the ball; for the held-out cameras only with ``test_seg``), ``train_meta.json`` and
    ``test_meta.json``. Returns ``root``."""
    from mono4d.data.images import write_gray, write_rgb

    count = len(TRAIN_CAMERAS) + len(TEST_CAMERAS)
    cameras = {camera: ring_camera(camera, count) for camera in TRAIN_CAMERAS + TEST_CAMERAS}
    for camera in cameras:
        (root / "ims" / str(camera)).mkdir(parents=True)
        (root / "seg" / str(camera)).mkdir(parents=True)
    for t in range(timesteps):
        gaussians, ball = scene_gaussians(t, np.random.default_rng(0))
        for camera, (K, w2c) in cameras.items():
            rgb, _ = render_scene(gaussians, K, w2c)
            _, ball_alpha = render_scene(gaussians, K, w2c, ball)
            write_rgb(root / "ims" / str(camera) / f"{t:06d}.jpg", rgb, jpeg_quality=98)
            if camera in TRAIN_CAMERAS or test_seg:
                write_gray(root / "seg" / str(camera) / f"{t:06d}.png", np.where(ball_alpha > 0.5, 255, 0).astype(np.uint8))
    for name, ids in (("train_meta.json", TRAIN_CAMERAS), ("test_meta.json", TEST_CAMERAS)):
        meta = {"w": WIDTH, "h": HEIGHT, "k": [[cameras[c][0].tolist() for c in ids]] * timesteps,
                "w2c": [[cameras[c][1].tolist() for c in ids]] * timesteps,
                "fn": [[f"{c}/{t:06d}.jpg" for c in ids] for t in range(timesteps)], "cam_id": [ids] * timesteps}
        (root / name).write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def multiview_root(tmp_path_factory) -> Path:
    return write_multiview_scene(tmp_path_factory.mktemp("panoptic") / "scene")


def test_panoptic_folder_brings_its_settings(multiview_root):
    from mono4d.pipeline.config import input_settings, load_config

    for source in (multiview_root, multiview_root / "train_meta.json"):
        settings = input_settings(source)
        assert settings["cameras.mode"] == "known" and settings["train.mode"] == "online"
        assert settings["cameras.known_path"] == str(multiview_root.resolve())
        assert settings["masks.mask_path"] == str((multiview_root / "seg").resolve())
    config = load_config("cpu", ["train.iterations=7"], source=multiview_root)
    assert config.params["masks"].backend == "file" and config.params["init"].mode == "multiview"
    assert config.sources["train.mode"] == "input" and config.params["train"].iterations == 7
    assert input_settings(multiview_root / "ims") == {}


def test_frames_cameras_and_masks_per_camera_and_timestep(multiview_root, tmp_path):
    from mono4d.data.artifacts import read_camera_views, read_cameras, read_masks
    from mono4d.stages import cameras, frames, masks

    for stage in ("frames", "cameras", "masks"):
        (tmp_path / stage).mkdir()
    frames.run({"source": multiview_root}, frames.Params(timesteps=2), tmp_path / "frames")
    meta = frames.read_frames_meta(tmp_path / "frames")
    per_step = len(TRAIN_CAMERAS) + len(TEST_CAMERAS)
    assert meta["num_frames"] == 2 * per_step and meta["views"]["timestep"] == [0] * per_step + [1] * per_step
    assert meta["views"]["camera"][:per_step] == TRAIN_CAMERAS + TEST_CAMERAS
    assert meta["holdout_frames"] == [8, 9, 18, 19] and meta["source_files"][9] == "5/000000.jpg"
    np.testing.assert_allclose(meta["times"][per_step], 0.5)  # t / (3 - 1)
    cameras.run({"frames": tmp_path / "frames"},
                cameras.Params(mode="known", known_path=str(multiview_root)), tmp_path / "cameras")
    K, w2c, _ = read_cameras(tmp_path / "cameras")
    camera_ids, timesteps = read_camera_views(tmp_path / "cameras")
    assert camera_ids.tolist() == meta["views"]["camera"] and timesteps.tolist() == meta["views"]["timestep"]
    expected_K, expected_w2c = ring_camera(5, per_step)
    np.testing.assert_allclose(w2c[19], expected_w2c) and np.testing.assert_allclose(K[19], expected_K)
    masks.run({"frames": tmp_path / "frames"}, masks.Params(backend="file", mask_path=str(multiview_root / "seg")),
              tmp_path / "masks")
    labels = read_masks(tmp_path / "masks")
    for frame in (0, 9, 13):  # training and held-out cameras: the ball's pixels
        _, ball_alpha = render_scene(*scene_gaussians(frame // per_step, np.random.default_rng(0))[:1],
                                     *ring_camera(meta["views"]["camera"][frame], per_step),
                                     count=scene_gaussians(0, np.random.default_rng(0))[1])
        assert ((labels[frame] > 0) == (ball_alpha > 0.5)).mean() > 0.99


def test_train_cameras_keep_some_training_cameras_and_every_held_out_one(multiview_root, tmp_path):
    from mono4d.stages import frames

    (tmp_path / "frames").mkdir()
    figures = frames.run({"source": multiview_root}, frames.Params(timesteps=1, train_cameras="4,2"), tmp_path / "frames")
    meta = frames.read_frames_meta(tmp_path / "frames")
    assert meta["views"]["camera"] == [2, 4, 0, 5] and meta["holdout_frames"] == [2, 3]
    assert figures["num_cameras"] == 4 and meta["dataset"]["train_cameras"] == [4, 2]
    with pytest.raises(InputError, match=r"cameras \[11\]"):
        frames.run({"source": multiview_root}, frames.Params(train_cameras="11"), tmp_path / "frames")
    with pytest.raises(ParameterError, match="comma-separated"):
        frames.Params(train_cameras="one").validate()


def test_multiview_box_and_foreground_candidates():
    from mono4d.stages.init_multiview import camera_box, foreground_candidates

    cameras = [ring_camera(index, 10) for index in range(10)]
    K, w2c = np.array([c[0] for c in cameras]), np.array([c[1] for c in cameras])
    low, high = camera_box(w2c)
    assert np.all(low < [-3.0, -1.5, -3.0]) and np.all(high > [3.0, 0.0, 3.0])  # the ball at y = 0 is inside
    foreground = np.zeros((10, HEIGHT, WIDTH), bool)
    foreground[:, HEIGHT // 2 - 2:HEIGHT // 2 + 2, WIDTH // 2 - 2:WIDTH // 2 + 2] = True  # the image centres
    points = foreground_candidates(foreground, K, w2c, (low, high), 2000, np.random.default_rng(0))
    assert 500 < len(points) <= 2000 and np.all((points >= low) & (points <= high))
    # every candidate lies on a ray through the centre pixels of some camera: near the ring's axis plane
    from mono4d.data.geometry import project_points

    on_centre = np.zeros(len(points), bool)
    for view in range(10):
        uv, depth = project_points(K[view], w2c[view], points)
        on_centre |= (depth > 0) & (np.abs(uv - [WIDTH / 2, HEIGHT / 2]) <= 2.5).all(axis=1)
    assert on_centre.all()


def test_held_out_cameras_without_masks_are_static_with_a_note(tmp_path):
    from mono4d.stages import frames, masks

    root = write_multiview_scene(tmp_path / "scene", timesteps=1, test_seg=False)
    for stage in ("frames", "masks"):
        (tmp_path / stage).mkdir()
    frames.run({"source": root}, frames.Params(), tmp_path / "frames")
    figures = masks.run({"frames": tmp_path / "frames"}, masks.Params(backend="file", mask_path=str(root / "seg")),
                        tmp_path / "masks")
    assert any("2 of 10 frames have no mask" in note for note in figures["notes"])


def test_online_mode_needs_multiview_input_and_rejects_resume():
    from mono4d.models.online import optimize_online
    from mono4d.models.trainer import TrainingData
    from mono4d.stages.train import Params

    with pytest.raises(ParameterError, match="online"):
        Params(mode="online", resume_from="/tmp/x.pt").validate()
    with pytest.raises(ParameterError, match="train.mode"):
        Params(mode="sideways").validate()
    data = TrainingData(images=None, K=None, w2c=None, times=np.zeros(2), train_frames=[0, 1], eval_frames=[],
                        scene_scale=1.0, eval_background=None)
    with pytest.raises(InputError, match="multi-view"):
        optimize_online(None, data, Params(mode="online"), "cpu", [])


def test_trajectory_pose_interpolates_between_timesteps():
    import torch

    from mono4d.models.gaussians import trajectory_pose

    means = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [1.0, 2.0, 0]]])
    half_turn = [np.cos(np.pi / 4), 0.0, 0.0, np.sin(np.pi / 4)]  # 90 degrees about z
    quats = torch.tensor([[[1.0, 0, 0, 0], half_turn, [-h for h in half_turn]]])
    times = [0.0, 0.5, 1.0]
    at, rotation = trajectory_pose(means, quats, times, 0.25)
    torch.testing.assert_close(at, torch.tensor([[0.5, 0.0, 0.0]]))
    expected = torch.nn.functional.normalize(torch.tensor([[1 + half_turn[0], 0, 0, half_turn[3]]]), dim=-1)
    torch.testing.assert_close(rotation, expected)  # 45 degrees about z
    at, rotation = trajectory_pose(means, quats, times, 0.75)  # the sign flip of the last key is ignored
    torch.testing.assert_close(rotation.abs(), torch.tensor([half_turn]).abs())
    torch.testing.assert_close(trajectory_pose(means, quats, times, 1.0)[0], torch.tensor([[1.0, 2.0, 0.0]]))
    torch.testing.assert_close(trajectory_pose(means, quats, times, -1.0)[0], torch.tensor([[0.0, 0.0, 0.0]]))


def test_velocity_start_continues_the_motion():
    import torch

    from mono4d.models.online import velocity_start

    means = [torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.1, 0.0, 0.0]])]
    quats = [torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0.0, 0.0]]))]
    start_means, start_quats = velocity_start(means, quats)
    torch.testing.assert_close(start_means, torch.tensor([[0.2, 0.0, 0.0]]))
    assert float(start_quats[0, 1]) > float(quats[1][0, 1]) and abs(float(start_quats.norm()) - 1.0) < 1e-6
    torch.testing.assert_close(velocity_start(means[:1], quats[:1])[0], means[0])


@pytest.mark.slow
def test_online_pipeline_on_the_rendered_scene(multiview_root, tmp_path):
    """``mono4d run`` of the folder: online training over 3 timesteps, held-out cameras scored per
    camera (masked and unmasked), 6-DOF trajectories that follow the ball, the seg masks used."""
    from mono4d.pipeline.cli import format_heldout
    from mono4d.pipeline.export import export_workspace
    from mono4d.pipeline.runner import run_pipeline

    summary = run_pipeline(tmp_path / "work", multiview_root, preset="cpu",
                           overrides=["train.iterations=120", "train.online_fraction=0.25", "train.downscale=1",
                                      "train.lr_online_means=0.003",
                                      "init.hull_candidates=60000", "init.max_static=6000", "init.max_dynamic=1500",
                                      "init.sh_degree=0", "train.export_ply=false"])
    ran = {outcome.stage: outcome for outcome in summary.outcomes}
    assert list(ran) == ["frames", "masks", "cameras", "init", "train"]
    assert ran["masks"].figures["backend"] == "file" and ran["masks"].figures["dynamic_fraction_mean"] > 0.02
    figures = ran["train"].figures
    assert figures["num_timesteps"] == TIMESTEPS and figures["steps_per_timestep"] == 30
    metrics = json.loads((tmp_path / "work" / "train" / "metrics.json").read_text())
    assert set(metrics["eval"]["cameras"]) == {"0", "5"}
    for camera in ("0", "5"):
        assert figures["heldout_cameras"][camera]["psnr"] > 16.0
        assert figures["heldout_cameras"][camera]["psnr_dynamic"] > 11.0
    assert "camera 5: PSNR" in format_heldout(figures)
    tracks = np.load(tmp_path / "work" / "train" / "trajectories.npz")
    assert tracks["xyz"].shape[1:] == (TIMESTEPS, 3) and tracks["quats"].shape[1:] == (TIMESTEPS, 4)
    assert len(tracks["xyz"]) == figures["num_dynamic"] > 100
    np.testing.assert_allclose(np.linalg.norm(tracks["quats"], axis=2), 1.0, atol=1e-5)
    # The ball moves BALL_STEP = 0.12 along +x per timestep; 30 steps per timestep let its Gaussians
    # follow only part of it (measured: median 0.0071 per timestep along x, 0.0006 and -0.0002 along
    # y and z): they move the right way, not the whole way.
    step = np.median(tracks["xyz"][:, -1] - tracks["xyz"][:, 0], axis=0) / (TIMESTEPS - 1)
    assert step[0] > 0.004 and np.abs(step[1:]).max() < 0.3 * step[0]
    written = export_workspace(tmp_path / "work", "tracks")["tracks"]  # no tracks stage: the Gaussians' tracks
    table = np.loadtxt(tmp_path / "work" / "export" / "tracks" / "gaussian_trajectories.csv", delimiter=",", skiprows=1)
    assert {path.name for path in written} == {"gaussian_trajectories.npz", "gaussian_trajectories.csv"}
    assert table.shape == (len(tracks["xyz"]) * TIMESTEPS, 9)
    np.testing.assert_allclose(table[TIMESTEPS - 1, 2:5], tracks["xyz"][0, -1], rtol=1e-5)


@pytest.mark.slow
def test_basketball_online_first_timesteps(tmp_path):
    """The real sequence: first 5 timesteps at half resolution, online, held-out cameras 0, 10,
    15, 30 scored (they have no seg masks: unmasked scores only)."""
    from mono4d.pipeline.runner import run_pipeline

    root = shared_path("panoptic/basketball")
    summary = run_pipeline(tmp_path / "work", root, preset="cpu",
                           overrides=["frames.timesteps=5", "frames.max_side=320", "train.iterations=200",
                                      "train.online_fraction=0.1", "init.hull_candidates=100000",
                                      "train.export_ply=false"])
    figures = summary.outcomes[-1].figures
    assert figures["num_timesteps"] == 5 and set(figures["heldout_cameras"]) == {"0", "10", "15", "30"}
    assert figures["psnr_heldout"] > 15.0
    tracks = np.load(tmp_path / "work" / "train" / "trajectories.npz")
    assert tracks["xyz"].shape == (figures["num_dynamic"], 5, 3)


def test_per_timestep_poses_survive_saving_layer_edits_and_rendering(tmp_path):
    import torch

    from mono4d.models.deformation import DeformationField
    from mono4d.models.gaussians import SceneModel, create_params, gaussians_at, load_model, save_model
    from mono4d.models.layers import duplicate_layer, remove_layer

    means = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    params, variables = create_params(means, torch.full((3, 3), 0.5), torch.full((3, 3), 0.1),
                                      torch.tensor([True, True, False]), 0, 0.5, torch.tensor([1, 2, 0]))
    shift = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    variables.update(trajectory_means=means[:, None] + shift[None] * torch.tensor([1.0, 1.0, 0.0])[:, None, None],
                     trajectory_quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(3, 2, 1), trajectory_times=[0.0, 1.0])
    model = SceneModel(params, variables, DeformationField(), {"labels": {"0": "background", "1": "a", "2": "b"}})
    save_model(tmp_path / "m.pt", model)
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.variables["trajectory_times"] == [0.0, 1.0]
    at_end = gaussians_at(loaded.params, loaded.variables, loaded.field, 1.0)
    torch.testing.assert_close(at_end["means"][:2, 0], torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(at_end["means"][2], means[2])  # static: where it was
    without, _ = remove_layer(loaded, "object_1")
    assert without.variables["trajectory_means"].shape == (2, 2, 3) and without.variables["trajectory_times"] == [0.0, 1.0]
    copied, _ = duplicate_layer(loaded, "object_2", [0.0, 3.0, 0.0])
    moved = gaussians_at(copied.params, copied.variables, copied.field, 1.0)["means"]
    torch.testing.assert_close(moved[3], torch.tensor([1.5, 3.0, 2.0]))  # the copy follows its poses, offset
