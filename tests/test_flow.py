"""Flow stage: pair selection, consistency check, DIS accuracy against the synthetic scene's
ground truth, stored artifacts, the RAFT checkpoint key mapping, and a real clip."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mono4d.data import artifacts
from mono4d.data.errors import InputError, ModelUnavailableError, ParameterError
from mono4d.data.images import read_rgb, write_rgb
from mono4d.models import raft
from mono4d.stages import flow, frames
from tests.conftest import SHARED_MODELS, shared_path



def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or broken against this torch
        return False
    return True


HAS_TORCHVISION = _torchvision_imports()


# ----------------------------------------------------------------------------- pure functions

def test_select_pairs_offsets_and_counts():
    pairs = flow.select_pairs(20, max_offset=8, sparse_long_range=False)
    offsets = {j - i for i, j in pairs}
    assert offsets == {1, 2, 4, 8}
    assert len(pairs) == 19 + 18 + 16 + 12
    assert pairs == sorted(pairs)
    assert flow.select_pairs(20, max_offset=1) == [(i, i + 1) for i in range(19)]
    # sparse long range: offset o pairs start every o/2 frames; under 3T pairs whatever the cap
    sparse = flow.select_pairs(200, max_offset=64)
    assert all(i % max(1, (j - i) // 2) == 0 for i, j in sparse)
    assert len(sparse) < 3 * 200
    assert {(i, i + 1) for i in range(199)} <= set(sparse)
    assert len(flow.select_pairs(10, exhaustive=True)) == 45


def test_sample_bilinear_is_exact_on_linear_fields_and_handles_many_points():
    height, width = 30, 40
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.stack([2.0 * cols + 1.0, -0.5 * rows], axis=-1)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, width - 1, 50000).astype(np.float32)  # more than one cv2.remap row
    y = rng.uniform(0, height - 1, 50000).astype(np.float32)
    sampled = flow.sample_bilinear(field, x, y)
    assert sampled.shape == (50000, 2)
    np.testing.assert_allclose(sampled[:, 0], 2.0 * x + 1.0, atol=2.0 / 32 + 1e-4)
    np.testing.assert_allclose(sampled[:, 1], -0.5 * y, atol=0.5 / 32 + 1e-4)
    outside = flow.sample_bilinear(field, np.array([-0.5, width - 0.5, 3.0]), np.array([1.0, 1.0, 2.0]))
    assert np.isnan(outside[:2]).all() and np.isfinite(outside[2]).all()


def test_consistency_mask_detects_inconsistent_and_outgoing_pixels():
    height, width = 40, 50
    forward = np.zeros((height, width, 2), np.float32)
    forward[..., 0] = 3.0  # everything moves 3 px right
    backward = -forward.copy()
    backward[10:20, 20:30] = (5.0, 5.0)  # frame j disagrees here: frame i pixels landing there fail
    valid = flow.consistency_mask(forward, backward, threshold=1.0, relative=0.0)
    assert not valid[:, width - 3:].any()  # x + 3 leaves the image
    assert not valid[12:18, 19:25].any()  # targets inside the corrupted block
    assert valid[30:, :40].all() and valid[:10, :40].all()


def test_motion_boundaries_mark_only_flow_steps():
    flow_field = np.zeros((30, 40, 2), np.float32)
    flow_field[:, 20:, 0] = 4.0  # a moving object on the right half
    flow_field[..., 1] = 0.03 * np.arange(40)[None, :]  # smooth (zoom-like) flow is not a boundary
    boundary = flow.motion_boundaries(flow_field, threshold=0.1, relative=0.1)
    assert boundary[:, 18:22].all()
    assert not boundary[:, :16].any() and not boundary[:, 24:].any()


def test_params_validation():
    flow.Params().validate()
    bad = [dict(backend="farneback"), dict(dis_preset="slow"), dict(max_offset=0), dict(fb_threshold=0.0),
           dict(fb_relative=-1.0), dict(batch_size=0), dict(device="tpu"), dict(raft_model=""),
           dict(dis_finest_scale=-2), dict(dis_blur=float("nan"))]
    for values in bad:
        with pytest.raises(ParameterError):
            flow.Params(**values).validate()


def test_dis_auto_finest_scale_keeps_detail_on_small_frames():
    engine = flow.DisFlow("medium")  # the medium preset stops at half resolution
    assert engine.finest_level(144, 192) == 0
    assert engine.finest_level(540, 960) == 1
    assert flow.DisFlow("medium", finest_scale=2).finest_level(144, 192) == 2


def test_dis_finest_level_never_shrinks_the_working_image_below_the_minimum():
    # OpenCV DIS crashes (segfault) when its finest level is smaller than 12 pixels on a side.
    assert flow.DisFlow("ultrafast", finest_scale=2).finest_level(12, 40) == 0
    assert flow.DisFlow("medium", finest_scale=8).finest_level(50, 400) == 2
    rng = np.random.default_rng(0)
    first = rng.integers(0, 255, (12, 40), dtype=np.uint8)
    forward, backward = flow.DisFlow("ultrafast", finest_scale=2)([(first, np.roll(first, 1, axis=1))])[0]
    assert forward.shape == (12, 40, 2) and np.isfinite(forward).all() and np.isfinite(backward).all()


def test_frames_too_small_for_raft_are_refused_before_loading_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        write_rgb(images / f"{index}.png", np.full((64, 96, 3), 40 * index, np.uint8))
    frames.run({"source": images}, frames.Params(), tmp_path / "frames")
    with pytest.raises(InputError, match="96x64 pixels: flow.backend=raft needs at least 121") as error:
        flow.run({"frames": tmp_path / "frames"}, flow.Params(backend="raft"), tmp_path / "flow")
    assert "flow.backend=dis" in error.value.hint


def test_missing_inputs_and_absurd_exhaustive_are_refused(tmp_path, synthetic_frames_dir):
    with pytest.raises(InputError):
        flow.run({}, flow.Params(), tmp_path)
    with pytest.raises(ParameterError, match="exhaustive"):
        flow.run({"frames": synthetic_frames_dir}, flow.Params(exhaustive=True, exhaustive_max_frames=5), tmp_path)
    with pytest.raises(InputError):
        artifacts.list_flow_pairs(tmp_path)


# ----------------------------------------------------------------------------- synthetic scene

def test_stage_outputs_parse(synthetic_flow_dir, synthetic_scene):
    meta = json.loads((synthetic_flow_dir / artifacts.FLOW_PAIRS_FILE).read_text())
    assert meta["backend"] == "dis"
    pairs = artifacts.list_flow_pairs(synthetic_flow_dir)
    num_frames = synthetic_scene.num_frames
    assert pairs == flow.select_pairs(num_frames, flow.Params().max_offset)
    with np.load(synthetic_flow_dir / artifacts.FLOW_PAIRS_DIR / "000000_000001.npz") as data:
        assert data["forward"].dtype == np.float16 and data["backward"].dtype == np.float16
        assert data["forward"].shape == (synthetic_scene.height, synthetic_scene.width, 2)
        assert data["valid_forward"].dtype == bool and data["valid_backward"].dtype == bool
    consecutive = sorted(path.name for path in (synthetic_flow_dir / flow.VIS_DIR).glob("*.png"))
    assert consecutive == [f"{artifacts.flow_pair_name(t, t + 1)}.png" for t in range(num_frames - 1)]
    assert read_rgb(synthetic_flow_dir / flow.VIS_DIR / consecutive[0]).shape == (synthetic_scene.height, synthetic_scene.width, 3)


def test_load_pair_swaps_directions(synthetic_flow_dir):
    pair = artifacts.read_flow_pair(synthetic_flow_dir, 2, 4)
    swapped = artifacts.read_flow_pair(synthetic_flow_dir, 4, 2)
    assert pair["forward"].dtype == np.float32
    np.testing.assert_array_equal(swapped["forward"], pair["backward"])
    np.testing.assert_array_equal(swapped["valid_backward"], pair["valid_forward"])
    with pytest.raises(InputError):
        artifacts.read_flow_pair(synthetic_flow_dir, 0, 3)


def test_dis_epe_and_occlusion_recall_against_ground_truth(synthetic_flow_dir, synthetic_scene):
    """Consecutive pairs: EPE on valid pixels < 1 px for every pair; the validity mask flags
    >= 70% of the pixels GT marks occluded (pooled over all pairs)."""
    scene = synthetic_scene
    occluded_total = occluded_flagged = 0
    for t in range(scene.num_frames - 1):
        pair = artifacts.read_flow_pair(synthetic_flow_dir, t, t + 1)
        valid, occluded = pair["valid_forward"], scene.flow_occluded[t]
        epe = np.linalg.norm(pair["forward"] - scene.flow[t], axis=-1)
        assert epe[valid].mean() < 1.0, f"pair {t}: EPE {epe[valid].mean():.3f} px"
        assert valid.mean() > 0.8
        occluded_total += int(occluded.sum())
        occluded_flagged += int((occluded & ~valid).sum())
    assert occluded_total > 0
    assert occluded_flagged / occluded_total >= 0.7


def test_long_range_pairs_are_usable(synthetic_flow_dir, synthetic_scene):
    """Offset-8 pairs: valid pixels still have sub-2-pixel EPE against the exact flow."""
    gt_flow, _ = synthetic_scene.flow_between(0, 8)
    pair = artifacts.read_flow_pair(synthetic_flow_dir, 0, 8)
    epe = np.linalg.norm(pair["forward"] - gt_flow, axis=-1)
    assert np.median(epe[pair["valid_forward"]]) < 2.0
    assert pair["valid_forward"].mean() > 0.5


# ----------------------------------------------------------------------------- RAFT

def _torchvision_raft_small_names() -> set[str]:
    """torchvision raft_small's parameter names, written out from its architecture: bottleneck
    encoders with layers (32, 32, 64, 96, 128|160) whose norms carry no parameters, a motion
    encoder with one correlation conv, one 3x3 ConvGRU, a flow head, no mask predictor."""
    names = set()
    for encoder in ("feature_encoder", "context_encoder"):
        convs = ["convnormrelu.0", "conv"]
        for layer in (1, 2, 3):
            for block in (0, 1):
                convs += [f"layer{layer}.{block}.convnormrelu{k}.0" for k in (1, 2, 3)]
            if layer > 1:  # stride-2 layers project their input
                convs.append(f"layer{layer}.0.downsample.0")
        names |= {f"{encoder}.{conv}.{leaf}" for conv in convs for leaf in ("weight", "bias")}
    update = [f"motion_encoder.{conv}.0" for conv in ("convcorr1", "convflow1", "convflow2", "conv")]
    update += [f"recurrent_block.convgru1.conv{gate}" for gate in "zrq"]
    update += ["flow_head.conv1", "flow_head.conv2"]
    names |= {f"update_block.{conv}.{leaf}" for conv in update for leaf in ("weight", "bias")}
    return names


def test_raft_small_checkpoint_keys_map_onto_torchvision_names():
    import torch

    path = SHARED_MODELS / "raft-small.pth"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    assert raft.is_original_raft_layout(state_dict)
    mapping = raft.map_original_raft_keys(state_dict)
    assert set(mapping) == set(state_dict)  # every key is mapped
    targets = list(mapping.values())
    assert len(set(targets)) == len(targets)  # onto unique names
    assert set(targets) == _torchvision_raft_small_names()
    renamed = {mapping[name]: tensor for name, tensor in state_dict.items()}
    assert raft.original_checkpoint_variant(renamed) == "small"
    assert tuple(renamed["feature_encoder.convnormrelu.0.weight"].shape) == (32, 3, 7, 7)
    assert tuple(renamed["context_encoder.conv.weight"].shape) == (160, 96, 1, 1)
    assert tuple(renamed["update_block.recurrent_block.convgru1.convz.weight"].shape) == (96, 242, 3, 3)
    assert tuple(renamed["update_block.motion_encoder.conv.0.weight"].shape) == (80, 128, 3, 3)


def test_raft_key_mapping_handles_the_large_layout_and_rejects_strangers():
    large = ["module.cnet.conv1.weight", "module.cnet.norm1.running_mean", "module.cnet.layer2.0.conv1.weight",
             "module.cnet.layer2.0.norm2.weight", "module.cnet.layer2.0.norm3.weight",
             "module.cnet.layer2.0.downsample.1.weight", "module.update_block.gru.convz2.bias",
             "module.update_block.encoder.convc2.weight", "module.update_block.mask.2.weight"]
    mapping = raft.map_original_raft_keys(large)
    assert mapping["module.cnet.norm1.running_mean"] == "context_encoder.convnormrelu.1.running_mean"
    assert mapping["module.cnet.layer2.0.norm2.weight"] == "context_encoder.layer2.0.convnormrelu2.1.weight"
    assert "module.cnet.layer2.0.norm3.weight" not in mapping  # alias of downsample.1
    assert mapping["module.update_block.gru.convz2.bias"] == "update_block.recurrent_block.convgru2.convz.bias"
    assert mapping["module.update_block.encoder.convc2.weight"] == "update_block.motion_encoder.convcorr2.0.weight"
    assert mapping["module.update_block.mask.2.weight"] == "mask_predictor.conv.weight"
    assert all(re.fullmatch(r"[a-z_0-9.]+", target) for target in mapping.values())
    with pytest.raises(ValueError):
        raft.map_original_raft_keys(["module.fnet.conv1.weight", "module.head.weight"])


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed: the RAFT backend can load")
def test_raft_backend_without_torchvision_names_the_fix(tmp_path, synthetic_frames_dir):
    with pytest.raises(ModelUnavailableError) as error:
        flow.run({"frames": synthetic_frames_dir}, flow.Params(backend="raft", max_offset=1), tmp_path)
    assert "torchvision" in str(error.value) and "flow.backend=dis" in error.value.hint


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
def test_raft_small_checkpoint_runs_through_the_stage(tmp_path, synthetic_frames_dir, synthetic_scene):
    path = SHARED_MODELS / "raft-small.pth"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    params = flow.Params(backend="raft", raft_model=str(path), max_offset=1)
    figures = flow.run({"frames": synthetic_frames_dir}, params, tmp_path)
    assert figures["num_pairs"] == synthetic_scene.num_frames - 1
    pair = artifacts.read_flow_pair(tmp_path, 0, 1)
    epe = np.linalg.norm(pair["forward"] - synthetic_scene.flow[0], axis=-1)
    assert np.median(epe[pair["valid_forward"]]) < 1.0
    with pytest.raises(ModelUnavailableError):
        raft.load_raft(str(tmp_path / "missing.pth"), "cpu")


# ----------------------------------------------------------------------------- real clip

@pytest.mark.slow
def test_flow_on_real_video(tmp_path):
    """First 20 frames of teddy.mp4 (handheld, hands moving a teddy bear): files parse and most
    pixels pass the forward-backward check."""
    from mono4d.stages import frames

    video = shared_path("videos/teddy.mp4")
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    frames.run({"source": video}, frames.Params(end=0.95), frames_dir)
    flow_dir = tmp_path / "flow"
    flow_dir.mkdir()
    figures = flow.run({"frames": frames_dir}, flow.Params(max_offset=1), flow_dir)
    num_frames = frames.read_frames_meta(frames_dir)["num_frames"]
    assert 19 <= num_frames <= 21
    assert figures["num_pairs"] == num_frames - 1
    assert figures["mean_valid_fraction"] > 0.5
    pair = artifacts.read_flow_pair(flow_dir, 0, 1)
    assert np.isfinite(pair["forward"]).all()
    assert pair["valid_forward"].mean() > 0.5
    assert np.abs(pair["forward"]).max() < 100
