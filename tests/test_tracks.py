"""Tracks stage: chained 2D tracks against the synthetic scene's ground-truth tracks, 3D flow
pairs against its ground-truth motion, stored artifacts and their loaders."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from mono4d.data import artifacts
from mono4d.data.errors import InputError, ParameterError
from mono4d.data.geometry import project_points
from mono4d.data.images import read_rgb
from mono4d.stages import flow, tracks

WINDOW = 16  # frames on either side of the query frame over which 2D tracks are scored


@pytest.fixture(scope="module")
def tracks_dir(synthetic_frames_dir, synthetic_flow_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The tracks stage (2D only: no align/cameras inputs) and its figures."""
    out = tmp_path_factory.mktemp("tracks")
    figures = tracks.run({"frames": synthetic_frames_dir, "flow": synthetic_flow_dir}, tracks.Params(), out)
    return out, figures


# ----------------------------------------------------------------------------- pure functions

def _constant_pair(height: int, width: int, motion: tuple[float, float]) -> dict:
    forward = np.zeros((height, width, 2), np.float32)
    forward[...] = motion
    return {"forward": forward, "backward": -forward, "valid_forward": np.ones((height, width), bool),
            "valid_backward": np.ones((height, width), bool)}


def test_chain_follows_translation_and_stops_at_borders_and_invalid_flow():
    height, width, num_frames = 40, 60, 10
    pair = _constant_pair(height, width, (2.0, 0.5))
    blocked = _constant_pair(height, width, (2.0, 0.5))
    blocked["valid_forward"][:, 30:] = False  # frame 5 -> 6 is inconsistent on the right half

    def load(i: int, j: int) -> dict:
        return blocked if i == 5 else pair

    queries = {3: np.array([[10.5, 10.5], [40.5, 20.5], [57.5, 5.5]], np.float32)}
    xy, visible, query_frame = tracks.chain_flow_tracks(load, num_frames, lambda t, live, ok: queries.get(t, []), 100)
    assert query_frame.tolist() == [3, 3, 3]
    frames = np.arange(num_frames)
    # track 0: visible everywhere (never on the blocked half at frame 5, never leaves the image)
    assert visible[0].all()
    np.testing.assert_allclose(xy[0, :, 0], 10.5 + 2.0 * (frames - 3), atol=0.05)
    np.testing.assert_allclose(xy[0, :, 1], 10.5 + 0.5 * (frames - 3), atol=0.05)
    # track 1: at frame 5 it sits on the blocked half: stops there going forward
    assert visible[1, :6].all() and not visible[1, 6:].any()
    assert np.isnan(xy[1, 6:]).all()
    # track 2: leaves the right border after frame 4; followed back to frame 0
    assert visible[2, :5].all() and not visible[2, 5:].any()
    # the query limit drops later seeds
    xy, _, _ = tracks.chain_flow_tracks(load, num_frames, lambda t, live, ok: queries.get(t, []), 2)
    assert len(xy) == 2


