"""`mono4d inspect DIR [--compare OTHER] [--out PATH]`: a static HTML report of a workspace.

Written under ``out_dir`` (default ``DIR/report``)::

    index.html        the run (input, preset, overrides) and a table of stages: state
                      (done / stale and why / missing), wall time, key figures
    <stage>.html      one page per stage: state, figures, notes, parameters, pictures, inputs,
                      versions, log
    assets/           style.css, report.js and generated pictures (thumbnails, GIFs of videos,
                      flow validity masks, colour bars and legends, error maps), per run and
                      stage in assets/<run>/<stage>/
    .mono4d-report.json  what the last report wrote here (replaced on the next one)

Pictures the stages wrote are linked by relative paths into the workspace, so the report opens
from disk (file://) with no server and no network, as long as the workspace and the report keep
their relative places. Videos (OpenCV writes mp4v, which browsers may not play) are converted to
short animated GIFs.

The pages are driven by the files found in each stage folder (documented formats in
../shared/DESIGN.md), not by the stage's name alone: a view appears where its files exist
(``frames.json`` -> frame strip, ``depth.json``/``alignment.json`` -> mono vs aligned depth,
``pairs.json`` -> flow, ``labels.json``/``masks/`` -> masks, ``cameras.json`` -> 3D cameras,
``tracks.npz``/``tracks.png``/``tracks.mp4`` -> tracks, ``*curve*``/``*loss*``/``*metric*``/
``*history*.json`` -> training curves, an image folder named ``gt``/``ground_truth``/``target``
next to another image folder with the same file names -> renders vs ground truth with error
maps, any video -> animated GIF), and every other picture or video is listed, so nothing is
hidden. A view that cannot read its files says why instead of failing the report.

With ``compare``, every page puts the two workspaces side by side: figures with their change,
parameters and versions with differences highlighted, pictures next to each other.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import shutil
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from data.errors import Mono4dError, ParameterError
from data.images import read_gray, read_rgb, write_gray, write_rgb
from data.visualize import LABEL_COLORS, color_bar, colorize, flow_to_color, overlay_labels
from pipeline.registry import STAGES
from pipeline.report_assets import REPORT_JS, STYLE_CSS
from pipeline.state import StageState
from pipeline.status import format_figures, workspace_states
from pipeline.workspace import MANIFEST, Workspace, read_json, write_json_atomic

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".svg")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
MARKER_FILE = ".mono4d-report.json"
#: Frames (or pairs) shown per view, and thumbnails in the frame strip.
SAMPLES = 4
STRIP_FRAMES = 8
THUMBNAIL_SIDE = 320
GIF_MAX_FRAMES = 60
GIF_MAX_SIDE = 360
#: Sparse points drawn in the 3D view at most (a fixed random subset beyond that).
ORBIT_MAX_POINTS = 6000
#: Per-folder previews in the list of other files.
PREVIEWS_PER_FOLDER = 6
#: Error maps of renders vs ground truth: |error| (intensities in [0, 1]) at the top of the scale.
ERROR_VMAX = 0.2
CURVE_FILE = re.compile(r"curve|loss|metric|histor", re.IGNORECASE)
STEP_KEYS = ("step", "steps", "iteration", "iterations", "iter", "epoch")
GROUND_TRUTH_DIRS = ("gt", "ground_truth", "groundtruth", "target", "targets", "reference")
#: Sibling folders of a ground-truth folder whose name holds one of these are not colour renders
#: of it (depth pictures, side-by-side composites, error maps) and are not scored against it.
NOT_COLOUR_RENDERS = ("depth", "compare", "error", "mask", "alpha")
CHART_COLORS = ("#1a67d2", "#e37400", "#1e8e3e", "#9334e6", "#c5221f", "#12a4af")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------------------------
# Runs and stage pages


@dataclass
class Run:
    """One workspace as the report sees it: its recorded configuration and stage states."""

    key: str  # asset subfolder and HTML id prefix: "a" (the run), "b" (the compared run)
    label: str
    workspace: Workspace
    config: dict[str, Any]
    states: dict[str, StageState]

    @property
    def root(self) -> Path:
        return self.workspace.root

    def stage_dir(self, stage: str) -> Path:
        return self.workspace.stage_dir(stage)

    def manifest(self, stage: str) -> dict[str, Any]:
        state = self.states.get(stage)
        return (state.manifest if state and state.manifest else None) or {}

    def params(self, stage: str) -> tuple[dict[str, Any], bool]:
        """The parameters the stage ran with, or (second value False) those the run
        configuration gives it when it has not run."""
        manifest = self.manifest(stage)
        if "params" in manifest:
            return dict(manifest["params"]), True
        return dict(self.config.get("config", {}).get("stages", {}).get(stage, {})), False

    def param_source(self, stage: str, name: str) -> str:
        """Where the run configuration took a parameter from ("luigi.cfg", "--set", "preset cpu",
        "default"); empty for a stage the configuration does not know."""
        config = self.config.get("config", {})
        if stage not in config.get("stages", {}):
            return ""
        return config.get("sources", {}).get(f"{stage}.{name}", "default")


def load_run(work: Path, key: str, label: str, report_dir: Path) -> Run:
    """Read a workspace's configuration and evaluate its stages (ParameterError when ``work`` is
    not a workspace). Stage folders with a manifest that the pipeline does not know (yet) are
    included as "unchecked"."""
    workspace = Workspace(work)
    config = workspace.read_config()
    states: dict[str, StageState] = {}
    problem = None
    try:
        states = {state.stage: state for state in workspace_states(workspace.root)}
    except Exception as error:  # a report must still show what exists when states cannot be evaluated
        logger.warning("cannot evaluate the stage states of %s", workspace.root, exc_info=True)
        problem = f"the stage state could not be evaluated: {type(error).__name__}: {error}"
    for child in sorted(workspace.root.iterdir()):
        if (child.is_dir() and not child.name.startswith(".") and child.name not in states
                and child.resolve() != report_dir and (child / MANIFEST).is_file()):
            reason = problem or "not a stage of this version of the pipeline (pipeline/config.py); shown as found"
            states[child.name] = StageState(child.name, "unchecked", [reason], read_json(child / MANIFEST))
    return Run(key, label, workspace, config, states)


def stage_rank(stage: str) -> tuple[int, str]:
    """Sort key of stage folders: the registry's pipeline order, then unknown folders by name."""
    order = list(STAGES)
    return (order.index(stage), "") if stage in order else (len(order), stage)


@dataclass
class View:
    """One titled block of a stage page (pictures, charts, facts) for one run."""

    title: str
    body: str


