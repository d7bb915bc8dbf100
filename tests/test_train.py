"""Train stage on the CI synthetic scene, driven by ground truth in the stage formats (GT cameras,
GT depth as aligned depth, GT masks, GT 3D flow pairs and tracks): held-out PSNR, the effect of
the ordinal depth loss, resuming, the exports, and D-NeRF folders through the pipeline."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from mono4d.data.errors import InputError, ParameterError
from tests.conftest import shared_path
from tests.test_init import write_ground_truth_stages

#: A small but dense init: 16k Gaussians reach > 22 dB on held-out frames within ~120 steps.
TEST_INIT = dict(max_static=12000, max_dynamic=4000, fit_iterations=200, fit_batch=2048, sh_degree=1)
QUICK = dict(make_videos=False, export_ply=False, eval_fraction=0.0, densify=False)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def stage_inputs(synthetic_scene, synthetic_frames_dir, tmp_path_factory) -> dict[str, Path]:
    from mono4d.stages import init

    inputs = write_ground_truth_stages(synthetic_scene, synthetic_frames_dir, tmp_path_factory.mktemp("gt_stages"))
    init_dir = tmp_path_factory.mktemp("init")
    init.run(inputs, init.Params(**TEST_INIT), init_dir)
    return {**inputs, "init": init_dir}


@pytest.fixture(scope="module")
def trained(stage_inputs, tmp_path_factory):
    from mono4d.stages import train

    out = tmp_path_factory.mktemp("train")
    resume = tmp_path_factory.mktemp("resume") / "state.pt"
    params = train.Params(iterations=120, eval_fraction=0.5, densify=False, ply_every=6, resume_from=str(resume))
    return out, train.run(stage_inputs, params, out), resume


def test_heldout_psnr_above_22db(trained):
    out, figures, _ = trained
    assert figures["psnr_heldout"] > 22.0, figures
    assert figures["psnr_train"] > 22.0 and figures["ssim_heldout"] > 0.6
    assert figures["psnr_dynamic_heldout"] > 18.0  # the moving cube and blob are reconstructed too
    assert figures["depth_order_heldout"] > 0.95
    assert figures["lpips"] is None and any("LPIPS" in note for note in figures["notes"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]["frames"]) == {"4", "12", "20"}
    assert metrics["eval"]["mean"]["psnr"] == pytest.approx(figures["psnr_heldout"])


def test_train_outputs_exist_and_parse(trained, synthetic_scene):
    from mono4d.data.ply import read_ply
    from mono4d.stages.train import load_trained

    out, figures, resume = trained
    model = load_trained(out)
    assert model.num_gaussians == figures["num_gaussians"] and model.meta["stage"] == "train"
    curves = json.loads((out / "curves.json").read_text())
    assert curves["step"][0] == 0 and curves["step"][-1] == 119 and len(curves["loss"]) == len(curves["step"])
    assert curves["eval_step"] == [60, 119] and "ordinal" in curves["parts"]
    assert (out / "curves.png").is_file()
    for split, frames in (("heldout", [4, 12, 20]), ("train", [0, 23])):
        for frame in frames:
            depth = np.load(out / "renders" / split / "depth" / f"{frame:06d}.npy")
            assert depth.shape == (synthetic_scene.height, synthetic_scene.width)
            assert (out / "renders" / split / "rgb" / f"{frame:06d}.png").is_file()
    assert (out / "renders" / "heldout" / "compare" / "000012.png").is_file()
    for video in ("novel_view.mp4", "time_sweep.mp4"):
        capture = cv2.VideoCapture(str(out / video))
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 24
        capture.release()
    plys = sorted((out / "ply").glob("*.ply"))
    assert [p.name for p in plys] == ["000000.ply", "000006.ply", "000012.ply", "000018.ply"]
    gaussians = read_ply(plys[1])
    assert len(gaussians["means"]) == model.num_gaussians and gaussians["sh_rest"].shape[1] == 3
    trajectories = np.load(out / "trajectories.npz")
    assert trajectories["xyz"].shape == (model.num_dynamic, 24, 3) and figures["num_trajectories"] == model.num_dynamic
    # dynamic Gaussians really move (the cube flies 0.6 m), static ones are not in the file
    travel = np.linalg.norm(trajectories["xyz"][:, -1] - trajectories["xyz"][:, 0], axis=1)
    assert np.median(travel) > 0.2
    assert resume.is_file()


def test_ordinal_loss_improves_depth_order(synthetic_scene, synthetic_frames_dir, stage_inputs, tmp_path_factory):
    """With a prior depth that has the right order but wrong values (a monotonic distortion, as
    monocular depth has), the ordinal loss makes the rendered depth order agree with the truth
    far more often than photometric training alone."""
    from mono4d.models.losses import ordering_accuracy
    from mono4d.stages import init, train

    align = tmp_path_factory.mktemp("distorted_align")
    (align / "depth").mkdir()
    for i, depth in enumerate(synthetic_scene.depth):
        np.save(align / "depth" / f"{i:06d}.npy", (1.5 * (depth / 1.5) ** 1.6).astype(np.float32))
    inputs = {**stage_inputs, "align": align}
    inputs["init"] = tmp_path_factory.mktemp("distorted_init")
    init.run(inputs, init.Params(**{**TEST_INIT, "max_static": 3000, "max_dynamic": 1500, "fit_iterations": 100}),
             inputs["init"])
    accuracy = {}
    for weight in (0.0, 0.3):
        out = tmp_path_factory.mktemp(f"ordinal_{weight}")
        train.run(inputs, train.Params(iterations=150, downscale=2, ordinal_weight=weight, **QUICK), out)
        scores = []
        for frame in (4, 12, 20):
            rendered = np.load(out / "renders" / "heldout" / "depth" / f"{frame:06d}.npy")
            truth = cv2.resize(synthetic_scene.depth[frame], rendered.shape[::-1], interpolation=cv2.INTER_NEAREST)
            scores.append(ordering_accuracy(rendered, truth, 20000, 0.05, seed=frame))
        accuracy[weight] = float(np.mean(scores))
    assert accuracy[0.3] > accuracy[0.0] + 0.02, accuracy
    assert accuracy[0.3] > 0.95, accuracy


def test_resume_continues_from_checkpoint(stage_inputs, tmp_path):
    from mono4d.models.gaussians import load_model, save_model
    from mono4d.stages import train

    resume = tmp_path / "resume" / "state.pt"
    settings = dict(downscale=4, resume_from=str(resume), **QUICK)
    first = train.run(stage_inputs, train.Params(iterations=20, checkpoint_fraction=0.5, **settings), tmp_path / "a")
    assert first["resumed_from_step"] == 0 and resume.is_file()
    second = train.run(stage_inputs, train.Params(iterations=30, checkpoint_fraction=1 / 3, **settings),
                       tmp_path / "b")
    assert second["resumed_from_step"] == 20
    curves = json.loads((tmp_path / "b" / "curves.json").read_text())
    assert curves["step"][0] == 0 and curves["step"][-1] == 29  # one continuous history
    # a resumable state of another init output is not used
    other_init = tmp_path / "other_init"
    other_init.mkdir()
    model, _ = load_model(stage_inputs["init"] / "init.pt")
    model.meta = {**model.meta, "note": "another init"}
    save_model(other_init / "init.pt", model)
    third = train.run({**stage_inputs, "init": other_init}, train.Params(iterations=5, **settings), tmp_path / "c")
    assert third["resumed_from_step"] == 0 and any("another init output" in note for note in third["notes"])


def test_reprojection_and_priors_run(stage_inputs, tmp_path):
    from mono4d.stages import train

    params = train.Params(iterations=12, downscale=4, reprojection_weight=0.5, rigidity_weight=0.5,
                          rotation_weight=0.5, isometry_weight=0.5, log_fraction=0.0, **QUICK)
    figures = train.run(stage_inputs, params, tmp_path)
    curves = json.loads((tmp_path / "curves.json").read_text())
    for name in ("reprojection", "rigidity", "rotation", "isometry", "ordinal"):
        assert len(curves["parts"][name]) == 12 and all(math.isfinite(v) for v in curves["parts"][name])
    # GT tracks and GT geometry: reprojection errors are a small fraction of the outlier cap
    assert np.median(curves["parts"]["reprojection"]) < 0.3
    assert math.isfinite(figures["psnr_heldout"])


def test_prior_on_dynamic_follows_the_depth_kind():
    from mono4d.stages.train import ignores_dynamic_prior

    assert ignores_dynamic_prior("auto", "sfm")  # stereo interpolates moving objects from the background
    assert not ignores_dynamic_prior("auto", "relative_inverse") and not ignores_dynamic_prior("auto", None)
    assert ignores_dynamic_prior("ignore", "metric") and not ignores_dynamic_prior("use", "sfm")


def test_train_rejects_bad_params_and_inputs(stage_inputs, tmp_path):
    from mono4d.stages import train

    for bad in (dict(iterations=0), dict(background="green"), dict(ssim_weight=2.0), dict(downscale=1.5),
                dict(prior_on_dynamic="sometimes"), dict(near_plane=0.0)):
        with pytest.raises(ParameterError):
            train.Params(**bad).validate()
    without_tracks = {key: value for key, value in stage_inputs.items() if key != "tracks"}
    with pytest.raises(InputError):
        train.run(without_tracks, train.Params(reprojection_weight=1.0), tmp_path)
    with pytest.raises(InputError):
        train.run({key: value for key, value in stage_inputs.items() if key != "init"}, train.Params(), tmp_path)


def sphere_views(size: int, views: int, radius: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``views`` OpenCV cameras ``K (3, 3)``, ``w2c (V, 4, 4)`` on a circle of radius 3 around a
    sphere of ``radius`` at the origin, and its silhouettes ``(V, size, size)`` bool."""
    from mono4d.data.geometry import intrinsics_matrix

    focal = 1.25 * size
    K = intrinsics_matrix(focal, focal, size / 2, size / 2)
    poses, masks = [], []
    for angle in np.linspace(0, 2 * np.pi, views, endpoint=False):
        centre = np.array([3.0 * np.sin(angle), 0.3, 3.0 * np.cos(angle)])
        forward = -centre / np.linalg.norm(centre)
        right = np.cross(forward, [0.0, -1.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        rotation = np.stack([right, down, forward])
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = rotation, -rotation @ centre
        poses.append(w2c)
        rows, cols = np.mgrid[0:size, 0:size]
        rays = np.stack([(cols + 0.5 - size / 2) / focal, (rows + 0.5 - size / 2) / focal,
                         np.ones_like(rows, float)], -1)
        rays = rays @ rotation / np.linalg.norm(rays, axis=-1, keepdims=True)
        closest = np.linalg.norm(np.cross(rays, -centre), axis=-1)
        masks.append(closest < radius)
    return K, np.array(poses), np.array(masks)


def write_dnerf_folder(root: Path, size: int = 96, views: int = 12, test_every: int = 6) -> Path:
    """A small D-NeRF folder: RGBA views of a red sphere (transparent around it), every
    ``test_every``-th view in the test split, the others in train (and val, unused), times
    ``i / (views - 1)``, Blender cameras."""
    from mono4d.data.geometry import w2c_to_opengl_c2w

    K, w2c, masks = sphere_views(size, views)
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for view in range(views):
        split = "test" if view % test_every == test_every // 2 else "train"
        (root / split).mkdir(parents=True, exist_ok=True)
        bgra = np.zeros((size, size, 4), np.uint8)
        bgra[..., 2], bgra[..., 3] = 200, masks[view] * 255
        cv2.imwrite(str(root / split / f"r_{view:03d}.png"), bgra)
        splits[split].append({"file_path": f"./{split}/r_{view:03d}", "time": view / (views - 1),
                              "transform_matrix": w2c_to_opengl_c2w(w2c[view]).tolist()})
    splits["val"] = splits["test"]
    angle_x = 2 * math.atan(size / 2 / K[0, 0])
    for split, frames in splits.items():
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle_x, "frames": frames}))
    return root


