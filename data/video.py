"""Reading frame sources (a video file decoded with OpenCV, or a folder of images) and writing
H.264 videos (:func:`write_video`, PyAV).

A source is opened once with :func:`open_source`, which checks it and lists the timestamps of
all its frames (for a video this is a decoding pass with ``cv2.VideoCapture.grab``, about
1 ms per frame at 480p); :func:`iter_frames` then decodes the frames a caller picked.
Timestamps are seconds from the first frame of the source. Frames are ``(H, W, 3) uint8`` RGB.
Every predictable problem (missing path, not a video, undecodable or truncated file, empty
folder, unreadable image) raises :class:`mono4d.data.errors.InputError` with a hint.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mono4d.data.errors import InputError
from mono4d.data.images import read_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
    ".mts", ".m2ts", ".ts", ".ogv", ".gif",
})
# Container frame rates outside this range are treated as missing metadata.
_PLAUSIBLE_FPS = (0.1, 1000.0)
# A complete decode may fall this many frames (or this fraction) short of the container's
# frame count without a warning: containers often count one or two frames more than decode.
_FRAME_COUNT_SLACK = (2, 0.05)
_FALLBACK_FPS = 30.0
_SUPPORTED_HINT = (
    "give a video file (" + ", ".join(sorted(VIDEO_EXTENSIONS)) + ") or a folder of images ("
    + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
)


def natural_sort_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``img2.png`` before ``img10.png``.

    Case-insensitive; names that compare equal this way (``img01``/``img1``) fall back to
    plain string order so the result is deterministic.
    """
    parts = re.split(r"(\d+)", name.casefold())
    # re.split with a capture group alternates text (even positions) and digits (odd positions),
    # so tuples compare str with str and int with int position by position.
    return tuple(int(part) if position % 2 else part for position, part in enumerate(parts)), name


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (extensions in :data:`IMAGE_EXTENSIONS`, any case),
    in natural order. Hidden files and subfolders are ignored."""
    folder = Path(folder)
    files = [
        path for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(files, key=lambda path: natural_sort_key(path.name))


@dataclass(frozen=True)
class VideoProbe:
    """Container metadata of a video as OpenCV reports it (may be approximate).

    ``fps`` is 0.0 and ``frame_count`` 0 when the container does not say.
    """

    fps: float
    frame_count: int
    width: int
    height: int


def _describe_unopenable(path: Path) -> str:
    """Why OpenCV could not open ``path``, as precisely as a glance at its bytes allows."""
    size = path.stat().st_size
    if size == 0:
        return f"{path} is an empty file (0 bytes), not a video"
    with path.open("rb") as handle:
        head = handle.read(512)
    try:
        head.decode("utf-8")
        looks_like_text = b"\x00" not in head
    except UnicodeDecodeError:
        looks_like_text = False
    if looks_like_text:
        return f"{path} looks like a text file, not a video"
    return (f"cannot decode {path} ({size} bytes): not a video OpenCV can read, or a corrupt or "
            f"truncated one (e.g. cut off before its index)")


def _open_capture(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise InputError(
            _describe_unopenable(path),
            "check that the file plays in a video player; re-download or re-export it, or convert "
            "it with `ffmpeg -i INPUT -c:v libx264 output.mp4`",
        )
    return capture


def probe_video(path: str | Path) -> VideoProbe:
    """Frame rate, frame count and size of a video from its container metadata.

    Raises :class:`InputError` when the file is missing or OpenCV cannot open it.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"video {path} does not exist", "check the path of the video file")
    if not path.is_file():
        raise InputError(f"{path} is not a video file", "give the path of a video file such as clip.mp4")
    capture = _open_capture(path)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
        frame_count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()
    fps = float(fps) if math.isfinite(fps) and _PLAUSIBLE_FPS[0] <= fps <= _PLAUSIBLE_FPS[1] else 0.0
    frame_count = int(frame_count) if math.isfinite(frame_count) and frame_count > 0 else 0
    return VideoProbe(fps=fps, frame_count=frame_count, width=width, height=height)