@dataclass
class StagePage:
    """What a view needs to draw one stage of one run: paths, links and generated assets."""

    run: Run
    stage: str
    report_dir: Path
    shown: set[Path] = field(default_factory=set)

    @property
    def directory(self) -> Path:
        return self.run.stage_dir(self.stage)

    def url(self, path: Path) -> str:
        return relative_url(path, self.report_dir)

    def asset(self, name: str) -> Path:
        """Path of a generated file ``assets/<run>/<stage>/<name>`` (its folder created)."""
        path = self.report_dir / "assets" / self.run.key / self.stage / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def figure(self, picture: Path, caption: str = "", link: Path | None = None) -> str:
        """An ``<img>`` of ``picture`` with a plain-text caption, optionally linking to ``link``."""
        self.shown.update({picture.resolve()} | ({link.resolve()} if link else set()))
        image = f'<img src="{esc(self.url(picture))}" alt="{esc(caption or picture.name)}">'
        if link is not None:
            image = f'<a href="{esc(self.url(link))}">{image}</a>'
        return f"<figure>{image}<figcaption>{esc(caption)}</figcaption></figure>"

    def video_figure(self, video: Path, caption: str) -> str:
        """An animated GIF of ``video`` (linking to the original), or a note when it cannot be read."""
        self.shown.add(video.resolve())
        relative = video.relative_to(self.directory).as_posix() if video.is_relative_to(self.directory) else video.name
        gif = self.asset("video_" + re.sub(r"[^A-Za-z0-9_.-]", "_", relative) + ".gif")
        frames = video_to_gif(video, gif)
        if frames == 0:
            return (f'<p class="muted">{esc(relative)}: OpenCV cannot decode this video '
                    f'(<a href="{esc(self.url(video))}">open the file</a>).</p>')
        return self.figure(gif, f"{caption} ({frames} frames, GIF of {relative})", link=video)


def relative_url(path: Path, start: Path) -> str:
    """URL of ``path`` relative to the folder ``start`` (a file:// URI when there is no relative path)."""
    try:
        relative = os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:  # another drive
        return Path(path).resolve().as_uri()
    return urllib.parse.quote(Path(relative).as_posix())


# ----------------------------------------------------------------------------------------------
# Pictures, videos and charts


def spaced(count: int, samples: int) -> list[int]:
    """Up to ``samples`` evenly spaced indices in ``0..count-1``, first and last included."""
    if count <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, count - 1, min(samples, count))})


def pick(items: Sequence[Any], samples: int) -> list[Any]:
    return [items[index] for index in spaced(len(items), samples)]


def write_thumbnail(source: Path, target: Path, max_side: int = THUMBNAIL_SIDE) -> None:
    """Write ``source`` shrunk (area interpolation) so its longer side is at most ``max_side``."""
    image = read_rgb(source)
    scale = max_side / max(image.shape[:2])
    if scale < 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    write_rgb(target, image)


def video_to_gif(video: Path, gif: Path, max_frames: int = GIF_MAX_FRAMES, max_side: int = GIF_MAX_SIDE) -> int:
    """Write an animated GIF (plays in every browser, unlike mp4v) of up to ``max_frames`` evenly
    spaced frames of ``video``, longer side at most ``max_side`` px, at the video's pace.
    Returns the number of frames written, 0 when OpenCV cannot read the video."""
    from PIL import Image

    capture = cv2.VideoCapture(str(video))
    try:
        if not capture.isOpened():
            return 0
        fps = capture.get(cv2.CAP_PROP_FPS)
        fps = fps if math.isfinite(fps) and fps > 0 else 10.0
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        step = max(1, math.ceil(count / max_frames)) if count > 0 else 1
        frames: list[Image.Image] = []
        index = 0
        while len(frames) < max_frames:
            ok, bgr = capture.read()
            if not ok:
                break
            if index % step == 0:
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                scale = max_side / max(rgb.shape[:2])
                if scale < 1.0:
                    rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                                     interpolation=cv2.INTER_AREA)
                frames.append(Image.fromarray(rgb))
            index += 1
    finally:
        capture.release()
    if not frames:
        return 0
    duration_ms = max(40, round(1000.0 * step / fps))
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return len(frames)


def flow_wheel(size: int = 129) -> np.ndarray:
    """Legend of the flow colours ``(size, size, 3)`` uint8 RGB: each pixel shows the colour of a
    flow pointing from the centre to it; the rim is the saturation limit (outside: black)."""
    radius = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - radius
    field = np.stack([x, y], axis=-1)
    return flow_to_color(field, valid=np.hypot(x, y) <= radius, max_magnitude=radius)


def colour_legend(page: StagePage, name: str, top: str, bottom: str, note: str) -> str:
    """A vertical turbo colour bar (data/visualize.py ``color_bar``) with end labels."""
    path = page.asset(name)
    write_rgb(path, color_bar(0.0, 1.0, height=220, width=24))
    return (f'<div class="legend"><img src="{esc(page.url(path))}" alt="colour scale">'
            f'<div class="scale"><span>{esc(top)}</span><span class="muted">{esc(note)}</span>'
            f'<span>{esc(bottom)}</span></div></div>')


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 x 10^k) within ``[low, high]``."""
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(high / step + 1e-9) + 1)]


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, x_label: str = "",
               log_y: bool | None = None, width: int = 460, height: int = 230) -> str:
    """An inline SVG line chart of ``{name: (x, y)}``; NaN/None values break a line. ``log_y``
    None picks a log scale for positive values spanning more than 50x."""
    data = {name: (np.asarray(x, np.float64), np.array([np.nan if v is None else v for v in y], np.float64))
            for name, (x, y) in series.items()}
    finite_y = np.concatenate([y[np.isfinite(y)] for _, y in data.values()] or [np.zeros(0)])
    finite_x = np.concatenate([x[np.isfinite(x)] for x, _ in data.values()] or [np.zeros(0)])
    if finite_y.size == 0 or finite_x.size == 0:
        return f'<p class="muted">{esc(title)}: no finite values</p>'
    positive = bool((finite_y > 0).all())
    if log_y is None:
        log_y = positive and finite_y.max() / finite_y.min() > 50
    log_y = log_y and positive
    transform = np.log10 if log_y else (lambda v: v)
    y_low, y_high = float(transform(finite_y.min())), float(transform(finite_y.max()))
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    x_low, x_high = float(finite_x.min()), float(finite_x.max())
    if x_high - x_low < 1e-12:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    left, right, top, bottom = 58, 12, 26, 34
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: np.ndarray) -> np.ndarray:
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: np.ndarray) -> np.ndarray:
        return top + (1.0 - (transform(y) - y_low) / (y_high - y_low)) * plot_h

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="{esc(title)}">',
             f'<text x="{left}" y="16" font-weight="600">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>']
    decades = [float(k) for k in range(math.ceil(y_low - 1e-9), math.floor(y_high + 1e-9) + 1)]
    for value in decades if log_y and len(decades) >= 2 else nice_ticks(y_low, y_high):
        y_pixel = float(py(np.array(10.0 ** value if log_y else value)))
        parts.append(f'<line x1="{left - 4}" y1="{y_pixel:.1f}" x2="{left + plot_w}" y2="{y_pixel:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y_pixel + 4:.1f}" text-anchor="end">'
                     f'{10.0 ** value if log_y else value:.4g}</text>')
    for value in nice_ticks(x_low, x_high):
        parts.append(f'<text x="{float(px(np.array(value))):.1f}" y="{top + plot_h + 14}" text-anchor="middle">'
                     f'{value:.6g}</text>')
    if x_label:
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">{esc(x_label)}</text>')
    for number, (name, (x, y)) in enumerate(data.items()):
        color = CHART_COLORS[number % len(CHART_COLORS)]
        ok = np.isfinite(x) & np.isfinite(y)
        runs = np.split(np.arange(len(x)), np.flatnonzero(np.diff(ok.astype(np.int8)) != 0) + 1)
        for run in runs:
            if len(run) and ok[run[0]]:
                points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(x[run]), py(y[run])))
                if len(run) == 1:
                    parts.append(f'<circle cx="{px(x[run])[0]:.1f}" cy="{py(y[run])[0]:.1f}" r="2" fill="{color}"/>')
                else:
                    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>')
        if len(data) > 1:
            legend_x = left + plot_w - 6
            legend_y = top + 14 + 14 * number
            parts.append(f'<text x="{legend_x}" y="{legend_y}" text-anchor="end" fill="{color}" style="fill:{color}">'
                         f'{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def facts_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{esc(key)}</th><td>{esc(format_value(value))}</td></tr>" for key, value in rows)
    return f"<table>{body}</table>"


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if value == "":
        return '""'
    if isinstance(value, (int, str)):
        return str(value)
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


def grid(cells: Sequence[str], columns: int) -> str:
    return (f'<div class="grid" style="grid-template-columns: repeat({max(1, columns)}, minmax(0, 1fr))">'
            + "".join(cells) + "</div>")


def missing_cell(text: str) -> str:
    return f'<figure><p class="muted">{esc(text)}</p></figure>'


def frame_files(run: Run) -> list[Path]:
    """The frames stage's images of ``run`` (empty when it has none)."""
    frames_dir = run.stage_dir("frames")
    if not (frames_dir / "frames.json").is_file():
        return []
    from stages.frames import frame_paths

    return frame_paths(frames_dir)


