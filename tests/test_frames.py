"""Frames stage and video/image-folder reading: selection by time, resizing, artifacts, and every
predictable bad input raising InputError/ParameterError with a hint."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mono4d.data import video
from mono4d.data.errors import InputError, Mono4dError, ParameterError
from mono4d.data.images import write_rgb
from mono4d.stages import frames
from tests.conftest import shared_path

FPS = 20.0
SIZE = (64, 48)  # width, height


def _frame(value: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A flat RGB frame whose brightness encodes ``value`` (robust to lossy codecs)."""
    width, height = size
    return np.full((height, width, 3), value, dtype=np.uint8)


def _write_video(path: Path, count: int, fourcc: str = "mp4v", fps: float = FPS, noise: bool = False) -> Path:
    """``count`` frames; frame i has brightness 5*i (+ noise for big MJPEG frames)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, SIZE)
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for index in range(count):
        frame = _frame(5 * index)
        if noise:
            frame = rng.integers(0, 255, frame.shape, dtype=np.uint8)
        writer.write(frame)
    writer.release()
    return path


def _write_folder(folder: Path, names: list[str], size: tuple[int, int] = SIZE) -> Path:
    """PNG/JPEG files; the image named ``names[k]`` has brightness 10*k."""
    folder.mkdir(parents=True, exist_ok=True)
    for position, name in enumerate(names):
        write_rgb(folder / name, _frame(10 * position, size))
    return folder


def _run(source: Path, out_dir: Path, **params) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    return frames.run({"source": source}, frames.Params(**params), out_dir)


def _brightness(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).mean(axis=1)


# --- reading sources -------------------------------------------------------------------------

def test_natural_sort_and_image_listing(tmp_path):
    names = ["img10.png", "img2.PNG", "img1.png", "IMG3.jpg", "img20.webp", "img11.TIFF"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    listed = [path.name for path in video.list_image_files(tmp_path)]
    assert listed == ["img1.png", "img2.PNG", "IMG3.jpg", "img10.png", "img11.TIFF", "img20.webp"]
    assert sorted(["a01b2", "a1b10", "a1b3", "a2"], key=video.natural_sort_key) == ["a01b2", "a1b3", "a1b10", "a2"]


def test_probe_and_iterate_video(tmp_path):
    path = _write_video(tmp_path / "clip.mp4", 12)
    probe = video.probe_video(path)
    assert probe.fps == pytest.approx(FPS)
    assert (probe.frame_count, probe.width, probe.height) == (12, *SIZE)
    source = video.open_source(path)
    assert source.kind == "video" and source.num_frames == 12 and source.complete
    np.testing.assert_allclose(source.timestamps, np.arange(12) / FPS, atol=1e-6)
    picked = list(video.iter_frames(source, [1, 4, 11]))
    assert [index for index, _, _ in picked] == [1, 4, 11]
    assert [stamp for _, stamp, _ in picked] == pytest.approx([0.05, 0.2, 0.55])
    images = np.stack([frame for _, _, frame in picked])
    assert images.shape == (3, SIZE[1], SIZE[0], 3) and images.dtype == np.uint8
    np.testing.assert_allclose(_brightness(images), [5, 20, 55], atol=5)  # mp4v shifts flat grey slightly


def test_open_source_stops_listing_at_until(tmp_path):
    source = video.open_source(_write_video(tmp_path / "clip.mp4", 40), until_s=0.5)
    assert not source.complete
    assert 0.5 <= source.timestamps[-1] < 0.5 + 2 / FPS


# --- selection ---------------------------------------------------------------------------------

def test_select_frames_by_time_stride_and_max_frames():
    times = np.arange(90) / 30.0
    np.testing.assert_array_equal(frames.select_frames(times, fps=10), np.arange(0, 90, 3))
    np.testing.assert_array_equal(frames.select_frames(times, fps=10, stride=2), np.arange(0, 90, 6))
    np.testing.assert_array_equal(frames.select_frames(times, fps=60), np.arange(90))
    window = frames.select_frames(times, start=1.0, end=2.0)
    assert (window[0], window[-1]) == (30, 60)
    evenly = frames.select_frames(times, max_frames=4)
    np.testing.assert_array_equal(evenly, [0, 30, 59, 89])
    assert frames.select_frames(times, start=5.0).size == 0


def test_select_frames_follows_variable_frame_rate():
    # 30 fps with a burst at 60 fps in the middle: a 10 fps target must stay evenly spaced in time.
    times = np.concatenate([np.arange(30) / 30, 1 + np.arange(60) / 60, 2 + np.arange(30) / 30])
    picked = frames.select_frames(times, fps=10)
    np.testing.assert_allclose(np.diff(times[picked]), 0.1, atol=1e-9)
    assert times[picked][-1] == pytest.approx(2.9)


def test_resize_to_max_side_keeps_aspect():
    image = np.zeros((480, 368, 3), np.uint8)
    assert frames.resize_to_max_side(image, 240).shape == (240, 184, 3)
    assert frames.resize_to_max_side(image, 0) is image
    assert frames.resize_to_max_side(image, 1000) is image


# --- running the stage -------------------------------------------------------------------------

def test_run_on_video_writes_artifacts(tmp_path):
    source = _write_video(tmp_path / "clip.mp4", 30)
    out = tmp_path / "out"
    figures = _run(source, out, fps=10, max_frames=5, format="jpg", jpeg_quality=90)
    meta = frames.read_frames_meta(out)
    assert figures == {"num_frames": 5, "width": SIZE[0], "height": SIZE[1], "fps": meta["fps"],
                       "source_fps": pytest.approx(FPS), "duration_s": pytest.approx(1.4)}
    assert meta["source_type"] == "video" and meta["source"] == str(source.resolve())
    assert meta["source_indices"] == [0, 8, 14, 20, 28]  # 15 frames at 10 fps, 5 evenly spaced
    assert meta["timestamps"] == pytest.approx([index / FPS for index in meta["source_indices"]])
    assert meta["files"] == [f"images/{number:06d}.jpg" for number in range(5)]
    assert [path.name for path in frames.frame_paths(out)] == [f"{number:06d}.jpg" for number in range(5)]
    images = frames.load_frames(out)
    assert images.shape == (5, SIZE[1], SIZE[0], 3)
    decoded = {index: frame for index, _, frame in video.iter_frames(video.open_source(source))}
    expected = np.stack([decoded[index] for index in meta["source_indices"]])
    np.testing.assert_allclose(_brightness(images), _brightness(expected), atol=1.5)  # JPEG q90 of flat frames
    np.testing.assert_array_equal(frames.load_frames(out, [4, 0]), images[[4, 0]])


def test_run_on_image_folder_in_natural_order(tmp_path):
    names = ["img1.png", "img2.png", "img10.png", "img11.png", "img20.png"]
    folder = _write_folder(tmp_path / "shots", names)
    (folder / "readme.txt").write_text("ignored")
    out = tmp_path / "out"
    figures = _run(folder, out, folder_fps=10, max_side=32)
    meta = json.loads((out / "frames.json").read_text())
    assert meta["source_type"] == "images" and meta["source_fps"] == 10
    assert meta["timestamps"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert figures["fps"] == pytest.approx(10) and (figures["width"], figures["height"]) == (32, 24)
    images = frames.load_frames(out)
    assert images.shape == (5, 24, 32, 3)
    np.testing.assert_array_equal(_brightness(images), [0, 10, 20, 30, 40])  # PNG and flat frames: exact


def test_run_on_teddy_resamples_and_resizes(tmp_path):
    teddy = shared_path("videos/teddy.mp4")
    out = tmp_path / "out"
    figures = _run(teddy, out, fps=10, max_side=240)
    assert (figures["width"], figures["height"]) == (184, 240)
    assert figures["source_fps"] == pytest.approx(20, abs=0.05)
    assert 69 <= figures["num_frames"] <= 72 and figures["fps"] == pytest.approx(10, abs=0.01)
    meta = frames.read_frames_meta(out)
    np.testing.assert_allclose(np.diff(meta["timestamps"]), 0.1, atol=1e-3)
    assert meta["source_indices"][:4] == [0, 2, 4, 6]
    assert len(list((out / "images").glob("*.png"))) == figures["num_frames"]
    first = frames.load_frames(out, [0])[0]
    assert first.shape == (240, 184, 3) and first.std() > 10  # real picture content, not blank


# --- bad input ---------------------------------------------------------------------------------

def _assert_error(error_type: type[Mono4dError], match: str, call) -> Mono4dError:
    """Run ``call``, check it raises ``error_type`` matching ``match`` with a hint; return the error."""
    with pytest.raises(error_type, match=match) as caught:
        call()
    assert caught.value.hint, "every user-facing error carries a hint"
    return caught.value


def test_missing_path(tmp_path):
    _assert_error(InputError, "does not exist", lambda: _run(tmp_path / "nope.mp4", tmp_path / "out"))


def test_not_a_video(tmp_path):
    text = tmp_path / "clip.txt"
    text.write_text("hello")
    error = _assert_error(InputError, "not a video", lambda: _run(text, tmp_path / "out"))
    assert ".mp4" in error.hint
    image = tmp_path / "photo.png"
    write_rgb(image, _frame(0))
    _assert_error(InputError, "single image", lambda: _run(image, tmp_path / "out"))


def test_text_file_named_mp4(tmp_path):
    fake = tmp_path / "clip.mp4"
    fake.write_text("this is not a video\n" * 20)
    _assert_error(InputError, "text file, not a video", lambda: _run(fake, tmp_path / "out"))


def test_random_bytes_and_empty_mp4(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).bytes(20000))
    error = _assert_error(InputError, "cannot decode", lambda: _run(noise, tmp_path / "out"))
    assert "ffmpeg" in error.hint
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _assert_error(InputError, "empty file", lambda: _run(empty, tmp_path / "out"))


def test_truncated_real_video(tmp_path):
    data = shared_path("videos/teddy.mp4").read_bytes()
    cut = tmp_path / "teddy_cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: nothing opens
    _assert_error(InputError, "truncated", lambda: _run(cut, tmp_path / "out"))
    assert not (tmp_path / "out" / "frames.json").exists()


def test_video_that_opens_but_decodes_nothing(tmp_path):
    data = bytearray(_write_video(tmp_path / "clip.mp4", 10).read_bytes())
    payload, index = data.find(b"mdat") + 4, data.find(b"moov") - 4
    data[payload:index] = bytes(index - payload)  # frame data zeroed, container intact
    broken = tmp_path / "zeroed.mp4"
    broken.write_bytes(bytes(data))
    _assert_error(InputError, "no frame could be decoded", lambda: _run(broken, tmp_path / "out"))


def test_truncated_video_keeps_decoded_frames_with_a_note(tmp_path):
    # MJPEG AVI keeps its frame count in the header, so a cut file opens and decodes partly.
    full = _write_video(tmp_path / "clip.avi", 40, fourcc="MJPG", noise=True).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full[: len(full) // 2])
    out = tmp_path / "out"
    figures = _run(cut, out)
    assert 5 <= figures["num_frames"] < 30
    assert any("stopped after" in note and "of the 40 frames" in note for note in figures["notes"])
    assert frames.read_frames_meta(out)["num_frames"] == figures["num_frames"]


def test_folders_without_usable_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_error(InputError, "contains no images", lambda: _run(empty, tmp_path / "out"))
    parent = tmp_path / "dataset"
    _write_folder(parent / "images", ["a.png", "b.png"])
    error = _assert_error(InputError, "contains no images", lambda: _run(parent, tmp_path / "out"))
    assert "images" in error.hint
    single = _write_folder(tmp_path / "single", ["only.png"])
    _assert_error(InputError, "at least 2 frames", lambda: _run(single, tmp_path / "out1"))
    assert not (tmp_path / "out1" / "frames.json").exists()


def test_folder_with_unreadable_or_mismatched_images(tmp_path):
    broken = _write_folder(tmp_path / "broken", ["f1.png", "f2.png"])
    (broken / "f3.png").write_text("not really a png")
    out = tmp_path / "out"
    error = _assert_error(InputError, "cannot read image .*f3.png", lambda: _run(broken, out))
    assert "remove or replace" in error.hint
    assert not (out / "frames.json").exists()
    mixed = _write_folder(tmp_path / "mixed", ["f1.png", "f2.png"])
    write_rgb(mixed / "f3.png", _frame(0, (32, 32)))
    _assert_error(InputError, "same size", lambda: _run(mixed, tmp_path / "out2"))


def test_selection_too_small(tmp_path):
    source = _write_video(tmp_path / "clip.mp4", 20)  # 1.0 s at 20 fps
    out = tmp_path / "out"
    error = _assert_error(InputError, "no frame .* time range", lambda: _run(source, out, start=5.0))
    assert "1.00 s long" in str(error) and "frames.start" in error.hint
    error = _assert_error(InputError, "at least 2 frames", lambda: _run(source, out, stride=50))
    assert "stride" in error.hint
    _assert_error(InputError, "at least 2 frames", lambda: _run(source, out, start=0.5, end=0.52))
    assert not (out / "frames.json").exists()


@pytest.mark.parametrize("size", [(1, 1), (11, 40), (200, 8)])
def test_frames_smaller_than_the_flow_backends_accept_are_rejected(tmp_path, size):
    folder = _write_folder(tmp_path / "tiny", ["a.png", "b.png", "c.png"], size)
    out = tmp_path / "out"
    error = _assert_error(InputError, f"{size[0]}x{size[1]} pixels: optical flow needs at least 12 pixels on each side",
                          lambda: _run(folder, out))
    assert "at least 12x12 pixels" in error.hint
    assert not (out / "frames.json").exists() and not list(out.rglob("*.png"))
    _run(_write_folder(tmp_path / "smallest", ["a.png", "b.png"], (12, 12)), tmp_path / "ok")  # the minimum works


def test_a_resize_below_the_flow_minimum_names_max_side(tmp_path):
    folder = _write_folder(tmp_path / "strip", ["a.png", "b.png"], (400, 20))
    error = _assert_error(InputError, "400x20 pixels, 192x10 after frames.max_side=192",
                          lambda: _run(folder, tmp_path / "out", max_side=192))
    assert "frames.max_side" in error.hint
    assert _run(folder, tmp_path / "ok", max_side=240)["height"] == 12


@pytest.mark.parametrize("params, match", [
    ({"fps": -1.0}, "fps must be >= 0"),
    ({"fps": float("nan")}, "fps must be >= 0"),
    ({"stride": 0}, "stride must be >= 1"),
    ({"stride": 1.5}, "whole number"),
    ({"max_frames": -3}, "max_frames"),
    ({"max_frames": 1}, "max_frames"),
    ({"start": -1.0}, "start must be >= 0"),
    ({"end": -2.0}, "end must be >= 0"),
    ({"start": 3.0, "end": 2.0}, "must be after"),
    ({"start": 2.0, "end": 2.0}, "must be after"),
    ({"max_side": 16}, "max_side"),
    ({"format": "gif"}, "format"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"jpeg_quality": 101}, "jpeg_quality"),
    ({"folder_fps": 0.0}, "folder_fps"),
])
def test_absurd_params_are_rejected(params, match, tmp_path):
    _assert_error(ParameterError, match, frames.Params(**params).validate)
    _assert_error(ParameterError, match, lambda: _run(tmp_path / "never-read.mp4", tmp_path / "out", **params))


def test_default_params_are_valid():
    frames.Params().validate()


def test_loaders_need_frames_json(tmp_path):
    _assert_error(InputError, "frames.json is missing", lambda: frames.read_frames_meta(tmp_path))
    (tmp_path / "frames.json").write_text("{broken")
    _assert_error(InputError, "not valid JSON", lambda: frames.load_frames(tmp_path))
