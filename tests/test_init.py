"""Init stage: the deformation fitted to 3D flow pairs and the canonical Gaussians, driven by the
synthetic scene's ground truth written in the stage formats (so the test does not depend on the
accuracy of the other stages)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mono4d.data import artifacts
from mono4d.data.errors import InputError, ParameterError

#: Frame offsets of the ground-truth 3D flow pairs (both directions are written).
PAIR_OFFSETS = (1, 2, 4, 8)
PAIRS_PER_DIRECTION = 600

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def write_ground_truth_stages(scene, frames_dir: Path, root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic scene's ground truth as the outputs of the cameras, align, masks and
    tracks stages under ``root``; returns the ``inputs`` mapping of the init/train stages."""
    rng = np.random.default_rng(seed)
    num_frames, height, width = scene.num_frames, scene.height, scene.width
    dirs = {name: root / name for name in ("cameras", "align", "masks", "tracks")}
    for path in dirs.values():
        path.mkdir(parents=True)
    artifacts.write_cameras(dirs["cameras"], np.repeat(scene.K[None], num_frames, axis=0), scene.w2c,
                            np.ones(num_frames, bool), [f"images/{i:06d}.png" for i in range(num_frames)], width, height,
                            units="metric")
    (dirs["align"] / "depth").mkdir()
    for i in range(num_frames):
        np.save(dirs["align"] / "depth" / f"{i:06d}.npy", scene.depth[i].astype(np.float32))
    artifacts.write_masks(dirs["masks"], scene.masks, {1: "cube", 2: "blob"}, "ground-truth")
    parts = {key: [] for key in ("src_xyz", "dst_xyz", "src_frame", "dst_frame", "src_xy", "dst_xy")}
    rows, cols = np.mgrid[0:height, 0:width]
    for offset in PAIR_OFFSETS:
        for i in range(num_frames - offset):
            for src, dst in ((i, i + offset), (i + offset, i)):
                flow, _ = scene.flow_between(src, dst)
                moved = scene.point_at_time(src, dst)
                dynamic = np.flatnonzero(scene.masks[src].ravel() > 0)
                static = np.flatnonzero(scene.masks[src].ravel() == 0)
                picked = np.concatenate([rng.choice(dynamic, min(PAIRS_PER_DIRECTION, len(dynamic)), replace=False),
                                         rng.choice(static, PAIRS_PER_DIRECTION // 4, replace=False)])
                r, c = rows.ravel()[picked], cols.ravel()[picked]
                src_xy = np.stack([c + 0.5, r + 0.5], axis=1)
                parts["src_xyz"].append(scene.point_at_time(src, src)[r, c])
                parts["dst_xyz"].append(moved[r, c])
                parts["src_xy"].append(src_xy)
                parts["dst_xy"].append(src_xy + flow[r, c])
                parts["src_frame"].append(np.full(len(r), src))
                parts["dst_frame"].append(np.full(len(r), dst))
    np.savez_compressed(dirs["tracks"] / "pairs3d.npz",
                        **{key: np.concatenate(value).astype(np.int32 if "frame" in key else np.float32)
                           for key, value in parts.items()})
    artifacts.write_tracks(dirs["tracks"], scene.tracks_xy.astype(np.float32), scene.tracks_visible,
                           np.zeros(len(scene.tracks_xy), np.int32))
    return {"frames": frames_dir, **dirs}


@pytest.fixture(scope="module")
def ground_truth_inputs(synthetic_scene, synthetic_frames_dir, tmp_path_factory) -> dict[str, Path]:
    return write_ground_truth_stages(synthetic_scene, synthetic_frames_dir, tmp_path_factory.mktemp("gt_stages"))


FAST_INIT = dict(max_static=3000, max_dynamic=1500, fit_iterations=300, fit_batch=2048, sh_degree=1)


@pytest.fixture(scope="module")
def init_output(ground_truth_inputs, tmp_path_factory):
    from mono4d.stages import init

    out = tmp_path_factory.mktemp("init")
    figures = init.run(ground_truth_inputs, init.Params(**FAST_INIT), out)
    return out, figures


def test_init_fits_pairs_and_builds_gaussians(init_output, synthetic_scene):
    import torch

    from mono4d.models.gaussians import gaussians_at
    from mono4d.stages import init

    out, figures = init_output
    assert (out / "init.pt").is_file() and (out / "init_view.png").is_file() and (out / "pair_residuals.png").is_file()
    assert json.loads((out / "init.json").read_text())["num_static"] == figures["num_static"]
    # the dynamic GT pairs move by centimetres to decimetres; the fitted field explains them
    assert figures["num_pairs_dynamic"] > 10000
    assert figures["pair_residual_before"] > 0.05
    assert figures["pair_residual_ratio"] < 0.1, figures  # measured 0.03
    assert 2500 <= figures["num_static"] <= 3000 and 1000 <= figures["num_dynamic"] <= 1500
    assert figures["num_holdout_frames"] == 3 and figures["num_train_frames"] == 21

    model = init.load_init(out)
    assert model.meta["holdout_frames"] == [4, 12, 20]
    assert model.num_dynamic == figures["num_dynamic"] and model.sh_degree == 1
    # static Gaussians lie on the GT surfaces: project into a training frame and compare depth
    frame = 10
    with torch.no_grad():
        state = gaussians_at(model.params, model.variables, model.field, model.meta["times"][frame])
    means = state["means"].numpy().astype(np.float64)
    cam = means @ synthetic_scene.w2c[frame][:3, :3].T + synthetic_scene.w2c[frame][:3, 3]
    uv = cam @ synthetic_scene.K.T
    x, y = uv[:, 0] / cam[:, 2], uv[:, 1] / cam[:, 2]
    inside = (cam[:, 2] > 0) & (x >= 0) & (x < synthetic_scene.width) & (y >= 0) & (y < synthetic_scene.height)
    rows, cols = y[inside].astype(int), x[inside].astype(int)
    gt = synthetic_scene.depth[frame][rows, cols]
    relative = np.abs(cam[inside, 2] - gt) / gt
    # most centres are on the visible surface (the rest are occluded from this view)
    assert np.mean(relative < 0.05) > 0.6
    dynamic = model.variables["is_dynamic"].numpy()[inside]
    on_objects = synthetic_scene.masks[frame][rows, cols] > 0
    # moved dynamic Gaussians land on the dynamic objects in this frame
    assert np.mean(on_objects[dynamic & (relative < 0.05)]) > 0.9


def test_init_voxel_downsample_respects_budget():
    from mono4d.stages.init import voxel_downsample

    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (20000, 3))
    colors = rng.uniform(0, 1, (20000, 3))
    down, down_colors = voxel_downsample(points, colors, 500)
    assert 350 <= len(down) <= 500 and down_colors.shape == down.shape
    assert np.all(down >= 0) and np.all(down <= 1)


def test_init_rejects_bad_params_and_inputs(ground_truth_inputs, tmp_path):
    from mono4d.stages import init

    with pytest.raises(ParameterError):
        init.Params(holdout_every=1).validate()
    with pytest.raises(ParameterError):
        init.Params(init_opacity=1.5).validate()
    with pytest.raises(InputError):
        init.run({key: value for key, value in ground_truth_inputs.items() if key != "tracks"}, init.Params(), tmp_path)
    with pytest.raises(InputError):
        init.load_init(tmp_path)