def frame_cell(page: StagePage, frames: list[Path], index: int) -> str:
    if 0 <= index < len(frames) and frames[index].is_file():
        return page.figure(frames[index], f"frame {index}")
    return missing_cell(f"frame {index}: no image in frames/")


# ----------------------------------------------------------------------------------------------
# Views (each returns [] when its files are absent)


def frames_views(page: StagePage) -> list[View]:
    if not (page.directory / "frames.json").is_file():
        return []
    from stages.frames import read_frames_meta

    meta = read_frames_meta(page.directory)
    timestamps = meta.get("timestamps", [])
    cells = []
    for index in spaced(len(meta["files"]), STRIP_FRAMES):
        source = page.directory / meta["files"][index]
        thumbnail = page.asset(f"frame_{index:06d}.jpg")
        write_thumbnail(source, thumbnail)
        when = f" · t = {timestamps[index]:.2f} s" if index < len(timestamps) else ""
        cells.append(page.figure(thumbnail, f"frame {index}{when}", link=source))
    facts = facts_table([("source", meta["source"]), ("source type", meta["source_type"]),
                         ("size", f"{meta['width']} x {meta['height']} px"), ("frames", meta["num_frames"]),
                         ("frame rate", f"{meta['fps']:.3g} fps (source {meta['source_fps']:.3g} fps)")])
    return [View("Frame strip", facts + f'<div class="strip">{"".join(cells)}</div>')]


def depth_range(depth_file: Path, kind: str, units: str) -> str:
    """The values at the warm (near) and cool (far) ends of a colourised depth map's scale: its
    2nd/98th percentiles of (inverse) depth over valid pixels, as data/visualize.py colours them."""
    if not depth_file.is_file():
        return "no depth values"
    depth = np.load(depth_file).astype(np.float32)
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        return "no valid pixels"
    share = f"valid {valid.mean():.0%}"
    if kind == "relative_inverse":
        low, high = np.percentile(depth[valid], [2, 98])
        return f"inverse depth {high:.3g} (near) … {low:.3g} (far), relative · {share}"
    low, high = np.percentile(1.0 / depth[valid], [2, 98])
    return f"depth {1.0 / high:.3g} (near) … {1.0 / low:.3g} (far) {units} · {share}"


def depth_views(page: StagePage) -> list[View]:
    """Monocular and aligned depth of the same frames side by side (on the depth and align pages)."""
    if not ((page.directory / "depth.json").is_file() or (page.directory / "alignment.json").is_file()):
        return []
    mono_dir, aligned_dir = page.run.stage_dir("depth"), page.run.stage_dir("align")
    mono_kind = (read_json(mono_dir / "depth.json") or {}).get("kind", "relative_inverse")
    camera_units = (read_json(page.run.stage_dir("cameras") / "cameras.json") or {}).get("units", "sfm")
    units = {"metric": "m", "sfm": "SfM units", "dataset": "dataset units"}
    columns = [(title, folder, kind, units.get(unit, unit)) for title, folder, kind, unit in (
        ("monocular", mono_dir, mono_kind, mono_kind), ("aligned", aligned_dir, "depth", camera_units))
        if (folder / "vis").is_dir()]
    names = sorted({path.stem for _, folder, _, _ in columns for path in (folder / "vis").glob("*.png")})
    if not names:
        return []
    frames = frame_files(page.run)
    cells = []
    for name in pick(names, SAMPLES):
        index = int(name) if name.isdigit() else -1
        cells.append(frame_cell(page, frames, index))
        for title, folder, kind, unit in columns:
            vis = folder / "vis" / f"{name}.png"
            values = depth_range(folder / "depth" / f"{name}.npy", kind, unit)
            cells.append(page.figure(vis, f"{title} {name}: {values}") if vis.is_file()
                         else missing_cell(f"{title}: no picture for {name}"))
    legend = colour_legend(page, "depth_colorbar.png", "near", "far",
                           "colours follow inverse depth, 2nd–98th percentile of each picture")
    headings = [f"<b>{esc(title)}</b>" for title in ["frame"] + [column[0] for column in columns]]
    return [View("Depth: monocular and aligned", with_legend(grid(headings + cells, len(headings)), legend))]


def with_legend(content: str, legend: str) -> str:
    return f'<div class="with-legend"><div>{content}</div>{legend}</div>'


def alignment_views(page: StagePage) -> list[View]:
    """Per-frame scale, shift, residual and inliers of ``alignment.json``, and ``scatter.png``."""
    meta = read_json(page.directory / "alignment.json")
    scatter = page.directory / "scatter.png"
    if meta is None and not scatter.is_file():
        return []
    body = ""
    records = (meta or {}).get("frames", [])
    if records:
        index = [record.get("index", number) for number, record in enumerate(records)]
        charts = [line_chart({key: (index, [record.get(key) for record in records])}, title, "frame", log_y=False)
                  for key, title in (("scale", "scale"), ("shift", "shift"),
                                     ("residual", "median relative residual of inliers"),
                                     ("inlier_fraction", "inlier fraction"))]
        filled = [record.get("index") for record in records if record.get("filled")]
        body += facts_table([("fit space", meta.get("fit_space")), ("depth kind", meta.get("depth_kind")),
                             ("masks used", meta.get("masks_used")), ("max depth", meta.get("max_depth")),
                             ("frames interpolated (too few points)", ", ".join(map(str, filled)) or "none")])
        body += f'<div class="strip">{"".join(charts)}</div>'
    if scatter.is_file():
        body += f'<div class="strip">{page.figure(scatter, "aligned monocular depth vs SfM depth (log-log)")}</div>'
    return [View("Alignment", body)]


