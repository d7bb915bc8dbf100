"""Views of the pipeline's intermediate outputs: frame strip, monocular vs aligned depth,
alignment, optical flow, masks, cameras (interactive 3D) and tracks. Each builder takes a
:class:`StagePage` and returns its views, [] when the stage folder lacks its files."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
from markupsafe import Markup

from mono4d.data.artifacts import (ALIGNMENT_FILE, CAMERAS_FILE, DEPTH_FILE, FLOW_PAIRS_FILE, LABELS_FILE, MASKS_DIR,
                                   PAIRS3D_COUNTS_FILE, POINTS_FILE, TRACKS_FILE, flow_pair_name, list_flow_pairs,
                                   read_cameras_meta, read_flow_meta, read_flow_pair, read_labels, read_points,
                                   read_tracks)
from mono4d.data.images import read_gray, read_rgb, write_gray, write_rgb
from mono4d.data.visualize import LABEL_COLORS, flow_to_color, overlay_labels
from mono4d.pipeline.report.markup import facts_table, grid, join, strip, ui
from mono4d.pipeline.report.media import chart_figure, colour_legend, flow_wheel, video_figure, write_thumbnail
from mono4d.pipeline.report.model import Run, StagePage, View, pick, spaced
from mono4d.pipeline.report.plots import line_chart
from mono4d.pipeline.workspace import read_json

#: Frames (or pairs) shown per view, and thumbnails in the frame strip.
SAMPLES = 4
STRIP_FRAMES = 8
#: Sparse points drawn in the 3D view at most (a fixed random subset beyond that).
ORBIT_MAX_POINTS = 6000


def frame_files(run: Run) -> list[Path]:
    """The frames stage's images of ``run`` (empty when it has none)."""
    frames_dir = run.stage_dir("frames")
    if not (frames_dir / "frames.json").is_file():
        return []
    from mono4d.stages.frames import frame_paths

    return frame_paths(frames_dir)


def frame_cell(page: StagePage, frames: list[Path], index: int) -> Markup:
    if 0 <= index < len(frames) and frames[index].is_file():
        return page.figure(frames[index], f"frame {index}")
    return ui().missing_cell(f"frame {index}: no image in frames/")


def frames_views(page: StagePage) -> list[View]:
    if not (page.directory / "frames.json").is_file():
        return []
    from mono4d.stages.frames import read_frames_meta

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
    return [View("Frame strip", join([facts, strip(cells)]))]


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
    if not ((page.directory / DEPTH_FILE).is_file() or (page.directory / ALIGNMENT_FILE).is_file()):
        return []
    mono_dir, aligned_dir = page.run.stage_dir("depth"), page.run.stage_dir("align")
    mono_kind = (read_json(mono_dir / DEPTH_FILE) or {}).get("kind", "relative_inverse")
    camera_units = (read_json(page.run.stage_dir("cameras") / CAMERAS_FILE) or {}).get("units", "sfm")
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
                         else ui().missing_cell(f"{title}: no picture for {name}"))
    legend = colour_legend(page, "depth_colorbar.png", "near", "far",
                           "colours follow inverse depth, 2nd–98th percentile of each picture")
    headings = [ui().heading(title) for title in ["frame"] + [column[0] for column in columns]]
    return [View("Depth: monocular and aligned", ui().with_legend(grid(headings + cells, len(headings)), legend))]


def alignment_views(page: StagePage) -> list[View]:
    """Per-frame scale, shift, residual and inliers of ``alignment.json`` (charts), and ``scatter.png``."""
    meta = read_json(page.directory / ALIGNMENT_FILE)
    scatter = page.directory / "scatter.png"
    if meta is None and not scatter.is_file():
        return []
    parts: list[Markup] = []
    records = (meta or {}).get("frames", [])
    if records:
        index = [record.get("index", number) for number, record in enumerate(records)]
        charts = [chart_figure(page, line_chart({key: (index, [record.get(key) for record in records])}, title,
                                                "frame", log_y=False), title)
                  for key, title in (("scale", "scale"), ("shift", "shift"),
                                     ("residual", "median relative residual of inliers"),
                                     ("inlier_fraction", "inlier fraction"))]
        filled = [record.get("index") for record in records if record.get("filled")]
        parts.append(facts_table([("fit space", meta.get("fit_space")), ("depth kind", meta.get("depth_kind")),
                                  ("masks used", meta.get("masks_used")), ("max depth", meta.get("max_depth")),
                                  ("frames interpolated (too few points)", ", ".join(map(str, filled)) or "none")]))
        parts.append(strip(charts))
    if scatter.is_file():
        parts.append(strip([page.figure(scatter, "aligned monocular depth vs SfM depth (log-log)")]))
    return [View("Alignment", join(parts))]


