"""data/video.py ``write_video``: H.264 MP4s that browsers play and the pipeline reads back."""
from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from mono4d.data.video import open_source, write_video


def moving_frames(count: int, height: int, width: int) -> np.ndarray:
    """``(count, height, width, 3)`` uint8: a smooth gradient with a bright square moving right."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), np.uint8)
    for t in range(count):
        frames[t, ..., 0] = (x * 255 // max(width - 1, 1)).astype(np.uint8)
        frames[t, ..., 1] = (y * 255 // max(height - 1, 1)).astype(np.uint8)
        frames[t, ..., 2] = 60
        frames[t, 8:20, 4 + 3 * t:16 + 3 * t] = 250
    return frames


def top_level_boxes(path: Path) -> list[str]:
    """The ISO-BMFF box types at the top level of an MP4, in file order."""
    data, boxes, offset = path.read_bytes(), [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        boxes.append(data[offset + 4:offset + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[offset + 8:offset + 16], "big")
        if size < 8:
            break
        offset += size
    return boxes


def test_written_video_decodes_back_as_browser_ready_h264(tmp_path):
    frames = moving_frames(15, 48, 64)
    path = tmp_path / "clip.mp4"
    assert write_video(path, iter(frames), fps=12.5) == 15  # any iterable, consumed lazily
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
        assert float(stream.average_rate) == pytest.approx(12.5)
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
    assert decoded.shape == frames.shape
    mse = np.mean((decoded.astype(np.float64) - frames) ** 2)
    assert 10 * np.log10(255.0 ** 2 / mse) > 30  # CRF 18: close to the frames given
    boxes = top_level_boxes(path)
    assert boxes.index("moov") < boxes.index("mdat")  # faststart: playback starts while loading
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left behind

    source = open_source(path)  # the pipeline reads it back with OpenCV
    assert source.num_frames == 15 and source.fps == pytest.approx(12.5)


def test_the_same_frames_encode_to_the_same_bytes(tmp_path):
    """Reproducible inputs: the synthetic scene's video.mp4 feeds every stage of the end-to-end
    test, so an encoder that varies from run to run makes the whole pipeline's figures vary (the
    libx264 of the PyAV wheel did with macroblock-tree rate control: 3 different files in 8)."""
    frames = moving_frames(24, 48, 64)
    encodes = []
    for attempt in range(12):
        path = tmp_path / f"clip{attempt}.mp4"
        write_video(path, frames, fps=12)
        encodes.append(path.read_bytes())
    assert all(data == encodes[0] for data in encodes), [len(data) for data in encodes]


def test_odd_sizes_are_padded_to_even_by_repeating_the_last_row_and_column(tmp_path):
    frames = moving_frames(4, 33, 47)
    path = tmp_path / "odd.mp4"
    assert write_video(path, frames, fps=5) == 4
    capture = cv2.VideoCapture(str(path))
    ok, bgr = capture.read()
    capture.release()
    assert ok and bgr.shape == (34, 48, 3)
    first = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.int16)
    assert np.abs(first[:33, :47] - frames[0]).mean() < 4
    assert np.abs(first[33, :47] - frames[0][32]).mean() < 6 and np.abs(first[:33, 47] - frames[0][:, 46]).mean() < 6


def test_bad_input_raises_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"previous")
    frames = [np.zeros((16, 16, 3), np.uint8), np.zeros((18, 16, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame 1 is 16x18 but the first frame is 16x16"):
        write_video(path, frames, fps=10)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        write_video(path, [np.zeros((16, 16, 3), np.float32)], fps=10)
    with pytest.raises(ValueError, match="frame rate must be positive"):
        write_video(path, [np.zeros((16, 16, 3), np.uint8)], fps=0)
    assert path.read_bytes() == b"previous"  # the old file is untouched, no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    assert write_video(tmp_path / "empty.mp4", [], fps=10) == 0 and not (tmp_path / "empty.mp4").exists()
    with pytest.raises(OSError, match="could not encode .* as H.264"):
        write_video(tmp_path / "missing" / "clip.mp4", [np.zeros((16, 16, 3), np.uint8)], fps=10)