def flow_views(page: StagePage) -> list[View]:
    """Flow colour images, forward-backward validity masks (from the pairs' npz) and a colour legend."""
    if not (page.directory / "pairs.json").is_file():
        return []
    from stages.flow import list_pairs, load_pair, pair_name

    pairs = list_pairs(page.directory)
    offsets: dict[int, int] = {}
    for i, j in pairs:
        offsets[j - i] = offsets.get(j - i, 0) + 1
    facts = facts_table([("backend", (read_json(page.directory / "pairs.json") or {}).get("backend")),
                         ("pairs", len(pairs)),
                         ("pairs per frame offset", ", ".join(f"{k}: {v}" for k, v in sorted(offsets.items())))])
    consecutive = [pair for pair in pairs if pair[1] - pair[0] == 1] or pairs
    frames = frame_files(page.run)
    cells = []
    for i, j in pick(consecutive, SAMPLES):
        pair = load_pair(page.directory, i, j)
        forward, valid = pair["forward"], pair["valid_forward"]
        mask = page.asset(f"valid_{pair_name(i, j)}.png")
        write_gray(mask, valid.astype(np.uint8) * 255)
        vis = page.directory / "vis" / f"{pair_name(i, j)}.png"
        if not vis.is_file():
            vis = page.asset(f"flow_{pair_name(i, j)}.png")
            write_rgb(vis, flow_to_color(forward, valid))
        magnitude = np.linalg.norm(forward, axis=-1)[valid]
        largest = f"{np.percentile(magnitude, 99):.3g} px" if magnitude.size else "—"
        cells += [frame_cell(page, frames, i),
                  page.figure(vis, f"flow {i} → {j} · 99th percentile |flow| {largest}"),
                  page.figure(mask, f"valid (forward-backward consistent) {valid.mean():.0%} · white = valid")]
    legend_path = page.asset("flow_legend.png")
    write_rgb(legend_path, flow_wheel())
    legend = ('<div>' + page.figure(legend_path, "colour of a pixel moving from the centre towards each point; "
                                     "white = still, rim = the picture's 99th-percentile magnitude; black = invalid")
              + '</div>')
    headings = ["<b>frame i</b>", "<b>flow i → j</b>", "<b>validity</b>"]
    return [View("Optical flow", facts + with_legend(grid(headings + cells, 3), legend))]


def masks_views(page: StagePage) -> list[View]:
    """Mask overlays of a few frames (``vis/``, drawn from ``masks/`` when missing) and the labels;
    with the motion cues (``vis/cues/``: residual score and flow confidence) next to each overlay."""
    mask_dir, vis_dir = page.directory / "masks", page.directory / "vis"
    cues_dir = vis_dir / "cues"
    has_cues = cues_dir.is_dir() and any(cues_dir.glob("score_*.png"))
    if not ((page.directory / "labels.json").is_file() or mask_dir.is_dir()):
        return []
    from stages.masks import load_labels

    labels = load_labels(page.directory) if (page.directory / "labels.json").is_file() else {}
    names = sorted(path.stem for path in mask_dir.glob("*.png")) or sorted(path.stem for path in vis_dir.glob("*.png"))
    frames = frame_files(page.run)
    cells, coverage, counted = [], {}, 0
    for name in pick(names, SAMPLES):
        mask_file, vis = mask_dir / f"{name}.png", vis_dir / f"{name}.png"
        index = int(name) if name.isdigit() else -1
        mask = read_gray(mask_file) if mask_file.is_file() else None
        if mask is not None:
            counted += 1
            for label, pixels in zip(*np.unique(mask, return_counts=True)):
                coverage[int(label)] = coverage.get(int(label), 0.0) + pixels / mask.size
        if not vis.is_file() and mask is not None and 0 <= index < len(frames):
            vis = page.asset(f"overlay_{name}.png")
            image = read_rgb(frames[index])
            if mask.shape != image.shape[:2]:
                mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
            write_rgb(vis, overlay_labels(image, mask))
        dynamic = f"dynamic {(mask > 0).mean():.1%}" if mask is not None else ""
        cells.append(page.figure(vis, f"frame {name} · {dynamic}") if vis.is_file()
                     else missing_cell(f"frame {name}: no overlay"))
        if has_cues:
            for kind in ("score", "confidence"):
                cue = cues_dir / f"{kind}_{name}.png"
                cells.append(page.figure(cue, f"frame {name} · {kind}") if cue.is_file()
                             else missing_cell(f"frame {name}: no {kind} picture"))
    rows = []
    for label in sorted(set(labels) | set(coverage)):
        color = LABEL_COLORS[label % len(LABEL_COLORS)]
        share = f"{coverage.get(label, 0.0) / counted:.1%}" if counted else "—"
        rows.append(f'<tr><td><span class="swatch" style="background: rgb({color[0]},{color[1]},{color[2]})"></span>'
                    f"{label}</td><td>{esc(labels.get(label, ''))}</td><td class=\"num\">{share}</td></tr>")
    legend = (f"<table><tr><th>label</th><th>name</th><th>pixels (shown frames)</th></tr>{''.join(rows)}</table>"
              if rows else "")
    if not has_cues:
        return [View("Masks", legend + grid(cells, SAMPLES))]
    headings = ["<b>mask</b>", "<b>motion score</b> (flow vs camera-induced motion, in noise sigmas: "
                "dark blue 0, red ≥ 4× the threshold)",
                "<b>flow confidence</b> (texture × forward-backward consistency: black = unreliable, "
                "its score cannot start a region)"]
    return [View("Masks", legend + grid(headings + cells, 3))]


def orbit_scene(content: Mapping[str, Any], points: Mapping[str, np.ndarray] | None) -> dict[str, Any] | None:
    """The JSON scene of the interactive 3D view (see pipeline/report_assets.py) from a
    ``cameras.json`` content and its ``points.npz`` arrays; None without any posed frame."""
    width, height = float(content["width"]), float(content["height"])
    posed = [frame for frame in content["frames"] if frame.get("w2c") is not None]
    if not posed:
        return None
    corners_px = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], np.float64)
    centers, rays, rotations = [], [], []
    for frame in posed:
        w2c = np.asarray(frame["w2c"], np.float64)
        rotation, translation = w2c[:3, :3], w2c[:3, 3]
        centers.append(-rotation.T @ translation)
        camera_rays = (np.linalg.inv(np.asarray(frame["K"], np.float64)) @ corners_px.T).T
        rays.append(camera_rays / camera_rays[:, 2:3])
        rotations.append(rotation)
    centers_arr = np.array(centers)
    xyz = np.zeros((0, 3)) if points is None else np.asarray(points["xyz"], np.float64).reshape(-1, 3)
    rgb = np.zeros((0, 3), np.uint8) if points is None else np.asarray(points["rgb"], np.uint8).reshape(-1, 3)
    keep = np.isfinite(xyz).all(axis=1)
    xyz, rgb = xyz[keep], rgb[keep]
    if len(xyz) > ORBIT_MAX_POINTS:
        chosen = np.sort(np.random.default_rng(0).choice(len(xyz), ORBIT_MAX_POINTS, replace=False))
        xyz, rgb = xyz[chosen], rgb[chosen]
    # Orbit around the middle of the cameras and the bulk of the points, far enough to see both.
    center = 0.5 * (np.median(xyz, axis=0) + centers_arr.mean(axis=0)) if len(xyz) else centers_arr.mean(axis=0)
    radius = float(np.linalg.norm(centers_arr - center, axis=1).max())
    if len(xyz):
        radius = max(radius, float(np.percentile(np.linalg.norm(xyz - center, axis=1), 90)))
    radius = radius or 1.0
    frustum_depth = 0.12 * radius
    digits = max(0, 5 - int(math.floor(math.log10(radius))))
    cameras = []
    for frame, camera_center, camera_rays, rotation in zip(posed, centers, rays, rotations):
        corners = camera_center + (rotation.T @ (camera_rays * frustum_depth).T).T
        cameras.append({"index": int(frame["index"]), "center": np.round(camera_center, digits).tolist(),
                        "corners": np.round(corners, digits).tolist(), "interpolated": bool(frame.get("interpolated"))})
    return {"xyz": np.round(xyz, digits).ravel().tolist(), "rgb": rgb.astype(int).ravel().tolist(), "cameras": cameras,
            "center": center.tolist(), "rotation": rotations[0].ravel().tolist(), "distance": 1.6 * radius,
            "first": int(posed[0]["index"])}