def test_grid_seeder_reseeds_only_empty_cells_and_shares_its_budget():
    height, width, step = 32, 48, 8
    cells = (height // step) * (width // step)
    seeder = tracks.GridSeeder(None, {0, 4}, step, 0, height, width, 10 * cells, np.random.default_rng(0))
    everything = np.ones((height, width), bool)
    first = seeder(0, np.zeros((0, 2), np.float32), everything)
    assert len(first) == cells
    assert len(seeder(1, np.zeros((0, 2), np.float32), everything)) == 0  # not a query frame
    live = first[first[:, 0] < width / 2]  # tracks on the left half survived
    again = seeder(4, live, everything)
    assert len(again) == len(first) - len(live)
    assert (again[:, 0] > width / 2).all()
    unseedable = everything.copy()
    unseedable[:, width // 2:] = False
    assert len(seeder(4, live, unseedable)) == 0
    assert seeder.capped_frames == []
    # a budget of 1.5 grids over 3 query frames: each frame gets half a grid
    thrifty = tracks.GridSeeder(None, {0, 1, 2}, step, 0, height, width, cells * 3 // 2, np.random.default_rng(0))
    counts = [len(thrifty(t, np.zeros((0, 2), np.float32), everything)) for t in range(3)]
    assert counts == [cells // 2] * 3 and thrifty.capped_frames == [0, 1, 2]


def test_prefetching_loader_returns_every_pair_asked_for_in_any_order():
    from concurrent.futures import ThreadPoolExecutor

    loaded = []

    def load(i: int, j: int) -> dict:
        loaded.append((i, j))
        return {"pair": (i, j)}

    order = [(t, t + 1) for t in range(20)]
    with ThreadPoolExecutor(2) as pool:
        get = tracks.prefetching_loader(load, order, pool, depth=3)
        asked = order[:5] + order[12:14] + [(3, 9)] + order[6:7] + order[18:]  # skips, a stranger, a step back
        assert [get(*key)["pair"] for key in asked] == asked
    assert set(asked) <= set(loaded) and len(loaded) <= len(order) + 2  # read ahead, but never the whole list twice


def test_depth_edges_and_unproject():
    depth = np.full((20, 30), 2.0, np.float32)
    depth[:, 15:] = 4.0
    depth[0, 0] = 0.0
    edges = tracks.depth_edges(depth, 0.05)
    assert edges[:, 14:16].all() and not edges[5:, :13].any() and not edges[:, 17:].any()
    assert edges[0, 0] and edges[1, 1]  # invalid depth and its neighbours
    K = np.array([[50.0, 0, 15], [0, 50.0, 10], [0, 0, 1]])
    w2c = np.eye(4)
    w2c[:3, :3] = cv2.Rodrigues(np.array([0.1, -0.2, 0.05]))[0]
    w2c[:3, 3] = (0.3, -0.1, 0.5)
    xy = np.array([[3.5, 4.5], [20.25, 11.75]])
    world = tracks.unproject(xy, np.array([2.0, 3.5]), K, w2c)
    uv, z = project_points(K, w2c, world)
    np.testing.assert_allclose(uv, xy, atol=1e-9)
    np.testing.assert_allclose(z, [2.0, 3.5], atol=1e-9)


def test_lift_keeps_valid_edge_free_pixels_within_budget():
    height, width = 30, 40
    flow_field = np.zeros((height, width, 2), np.float32)
    flow_field[..., 0] = 1.0
    valid = np.ones((height, width), bool)
    valid[:5] = False
    depth = np.full((height, width), 3.0, np.float32)
    depth[:, 20:] = 6.0
    K = np.array([[40.0, 0, 20], [0, 40.0, 15], [0, 0, 1]])
    lifted = tracks.lift_flow_pairs(flow_field, valid, depth, depth, K, np.eye(4), np.eye(4), 0.05, 10_000)
    src = lifted["src_xy"] - tracks.PIXEL_CENTER
    assert (src[:, 1] >= 5).all()  # invalid flow rows
    assert not ((src[:, 0] >= 18) & (src[:, 0] <= 20)).any()  # depth edge at frame i and its flow target
    assert (src[:, 0] <= width - 2).all()  # flow target leaves the image on the last column
    np.testing.assert_allclose(lifted["dst_xy"] - lifted["src_xy"], np.tile([1.0, 0.0], (len(src), 1)), atol=1e-6)
    np.testing.assert_allclose(lifted["src_xyz"][:, 2], np.where(src[:, 0] < 20, 3.0, 6.0), rtol=1e-6)
    few = tracks.lift_flow_pairs(flow_field, valid, depth, depth, K, np.eye(4), np.eye(4), 0.05, 50,
                                 np.random.default_rng(1))
    assert len(few["src_xyz"]) == 50


def test_params_validation():
    tracks.Params().validate()
    for values in (dict(grid_step=0), dict(query_every=0), dict(max_tracks=0),
                   dict(depth_edge_threshold=0.0), dict(points_per_pair=0), dict(motion_boundary=-0.1)):
        with pytest.raises(ParameterError):
            tracks.Params(**values).validate()


def test_missing_inputs_are_refused(tmp_path, synthetic_frames_dir):
    with pytest.raises(InputError):
        tracks.run({"frames": synthetic_frames_dir}, tracks.Params(), tmp_path)
    with pytest.raises(InputError):
        artifacts.read_tracks(tmp_path)


# ----------------------------------------------------------------------------- synthetic scene

def test_tracking_masks_flag_occlusions_inside_the_image(synthetic_flow_dir, synthetic_scene):
    """Forward-backward consistency alone misses most occlusions inside the image (DIS smooths
    flow across the thin occluded bands); with motion boundaries the masks tracks use flag most
    of them while keeping most pixels."""
    scene = synthetic_scene
    load = tracks.tracking_pair_loader(synthetic_flow_dir, tracks.Params())
    rows, cols = np.mgrid[0:scene.height, 0:scene.width]
    occluded_total = flagged = valid_total = 0
    for t in range(scene.num_frames - 1):
        valid = load(t, t + 1)["valid_forward"]
        target_x = cols + tracks.PIXEL_CENTER + scene.flow[t][..., 0]
        target_y = rows + tracks.PIXEL_CENTER + scene.flow[t][..., 1]
        inside = (target_x >= 0) & (target_x <= scene.width) & (target_y >= 0) & (target_y <= scene.height)
        occluded = scene.flow_occluded[t] & inside
        occluded_total += int(occluded.sum())
        flagged += int((occluded & ~valid).sum())
        valid_total += int(valid.sum())
    assert flagged / occluded_total >= 0.5
    assert valid_total / ((scene.num_frames - 1) * scene.height * scene.width) > 0.8


def test_tracks_from_ground_truth_queries(synthetic_flow_dir, synthetic_scene):
    """Seeded at the GT tracks' query points: median error < 2 px within 16 frames of the query
    frame where both agree the point is visible; tracks rarely claim occluded points."""
    scene = synthetic_scene
    query_frame = scene.tracks_query_frame
    count = len(query_frame)
    queries = scene.tracks_xy[np.arange(count), query_frame]
    order = np.argsort(query_frame, kind="stable")

    def seeder(t: int, live: np.ndarray, seedable: np.ndarray) -> np.ndarray:
        return queries[order[query_frame[order] == t]]

    load = tracks.tracking_pair_loader(synthetic_flow_dir, tracks.Params())
    xy, visible, seeded_frame = tracks.chain_flow_tracks(load, scene.num_frames, seeder, 10 * count)
    assert len(xy) == count
    inverse = np.argsort(order)
    xy, visible = xy[inverse], visible[inverse]
    np.testing.assert_array_equal(seeded_frame[inverse], query_frame)

    near = np.abs(np.arange(scene.num_frames)[None, :] - query_frame[:, None]) < WINDOW
    gt_visible = scene.tracks_visible & near
    both = visible & gt_visible
    error = np.linalg.norm(xy - scene.tracks_xy, axis=-1)
    assert np.median(error[both]) < 2.0
    assert np.percentile(error[both], 90) < 4.0
    assert both.sum() / gt_visible.sum() > 0.6  # tracks cover most of the GT-visible points
    assert (visible & ~scene.tracks_visible & near).sum() / (visible & near).sum() < 0.05
    on_objects = scene.masks[query_frame, (queries[:, 1] - 0.5).astype(int), (queries[:, 0] - 0.5).astype(int)] > 0
    assert np.median(error[both & on_objects[:, None]]) < 2.0


def test_stage_tracks_against_exact_flow(tracks_dir, synthetic_scene):
    """The stage's own tracks from frame 0, scored against the exact flow from frame 0 at their
    query points over the next 15 frames (points GT marks occluded are left out)."""
    out, figures = tracks_dir
    data = artifacts.read_tracks(out)
    xy, visible, query_frame = data["xy"], data["visible"], data["query_frame"]
    assert figures["num_tracks"] == len(xy) > 100
    seeded_first = np.flatnonzero(query_frame == 0)
    start = xy[seeded_first, 0]
    errors = []
    for t in range(1, WINDOW):
        exact, occluded = synthetic_scene.flow_between(0, t)
        x, y = start[:, 0] - tracks.PIXEL_CENTER, start[:, 1] - tracks.PIXEL_CENTER
        target = start + flow.sample_bilinear(exact, x, y)
        seen = flow.sample_bilinear(occluded.astype(np.float32), x, y) < 0.5
        kept = visible[seeded_first, t] & seen
        errors.append(np.linalg.norm(xy[seeded_first[kept], t] - target[kept], axis=-1))
    errors = np.concatenate(errors)
    assert len(errors) > 10 * len(seeded_first)
    assert np.median(errors) < 2.0


def test_stage_writes_parseable_tracks_video_and_still(tracks_dir, synthetic_scene):
    out, figures = tracks_dir
    data = artifacts.read_tracks(out)
    count, num_frames = data["xy"].shape[:2]
    assert num_frames == synthetic_scene.num_frames
    assert data["xy"].dtype == np.float32 and data["visible"].dtype == bool and data["query_frame"].dtype == np.int32
    assert np.isfinite(data["xy"][data["visible"]]).all() and np.isnan(data["xy"][~data["visible"]]).all()
    assert (data["visible"].sum(axis=1) >= tracks.Params().min_track_length).all()
    assert data["visible"][np.arange(count), data["query_frame"]].all()
    assert set(np.unique(data["query_frame"])) <= tracks.query_frame_set(num_frames, tracks.Params().query_every)
    assert 0 < figures["tracked_fraction"] <= 1
    assert read_rgb(out / tracks.STILL_FILE).shape == (synthetic_scene.height, synthetic_scene.width, 3)
    video = cv2.VideoCapture(str(out / tracks.VIDEO_FILE))
    assert video.isOpened() and int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == num_frames
    video.release()
    assert not (out / artifacts.PAIRS3D_FILE).exists()  # no align/cameras inputs: 2D only


def test_lifted_pairs_match_ground_truth_motion(synthetic_flow_dir, synthetic_scene):
    """GT depth and cameras; with the exact flow the endpoints are exact, with the DIS flow of
    the flow stage (tracking masks) the median error stays far below 3% of the scene extent."""
    scene = synthetic_scene
    load = tracks.tracking_pair_loader(synthetic_flow_dir, tracks.Params())
    rng = np.random.default_rng(0)
    for source in ("exact", "dis"):
        errors = []
        for i, j in [(0, 1), (5, 6), (11, 12), (4, 8), (8, 16)]:
            if source == "exact":
                flow_ij, occluded = scene.flow_between(i, j)
                valid = ~occluded
            else:
                pair = load(i, j)
                flow_ij, valid = pair["forward"], pair["valid_forward"]
            lifted = tracks.lift_flow_pairs(flow_ij, valid, scene.depth[i], scene.depth[j], scene.K, scene.w2c[i],
                                            scene.w2c[j], 0.05, 2000, rng)
            assert len(lifted["src_xyz"]) == 2000
            cols = (lifted["src_xy"][:, 0] - tracks.PIXEL_CENTER).astype(int)
            rows = (lifted["src_xy"][:, 1] - tracks.PIXEL_CENTER).astype(int)
            np.testing.assert_allclose(lifted["src_xyz"], scene.point_at_time(i, i)[rows, cols], atol=1e-4 * scene.extent)
            errors.append(np.linalg.norm(lifted["dst_xyz"] - scene.point_at_time(i, j)[rows, cols], axis=-1))
        errors = np.concatenate(errors) / scene.extent
        if source == "exact":
            assert np.percentile(errors, 99) < 0.001
        else:
            assert np.median(errors) < 0.03
            assert np.percentile(errors, 90) < 0.03


def _write_ground_truth_align_and_cameras(scene, root: Path) -> tuple[Path, Path]:
    """align/ and cameras/ folders in the documented artifact formats, holding the scene's GT."""
    align_dir, cameras_dir = root / "align", root / "cameras"
    (align_dir / "depth").mkdir(parents=True)
    cameras_dir.mkdir()
    for t in range(scene.num_frames):
        np.save(align_dir / "depth" / f"{t:06d}.npy", scene.depth[t])
    registered = np.arange(scene.num_frames) != 3
    artifacts.write_cameras(cameras_dir, np.repeat(scene.K[None], scene.num_frames, axis=0), scene.w2c, registered,
                            [f"images/{t:06d}.png" for t in range(scene.num_frames)], scene.width, scene.height,
                            interpolated=~registered, units="dataset")
    return align_dir, cameras_dir


def test_stage_writes_3d_pairs_with_align_and_cameras(synthetic_frames_dir, synthetic_flow_dir, synthetic_scene, tmp_path):
    pytest.importorskip("mono4d.stages.align")
    pytest.importorskip("mono4d.stages.cameras")
    scene = synthetic_scene
    align_dir, cameras_dir = _write_ground_truth_align_and_cameras(scene, tmp_path)
    out = tmp_path / "tracks"
    out.mkdir()
    params = tracks.Params(points_per_pair=300, make_video=False)
    figures = tracks.run({"frames": synthetic_frames_dir, "flow": synthetic_flow_dir, "align": align_dir,
                          "cameras": cameras_dir}, params, out)
    pairs3d = artifacts.read_pairs3d(out)
    total = len(pairs3d["src_xyz"])
    assert figures["num_pairs3d"] == total
    counts = artifacts.read_pairs3d_counts(out)
    assert counts["total"] == total == sum(sum(both) for both in counts["counts"].values())
    lifted_pairs = [pair for pair in artifacts.list_flow_pairs(synthetic_flow_dir) if 3 not in pair]
    assert sorted(counts["counts"]) == sorted(artifacts.flow_pair_name(i, j) for i, j in lifted_pairs)
    assert all(0 < count <= 300 for both in counts["counts"].values() for count in both)
    assert any("not registered" in note for note in figures["notes"])
    assert 3 not in set(pairs3d["src_frame"].tolist()) | set(pairs3d["dst_frame"].tolist())
    assert pairs3d["src_frame"].dtype == np.int32 and pairs3d["dst_xyz"].dtype == np.float32
    # both directions of every pair; endpoints agree with the scene's motion
    assert {(int(a), int(b)) for a, b in zip(pairs3d["src_frame"], pairs3d["dst_frame"])} == \
        {pair for i, j in lifted_pairs for pair in ((i, j), (j, i))}
    sample = np.flatnonzero((pairs3d["src_frame"] == 10) & (pairs3d["dst_frame"] == 9))
    cols = (pairs3d["src_xy"][sample, 0] - tracks.PIXEL_CENTER).astype(int)
    rows = (pairs3d["src_xy"][sample, 1] - tracks.PIXEL_CENTER).astype(int)
    errors = np.linalg.norm(pairs3d["dst_xyz"][sample] - scene.point_at_time(10, 9)[rows, cols], axis=-1)
    assert np.median(errors) < 0.03 * scene.extent
    assert not (out / tracks.VIDEO_FILE).exists() and (out / tracks.STILL_FILE).exists()