def flow_views(page: StagePage) -> list[View]:
    """Flow colour images, forward-backward validity masks (from the pairs' npz) and a colour legend."""
    if not (page.directory / FLOW_PAIRS_FILE).is_file():
        return []
    pairs = list_flow_pairs(page.directory)
    offsets: dict[int, int] = {}
    for i, j in pairs:
        offsets[j - i] = offsets.get(j - i, 0) + 1
    facts = facts_table([("backend", read_flow_meta(page.directory).get("backend")),
                         ("pairs", len(pairs)),
                         ("pairs per frame offset", ", ".join(f"{k}: {v}" for k, v in sorted(offsets.items())))])
    consecutive = [pair for pair in pairs if pair[1] - pair[0] == 1] or pairs
    frames = frame_files(page.run)
    cells = []
    for i, j in pick(consecutive, SAMPLES):
        pair = read_flow_pair(page.directory, i, j)
        forward, valid = pair["forward"], pair["valid_forward"]
        mask = page.asset(f"valid_{flow_pair_name(i, j)}.png")
        write_gray(mask, valid.astype(np.uint8) * 255)
        vis = page.directory / "vis" / f"{flow_pair_name(i, j)}.png"
        if not vis.is_file():
            vis = page.asset(f"flow_{flow_pair_name(i, j)}.png")
            write_rgb(vis, flow_to_color(forward, valid))
        magnitude = np.linalg.norm(forward, axis=-1)[valid]
        largest = f"{np.percentile(magnitude, 99):.3g} px" if magnitude.size else "—"
        cells += [frame_cell(page, frames, i),
                  page.figure(vis, f"flow {i} → {j} · 99th percentile |flow| {largest}"),
                  page.figure(mask, f"valid (forward-backward consistent) {valid.mean():.0%} · white = valid")]
    legend_path = page.asset("flow_legend.png")
    write_rgb(legend_path, flow_wheel())
    legend = ui().plain(page.figure(legend_path, "colour of a pixel moving from the centre towards each point; "
                                    "white = still, rim = the picture's 99th-percentile magnitude; black = invalid"))
    headings = [ui().heading("frame i"), ui().heading("flow i → j"), ui().heading("validity")]
    return [View("Optical flow", join([facts, ui().with_legend(grid(headings + cells, 3), legend)]))]


def masks_views(page: StagePage) -> list[View]:
    """Mask overlays of a few frames (``vis/``, drawn from ``masks/`` when missing) and the labels;
    with the motion cues (``vis/cues/``: residual score and flow confidence) next to each overlay."""
    mask_dir, vis_dir = page.directory / MASKS_DIR, page.directory / "vis"
    cues_dir = vis_dir / "cues"
    has_cues = cues_dir.is_dir() and any(cues_dir.glob("score_*.png"))
    if not ((page.directory / LABELS_FILE).is_file() or mask_dir.is_dir()):
        return []
    labels = read_labels(page.directory) if (page.directory / LABELS_FILE).is_file() else {}
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
                     else ui().missing_cell(f"frame {name}: no overlay"))
        if has_cues:
            for kind in ("score", "confidence"):
                cue = cues_dir / f"{kind}_{name}.png"
                cells.append(page.figure(cue, f"frame {name} · {kind}") if cue.is_file()
                             else ui().missing_cell(f"frame {name}: no {kind} picture"))
    rows = [{"label": label, "name": labels.get(label, ""), "color": [int(c) for c in LABEL_COLORS[label % len(LABEL_COLORS)]],
             "share": f"{coverage.get(label, 0.0) / counted:.1%}" if counted else "—"}
            for label in sorted(set(labels) | set(coverage))]
    legend = ui().label_table(rows)
    if not has_cues:
        return [View("Masks", join([legend, grid(cells, SAMPLES)]))]
    headings = [ui().heading("mask"),
                ui().heading("motion score", "(flow vs camera-induced motion, in noise sigmas: "
                             "dark blue 0, red ≥ 4× the threshold)"),
                ui().heading("flow confidence", "(texture × forward-backward consistency: black = unreliable, "
                             "its score cannot start a region)")]
    return [View("Masks", join([legend, grid(headings + cells, 3)]))]


def orbit_scene(content: Mapping[str, Any], points: Mapping[str, np.ndarray] | None) -> dict[str, Any] | None:
    """The JSON scene of the interactive 3D view (see pipeline/report/static/report.js) from a
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
    if not (page.directory / CAMERAS_FILE).is_file():
        return []
    content = read_cameras_meta(page.directory)
    frames = content["frames"]
    points = read_points(page.directory) if (page.directory / POINTS_FILE).is_file() else None
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
        return [View("Cameras", join([facts, ui().muted("no frame has a pose: nothing to draw in 3D")]))]
    scene_id = f"scene-{page.run.key}-{re.sub(r'[^A-Za-z0-9_-]', '_', page.stage)}"
    return [View("Cameras", join([facts, ui().orbit(scene_id, scene, len(scene["xyz"]) // 3)]))]


def tracks_views(page: StagePage) -> list[View]:
    """Track statistics, visible tracks per frame (chart), the still and the overlay video."""
    npz, still, video = (page.directory / name for name in (TRACKS_FILE, "tracks.png", "tracks.mp4"))
    if not (npz.is_file() or still.is_file() or video.is_file()):
        return []
    parts: list[Markup] = []
    if npz.is_file():
        tracks = read_tracks(page.directory)
        visible = tracks["visible"]
        per_frame = visible.sum(axis=0)
        parts.append(facts_table([("tracks", visible.shape[0]), ("frames", visible.shape[1]),
                                  ("mean visible frames per track",
                                   f"{visible.sum(axis=1).mean():.1f}" if len(visible) else "—"),
                                  ("visible fraction", f"{visible.mean():.1%}" if visible.size else "—"),
                                  ("3D flow pairs (pairs3d.npz)",
                                   (read_json(page.directory / PAIRS3D_COUNTS_FILE) or {}).get("total", "none"))]))
        title = "visible tracks per frame"
        parts.append(chart_figure(page, line_chart({"visible tracks": (np.arange(len(per_frame)), per_frame)},
                                                   title, "frame", log_y=False), title))
    pictures = []
    if still.is_file():
        pictures.append(page.figure(still, "trajectories of the tracks seen on the middle frame"))
    if video.is_file():
        pictures.append(video_figure(page, video, "track overlay"))
    return [View("Tracks", join([*parts, grid(pictures, 3)]))]