def cameras_views(page: StagePage) -> list[View]:
    """Camera facts and an interactive 3D plot of the poses (frusta) and sparse points."""
    if not (page.directory / "cameras.json").is_file():
        return []
    from stages.cameras import load_points, read_cameras_json

    content = read_cameras_json(page.directory)
    frames = content["frames"]
    points = load_points(page.directory) if (page.directory / "points.npz").is_file() else None
    K = np.asarray(frames[0]["K"], np.float64) if frames else np.eye(3)
    errors = np.asarray(points["error"], np.float64) if points is not None and "error" in points else np.zeros(0)
    facts = facts_table([
        ("model", content.get("model")), ("units", content.get("units")), ("mode", content.get("mode")),
        ("size", f"{content['width']} x {content['height']} px"), ("frames", len(frames)),
        ("registered", sum(bool(f.get("registered")) for f in frames)),
        ("interpolated", sum(bool(f.get("interpolated")) for f in frames)),
        ("without pose", sum(f.get("w2c") is None for f in frames)),
        ("fx, fy, cx, cy (frame 0)", ", ".join(f"{v:.1f}" for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))),
        ("sparse points", 0 if points is None else len(points["xyz"])),
        ("median reprojection error", f"{np.median(errors):.3g} px" if errors.size else "—")])
    scene = orbit_scene(content, points)
    if scene is None:
        return [View("Cameras", facts + '<p class="muted">no frame has a pose: nothing to draw in 3D</p>')]
    scene_id = f"scene-{page.run.key}-{re.sub(r'[^A-Za-z0-9_-]', '_', page.stage)}"
    scene_json = json.dumps(scene, separators=(",", ":")).replace("</", "<\\/")
    plot = (f'<figure><canvas class="orbit" width="760" height="480" data-scene="{scene_id}"></canvas>'
            f'<figcaption>drag: orbit · wheel: zoom · double click: reset. Cameras: red = first posed, '
            f'blue = registered, orange = interpolated, grey line = path; sparse points in their colours '
            f'({len(scene["xyz"]) // 3} shown).</figcaption></figure>'
            f'<script type="application/json" id="{scene_id}">{scene_json}</script>')
    return [View("Cameras", facts + plot)]


def tracks_views(page: StagePage) -> list[View]:
    """Track statistics, visible tracks per frame, the still and the overlay video."""
    npz, still, video = (page.directory / name for name in ("tracks.npz", "tracks.png", "tracks.mp4"))
    if not (npz.is_file() or still.is_file() or video.is_file()):
        return []
    body = ""
    if npz.is_file():
        from stages.tracks import load_tracks

        tracks = load_tracks(page.directory)
        visible = tracks["visible"]
        per_frame = visible.sum(axis=0)
        body += facts_table([("tracks", visible.shape[0]), ("frames", visible.shape[1]),
                             ("mean visible frames per track",
                              f"{visible.sum(axis=1).mean():.1f}" if len(visible) else "—"),
                             ("visible fraction", f"{visible.mean():.1%}" if visible.size else "—"),
                             ("3D flow pairs (pairs3d.npz)",
                              (read_json(page.directory / "pairs3d.json") or {}).get("total", "none"))])
        body += line_chart({"visible tracks": (np.arange(len(per_frame)), per_frame)}, "visible tracks per frame",
                           "frame", log_y=False)
    pictures = []
    if still.is_file():
        pictures.append(page.figure(still, "trajectories of the tracks seen on the middle frame"))
    if video.is_file():
        pictures.append(page.video_figure(video, "track overlay"))
    return [View("Tracks", body + grid(pictures, 3))]