@dataclass(frozen=True)
class FrameSource:
    """An opened and checked frame source.

    ``timestamps`` ``(N,)`` float64 seconds from the first frame, strictly increasing;
    ``fps`` the source frame rate (container metadata for a video, the assumed rate for an
    image folder); ``files`` the image files in natural order (empty for a video);
    ``complete`` False when listing stopped early at ``until_s`` (frames after it exist but
    are not listed); ``notes`` warnings worth recording (e.g. a truncated video).
    """

    path: Path
    kind: str
    fps: float
    timestamps: np.ndarray
    files: tuple[Path, ...] = ()
    complete: bool = True
    notes: tuple[str, ...] = ()

    @property
    def num_frames(self) -> int:
        """Number of frames listed."""
        return int(self.timestamps.size)

    @property
    def duration_s(self) -> float:
        """Length of the listed frames in seconds: last timestamp plus one frame period."""
        return float(self.timestamps[-1] + 1.0 / self.fps) if self.num_frames else 0.0


def _timestamps_from_positions(positions_ms: Sequence[float], fps: float) -> np.ndarray:
    """Seconds from the first frame: the decoder's presentation times when they are usable
    (finite, strictly increasing), else ``index / fps``."""
    positions = np.asarray(positions_ms, dtype=np.float64)
    if positions.size and np.all(np.isfinite(positions)) and np.all(np.diff(positions) > 0):
        return (positions - positions[0]) / 1000.0
    return np.arange(positions.size, dtype=np.float64) / fps


def _scan_video(path: Path, until_s: float | None) -> FrameSource:
    probe = probe_video(path)
    notes: list[str] = []
    fps = probe.fps
    if fps == 0.0:
        fps = _FALLBACK_FPS
        notes.append(f"{path.name} has no usable frame rate in its metadata; assuming {fps:g} fps "
                     "where the decoder gives no timestamps")
    capture = _open_capture(path)
    positions_ms: list[float] = []
    complete = True
    try:
        with tqdm(total=probe.frame_count or None, desc=f"scanning {path.name}", unit="frame",
                  leave=False) as progress:
            while capture.grab():
                positions_ms.append(capture.get(cv2.CAP_PROP_POS_MSEC))
                progress.update()
                if until_s is not None and len(positions_ms) > 1:
                    by_position = (positions_ms[-1] - positions_ms[0]) / 1000.0
                    by_index = (len(positions_ms) - 1) / fps
                    if min(by_position, by_index) > until_s:
                        complete = False
                        break
    finally:
        capture.release()
    decoded = len(positions_ms)
    if decoded == 0:
        raise InputError(
            f"{path} opens as a video but no frame could be decoded (corrupt or truncated file, "
            "or a codec this OpenCV build lacks)",
            "check that it plays in a video player; convert it with "
            "`ffmpeg -i INPUT -c:v libx264 output.mp4`",
        )
    timestamps = _timestamps_from_positions(positions_ms, fps)
    expected = probe.frame_count
    if complete and expected and decoded < expected - max(_FRAME_COUNT_SLACK[0], _FRAME_COUNT_SLACK[1] * expected):
        note = (f"decoding {path.name} stopped after {decoded} of the {expected} frames its "
                f"metadata reports (truncated or corrupt file?); using the {decoded} decoded frames")
        logger.warning(note)
        notes.append(note)
    return FrameSource(path=path, kind="video", fps=fps, timestamps=timestamps, complete=complete,
                       notes=tuple(notes))


def _no_images_hint(folder: Path) -> str:
    """Suggest where the images might be when ``folder`` holds none."""
    entries = sorted((entry for entry in folder.iterdir() if not entry.name.startswith(".")),
                     key=lambda entry: natural_sort_key(entry.name))
    videos = [entry for entry in entries if entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS]
    if videos:
        return f"to use a video, give the file itself, e.g. {videos[0]}"
    with_images = [entry for entry in entries if entry.is_dir() and list_image_files(entry)]
    if with_images:
        return f"did you mean the subfolder {with_images[0]}?"
    return _SUPPORTED_HINT


