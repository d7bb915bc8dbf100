"""Pictures and videos the report generates or embeds: thumbnails, colour legends, charts as SVG
files, and videos as ``<video>`` elements.

Videos are embedded as they are when browsers play them (H.264, VP8, VP9 or AV1 in MP4/WebM;
data/video.py ``write_video`` writes H.264 MP4s). Any other video (e.g. mp4v from an older
workspace) is decoded with data/video.py ``iter_frames`` and re-encoded once into ``assets/`` as
H.264 with ``write_video``; the codec is read with PyAV.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from markupsafe import Markup

from mono4d.data.images import read_rgb, write_rgb
from mono4d.data.errors import InputError
from mono4d.data.video import iter_frames, open_source, write_video
from mono4d.data.visualize import color_bar, flow_to_color
from mono4d.pipeline.report.markup import ui
from mono4d.pipeline.report.model import StagePage

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 320
#: Codecs and containers every current browser plays in a ``<video>`` element.
BROWSER_CODECS = frozenset({"h264", "vp8", "vp9", "av1"})
BROWSER_CONTAINERS = frozenset({".mp4", ".m4v", ".webm"})


def asset_name(page: StagePage, path: Path, prefix: str, suffix: str = "") -> str:
    """A file name for an asset derived from ``path`` (its place in the stage folder, flattened)."""
    relative = path.relative_to(page.directory).as_posix() if path.is_relative_to(page.directory) else path.name
    return prefix + re.sub(r"[^A-Za-z0-9_.-]", "_", relative) + suffix


def write_thumbnail(source: Path, target: Path, max_side: int = THUMBNAIL_SIDE) -> None:
    """Write ``source`` shrunk (area interpolation) so its longer side is at most ``max_side``."""
    image = read_rgb(source)
    scale = max_side / max(image.shape[:2])
    if scale < 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    write_rgb(target, image)


def flow_wheel(size: int = 129) -> np.ndarray:
    """Legend of the flow colours ``(size, size, 3)`` uint8 RGB: each pixel shows the colour of a
    flow pointing from the centre to it; the rim is the saturation limit (outside: black)."""
    radius = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - radius
    field = np.stack([x, y], axis=-1)
    return flow_to_color(field, valid=np.hypot(x, y) <= radius, max_magnitude=radius)


def colour_legend(page: StagePage, name: str, top: str, bottom: str, note: str) -> Markup:
    """A vertical turbo colour bar (data/visualize.py ``color_bar``: the colours of the pictures)
    with end labels."""
    path = page.asset(name)
    write_rgb(path, color_bar(0.0, 1.0, height=220, width=24))
    return ui().colour_legend(page.url(path), top, bottom, note)


def chart_figure(page: StagePage, svg: str, title: str) -> Markup:
    """Write a chart (an SVG document from :mod:`mono4d.pipeline.report.plots`) as an asset and show it."""
    page.charts += 1
    path = page.asset(f"chart_{page.charts:02d}_{re.sub(r'[^A-Za-z0-9_-]', '_', title)[:60]}.svg")
    path.write_text(svg, encoding="utf-8")
    return page.figure(path, title, css="chart")  # the title also as caption: searchable page text


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says: codec name (FFmpeg's), size in px, frame count (0 when the
    container does not say) and frame rate (frames per second, 0.0 when unknown)."""

    codec: str
    width: int
    height: int
    frames: int
    fps: float

    def playable(self, path: Path) -> bool:
        """Whether browsers play ``path`` with this codec as it is."""
        return self.codec in BROWSER_CODECS and path.suffix.lower() in BROWSER_CONTAINERS


def video_stream_info(path: Path) -> VideoInfo:
    """Codec, size, frame count and rate of the first video stream of ``path`` (PyAV).
    Raises ``av.FFmpegError`` when FFmpeg cannot read the file, ValueError without a video stream."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(stream.codec_context.name, stream.codec_context.width, stream.codec_context.height,
                         int(frames), float(rate) if rate else 0.0)


def video_figure(page: StagePage, video: Path, caption: str) -> Markup:
    """A ``<video>`` of ``video`` (re-encoded into ``assets/`` as H.264 when browsers do not play
    it as it is) with a link to the file, or a note saying why it cannot be decoded."""
    import av

    page.shown.add(video.resolve())
    relative = video.relative_to(page.directory).as_posix() if video.is_relative_to(page.directory) else video.name
    try:
        info = video_stream_info(video)
        shown, note = video, None
        if not info.playable(video):
            shown = page.asset(asset_name(page, video, "video_", ".mp4"))
            source = open_source(video)
            write_video(shown, (frame for _, _, frame in iter_frames(source)), source.fps)
            note = f"re-encoded from {info.codec} (browsers do not play it) to H.264"
    except (av.FFmpegError, InputError, ValueError, OSError) as error:
        logger.warning("report: cannot decode the video %s", video, exc_info=True)
        problem = error.message if isinstance(error, InputError) else f"{type(error).__name__}: {error}"
        return ui().unreadable_video(relative, page.url(video), problem)
    size = f"{info.width} x {info.height} px"
    rate = f", {info.fps:.3g} fps" if info.fps > 0 else ""
    return ui().video(page.url(shown), f"{caption} ({info.frames} frames, {size}{rate}, {info.codec})",
                      page.url(video), note)