def collect_series(data: Any, group: str, out: dict[str, dict[str, list[float]]]) -> None:
    """Numeric series found in parsed JSON, by group (the key path): ``{"step": [...], "loss": [...]}``,
    lists of records ``[{"step": 0, "loss": 1.2}, ...]`` and nested dicts of those."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def series(values: list[Any]) -> list[float] | None:
        if len(values) >= 2 and all(v is None or number(v) for v in values) and sum(number(v) for v in values) >= 2:
            return [math.nan if v is None else float(v) for v in values]
        return None

    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        for key in dict.fromkeys(key for item in data for key in item):
            values = series([item.get(key) for item in data])
            if values is not None:
                out.setdefault(group, {})[key] = values
        return
    if isinstance(data, dict):
        for key, value in data.items():
            values = series(value) if isinstance(value, list) else None
            if values is not None:
                out.setdefault(group, {})[key] = values
            elif isinstance(value, (dict, list)):
                collect_series(value, f"{group}/{key}" if group else str(key), out)


def curves_views(page: StagePage) -> list[View]:
    """Training curves from the stage's ``*curve*``/``*loss*``/``*metric*``/``*history*.json``:
    losses together (log scale when they span decades), every other series on its own chart."""
    views = []
    files = sorted(path for path in page.directory.rglob("*.json")
                   if CURVE_FILE.search(path.stem) and path.name != MANIFEST)
    for path in files:
        groups: dict[str, dict[str, list[float]]] = {}
        collect_series(read_json(path), "", groups)
        charts = []
        top_step_key = next((key for key in STEP_KEYS if key in groups.get("", {})), None)
        top_steps = list(groups[""][top_step_key]) if top_step_key else None
        for group, series in groups.items():
            step_key = next((key for key in STEP_KEYS if key in series), None)
            steps = series.pop(step_key) if step_key else None
            if steps is None and top_steps is not None and all(len(v) == len(top_steps) for v in series.values()):
                # a nested group (e.g. loss parts) recorded at the top level's steps
                step_key, steps = top_step_key, top_steps

            def xy(values: list[float]) -> tuple[Sequence[float], list[float]]:
                return (steps if steps is not None and len(steps) == len(values) else range(len(values))), values

            prefix = f"{group} " if group else ""
            losses = {key: xy(values) for key, values in series.items() if "loss" in key.lower()}
            if losses:
                charts.append(line_chart(losses, f"{prefix}loss", step_key or "index"))
            charts += [line_chart({key: xy(values)}, f"{prefix}{key}", step_key or "index")
                       for key, values in series.items() if "loss" not in key.lower()]
        if charts:
            views.append(View(f"Curves: {path.relative_to(page.directory).as_posix()}",
                              f'<div class="strip">{"".join(charts)}</div>'))
    return views


def image_files(folder: Path) -> dict[str, Path]:
    return {path.name: path for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES
            and path.suffix.lower() not in (".gif", ".svg")}


def render_views(page: StagePage) -> list[View]:
    """Renders next to ground truth (an image folder named gt/ground_truth/target/... and a
    sibling folder with the same file names), with error maps and PSNR."""
    views = []
    truth_dirs = sorted(path for path in page.directory.rglob("*")
                        if path.is_dir() and path.name.lower() in GROUND_TRUTH_DIRS)
    for truth_dir in truth_dirs:
        truths = image_files(truth_dir)
        for render_dir in sorted(path for path in truth_dir.parent.iterdir() if path.is_dir() and path != truth_dir
                                 and not any(word in path.name.lower() for word in NOT_COLOUR_RENDERS)):
            renders = image_files(render_dir)
            common = sorted(set(truths) & set(renders))
            if not common:
                continue
            cells, psnrs = [], []
            for name in pick(common, SAMPLES):
                truth, render = read_rgb(truths[name]), read_rgb(renders[name])
                if render.shape != truth.shape:
                    render = cv2.resize(render, (truth.shape[1], truth.shape[0]), interpolation=cv2.INTER_AREA)
                error = np.abs(render.astype(np.float32) - truth.astype(np.float32)).mean(axis=2) / 255.0
                mse = float(np.mean(((render.astype(np.float64) - truth) / 255.0) ** 2))
                psnr = 10.0 * math.log10(1.0 / max(mse, 1e-12))
                psnrs.append(psnr)
                error_path = page.asset(f"error_{render_dir.name}_{Path(name).stem}.png")
                write_rgb(error_path, colorize(error, vmin=0.0, vmax=ERROR_VMAX))
                cells += [page.figure(truths[name], f"ground truth {name}"),
                          page.figure(renders[name], f"{render_dir.name} {name} · PSNR {psnr:.2f} dB"),
                          page.figure(error_path, f"|error| mean {error.mean():.4f}")]
            legend = colour_legend(page, "error_colorbar.png", f"{ERROR_VMAX:g}", "0",
                                   "mean absolute error per pixel (intensities 0..1)")
            relative = render_dir.relative_to(page.directory).as_posix()
            summary = (f"<p>{len(common)} images in both folders; mean PSNR of the shown ones "
                       f"{np.mean(psnrs):.2f} dB.</p>")
            headings = ["<b>ground truth</b>", f"<b>{esc(render_dir.name)}</b>", "<b>error</b>"]
            views.append(View(f"Renders vs ground truth: {relative}",
                              summary + with_legend(grid(headings + cells, 3), legend)))
    return views


def layers_views(page: StagePage) -> list[View]:
    """The scene layers of a train output side by side (``renders/<split>/layers/<layer>/rgb``
    next to the full render ``renders/<split>/rgb``, :mod:`stages.train_layers`), for a few
    frames, with each layer's labels, Gaussian count and mask IoU from ``layers.json``."""
    table = (read_json(page.directory / "layers.json") or {}).get("layers", {})
    views = []
    for layers_dir in sorted(path for path in page.directory.glob("renders/*/layers") if path.is_dir()):
        found = {path.name for path in layers_dir.iterdir() if (path / "rgb").is_dir()}
        names = [name for name in table if name in found] + sorted(found - set(table))
        full_dir = layers_dir.parent / "rgb"
        columns = [("full render", full_dir)] * full_dir.is_dir() + [(name, layers_dir / name / "rgb") for name in names]
        files = [image_files(folder) for _, folder in columns]
        common = sorted(set.intersection(*(set(found_files) for found_files in files))) if files else []
        if not common:
            continue
        cells = [f"<b>{esc(title)}</b>" for title, _ in columns]
        for name in pick(common, SAMPLES):
            cells += [page.figure(found_files[name], f"{title} {name}") for (title, _), found_files in zip(columns, files)]
        rows = [(name, f"labels {', '.join(map(str, entry.get('labels', [])))} ({', '.join(entry.get('names', []))}) · "
                 f"{entry.get('num_gaussians', '?')} Gaussians"
                 + (f" · mask IoU {entry['mask_iou_heldout']:.3f}" if "mask_iou_heldout" in entry else ""))
                for name, entry in table.items()]
        split = layers_dir.parent.name
        views.append(View(f"Scene layers: {split}", (facts_table(rows) if rows else "")
                          + grid(cells, len(columns))))
    return views


def media_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def video_views(page: StagePage) -> list[View]:
    """Every video of the stage not shown yet, as an animated GIF linking to the file."""
    videos = [path for path in media_files(page.directory, VIDEO_SUFFIXES) if path.resolve() not in page.shown]
    if not videos:
        return []
    cells = [page.video_figure(path, path.relative_to(page.directory).as_posix()) for path in videos]
    return [View("Videos", grid(cells, 3))]