def test_silhouette_init_points_follow_the_silhouettes():
    """The silhouette initialisation (init.mode=silhouette, the D-NeRF path) keeps random points
    inside the silhouettes' visual hull."""
    from mono4d.stages import init
    from mono4d.stages.init_silhouette import silhouette_model

    radius = 0.6
    K, w2c, masks = sphere_views(64, 12, radius)
    rgb = np.zeros((12, 64, 64, 3), np.uint8)
    rgb[..., 0] = 200
    params = init.Params(mode="silhouette", max_dynamic=800, hull_candidates=40000, hull_half_size=1.5)
    model = silhouette_model(masks.astype(np.uint8) * 255, rgb, np.repeat(K[None], 12, 0), w2c, params, {})
    points = model.params["means"].detach().numpy()
    assert 200 <= len(points) <= 800 and bool(model.variables["is_dynamic"].all())
    assert np.percentile(np.linalg.norm(points, axis=1), 95) < radius * 1.25
    assert np.allclose(model.params["sh0"].detach().numpy()[:, 0, 0], (200 / 255 - 0.5) / 0.28209479177387814, atol=1e-3)


def test_dnerf_folder_trains_through_the_pipeline(tmp_path):
    """`mono4d run DNERF_FOLDER`: frames from its train and test images over white, the folder's
    cameras (cameras.mode=known), the silhouette init and train, nothing else; the test split is
    held out and scored."""
    from mono4d.data.artifacts import read_cameras
    from mono4d.data.dnerf import read_dnerf_splits
    from mono4d.pipeline import dag
    from mono4d.pipeline.config import load_config
    from mono4d.pipeline.runner import run_pipeline
    from mono4d.stages.frames import load_alpha, load_frames, read_frames_meta

    root = write_dnerf_folder(tmp_path / "sphere")
    settings = ["train.iterations=60", "train.make_videos=false", "train.export_ply=false", "train.densify=false",
                "init.max_dynamic=1500", "init.hull_candidates=60000"]
    config = load_config("cpu", settings, source=root)
    assert dag.closure("train", config) == ["frames", "cameras", "init", "train"]
    assert config.params["cameras"].known_path == str(root.resolve()) and config.sources["cameras.mode"] == "input"
    assert config.params["init"].max_dynamic == 1500 and config.sources["init.max_dynamic"] == "--set"
    summary = run_pipeline(tmp_path / "work", root, preset="cpu", overrides=settings)
    assert summary.ran == ["frames", "cameras", "init", "train"]
    work = tmp_path / "work"
    meta = read_frames_meta(work / "frames")
    assert meta["num_frames"] == 12 and meta["holdout_frames"] == [10, 11] and meta["dataset"]["splits"] == {
        "train": 10, "test": 2}
    images, alpha = load_frames(work / "frames"), load_alpha(work / "frames")
    assert (images[alpha == 0] == 255).all() and (images[alpha == 255] == [200, 0, 0]).all()  # over white
    dataset = read_dnerf_splits(root)
    K, w2c, _ = read_cameras(work / "cameras")
    np.testing.assert_allclose(w2c, dataset.w2c, atol=1e-9)
    np.testing.assert_allclose(K, dataset.K, atol=1e-9)
    assert np.allclose(meta["times"], dataset.times)
    figures = json.loads((work / "train" / "manifest.json").read_text())["figures"]
    metrics = json.loads((work / "train" / "metrics.json").read_text())
    assert set(metrics["eval"]["frames"]) == {"10", "11"}
    # measured 17.5 dB after these 60 steps (the hull's fuzzy edges are still being carved); a
    # render of the white background alone scores 8.6 dB on these views
    assert figures["psnr_heldout"] > 15.0, figures
    assert "depth_order_heldout" not in figures and "psnr_dynamic_heldout" not in figures  # no depth, no masks


