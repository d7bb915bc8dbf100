"""Nerfies/HyperNeRF, DyCheck iPhone and DyNeRF readers on small scenes written in the real layouts,
and DyCheck's masked metrics."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mono4d.data.datasets import detect_format, read_dataset
from mono4d.data.dycheck import (dycheck_camera_ids, evaluation_mask, masked_scores, masked_ssim, read_depth,
                                 read_dycheck, read_split)
from mono4d.data.dynerf import dynerf_camera_ids, read_dynerf, read_poses_bounds
from mono4d.data.errors import InputError
from mono4d.data.geometry import camera_centers, project_points
from mono4d.data.hypernerf import hypernerf_camera_ids, read_hypernerf, read_nerfies_camera
from mono4d.data.images import write_gray
from mono4d.data.video import write_video

TARGET = np.array([0.3, -0.2, 1.5])


def look_at(centre: np.ndarray, target: np.ndarray = TARGET, up: np.ndarray = np.array([0.0, 0.0, 1.0])
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World directions ``(right, down, forward)`` of a camera at ``centre`` looking at ``target``."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    down = -(up - up @ forward * forward)
    down /= np.linalg.norm(down)
    return np.cross(down, forward), down, forward


def nerfies_projection(camera: dict, point: np.ndarray) -> np.ndarray:
    """Pixel of a world point by the Nerfies camera model as its documentation states it (no distortion)."""
    local = np.asarray(camera["orientation"]) @ (point - np.asarray(camera["position"]))
    x, y = local[:2] / local[2]
    f, (cx, cy) = camera["focal_length"], camera["principal_point"]
    return np.array([f * x + camera["skew"] * y + cx, f * camera["pixel_aspect_ratio"] * y + cy])


def nerfies_camera(centre: np.ndarray, size: tuple[int, int] = (40, 30), focal: float = 35.0, skew: float = 0.0,
                   aspect: float = 1.0, radial: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> dict:
    right, down, forward = look_at(centre)
    return {"orientation": np.stack([right, down, forward]).tolist(), "position": centre.tolist(),
            "focal_length": focal, "principal_point": [size[0] / 2 - 0.7, size[1] / 2 + 0.4], "skew": skew,
            "pixel_aspect_ratio": aspect, "radial_distortion": list(radial), "tangential_distortion": [0.0, 0.0],
            "image_size": list(size)}


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2))


def write_nerfies_scene(root: Path, frames: dict[str, dict], factors: tuple[int, ...] = (1, 2),
                        rgba: bool = False) -> None:
    """``camera/<name>.json`` and ``rgb/<f>x/<name>.png`` (sizes divided by f) for every frame."""
    for name, camera in frames.items():
        write_json(root / "camera" / f"{name}.json", camera)
        width, height = camera["image_size"]
        for factor in factors:
            image = np.full((round(height / factor), round(width / factor), 4 if rgba else 3), 120, np.uint8)
            if rgba:
                image[..., 3] = 255
                image[0, :, 3] = 0  # an invalid top row
            (root / "rgb" / f"{factor}x").mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / "rgb" / f"{factor}x" / f"{name}.png"), image)
    write_json(root / "scene.json", {"center": [0.1, 0.0, 1.0], "scale": 0.5, "near": 0.1, "far": 2.0})
    np.save(root / "points.npy", np.zeros((5, 3), np.float32))


def write_hypernerf(root: Path) -> dict[str, dict]:
    """A vrig-style scene: camera 0 ("left") trains, camera 1 ("right") is held out, 4 time steps."""
    frames = {}
    for step in range(4):
        frames[f"left1_{step:06d}"] = nerfies_camera(np.array([-0.2 * step, -1.0, 1.3]), skew=0.3, aspect=1.05)
        frames[f"right1_{step:06d}"] = nerfies_camera(np.array([0.5, -0.9 - 0.1 * step, 1.6]),
                                                      radial=(0.01, 0.0, 0.0))
    write_nerfies_scene(root, frames)
    ids = list(frames)
    write_json(root / "dataset.json", {"count": len(ids), "num_exemplars": 4, "ids": ids,
                                       "train_ids": [name for name in ids if name.startswith("left")],
                                       "val_ids": [name for name in ids if name.startswith("right")]})
    write_json(root / "metadata.json", {name: {"warp_id": int(name[-1]), "appearance_id": int(name[-1]),
                                               "camera_id": int(name.startswith("right")), "time_id": int(name[-1])}
                                        for name in ids})
    return frames


def test_nerfies_camera_projects_like_the_nerfies_model(tmp_path):
    # The first camera of DyCheck's released paper-windmill scene, value for value.
    released = {"focal_length": 719.9471435546875, "image_size": [720, 960],
                "orientation": [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]], "pixel_aspect_ratio": 1.0,
                "position": [0.0, 4.656612873077393e-10, 0.0], "principal_point": [358.8895263671875, 484.92236328125],
                "radial_distortion": [0.0, 0.0, 0.0], "skew": 0.0, "tangential_distortion": [0.0, 0.0]}
    skewed = nerfies_camera(np.array([0.4, -1.2, 0.9]), skew=2.5, aspect=1.1)
    points = np.array([[0.1, -0.3, -1.2], [-0.4, 0.2, -2.0], TARGET + [0.05, 0.1, -0.02], TARGET])
    for index, camera in enumerate((released, skewed)):
        write_json(tmp_path / f"{index}.json", camera)
        read = read_nerfies_camera(tmp_path / f"{index}.json")
        assert (read.width, read.height) == tuple(camera["image_size"])
        np.testing.assert_allclose(camera_centers(read.w2c), camera["position"], atol=1e-12)
        chosen = points[:2] if index == 0 else points[2:]
        uv, depth = project_points(read.K, read.w2c, chosen)
        assert np.all(depth > 0)
        np.testing.assert_allclose(uv, [nerfies_projection(camera, point) for point in chosen], atol=1e-9)
    # The look-at camera sees its target at the principal point (pixel centres at half-integers on both sides).
    uv, _ = project_points(read.K, read.w2c, TARGET[None])
    np.testing.assert_allclose(uv[0], skewed["principal_point"], atol=1e-9)
    # Downsampling by 2 halves the pixel coordinates of every point.
    half = read.downsampled(2)
    np.testing.assert_allclose(project_points(half.K, half.w2c, points[2:])[0], project_points(read.K, read.w2c, points[2:])[0] / 2)

    broken = dict(skewed)
    del broken["principal_point"]
    write_json(tmp_path / "broken.json", broken)
    with pytest.raises(InputError, match="lacks principal_point"):
        read_nerfies_camera(tmp_path / "broken.json")
    write_json(tmp_path / "shape.json", {**skewed, "orientation": [[1.0, 0.0], [0.0, 1.0]]})
    with pytest.raises(InputError, match=r"orientation has shape \(2, 2\)"):
        read_nerfies_camera(tmp_path / "shape.json")
    write_json(tmp_path / "scaled.json", {**skewed, "orientation": (2 * np.eye(3)).tolist()})
    with pytest.raises(InputError, match="not a rotation"):
        read_nerfies_camera(tmp_path / "scaled.json")


def test_hypernerf_splits_cameras_factors(tmp_path):
    frames = write_hypernerf(tmp_path)
    assert detect_format(tmp_path) == "hypernerf" and detect_format(tmp_path / "dataset.json") == "hypernerf"
    train = read_dataset(tmp_path)
    assert train.format == "hypernerf" and train.num_frames == 4 and (train.width, train.height) == (40, 30)
    assert [path.name for path in train.image_paths] == [f"left1_{step:06d}.png" for step in range(4)]
    assert all(path.parent == tmp_path / "rgb" / "1x" for path in train.image_paths)
    np.testing.assert_allclose(train.times, [0, 1 / 3, 2 / 3, 1])
    assert train.notes == ()  # no distortion, one camera
    for frame, (K, w2c) in enumerate(zip(train.K, train.w2c)):
        camera = frames[f"left1_{frame:06d}"]
        point = TARGET + [0.1, -0.05, 0.08]
        np.testing.assert_allclose(project_points(K, w2c, point[None])[0][0], nerfies_projection(camera, point), atol=1e-9)

    half = read_hypernerf(tmp_path, factor=2)
    assert (half.width, half.height) == (20, 15) and half.image_paths[0].parent.name == "2x"
    np.testing.assert_allclose(half.K[:, :2], train.K[:, :2] / 2)
    np.testing.assert_allclose(half.w2c, train.w2c)

    val = read_dataset(tmp_path, split="val")
    assert val.num_frames == 4 and "distortion" in val.notes[0]
    assert hypernerf_camera_ids(tmp_path, "val") == [1] and hypernerf_camera_ids(tmp_path) == [0]
    assert read_hypernerf(tmp_path, split="val", camera=1).num_frames == 4
    with pytest.raises(InputError, match="camera 0 has no val frame") as failure:
        read_hypernerf(tmp_path, split="val", camera=0)
    assert "[1]" in failure.value.hint
    with pytest.raises(InputError, match="unknown Nerfies/HyperNeRF split"):
        read_hypernerf(tmp_path, split="test")
    with pytest.raises(InputError, match="images are missing") as failure:
        read_hypernerf(tmp_path, factor=4)
    assert "[1, 2]" in failure.value.hint
    (tmp_path / "rgb" / "2x" / "left1_000000.png").unlink()
    assert cv2.imwrite(str(tmp_path / "rgb" / "2x" / "left1_000000.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(InputError, match="is 10x10 but its camera at factor 2 is 20x15"):
        read_hypernerf(tmp_path, factor=2)

    (tmp_path / "camera" / "left1_000001.json").unlink()
    with pytest.raises(InputError, match="camera file .*left1_000001.json of frame"):
        read_hypernerf(tmp_path, camera=0)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    del metadata["left1_000002"]["camera_id"]
    write_json(tmp_path / "metadata.json", metadata)
    with pytest.raises(InputError, match="malformed .*metadata.json"):
        read_hypernerf(tmp_path)
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    write_json(tmp_path / "dataset.json", {**dataset, "val_ids": []})
    with pytest.raises(InputError, match="has no val frames"):
        read_hypernerf(tmp_path, split="val")
    del dataset["train_ids"]
    write_json(tmp_path / "dataset.json", dataset)
    with pytest.raises(InputError, match="malformed .*dataset.json: 'train_ids'"):
        read_hypernerf(tmp_path)


def write_dycheck(root: Path, factor: int = 1) -> None:
    """An iPhone scene: camera 0 moves over 6 time steps (train), cameras 1 and 2 watch some of them (val)."""
    frames, train, val = {}, [], []
    for step in range(6):
        name = f"0_{step:05d}"
        frames[name] = nerfies_camera(np.array([0.1 * step, -1.0, 1.4]), size=(24, 32))
        train.append((name, step, 0))
    for camera, steps in ((1, (0, 1, 2, 3)), (2, (2, 3, 4, 5))):
        for step in steps:
            name = f"{camera}_{step:05d}"
            frames[name] = nerfies_camera(np.array([-0.5 * camera, -0.8, 1.2]), size=(24, 32))
            val.append((name, step, camera))
    write_nerfies_scene(root, frames, factors=(factor,), rgba=True)
    ids = list(frames)
    write_json(root / "dataset.json", {"count": len(ids), "num_exemplars": 6, "ids": ids,
                                       "train_ids": [name for name, _, _ in train],
                                       "val_ids": [name for name, _, _ in val]})
    write_json(root / "metadata.json", {name: {"appearance_id": step, "camera_id": camera, "warp_id": step}
                                        for name, step, camera in train + val})
    for split, rows in (("train", train), ("val", val)):
        write_json(root / "splits" / f"{split}.json", {"camera_ids": [row[2] for row in rows],
                                                        "frame_names": [row[0] for row in rows],
                                                        "time_ids": [row[1] for row in rows]})
    write_json(root / "extra.json", {"factor": 2, "fps": 30.0, "bbox": [[-1, -1, -1], [1, 1, 1]],
                                     "lookat": TARGET.tolist(), "up": [0, 0, 1]})
    write_json(root / "emf.json", {"omega": 10.0, "Omega": 150.0})
    height, width = round(32 / factor), round(24 / factor)
    (root / "depth" / f"{factor}x").mkdir(parents=True)
    for name, step, _ in train:
        np.save(root / "depth" / f"{factor}x" / f"{name}.npy", np.full((height, width, 1), 1.0 + step, np.float32))
    (root / "covisible" / f"{factor}x" / "val").mkdir(parents=True)
    for name, _, _ in val:
        covisible = np.zeros((height, width), np.uint8)
        covisible[:, : width // 2] = 255
        write_gray(root / "covisible" / f"{factor}x" / "val" / f"{name}.png", covisible)


def test_dycheck_iphone_layout(tmp_path):
    write_dycheck(tmp_path)
    assert detect_format(tmp_path) == "dycheck"
    train = read_dataset(tmp_path)
    assert train.format == "dycheck" and train.num_frames == 6 and (train.width, train.height) == (24, 32)
    np.testing.assert_allclose(train.times, np.arange(6) / 5)
    assert train.notes == ()
    val = read_dycheck(tmp_path, split="val")
    assert val.num_frames == 8 and dycheck_camera_ids(tmp_path, "val") == [1, 2]
    assert any("cameras [1, 2]" in note for note in val.notes) and any("covisible" in note for note in val.notes)
    second = read_dataset(tmp_path, split="val", camera=2)
    assert [path.stem for path in second.image_paths] == ["2_00002", "2_00003", "2_00004", "2_00005"]
    np.testing.assert_allclose(second.times, np.arange(2, 6) / 5)
    # Val frames at the same time step as a train frame share its time value.
    names, time_ids, camera_ids = read_split(tmp_path, "val")
    assert names[0] == "1_00000" and time_ids[0] == 0 and camera_ids[0] == 1
    np.testing.assert_allclose(camera_centers(second.w2c), np.broadcast_to([-1.0, -0.8, 1.2], (4, 3)), atol=1e-12)

    mask = evaluation_mask(tmp_path, "2_00003")
    expected = np.zeros((32, 24), bool)
    expected[1:, :12] = True  # covisible left half, minus the invalid (alpha 0) top row
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(read_depth(tmp_path, "0_00004"), np.full((32, 24), 5.0, np.float32))
    with pytest.raises(InputError, match="cannot read covisible mask"):
        evaluation_mask(tmp_path, "0_00001")
    with pytest.raises(InputError, match="cannot read depth map"):
        read_depth(tmp_path, "1_00000")

    split = json.loads((tmp_path / "splits" / "val.json").read_text())
    split["time_ids"] = split["time_ids"][:-1]
    write_json(tmp_path / "splits" / "val.json", split)
    with pytest.raises(InputError, match="different lengths"):
        read_dycheck(tmp_path, split="val")


def test_dycheck_half_resolution(tmp_path):
    write_dycheck(tmp_path, factor=2)
    half = read_dataset(tmp_path)  # the only image folder, rgb/2x
    assert (half.width, half.height) == (12, 16) and half.image_paths[0].parent.name == "2x"
    assert evaluation_mask(tmp_path, "1_00001", factor=2).shape == (16, 12)
    with pytest.raises(InputError, match="missing"):
        read_dycheck(tmp_path, factor=1)


def test_masked_ssim_matches_ssim_and_ignores_pixels_outside_the_mask():
    from kornia.metrics import ssim as kornia_ssim

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(40, 52, 3, generator=generator, dtype=torch.float64)
    image = (target + 0.1 * torch.randn(40, 52, 3, generator=generator, dtype=torch.float64)).clamp(0, 1)
    full = torch.ones(40, 52, dtype=torch.bool)
    reference = kornia_ssim(image.permute(2, 0, 1)[None], target.permute(2, 0, 1)[None], 11, padding="valid").mean()
    assert float(masked_ssim(image, target, full)) == pytest.approx(float(reference), abs=1e-6)
    assert 0.3 < float(reference) < 0.95

    mask = torch.zeros(40, 52, dtype=torch.bool)
    mask[5:30, 8:40] = True
    masked = float(masked_ssim(image, target, mask))
    changed = torch.where(mask[..., None], image, torch.rand(40, 52, 3, generator=generator, dtype=torch.float64))
    assert float(masked_ssim(changed, target, mask)) == masked
    assert float(masked_ssim(target, target, mask)) == pytest.approx(1.0, abs=1e-12)
    # Errors confined to the unmasked area leave a perfect score (windows without masked pixels count as 1).
    assert float(masked_ssim(torch.where(mask[..., None], target, image), target, mask)) == pytest.approx(1.0, abs=1e-12)
    assert masked != pytest.approx(float(reference), abs=1e-3)


def test_masked_ssim_partial_windows_follow_dycheck():
    # Constant images a (render) and b (target) on the 6 left columns, anything elsewhere. A width
    # window starting at column p sees the valid columns p..5: its partial convolution is
    # value * 11 * G(5 - p) / (6 - p), with G(m) the sum of the first m + 1 Gaussian weights; the
    # height pass then sees only valid rows. Windows past column 5 hold no valid pixel and score 1.
    a, b, height, width = 0.3, 0.6, 16, 30
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(height, width, 3, generator=generator, dtype=torch.float64)
    target = torch.rand(height, width, 3, generator=generator, dtype=torch.float64)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[:, :6] = True
    image[:, :6], target[:, :6] = a, b
    weights = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    weights /= weights.sum()
    scores = []
    for start in range(width - 10):
        if start > 5:
            scores.append(1.0)
            continue
        s = 11 * weights[: 6 - start].sum() / (6 - start)
        var0, var1 = max(0.0, a * a * s * (1 - s)), max(0.0, b * b * s * (1 - s))
        cov = np.sign(a * b * s * (1 - s)) * min(np.sqrt(var0 * var1), abs(a * b * s * (1 - s)))
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        scores.append((2 * a * b * s * s + c1) * (2 * cov + c2) / (((a * a + b * b) * s * s + c1) * (var0 + var1 + c2)))
    assert float(masked_ssim(image, target, mask)) == pytest.approx(np.mean(scores), abs=1e-12)


def test_masked_scores_psnr_counts_masked_pixels_only():
    target = torch.full((30, 30, 3), 0.5)
    image = target + 0.1
    mask = torch.zeros(30, 30, dtype=torch.bool)
    mask[10:20, 5:25] = True
    image[~mask] = 1.0  # large errors outside the mask do not count
    scores = masked_scores(image, target, mask)
    assert scores["mpsnr"] == pytest.approx(20.0, abs=1e-4)
    assert 0.0 < scores["mssim"] < 1.0
    with pytest.raises(ValueError, match="no pixel"):
        masked_scores(image, target, torch.zeros(30, 30, dtype=torch.bool))


def write_dynerf(root: Path, ids: tuple[int, ...] = (0, 1, 3), frames: int = 5) -> dict[int, np.ndarray]:
    """Cameras on an arc looking at TARGET, calibrated at 64x48 (focal 50), videos at 32x24."""
    rows, centres = [], {}
    for index, camera in enumerate(ids):
        centre = np.array([-0.6 + 0.5 * index, -1.5, 1.2 + 0.1 * index])
        right, down, forward = look_at(centre)
        # LLFF 3x5: columns down, right, backward, centre, (height, width, focal).
        matrix = np.stack([down, right, -forward, centre, [48.0, 64.0, 50.0]], axis=1)
        rows.append(np.concatenate([matrix.reshape(-1), [0.5, 4.0]]))
        centres[camera] = centre
        write_video(root / f"cam{camera:02d}.mp4", np.full((frames, 24, 32, 3), 40 * index, np.uint8), fps=30)
    np.save(root / "poses_bounds.npy", np.array(rows))
    return centres


def test_dynerf_llff_poses_and_camera_choice(tmp_path):
    centres = write_dynerf(tmp_path)
    assert detect_format(tmp_path) == "dynerf" and detect_format(tmp_path / "poses_bounds.npy") == "dynerf"
    assert dynerf_camera_ids(tmp_path) == [0, 1, 3]
    K, w2c, sizes, bounds = read_poses_bounds(tmp_path)
    np.testing.assert_allclose(sizes, np.broadcast_to([64, 48], (3, 2)))
    np.testing.assert_allclose(bounds, np.broadcast_to([0.5, 4.0], (3, 2)))

    dataset = read_dataset(tmp_path, camera=3)  # the third row: rows follow the sorted video names
    assert dataset.format == "dynerf" and dataset.video == tmp_path / "cam03.mp4" and dataset.image_paths == []
    assert dataset.num_frames == 5 and (dataset.width, dataset.height) == (32, 24)
    np.testing.assert_allclose(dataset.times, np.linspace(0, 1, 5))
    np.testing.assert_allclose(dataset.K[0], [[25, 0, 16], [0, 25, 12], [0, 0, 1]])
    assert "scaled" in dataset.notes[0]
    np.testing.assert_allclose(camera_centers(dataset.w2c[0]), centres[3], atol=1e-12)
    # The camera looks at the target (image centre); the world's right and down directions of the
    # camera move the target right and down in the image.
    right, down, _ = look_at(centres[3])
    points = np.stack([TARGET, TARGET + 0.1 * right, TARGET + 0.1 * down])
    uv, depth = project_points(dataset.K[4], dataset.w2c[4], points)
    np.testing.assert_allclose(depth[0], np.linalg.norm(TARGET - centres[3]))
    np.testing.assert_allclose(uv[0], [16, 12], atol=1e-9)
    assert uv[1, 0] > 16 and uv[1, 1] == pytest.approx(12) and uv[2, 1] > 12 and uv[2, 0] == pytest.approx(16)

    with pytest.raises(InputError, match="holds 3 cameras") as failure:
        read_dynerf(tmp_path)
    assert "known_camera" in failure.value.hint and "[0, 1, 3]" in failure.value.hint
    with pytest.raises(InputError, match="camera 2 is not"):
        read_dynerf(tmp_path, camera=2)
    (tmp_path / "cam01.mp4").unlink()
    with pytest.raises(InputError, match="3 cameras but the folder holds 2"):
        read_dynerf(tmp_path, camera=0)


def test_dynerf_malformed_poses(tmp_path):
    write_dynerf(tmp_path, ids=(0,), frames=3)
    assert read_dynerf(tmp_path).num_frames == 3  # a single camera needs no id
    np.save(tmp_path / "poses_bounds.npy", np.zeros((1, 15)))
    with pytest.raises(InputError, match=r"shape \(1, 15\)"):
        read_dynerf(tmp_path)
    np.save(tmp_path / "poses_bounds.npy", np.concatenate([np.ones(15), [0.5, 4.0]])[None])
    with pytest.raises(InputError, match="not rotation matrices"):
        read_dynerf(tmp_path)