def other_files_views(page: StagePage) -> list[View]:
    """Every picture and video of the stage folder not shown above, by folder: a few previews
    and the full list of links."""
    remaining = [path for path in media_files(page.directory, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
                 if path.resolve() not in page.shown]
    if not remaining:
        return []
    folders: dict[Path, list[Path]] = {}
    for path in remaining:
        folders.setdefault(path.parent, []).append(path)
    blocks = []
    for folder, paths in folders.items():
        name = folder.relative_to(page.directory).as_posix() + "/" if folder != page.directory else "stage folder"
        images = [path for path in paths if path.suffix.lower() in IMAGE_SUFFIXES]
        previews = "".join(preview(page, path) for path in pick(images, PREVIEWS_PER_FOLDER))
        links = "".join(f'<li><a href="{esc(page.url(path))}">{esc(path.name)}</a></li>' for path in paths)
        count = f"{len(paths)} file{'s' if len(paths) > 1 else ''}"
        blocks.append(f'<h3>{esc(name)} <span class="muted">({count})</span></h3><div class="strip">{previews}</div>'
                      f'<details><summary>list of the {count}</summary><ul class="files">{links}</ul></details>')
    return [View("Other pictures and videos", "".join(blocks))]


def preview(page: StagePage, path: Path) -> str:
    """A picture as it is, except a label map (8-bit grey, values below 64: it would look black),
    which is shown in the mask label colours (data/visualize.py ``LABEL_COLORS``)."""
    from PIL import Image

    with Image.open(path) as image:
        grey = image.mode == "L"
    labels = read_gray(path) if grey else None
    if labels is None or labels.max() >= 64:
        return page.figure(path, path.name)
    relative = path.relative_to(page.directory).as_posix()
    coloured = page.asset("labels_" + re.sub(r"[^A-Za-z0-9_.-]", "_", relative))
    write_rgb(coloured, LABEL_COLORS[labels % len(LABEL_COLORS)])
    return page.figure(coloured, f"{path.name} (label ids in colour)", link=path)


#: View builders in page order; the list of other files comes last (it shows what the others did not).
VIEW_BUILDERS: tuple[tuple[str, Callable[[StagePage], list[View]]], ...] = (
    ("Frame strip", frames_views), ("Depth", depth_views), ("Alignment", alignment_views),
    ("Optical flow", flow_views), ("Masks", masks_views), ("Cameras", cameras_views), ("Tracks", tracks_views),
    ("Curves", curves_views), ("Renders vs ground truth", render_views), ("Scene layers", layers_views),
    ("Videos", video_views),
    ("Other pictures and videos", other_files_views))


def build_views(page: StagePage) -> list[View]:
    """All views of a stage folder; a view whose files cannot be read shows the error instead."""
    if not page.directory.is_dir():
        return []
    views = []
    for title, builder in VIEW_BUILDERS:
        try:
            views += builder(page)
        except Exception as error:  # one unreadable output must not cost the whole report
            logger.warning("report: %s view of %s failed", title, page.directory, exc_info=True)
            message = error.message if isinstance(error, Mono4dError) else f"{type(error).__name__}: {error}"
            views.append(View(title, f'<p class="banner error">could not draw this view: {esc(message)}</p>'))
    return views


# ----------------------------------------------------------------------------------------------
# Pages

ABSENT = object()
NUM_CLASS, DIFF_CLASS, CURRENT_CLASS = ' class="num"', ' class="diff"', ' class="current"'


def badge(status: str) -> str:
    return f'<span class="badge {esc(status)}">{esc(status)}</span>'


def format_seconds(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:.0f} s" if minutes < 60 else f"{int(minutes // 60)} h {int(minutes % 60)} min"


def stage_file(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", stage) + ".html"


def state_of(run: Run, stage: str) -> StageState:
    return run.states.get(stage) or StageState(stage, "missing", ["no such stage in this workspace"])


def reasons_list(reasons: Sequence[str]) -> str:
    return f'<ul class="reasons">{"".join(f"<li>{esc(reason)}</li>" for reason in reasons)}</ul>' if reasons else ""


def failure_text(run: Run, stage: str) -> str:
    error = run.workspace.read_error(stage)
    if not error:
        return ""
    hint = f" — {error['hint']}" if error.get("hint") else ""
    return (f'<p class="banner error">last attempt failed: {esc(error.get("type"))}: '
            f'{esc(error.get("message"))}{esc(hint)}</p>')


def state_block(run: Run, stage: str) -> str:
    """The stage's state with reasons, its last failure and when it ran."""
    state = state_of(run, stage)
    manifest = state.manifest or {}
    explanation = {
        "done": "",
        "stale": "Out of date: the outputs below are from an earlier configuration; `mono4d run` recomputes them.",
        "missing": "This stage has not run in this workspace.",
        "unchecked": "The pipeline does not evaluate this stage; its folder is shown as found.",
    }.get(state.status, "")
    parts = [f"<p>{badge(state.status)}</p>"]
    if explanation or state.reasons:
        parts.append(f'<div class="banner {esc(state.status)}">{esc(explanation)}{reasons_list(state.reasons)}</div>')
    parts.append(failure_text(run, stage))
    if manifest:
        parts.append(facts_table([("wall time", format_seconds(manifest.get("wall_time_s"))),
                                  ("started", manifest.get("started_at")), ("finished", manifest.get("finished_at")),
                                  ("run id", manifest.get("run_id"))]))
    return "".join(parts)


def side_by_side(runs: Sequence[Run], cells: Sequence[str]) -> str:
    if len(runs) == 1:
        return cells[0]
    return '<div class="pair">' + "".join(f'<div><div class="runlabel">{esc(run.label)}</div>{cell}</div>'
                                          for run, cell in zip(runs, cells)) + "</div>"


def change(first: Any, second: Any) -> str:
    """``second - first`` (and relative) for two numbers, else empty."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (first, second))
    if not numbers or first == second:
        return ""
    delta = second - first
    relative = f" ({delta / abs(first):+.1%})" if first else ""
    return f"{delta:+.4g}{relative}"


def key_value_table(values: Sequence[Mapping[str, Any]], runs: Sequence[Run], key_header: str = "",
                    sources: Sequence[Callable[[str], str]] | None = None, show_change: bool = False) -> str:
    """One row per key, one value column per run; with two runs, differing rows are highlighted
    (and counted in the caption) and numeric changes shown when ``show_change``."""
    keys = list(dict.fromkeys(key for mapping in values for key in mapping))
    if not keys:
        return '<p class="muted">none</p>'
    compare = len(values) > 1
    header = f"<th>{esc(key_header)}</th>" + ("".join(f"<th>{esc(run.label)}</th>" for run in runs) if compare
                                                   else "<th>value</th>")
    if compare and show_change:
        header += "<th>change</th>"
    rows, differing = [], 0
    for key in keys:
        cells_values = [mapping.get(key, ABSENT) for mapping in values]
        differs = compare and any(value != cells_values[0] for value in cells_values[1:])
        differing += differs
        cells = []
        for number, value in enumerate(cells_values):
            text = "(absent)" if value is ABSENT else format_value(value)
            origin = sources[number](key) if sources and value is not ABSENT else ""
            source = f'<span class="src">{esc(origin)}</span>' if origin else ""
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(f"<td{NUM_CLASS if numeric else ''}>{esc(text)}{source}</td>")
        if compare and show_change:
            cells.append(f'<td class="num">{esc(change(cells_values[0], cells_values[1]))}</td>')
        rows.append(f"<tr{DIFF_CLASS if differs else ''}><th>{esc(key)}</th>{''.join(cells)}</tr>")
    caption = (f'<p class="muted">{differing} of {len(keys)} differ (highlighted)</p>' if compare else "")
    return f"{caption}<table><tr>{header}</tr>{''.join(rows)}</table>"


def provenance(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs, upstream manifests and code the stage's fingerprint covers, as short hashes."""
    facts: dict[str, Any] = {}
    for name, entry in (manifest.get("inputs") or {}).items():
        entry = entry or {}
        facts[f"input {name}"] = f"{entry.get('path')} (sha256 {str(entry.get('sha256'))[:12]})"
    for name, digest in (manifest.get("upstream") or {}).items():
        facts[f"upstream {name}"] = f"manifest {str(digest)[:12]}"
    if manifest.get("code"):
        facts["stage code"] = str(manifest["code"])[:12]
    return facts


def log_tail(run: Run, stage: str, report_dir: Path, lines: int = 80) -> str:
    """A link to the stage's ``log.txt`` and its last ``lines`` lines."""
    path = run.stage_dir(stage) / "log.txt"
    if not path.is_file():
        return '<p class="muted">no log</p>'
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return (f'<p><a href="{esc(relative_url(path, report_dir))}">log.txt</a> ({len(text)} lines, '
            f'last {min(lines, len(text))} shown)</p><pre>{esc(chr(10).join(text[-lines:]))}</pre>')


def page_html(title: str, nav: str, body: str) -> str:
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="generator" content="mono4d inspect">'
            f"<title>{esc(title)}</title>"
            '<link rel="icon" href="data:,"><link rel="stylesheet" href="assets/style.css">'
            '<script src="assets/report.js" defer></script></head>\n'
            f"<body>{nav}\n{body}\n<footer class=\"muted\"><p>mono4d inspect · generated {esc(generated)}</p></footer>"
            "</body></html>\n")


def navigation(stages: Sequence[str], runs: Sequence[Run], current: str | None) -> str:
    links = [f"<a href=\"index.html\"{CURRENT_CLASS if current is None else ''}>overview</a>"]
    for stage in stages:
        status = state_of(runs[0], stage).status
        links.append(f'<a href="{esc(stage_file(stage))}"{CURRENT_CLASS if stage == current else ""}>{esc(stage)} '
                     f'<span class="badge {esc(status)}" title="{esc(status)}"></span></a>')
    return f"<nav>{''.join(links)}</nav>"


def stage_page(stage: str, runs: Sequence[Run], stages: Sequence[str], report_dir: Path) -> str:
    """The page of one stage: state, figures, notes, views (pictures first), parameters, provenance, log."""
    parts = [f"<h1>{esc(stage)}</h1>", side_by_side(runs, [state_block(run, stage) for run in runs])]
    manifests = [run.manifest(stage) for run in runs]
    figures = [manifest.get("figures") or {} for manifest in manifests]
    if any(figures):
        parts += ["<h2>Key figures</h2>", key_value_table(figures, runs, "figure", show_change=True)]
    notes = [manifest.get("notes") or [] for manifest in manifests]
    if any(notes):
        parts += ["<h2>Notes</h2>", side_by_side(runs, [reasons_list(note) or '<p class="muted">none</p>'
                                                        for note in notes])]
    all_views = [build_views(StagePage(run, stage, report_dir)) for run in runs]
    for title in dict.fromkeys(view.title for views in all_views for view in views):
        cells = ["".join(view.body for view in views if view.title == title)
                 or '<p class="muted">not in this run</p>' for views in all_views]
        parts += [f"<h2>{esc(title)}</h2>", side_by_side(runs, cells)]
    params = [run.params(stage) for run in runs]
    parts.append("<h2>Parameters</h2>")
    for run, (_, ran) in zip(runs, params):
        if not ran:
            parts.append(f'<p class="muted">{esc(run.label)}: the stage has not run; these are the values of '
                         "the recorded run configuration.</p>")
    parts.append(key_value_table([values for values, _ in params], runs, "parameter",
                                 sources=[lambda key, run=run: run.param_source(stage, key) for run in runs]))
    if any(manifests):
        parts += ["<h2>Provenance</h2>", key_value_table([provenance(m) for m in manifests], runs, "fingerprint part"),
                  "<details><summary>library versions</summary>",
                  key_value_table([m.get("versions") or {} for m in manifests], runs, "library"), "</details>"]
    logs = [log_tail(run, stage, report_dir) for run in runs]
    parts += ["<details><summary>log</summary>", side_by_side(runs, logs), "</details>"]
    return page_html(f"mono4d · {stage}", navigation(stages, runs, stage), "\n".join(parts))


def run_facts(run: Run) -> dict[str, Any]:
    """What identifies a run: workspace, input, preset, target, settings given on the command line."""
    config = run.config.get("config", {})
    sources = config.get("sources", {})
    stages = config.get("stages", {})
    chosen = [f"{key}={format_value(stages.get(key.split('.', 1)[0], {}).get(key.split('.', 1)[1]))} ({source})"
              for key, source in sources.items() if source == "--set" or source.startswith("preset")]
    return {"workspace": str(run.root), "input": run.config.get("input"), "preset": config.get("preset"),
            "target stage": run.config.get("target"), "started": run.config.get("started_at"),
            "run id": run.config.get("run_id"), "settings from --set and the preset": ", ".join(chosen) or "none"}


def index_page(runs: Sequence[Run], stages: Sequence[str]) -> str:
    """The overview: the run(s) and one row per stage."""
    compare = len(runs) > 1
    title = "mono4d report: " + " vs ".join(run.label for run in runs)
    parts = [f"<h1>{esc(title)}</h1>", "<h2>Run</h2>", key_value_table([run_facts(run) for run in runs], runs, "")]
    header = "<th>stage</th>" + "".join(
        f"<th>{esc(run.label + ': ' if compare else '')}state</th><th>time</th><th>key figures</th>" for run in runs)
    if compare:
        header += "<th>differences</th>"
    rows = []
    for stage in stages:
        cells = [f'<th><a href="{esc(stage_file(stage))}">{esc(stage)}</a></th>']
        for run in runs:
            state = state_of(run, stage)
            manifest = state.manifest or {}
            failed = " <b>last attempt failed</b>" if run.workspace.read_error(stage) else ""
            reasons = state.reasons if len(state.reasons) <= 4 else [
                *state.reasons[:3], f"and {len(state.reasons) - 3} more (see the stage's page)"]
            cells += [f"<td>{badge(state.status)}{failed}{reasons_list(reasons)}</td>",
                      f'<td class="num">{esc(format_seconds(manifest.get("wall_time_s")))}</td>',
                      f"<td><code>{esc(format_figures(manifest.get('figures') or {}) or '—')}</code></td>"]
        if compare:
            cells.append(f"<td>{esc(differences(stage, runs[0], runs[1]))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    parts += ["<h2>Stages</h2>", f"<table><tr>{header}</tr>{''.join(rows)}</table>",
              '<p class="muted">Open a stage for its figures, parameters, pictures, versions and log.</p>']
    return page_html(title, navigation(stages, runs, None), "\n".join(parts))


def differences(stage: str, first: Run, second: Run) -> str:
    """How many figures and parameters of ``stage`` differ between two runs."""
    counts = []
    for name, a, b in (("figures", first.manifest(stage).get("figures") or {},
                        second.manifest(stage).get("figures") or {}),
                       ("parameters", first.params(stage)[0], second.params(stage)[0])):
        differing = sum(a.get(key, ABSENT) != b.get(key, ABSENT) for key in set(a) | set(b))
        if differing:
            counts.append(f"{differing} {name if differing > 1 else name[:-1]}")
    return ", ".join(counts) or "none"


# ----------------------------------------------------------------------------------------------
# Entry point


def prepare_out_dir(report_dir: Path) -> None:
    """Create ``report_dir`` and remove what the previous report wrote there (listed in its marker);
    refuse a folder whose ``assets/`` another tool wrote."""
    report_dir.mkdir(parents=True, exist_ok=True)
    previous = read_json(report_dir / MARKER_FILE)
    assets = report_dir / "assets"
    if previous is None:
        if assets.exists():
            raise ParameterError(f"{report_dir} already holds an assets/ folder that mono4d inspect did not write",
                                 "choose another --out folder, or empty that one")
        return
    for name in previous.get("pages", []):
        if "/" not in name and name.endswith(".html"):
            (report_dir / name).unlink(missing_ok=True)
    shutil.rmtree(assets, ignore_errors=True)


def run_labels(works: Sequence[Path]) -> list[str]:
    """Short names of the workspaces: their folder names, with the parent when those coincide."""
    if len(works) == 1:
        return [works[0].name]
    names = [work.name for work in works]
    if len(set(names)) < len(names):
        names = [f"{work.parent.name}/{work.name}" for work in works]
    return [f"{letter}: {name}" for letter, name in zip("AB", names)]


def write_report(work: Path, compare: Path | None = None, out_dir: Path | None = None) -> Path:
    """Write the HTML report of workspace ``work`` (side by side with workspace ``compare`` when
    given) into ``out_dir`` (default ``work/report``) and return the path of its ``index.html``.

    Raises :class:`ParameterError` when ``work`` or ``compare`` is not a workspace (no
    ``config.json``) or when ``out_dir`` holds an ``assets/`` folder another tool wrote.
    """
    works = [Path(work).resolve()] + ([Path(compare).resolve()] if compare is not None else [])
    report_dir = Path(out_dir).resolve() if out_dir is not None else works[0] / "report"
    runs = [load_run(path, key, label, report_dir) for path, key, label in zip(works, "ab", run_labels(works))]
    stages = sorted({stage for run in runs for stage in run.states}, key=stage_rank)
    prepare_out_dir(report_dir)
    (report_dir / "assets").mkdir()
    (report_dir / "assets" / "style.css").write_text(STYLE_CSS, encoding="utf-8")
    (report_dir / "assets" / "report.js").write_text(REPORT_JS, encoding="utf-8")
    pages = []
    for stage in stages:
        (report_dir / stage_file(stage)).write_text(stage_page(stage, runs, stages, report_dir), encoding="utf-8")
        pages.append(stage_file(stage))
    index = report_dir / "index.html"
    index.write_text(index_page(runs, stages), encoding="utf-8")
    write_json_atomic(report_dir / MARKER_FILE, {"pages": pages + ["index.html"],
                                                 "workspaces": [str(path) for path in works]})
    logger.info("report written to %s", index)
    return index