def _scan_folder(folder: Path, folder_fps: float) -> FrameSource:
    if not (math.isfinite(folder_fps) and folder_fps > 0):
        raise InputError(f"the frame rate assumed for an image folder must be positive, got {folder_fps}",
                         "set frames.folder_fps to the rate the images were taken at, e.g. 30")
    files = list_image_files(folder)
    if not files:
        raise InputError(f"folder {folder} contains no images", _no_images_hint(folder))
    timestamps = np.arange(len(files), dtype=np.float64) / folder_fps
    return FrameSource(path=folder, kind="images", fps=float(folder_fps), timestamps=timestamps,
                       files=tuple(files))


def open_source(path: str | Path, folder_fps: float = 30.0, until_s: float | None = None) -> FrameSource:
    """Check a video file or image folder and list its frames' timestamps.

    ``folder_fps`` is the frame rate assumed for an image folder. With ``until_s``, listing a
    video stops at the first frame later than that many seconds (``complete`` is then False).
    Raises :class:`InputError` for a missing path, a file that is not a supported video, a
    video with no decodable frame and a folder without images.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist", "check the path; " + _SUPPORTED_HINT)
    if path.is_dir():
        return _scan_folder(path, folder_fps)
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        raise InputError(f"{path} is a single image, not a video",
                         f"put the frames in a folder and give the folder, e.g. {path.parent}")
    if suffix not in VIDEO_EXTENSIONS:
        raise InputError(
            f"{path} is not a video (unsupported extension '{path.suffix or '(none)'}')",
            _SUPPORTED_HINT + "; convert other formats with `ffmpeg -i INPUT output.mp4`",
        )
    return _scan_video(path, until_s)


def _checked_size(frame: np.ndarray, first_shape: tuple[int, ...] | None, what: str, source: Path) -> tuple[int, ...]:
    if first_shape is not None and frame.shape != first_shape:
        raise InputError(
            f"{what} of {source} is {frame.shape[1]}x{frame.shape[0]} but the first frame is "
            f"{first_shape[1]}x{first_shape[0]}: all frames must have the same size",
            "resize or crop the images to one size (or remove the odd ones)",
        )
    return frame.shape


def iter_frames(source: FrameSource, indices: Sequence[int] | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
    """Decode frames of ``source`` as ``(source_index, timestamp_s, (H, W, 3) uint8 RGB)``.

    ``indices`` (strictly increasing, within ``0..num_frames-1``) picks the frames; None means
    all listed frames. Video frames that are not picked are skipped without colour conversion.
    Raises :class:`InputError` for an unreadable image, frames of different sizes, or a video
    that stops decoding before a picked frame.
    """
    wanted = np.arange(source.num_frames) if indices is None else np.asarray(indices, dtype=np.int64)
    if wanted.size == 0:
        return
    if np.any(np.diff(wanted) <= 0) or wanted[0] < 0 or wanted[-1] >= source.num_frames:
        raise IndexError(f"frame indices must be strictly increasing within 0..{source.num_frames - 1}")
    first_shape: tuple[int, ...] | None = None
    if source.kind == "images":
        for index in wanted:
            image_path = source.files[index]
            try:
                frame = read_rgb(image_path)
            except InputError as error:
                raise InputError(
                    f"cannot read image {image_path} (frame {index} of folder {source.path})",
                    "the file is corrupt or not an image: remove or replace it",
                ) from error
            first_shape = _checked_size(frame, first_shape, f"image {image_path.name}", source.path)
            yield int(index), float(source.timestamps[index]), frame
        return
    capture = _open_capture(source.path)
    try:
        position = 0
        for index in wanted:
            while position <= index:
                if not capture.grab():
                    raise InputError(
                        f"decoding {source.path} stopped at frame {position}, although the first "
                        f"pass decoded {source.num_frames} frames",
                        "the file changed or cannot be decoded reliably; convert it with "
                        "`ffmpeg -i INPUT -c:v libx264 output.mp4`",
                    )
                position += 1
            ok, bgr = capture.retrieve()
            if not ok or bgr is None:
                raise InputError(f"cannot decode frame {index} of {source.path}",
                                 "convert the video with `ffmpeg -i INPUT -c:v libx264 output.mp4`")
            frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            first_shape = _checked_size(frame, first_shape, f"frame {index}", source.path)
            yield int(index), float(source.timestamps[index]), frame
    finally:
        capture.release()


#: H.264 encoder settings of :func:`write_video`: constant quality (CRF 18: visually lossless for
#: renders and overlays), the default speed preset, 8-bit 4:2:0 so every browser plays it.
H264_CRF = 18
H264_PRESET = "medium"
H264_PIXEL_FORMAT = "yuv420p"
#: libx264 options beyond the preset: macroblock-tree rate control off. With it on, the libx264 of
#: the PyAV wheel encodes the same frames differently from run to run (measured: 9 different files
#: in 12 encodes of the synthetic scene, with or without threads), so a generated input video, and
#: every stage run on it, would not be reproducible; with it off all encodes are bit-identical.
H264_X264_PARAMS = "mbtree=0"


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> int:
    """Write ``(H, W, 3)`` uint8 RGB frames (an array ``(T, H, W, 3)`` or any iterable, consumed
    lazily) as an H.264 MP4 that browsers play: yuv420p, ``fps`` frames per second, the index
    (moov) before the data so playback starts while it loads. Encoded in process with PyAV
    (FFmpeg's libx264). The size is the first frame's; odd widths or heights are padded to even by
    repeating the last column/row (4:2:0 needs even sizes; pixel coordinates stay valid). The file
    is written under a temporary name and renamed, so ``path`` never holds a partial video.
    Returns the frame count; with no frame nothing is written and 0 returned.

    Raises ValueError for a non-positive ``fps`` or a frame that is not ``(H, W, 3)`` uint8 of the
    first frame's size, OSError when the encoder or the file fails.
    """
    import av

    path = Path(path)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"write_video({path}): the frame rate must be positive, got {fps}")
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix or '.mp4'}")
    container = stream = None
    shape: tuple[int, ...] | None = None
    count = 0
    try:
        for frame in frames:
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"write_video({path}): frames must be (H, W, 3) uint8 RGB, frame {count} is "
                                 f"{frame.shape} {frame.dtype}")
            if shape is None:
                shape = frame.shape
                container = av.open(str(temporary), mode="w", format="mp4", options={"movflags": "+faststart"})
                stream = container.add_stream("libx264", rate=Fraction(float(fps)).limit_denominator(100_000))
                stream.width, stream.height = frame.shape[1] + frame.shape[1] % 2, frame.shape[0] + frame.shape[0] % 2
                stream.pix_fmt = H264_PIXEL_FORMAT
                stream.options = {"crf": str(H264_CRF), "preset": H264_PRESET, "x264-params": H264_X264_PARAMS}
            elif frame.shape != shape:
                raise ValueError(f"write_video({path}): frame {count} is {frame.shape[1]}x{frame.shape[0]} but the "
                                 f"first frame is {shape[1]}x{shape[0]}; all frames must have one size")
            if frame.shape[0] % 2 or frame.shape[1] % 2:
                frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(picture))
            count += 1
        if container is not None:
            container.mux(stream.encode())
            container.close()
            container = None
            os.replace(temporary, path)
    except av.FFmpegError as error:
        raise OSError(f"could not encode {path} as H.264 with PyAV/FFmpeg: {error}; check that the folder is "
                      "writable and the disk not full, and that the installed `av` wheel includes libx264") from error
    finally:
        if container is not None:
            try:
                container.close()
            except av.FFmpegError:
                logger.debug("closing the failed video %s", temporary, exc_info=True)
        temporary.unlink(missing_ok=True)
    return count