@pytest.mark.slow
def test_dnerf_mutant_trains(tmp_path):
    """The D-NeRF mutant through `mono4d run` at 200 x 200: 300 steps, 8000 initial Gaussians."""
    from mono4d.pipeline.runner import run_pipeline

    root = shared_path("dnerf/mutant")
    settings = ["frames.max_side=200", "train.iterations=300", "train.refine_start_fraction=0.34",
                "train.refine_every_fraction=0.34", "train.eval_fraction=0.0", "train.make_videos=false",
                "train.export_ply=false", "init.max_dynamic=8000"]
    summary = run_pipeline(tmp_path / "work", root, preset="cpu", overrides=settings)
    assert summary.ran == ["frames", "cameras", "init", "train"]
    figures = summary.outcomes[-1].figures
    assert figures["psnr_heldout"] > 22.0, figures
    metrics = json.loads((tmp_path / "work" / "train" / "metrics.json").read_text())
    assert len(metrics["eval"]["frames"]) == 20


def test_schedule_is_relative_to_iterations():
    """Every step-based setting scales with the budget: one number changes the whole schedule,
    and the cpu preset's budget grows the SH degree to its maximum and densifies."""
    from mono4d.models.trainer import make_schedule, sh_degree_at
    from mono4d.pipeline.config import load_config
    from mono4d.stages.train import Params

    long, short = make_schedule(Params(iterations=3000)), make_schedule(Params(iterations=500))
    for name in ("refine_start", "refine_stop", "refine_every", "sh_degree_every", "log_every", "eval_every",
                 "checkpoint_every"):
        assert getattr(long, name) == pytest.approx(6 * getattr(short, name), abs=3), name
    assert (short.refine_start, short.refine_stop, short.refine_every) == (75, 375, 25)
    assert short.opacity_reset_every == 0
    assert make_schedule(Params(opacity_reset_fraction=0.3)).opacity_reset_every == 900
    assert make_schedule(Params(iterations=10, log_fraction=0.0)).log_every == 1
    cpu = load_config(preset="cpu").params["train"]
    schedule = make_schedule(cpu)
    assert sh_degree_at(cpu.iterations // 2, schedule, 3) == 3  # full SH degree by half the cpu budget
    refinements = [step for step in range(schedule.refine_start + 1, schedule.refine_stop)
                   if step % schedule.refine_every == 0]
    assert len(refinements) >= 8, refinements
    with pytest.raises(ParameterError):
        Params(refine_start_fraction=0.8).validate()
    with pytest.raises(ParameterError):
        Params(eval_fraction=1.5).validate()


def test_sh_degree_grows_to_the_maximum_in_a_short_run(trained):
    """The 120-step fixture run used its model's full SH degree (1) after 10 % of the steps, and
    the higher-order coefficients were trained (they start at 0)."""
    from mono4d.stages.train import load_trained

    out, _, _ = trained
    curves = json.loads((out / "curves.json").read_text())
    degrees = dict(zip(curves["step"], curves["sh_degree"]))
    assert degrees[0] == 0 and degrees[12] == 1 and curves["sh_degree"][-1] == 1
    model = load_trained(out)
    assert model.sh_degree == 1 and float(model.params["shN"].detach().abs().mean()) > 1e-4


def test_init_opacities_survive_until_the_first_reset(stage_inputs, tmp_path, monkeypatch):
    """With densification and opacity resets on, training starts from the init stage's
    opacities (no reset at step 0, whatever gsplat does there) and resets them where scheduled."""
    import torch

    from mono4d.models import trainer
    from mono4d.stages import init, train

    seen: dict[int, float] = {}
    original = trainer.evaluate

    def spy(model, data, frames, params):
        seen[len(seen)] = float(torch.sigmoid(model.params["opacities"].detach()).median())
        return original(model, data, frames, params)

    monkeypatch.setattr(trainer, "evaluate", spy)
    params = train.Params(iterations=20, downscale=4, eval_fraction=0.1, opacity_reset_fraction=0.5,
                          refine_every_fraction=0.25, make_videos=False, export_ply=False)
    train.run(stage_inputs, params, tmp_path)
    initial = init.Params(**TEST_INIT).init_opacity
    # the loop's evaluations after steps 2, 4, ..., 18: the reset follows step 10
    assert abs(seen[0] - initial) < 0.05 and abs(seen[3] - initial) < 0.1, seen
    assert seen[4] <= 0.0101, seen  # step 10: clamped to twice gsplat's pruning threshold (0.005)


def test_exposure_affine_recovers_per_frame_exposure(synthetic_frames_dir, stage_inputs, tmp_path):
    """Frames whose exposure drifts (each frame's colours scaled by a smooth per-frame gain):
    the per-frame colour affine learns the gains (up to one common factor, which the colours
    absorb) and scores held-out frames, whose gains it interpolates, better than training without."""
    import shutil

    from mono4d.data.images import read_rgb, write_rgb
    from mono4d.stages import train
    from mono4d.stages.frames import read_frames_meta
    from mono4d.stages.train import load_trained

    frames = tmp_path / "frames"
    shutil.copytree(synthetic_frames_dir, frames)
    files = read_frames_meta(frames)["files"]
    gains = np.exp(0.25 * np.sin(2 * np.pi * np.arange(len(files)) / len(files)))
    for name, gain in zip(files, gains):
        image = read_rgb(frames / name).astype(np.float32) * gain
        write_rgb(frames / name, np.clip(np.rint(image), 0, 255).astype(np.uint8))
    inputs = {**stage_inputs, "frames": frames}
    psnr = {}
    for exposure in (False, True):
        out = tmp_path / f"exposure_{exposure}"
        figures = train.run(inputs, train.Params(iterations=120, downscale=2, exposure=exposure, **QUICK), out)
        psnr[exposure] = figures["psnr_heldout"]
    assert psnr[True] > psnr[False] + 1.0, psnr
    learned = load_trained(out).exposure.detach().numpy()  # (T, 2, 3) log gain, offset
    log_gain = learned[:, 0].mean(axis=1)
    relative = log_gain - np.log(gains)
    assert np.std(relative) < 0.75 * np.std(np.log(gains)), (log_gain, np.log(gains))  # measured 0.11 vs 0.18
    assert np.abs(learned[:, 1]).max() < 0.15  # offsets stay small (measured 0.11: they absorb the clipped highlights)
