"""Views of what the optimizer and exporters write: training curves (``*curve*``/``*loss*``/
``*metric*``/``*history*.json``), renders vs ground truth with error maps, scene layers, videos,
and the list of every other picture or video of a stage folder."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from markupsafe import Markup

from mono4d.data.images import read_gray, read_rgb, write_rgb
from mono4d.data.visualize import LABEL_COLORS, colorize
from mono4d.pipeline.report.markup import facts_table, grid, join, strip, ui
from mono4d.pipeline.report.media import asset_name, chart_figure, colour_legend, video_figure
from mono4d.pipeline.report.model import StagePage, View, pick
from mono4d.pipeline.report.plots import line_chart
from mono4d.pipeline.report.views import SAMPLES
from mono4d.pipeline.workspace import MANIFEST, read_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".svg")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
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
                charts.append((line_chart(losses, f"{prefix}loss", step_key or "index"), f"{prefix}loss"))
            charts += [(line_chart({key: xy(values)}, f"{prefix}{key}", step_key or "index"), f"{prefix}{key}")
                       for key, values in series.items() if "loss" not in key.lower()]
        if charts:
            views.append(View(f"Curves: {path.relative_to(page.directory).as_posix()}",
                              strip([chart_figure(page, svg, title) for svg, title in charts])))
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
            summary = ui().paragraph(f"{len(common)} images in both folders; mean PSNR of the shown ones "
                                     f"{np.mean(psnrs):.2f} dB.")
            headings = [ui().heading("ground truth"), ui().heading(render_dir.name), ui().heading("error")]
            views.append(View(f"Renders vs ground truth: {relative}",
                              join([summary, ui().with_legend(grid(headings + cells, 3), legend)])))
    return views


def layers_views(page: StagePage) -> list[View]:
    """The scene layers of a train output side by side (``renders/<split>/layers/<layer>/rgb``
    next to the full render ``renders/<split>/rgb``, :mod:`mono4d.stages.train_layers`), for a few
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
        cells = [ui().heading(title) for title, _ in columns]
        for name in pick(common, SAMPLES):
            cells += [page.figure(found_files[name], f"{title} {name}") for (title, _), found_files in zip(columns, files)]
        rows = [(name, f"labels {', '.join(map(str, entry.get('labels', [])))} ({', '.join(entry.get('names', []))}) · "
                 f"{entry.get('num_gaussians', '?')} Gaussians"
                 + (f" · mask IoU {entry['mask_iou_heldout']:.3f}" if "mask_iou_heldout" in entry else ""))
                for name, entry in table.items()]
        split = layers_dir.parent.name
        views.append(View(f"Scene layers: {split}", join([facts_table(rows) if rows else "",
                                                          grid(cells, len(columns))])))
    return views


def media_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def video_views(page: StagePage) -> list[View]:
    """Every video of the stage not shown yet, as a ``<video>`` with a link to the file."""
    videos = [path for path in media_files(page.directory, VIDEO_SUFFIXES) if path.resolve() not in page.shown]
    if not videos:
        return []
    cells = [video_figure(page, path, path.relative_to(page.directory).as_posix()) for path in videos]
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
    blocks: list[Markup] = []
    for folder, paths in folders.items():
        name = folder.relative_to(page.directory).as_posix() + "/" if folder != page.directory else "stage folder"
        images = [path for path in paths if path.suffix.lower() in IMAGE_SUFFIXES]
        previews = [preview(page, path) for path in pick(images, PREVIEWS_PER_FOLDER)]
        links = [(page.url(path), path.name) for path in paths]
        count = f"{len(paths)} file{'s' if len(paths) > 1 else ''}"
        blocks.append(ui().folder_block(name, count, previews, links))
    return [View("Other pictures and videos", join(blocks))]


def preview(page: StagePage, path: Path) -> Markup:
    """A picture as it is, except a label map (8-bit grey, values below 64: it would look black),
    which is shown in the mask label colours (data/visualize.py ``LABEL_COLORS``)."""
    from PIL import Image

    with Image.open(path) as image:
        grey = image.mode == "L"
    labels = read_gray(path) if grey else None
    if labels is None or labels.max() >= 64:
        return page.figure(path, path.name)
    coloured = page.asset(asset_name(page, path, "labels_"))
    write_rgb(coloured, LABEL_COLORS[labels % len(LABEL_COLORS)])
    return page.figure(coloured, f"{path.name} (label ids in colour)", link=path)
