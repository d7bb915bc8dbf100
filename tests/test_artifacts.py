"""The artifact layer (data/artifacts.py): every write_X/read_X pair round-trips, the files keep
the layout stages have always written, readers fail with actionable errors, tests write stage
folders through it, and the import cycles it replaced stay gone."""
from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mono4d.data import artifacts
from mono4d.data.errors import InputError

T, H, W = 4, 6, 8
ROOT = Path(__file__).resolve().parents[1]


def cameras_arrays(rng: np.random.Generator) -> dict:
    """Cameras of T frames: frame 2 unposed (NaN w2c), frame 1 interpolated."""
    K = np.repeat(np.array([[50.0, 0.0, W / 2], [0.0, 51.0, H / 2], [0.0, 0.0, 1.0]])[None], T, axis=0)
    K[3, 0, 0] = 49.25
    w2c = np.repeat(np.eye(4)[None], T, axis=0)
    w2c[:, :3, 3] = rng.normal(size=(T, 3))
    w2c[2] = np.nan
    return {"K": K, "w2c": w2c, "registered": np.array([True, False, False, True]),
            "interpolated": np.array([False, True, False, False])}


# ----------------------------------------------------------------------------------------------
# round trips


def test_cameras_round_trip_and_layout(tmp_path):
    cams = cameras_arrays(np.random.default_rng(0))
    files = [f"images/{t:06d}.png" for t in range(T)]
    colmap = [{"camera_id": 1, "model": "SIMPLE_PINHOLE", "params": [50.0, 4.0, 3.0]}]
    artifacts.write_cameras(tmp_path, cams["K"].astype(np.float32), cams["w2c"], cams["registered"], files, W, H,
                            interpolated=cams["interpolated"], model="SIMPLE_PINHOLE", units="sfm", mode="colmap",
                            colmap_cameras=colmap)
    K, w2c, registered = artifacts.read_cameras(tmp_path)
    assert (K.dtype, w2c.dtype, registered.dtype) == (np.float64, np.float64, bool)
    assert K.shape == (T, 3, 3) and w2c.shape == (T, 4, 4) and registered.shape == (T,)
    np.testing.assert_array_equal(K, cams["K"].astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(w2c, cams["w2c"])  # NaN frame stays NaN
    np.testing.assert_array_equal(registered, cams["registered"])
    # the documented cameras.json layout, byte for byte (indent=1, this key order)
    expected = {"width": W, "height": H, "model": "SIMPLE_PINHOLE", "units": "sfm", "mode": "colmap",
                "frames": [{"index": t, "file": files[t], "K": cams["K"][t].astype(np.float32).astype(float).tolist(),
                            "w2c": None if t == 2 else cams["w2c"][t].tolist(),
                            "registered": bool(cams["registered"][t]), "interpolated": bool(cams["interpolated"][t])}
                           for t in range(T)],
                "colmap_cameras": colmap}
    assert (tmp_path / "cameras.json").read_text() == json.dumps(expected, indent=1)
    assert artifacts.read_cameras_meta(tmp_path) == expected


def test_points_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    points = {"xyz": rng.normal(size=(5, 3)).astype(np.float32), "rgb": rng.integers(0, 255, (5, 3), dtype=np.uint8),
              "error": rng.random(5).astype(np.float32), "obs_frame": np.array([0, 1, 1, 3], np.int32),
              "obs_point": np.array([0, 4, 2, 2], np.int32), "obs_xy": rng.random((4, 2)).astype(np.float32)}
    artifacts.write_points(tmp_path, points)
    read = artifacts.read_points(tmp_path)
    assert read.keys() == points.keys()
    for key, value in points.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape
        np.testing.assert_array_equal(read[key], value)
    artifacts.write_points(tmp_path, artifacts.empty_points())
    empty = artifacts.read_points(tmp_path)
    assert {key: (value.shape, value.dtype) for key, value in empty.items()} == {
        key: ((0, *shape), np.dtype(dtype)) for key, (shape, dtype) in artifacts.POINTS_ARRAYS.items()}


def test_masks_round_trip(tmp_path):
    masks = np.random.default_rng(2).integers(0, 3, (T, H, W)).astype(np.uint8)
    artifacts.write_masks(tmp_path, masks, {2: "hand", 1: "object"}, "sam")
    read = artifacts.read_masks(tmp_path)
    assert read.dtype == np.uint8 and read.shape == (T, H, W)
    np.testing.assert_array_equal(read, masks)
    assert artifacts.read_labels(tmp_path) == {0: "background", 1: "object", 2: "hand"}
    assert artifacts.read_masks_meta(tmp_path) == {"labels": {"0": "background", "1": "object", "2": "hand"},
                                                   "backend": "sam", "num_frames": T}
    assert sorted(path.name for path in (tmp_path / "masks").iterdir()) == [f"{t:06d}.png" for t in range(T)]


def test_depth_round_trip(tmp_path):
    depth = np.random.default_rng(3).random((T, H, W))  # float64 in: stored as float32
    depth[0, 0, 0] = 0.0
    artifacts.write_depth(tmp_path, depth, "relative_inverse", backend="transformers", model="tiny", auto_chosen=True)
    read, kind = artifacts.read_depth(tmp_path)
    assert kind == "relative_inverse" and read.dtype == np.float32 and read.shape == (T, H, W)
    np.testing.assert_array_equal(read, depth.astype(np.float32))
    meta = json.loads((tmp_path / "depth.json").read_text())
    assert meta == {"kind": "relative_inverse", "invalid": "0", "backend": "transformers", "auto_chosen": True,
                    "model": "tiny", "num_frames": T, "width": W, "height": H,
                    "files": [f"depth/{t:06d}.npy" for t in range(T)]}
    with pytest.raises(ValueError, match="unknown depth kind"):
        artifacts.write_depth(tmp_path / "other", depth, "disparity", backend="file")


def test_aligned_depth_round_trip(tmp_path):
    depth = np.random.default_rng(4).random((T, H, W)).astype(np.float32)
    record = {"depth_kind": "metric", "frames": [{"index": t, "scale": 1.0} for t in range(T)]}
    artifacts.write_aligned_depth(tmp_path, depth, record)
    read = artifacts.read_aligned_depth(tmp_path)
    assert read.dtype == np.float32 and read.shape == (T, H, W)
    np.testing.assert_array_equal(read, depth)
    assert artifacts.read_aligned_kind(tmp_path) == "metric"
    assert json.loads((tmp_path / "alignment.json").read_text()) == record
    (tmp_path / "alignment.json").unlink()
    assert artifacts.read_aligned_kind(tmp_path) is None  # aligned depth written by other tools


def test_flow_pair_and_meta_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    forward, backward = (rng.normal(scale=3.0, size=(H, W, 2)).astype(np.float32) for _ in range(2))
    valid_forward, valid_backward = rng.random((H, W)) > 0.3, rng.random((H, W)) > 0.6
    artifacts.write_flow_pair(tmp_path, 2, 5, forward, backward, valid_forward, valid_backward)
    pair = artifacts.read_flow_pair(tmp_path, 2, 5)
    for key in ("forward", "backward"):
        assert pair[key].dtype == np.float32 and pair[key].shape == (H, W, 2)
    np.testing.assert_array_equal(pair["forward"], forward.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(pair["backward"], backward.astype(np.float16).astype(np.float32))
    assert pair["valid_forward"].dtype == bool and pair["valid_forward"].shape == (H, W)
    np.testing.assert_array_equal(pair["valid_forward"], valid_forward)
    np.testing.assert_array_equal(pair["valid_backward"], valid_backward)
    swapped = artifacts.read_flow_pair(tmp_path, 5, 2)
    np.testing.assert_array_equal(swapped["forward"], pair["backward"])
    np.testing.assert_array_equal(swapped["valid_forward"], pair["valid_backward"])
    # the stored layout: float16 flows stored, bool masks deflated
    with zipfile.ZipFile(tmp_path / "pairs" / "000002_000005.npz") as archive:
        methods = {info.filename: info.compress_type for info in archive.infolist()}
    assert methods == {"forward.npy": zipfile.ZIP_STORED, "backward.npy": zipfile.ZIP_STORED,
                       "valid_forward.npy": zipfile.ZIP_DEFLATED, "valid_backward.npy": zipfile.ZIP_DEFLATED}
    with np.load(tmp_path / "pairs" / "000002_000005.npz") as data:
        assert data["forward"].dtype == np.float16
    meta = {"pairs": [[0, 1], [2, 5]], "backend": "dis", "num_frames": 6, "width": W, "height": H}
    artifacts.write_flow_meta(tmp_path, meta)
    assert artifacts.read_flow_meta(tmp_path) == meta
    assert (tmp_path / "pairs.json").read_text() == json.dumps(meta)
    assert artifacts.list_flow_pairs(tmp_path) == [(0, 1), (2, 5)]
    assert artifacts.flow_pair_name(2, 5) == "000002_000005"


def test_tracks_and_pairs3d_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    xy = rng.random((7, T, 2)).astype(np.float32)
    xy[0, 3] = np.nan
    visible = rng.random((7, T)) > 0.5
    query_frame = rng.integers(0, T, 7).astype(np.int32)
    artifacts.write_tracks(tmp_path, xy, visible, query_frame)
    tracks = artifacts.read_tracks(tmp_path)
    assert {key: (value.dtype, value.shape) for key, value in tracks.items()} == {
        "xy": (np.float32, (7, T, 2)), "visible": (bool, (7, T)), "query_frame": (np.int32, (7,))}
    np.testing.assert_array_equal(tracks["xy"], xy)
    np.testing.assert_array_equal(tracks["visible"], visible)
    np.testing.assert_array_equal(tracks["query_frame"], query_frame)

    arrays = {key: rng.random((9, *shape)).astype(dtype) if dtype == np.float32 else rng.integers(0, T, 9).astype(dtype)
              for key, (shape, dtype) in artifacts.PAIRS3D_ARRAYS.items()}
    counts = {"000000_000001": [4, 3], "000001_000002": [2, 0]}
    artifacts.write_pairs3d(tmp_path, arrays, counts)
    pairs = artifacts.read_pairs3d(tmp_path)
    assert pairs.keys() == arrays.keys()
    for key, value in arrays.items():
        assert pairs[key].dtype == value.dtype and pairs[key].shape == value.shape
        np.testing.assert_array_equal(pairs[key], value)
    assert artifacts.read_pairs3d_counts(tmp_path) == {"counts": counts, "total": 9}


# ----------------------------------------------------------------------------------------------
# errors

READERS = {
    "cameras": (artifacts.read_cameras, "cameras.json", "cameras"),
    "cameras_meta": (artifacts.read_cameras_meta, "cameras.json", "cameras"),
    "points": (artifacts.read_points, "points.npz", "cameras"),
    "labels": (artifacts.read_labels, "labels.json", "masks"),
    "depth": (artifacts.read_depth, "depth.json", "depth"),
    "flow_meta": (artifacts.list_flow_pairs, "pairs.json", "flow"),
    "tracks": (artifacts.read_tracks, "tracks.npz", "tracks"),
    "pairs3d": (artifacts.read_pairs3d, "pairs3d.npz", "tracks"),
    "pairs3d_counts": (artifacts.read_pairs3d_counts, "pairs3d.json", "tracks"),
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_readers_name_the_missing_file_and_stage(tmp_path, name):
    reader, file_name, stage = READERS[name]
    with pytest.raises(InputError, match=f"{file_name} is missing") as error:
        reader(tmp_path)
    assert stage in error.value.hint


@pytest.mark.parametrize("name", sorted(READERS))
def test_readers_turn_a_corrupt_file_into_an_input_error(tmp_path, name):
    reader, file_name, stage = READERS[name]
    (tmp_path / file_name).write_bytes(b"\x00\x01 not what the stage wrote")
    with pytest.raises(InputError, match="unreadable") as error:
        reader(tmp_path)
    assert f"rerun the {stage} stage" in error.value.hint and str(tmp_path) in error.value.hint


def test_readers_of_folders_of_maps_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="holds no mask PNGs"):
        artifacts.read_masks(tmp_path)
    with pytest.raises(InputError, match="no aligned depth maps"):
        artifacts.read_aligned_depth(tmp_path)
    with pytest.raises(InputError, match=r"flow pair \(0, 1\) is not stored"):
        artifacts.read_flow_pair(tmp_path, 0, 1)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "000000.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image"):
        artifacts.read_masks(tmp_path)
    (tmp_path / "depth").mkdir()
    (tmp_path / "depth" / "000000.npy").write_bytes(b"not an array")
    with pytest.raises(InputError, match="unreadable") as error:
        artifacts.read_aligned_depth(tmp_path)
    assert "rerun the align stage" in error.value.hint
    (tmp_path / "alignment.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid alignment record"):
        artifacts.read_aligned_kind(tmp_path)


def test_readers_reject_files_without_their_fields(tmp_path):
    (tmp_path / "cameras.json").write_text(json.dumps({"width": W}))
    with pytest.raises(InputError, match="lacks frames") as error:
        artifacts.read_cameras(tmp_path)
    assert "rerun the cameras stage" in error.value.hint
    artifacts.write_depth(tmp_path, np.ones((1, H, W), np.float32), "metric", backend="file")
    (tmp_path / "depth" / "000000.npy").unlink()
    with pytest.raises(InputError, match="000000.npy is missing"):
        artifacts.read_depth(tmp_path)
    with zipfile.ZipFile(tmp_path / "tracks.npz", "w") as archive:
        with archive.open("xy.npy", "w") as handle:
            np.lib.format.write_array(handle, np.zeros((1, 1, 2), np.float32))
    with pytest.raises(InputError, match="lacks xy, visible, query_frame"):
        artifacts.read_tracks(tmp_path)


# ----------------------------------------------------------------------------------------------
# the tests use the writers; the import cycles stay gone


def _writes_cameras_json_by_hand(tree: ast.AST) -> list[int]:
    """Lines of ``<path with cameras.json>.write_text/write_bytes(...)`` or ``open(..cameras.json.., "w")``."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("write_text", "write_bytes"):
            target = ast.unparse(func.value)
        elif isinstance(func, ast.Name) and func.id == "open" and len(node.args) > 1:
            target = ast.unparse(node.args[0]) + ast.unparse(node.args[1])
            if "w" not in ast.unparse(node.args[1]):
                continue
        else:
            continue
        if "cameras.json" in target or "CAMERAS_FILE" in target:
            lines.append(node.lineno)
    return lines


def test_tests_write_cameras_through_the_artifact_layer():
    by_hand, through_writer = {}, set()
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if lines := _writes_cameras_json_by_hand(tree):
            by_hand[path.name] = lines
        if any(isinstance(node, ast.Attribute) and node.attr == "write_cameras" for node in ast.walk(tree)):
            through_writer.add(path.name)
    assert by_hand == {}
    # the six helpers that used to write cameras.json themselves
    assert {"test_align.py", "test_export.py", "test_init.py", "test_masks.py", "test_report.py",
            "test_tracks.py"} <= through_writer


def _import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Project module -> project modules it imports anywhere (function-level imports included)."""
    from mono4d.pipeline.state import imported_modules

    modules = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(("mono4d",) + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
    return {name: {module for module in imported_modules(ast.parse(path.read_text()), name,
                                                         path.name == "__init__.py")
                   if module in modules and module != name and module.count(".") > 1}
            for name, path in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        for module in graph[todo.pop()] - seen:
            if module == goal:
                return True
            seen.add(module)
            todo.append(module)
    return False


def test_no_import_cycles_in_data_or_between_the_masks_modules():
    graph = _import_graph(("data", "stages", "pipeline", "models"))
    in_cycles = sorted(name for name in graph if name.startswith(("mono4d.data.", "mono4d.stages.masks"))
                       and _reaches(graph, name, name))
    assert in_cycles == []
    assert not any(module.split(".")[1] in ("stages", "pipeline") for module in graph["mono4d.data.artifacts"])
