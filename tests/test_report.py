"""The HTML report (`mono4d inspect`): pages parse, every local link resolves, states are
labelled, stage views show the files in the documented formats, compare mode shows both runs.

The workspace is a real pipeline run (the stages wired in pipeline/config.py, at least frames)
over the tiny synthetic scene, plus stage folders written by hand in the documented formats
from the scene's ground truth for the stages that are not wired (yet): depth, align, flow,
masks, cameras, tracks, and a train folder with curves, renders vs ground truth and a video.
"""
from __future__ import annotations

import json
import shutil
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mono4d.data import artifacts
from mono4d.data.errors import ParameterError, StageFailure
from mono4d.data.images import read_gray, read_rgb, write_gray, write_rgb
from mono4d.data.visualize import colorize, colorize_depth, flow_to_color, overlay_labels
from mono4d.data.video import write_video
from mono4d.pipeline.registry import STAGES
from mono4d.pipeline.report import collect_series, line_chart, write_report
from mono4d.pipeline.runner import run_pipeline
from mono4d.pipeline.workspace import Workspace

HANDMADE_STAGES = ("depth", "align", "flow", "masks", "cameras", "tracks", "train")


# ----------------------------------------------------------------------------------------------
# Workspace builders


def write_manifest(stage_dir: Path, stage: str, params: dict, figures: dict, notes: list[str] | None = None) -> None:
    """A manifest like the pipeline's (its fingerprint matches nothing: the stage reads as hand-made)."""
    manifest = {"stage": stage, "run_id": "handmade", "fingerprint": "handmade", "params": params,
                "inputs": {}, "upstream": {"frames": "0" * 64}, "code": "c" * 64,
                "versions": {"python": "3", "numpy": np.__version__}, "started_at": "2025-01-01T00:00:00+00:00",
                "finished_at": "2025-01-01T00:00:01+00:00", "wall_time_s": 1.25, "figures": figures,
                "notes": notes or []}
    (stage_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def handmade_stages(work: Path, scene, flow_offsets: tuple[int, ...] = (1, 2), dynamic_params: int = 1) -> None:
    """Stage folders in the documented formats (../shared/DESIGN.md), from the scene's ground truth."""
    T, H, W = scene.num_frames, scene.height, scene.width
    names = [f"{t:06d}" for t in range(T)]

    depth_dir = work / "depth"
    (depth_dir / "depth").mkdir(parents=True)
    (depth_dir / "vis").mkdir()
    for name, depth in zip(names, scene.depth):
        np.save(depth_dir / "depth" / f"{name}.npy", (1.0 / depth).astype(np.float32))
        write_rgb(depth_dir / "vis" / f"{name}.png", colorize(1.0 / depth))
    (depth_dir / "depth.json").write_text(json.dumps({"kind": "relative_inverse", "invalid": "0",
                                                      "files": [f"depth/{n}.npy" for n in names]}))
    write_manifest(depth_dir, "depth", {"backend": "file"}, {"num_frames": T, "kind": "relative_inverse"})

    align_dir = work / "align"
    (align_dir / "depth").mkdir(parents=True)
    (align_dir / "vis").mkdir()
    for name, depth in zip(names, scene.depth):
        np.save(align_dir / "depth" / f"{name}.npy", depth.astype(np.float32))
        write_rgb(align_dir / "vis" / f"{name}.png", colorize_depth(depth))
    records = [{"index": t, "scale": 1.0 + 0.01 * t, "shift": 0.0, "residual": 0.02, "inlier_fraction": 0.9,
                "filled": t == 3} for t in range(T)]
    (align_dir / "alignment.json").write_text(json.dumps({"fit_space": "inverse_depth", "frames": records}))
    write_rgb(align_dir / "scatter.png", np.full((64, 64, 3), 200, np.uint8))
    write_manifest(align_dir, "align", {"inlier_threshold": 0.1}, {"median_residual": 0.02},
                   ["1 frames had fewer than 50 inlier SfM points"])

    flow_dir = work / "flow"
    (flow_dir / "pairs").mkdir(parents=True)
    (flow_dir / "vis").mkdir()
    pairs = [(i, i + k) for k in flow_offsets for i in range(T - k)]
    for i, j in pairs:
        forward, occluded_forward = scene.flow_between(i, j)
        backward, occluded_backward = scene.flow_between(j, i)
        np.savez_compressed(flow_dir / "pairs" / f"{i:06d}_{j:06d}.npz", forward=forward.astype(np.float16),
                            backward=backward.astype(np.float16), valid_forward=~occluded_forward,
                            valid_backward=~occluded_backward)
        if j == i + 1:
            write_rgb(flow_dir / "vis" / f"{i:06d}_{j:06d}.png", flow_to_color(forward, ~occluded_forward))
    (flow_dir / "pairs.json").write_text(json.dumps({"pairs": [list(p) for p in pairs], "backend": "ground truth"}))
    write_manifest(flow_dir, "flow", {"backend": "dis", "max_offset": max(flow_offsets)},
                   {"num_pairs": len(pairs), "mean_valid_fraction": 0.9})

    masks_dir = work / "masks"
    (masks_dir / "masks").mkdir(parents=True)
    (masks_dir / "vis").mkdir()
    for name, image, mask in zip(names, scene.images, scene.masks):
        write_gray(masks_dir / "masks" / f"{name}.png", mask)
        write_rgb(masks_dir / "vis" / f"{name}.png", overlay_labels(image, mask))
    (masks_dir / "labels.json").write_text(json.dumps({"labels": {"0": "background", "1": "cube", "2": "blob"},
                                                       "backend": "file"}))
    write_manifest(masks_dir, "masks", {"backend": "motion", "dilate": dynamic_params},
                   {"dynamic_fraction": float((scene.masks > 0).mean())})

    cameras_dir = work / "cameras"
    cameras_dir.mkdir()
    registered = np.arange(T) != 5
    artifacts.write_cameras(cameras_dir, np.repeat(scene.K[None], T, axis=0), scene.w2c, registered,
                            [f"images/{names[t]}.png" for t in range(T)], W, H, interpolated=~registered, units="metric")
    xyz = scene.point_at_time(0, 0)[::4, ::4].reshape(-1, 3).astype(np.float32)
    rgb = scene.images[0][::4, ::4].reshape(-1, 3)
    artifacts.write_points(cameras_dir, {"xyz": xyz, "rgb": rgb, "error": np.full(len(xyz), 0.5, np.float32),
                                         "obs_frame": np.zeros(len(xyz), np.int32),
                                         "obs_point": np.arange(len(xyz), dtype=np.int32),
                                         "obs_xy": np.zeros((len(xyz), 2), np.float32)})
    (cameras_dir / "vis").mkdir()
    write_rgb(cameras_dir / "vis" / "trajectory.png", np.full((48, 48, 3), 90, np.uint8))
    write_manifest(cameras_dir, "cameras", {"mode": "known"}, {"num_registered": T - 1})

    tracks_dir = work / "tracks"
    tracks_dir.mkdir()
    np.savez_compressed(tracks_dir / "tracks.npz", xy=scene.tracks_xy.astype(np.float32),
                        visible=scene.tracks_visible, query_frame=np.zeros(len(scene.tracks_xy), np.int32))
    write_rgb(tracks_dir / "tracks.png", scene.images[T // 2])
    write_video(tracks_dir / "tracks.mp4", scene.images, fps=8.0)
    write_manifest(tracks_dir, "tracks", {"grid_step": 8}, {"num_tracks": len(scene.tracks_xy)})

    train_dir = work / "train"
    (train_dir / "eval" / "gt").mkdir(parents=True)
    (train_dir / "eval" / "renders").mkdir()
    steps = np.arange(0, 200, 10)
    (train_dir / "curves.json").write_text(json.dumps({"step": steps.tolist(), "loss": (1.0 / (1 + steps)).tolist(),
                                                       "psnr": (20 + 0.05 * steps).tolist()}))
    rng = np.random.default_rng(0)
    for t in (0, T - 1):
        write_rgb(train_dir / "eval" / "gt" / f"{names[t]}.png", scene.images[t])
        noisy = np.clip(scene.images[t].astype(np.int16) + rng.integers(-20, 21, scene.images[t].shape), 0, 255)
        write_rgb(train_dir / "eval" / "renders" / f"{names[t]}.png", noisy.astype(np.uint8))
    write_video(train_dir / "novel_view.mp4", scene.images[::-1], fps=8.0)
    write_manifest(train_dir, "train", {"iterations": 200}, {"psnr": 29.5})


def build_workspace(work: Path, scene, overrides: tuple[str, ...] = (), **handmade) -> Path:
    """A real pipeline run up to frames (its wired stages) plus the hand-made stage folders."""
    run_pipeline(work, scene.root / "images", until="frames", preset="cpu", overrides=overrides)
    handmade_stages(work, scene, **handmade)
    return work


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    from mono4d.data import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("report_scene") / "scene", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def workspace(tiny_scene, tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("report_a") / "run_a", tiny_scene)


@pytest.fixture(scope="module")
def report(workspace) -> Path:
    return write_report(workspace)


# ----------------------------------------------------------------------------------------------
# Reading the report back


class PageParser(HTMLParser):
    """Collects src/href links, image sources, element ids and the visible text of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.images: list[str] = []
        self.videos: list[str] = []
        self.text: list[str] = []
        self.scripts: dict[str, str] = {}
        self._script_id: str | None = None
        self.open_tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        for name in ("src", "href"):
            if values.get(name):
                self.links.append(values[name])
        if tag == "img":
            self.images.append(values.get("src", ""))
        if tag == "video":
            self.videos.append(values.get("src", ""))
        if tag == "script" and values.get("type") == "application/json":
            self._script_id = values.get("id")
        if tag not in ("img", "link", "meta", "br", "input", "circle", "line", "rect", "polyline"):
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        if tag in self.open_tags:
            while self.open_tags and self.open_tags.pop() != tag:
                pass
        if tag == "script":
            self._script_id = None

    def handle_data(self, data):
        if self._script_id:
            self.scripts[self._script_id] = self.scripts.get(self._script_id, "") + data
        else:
            self.text.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def text_of(path: Path) -> str:
    return " ".join(" ".join(parse(path).text).split())


def chart_texts(page: Path) -> list[tuple[str, list[str]]]:
    """Title and ``<text>`` contents of each chart (an SVG file shown with ``<img>``) of ``page``."""
    import xml.etree.ElementTree as ElementTree

    svg = "{http://www.w3.org/2000/svg}"
    charts = []
    for link in parse(page).images:
        if link.endswith(".svg") and "/chart_" in link:
            root = ElementTree.parse(local_target(page, link)).getroot()
            assert root.tag == f"{svg}svg", link
            (title,) = [node for node in root.iter(f"{svg}g") if node.get("id") == "title"]
            charts.append(("".join(title.itertext()).strip(),
                           ["".join(node.itertext()) for node in root.iter(f"{svg}text")]))
    return charts


def decode(path: Path) -> tuple[str, int, int, int]:
    """Codec name, decoded frame count, width and height of the first video stream of ``path``."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, count, stream.codec_context.width, stream.codec_context.height


def local_target(page: Path, link: str) -> Path | None:
    """The file a relative link of ``page`` points to (None for in-page anchors and data: URIs)."""
    if link.startswith(("#", "data:")):
        return None
    assert "://" not in link, f"{page.name} links outside the report's files: {link}"
    return (page.parent / urllib.parse.unquote(link.split("#")[0])).resolve()


# ----------------------------------------------------------------------------------------------
# Tests


def test_every_page_parses_and_every_local_link_resolves(report, workspace):
    pages = sorted(report.parent.glob("*.html"))
    names = {page.stem for page in pages}
    assert {"index", "frames", *HANDMADE_STAGES} <= names
    for page in pages:
        parser = parse(page)
        assert parser.open_tags == [], f"{page.name}: unclosed {parser.open_tags}"
        assert parser.links, page.name
        for link in parser.links:
            target = local_target(page, link)
            assert target is None or target.is_file(), f"{page.name}: {link} does not resolve"
    assert (report.parent / "assets" / "style.css").is_file() and (report.parent / "assets" / "report.js").is_file()
    assert report == workspace / "report" / "index.html"


def test_index_lists_stages_with_states_times_and_figures(report):
    text = text_of(report)
    assert "frames done" in text
    assert "num_frames=12" in text
    for stage in HANDMADE_STAGES:
        expected = "stale" if stage in STAGES else "unchecked"
        assert f"{stage} {expected}" in text, stage
    assert "1.2 s" in text  # hand-made wall times
    assert "preset cpu" in text and "target stage frames" in text


def test_stale_and_missing_stages_are_labelled_with_reasons(workspace, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(workspace, copy, ignore=shutil.ignore_patterns("report"))
    config = json.loads((copy / "config.json").read_text())
    config["config"]["stages"]["frames"]["max_side"] = 48
    (copy / "config.json").write_text(json.dumps(config))
    index = write_report(copy)
    text = text_of(index)
    assert "frames stale" in text
    assert "parameter max_side changed: 960 -> 48" in text
    assert "Out of date" in text_of(index.parent / "frames.html")

    shutil.rmtree(copy / "frames")
    index = write_report(copy)
    text = text_of(index)
    assert "frames missing" in text
    page = text_of(index.parent / "frames.html")
    assert "has not run in this workspace" in page
    assert "recorded run configuration" in page  # parameters of a stage that has not run


def test_frames_depth_and_align_views(report, workspace, tiny_scene):
    frames_page = parse(report.parent / "frames.html")
    thumbnails = [link for link in frames_page.images if "/frames/frame_" in link]
    assert len(thumbnails) == 8
    with Image.open(local_target(report, thumbnails[0])) as thumbnail:
        assert thumbnail.size == (tiny_scene.width, tiny_scene.height)

    for stage in ("depth", "align"):
        page = report.parent / f"{stage}.html"
        images = parse(page).images
        # the depth view comes first (rows of frame, mono, aligned); the list of other pictures follows
        mono = [local_target(page, link).name for link in images if "depth/vis/" in link][:4]
        aligned = [local_target(page, link).name for link in images if "align/vis/" in link][:4]
        assert mono == aligned == ["000000.png", "000004.png", "000007.png", "000011.png"]
        assert any("depth_colorbar.png" in link for link in images)
        text = text_of(page)
        depth = tiny_scene.depth[0]
        near, far = 1.0 / np.percentile(1.0 / depth, [98, 2])
        assert f"depth {near:.3g} (near) … {far:.3g} (far) m" in text
    align_text = text_of(report.parent / "align.html")
    assert "scatter.png" in " ".join(parse(report.parent / "align.html").images)
    assert "1 frames had fewer than 50 inlier SfM points" in align_text
    titles = [title for title, _ in chart_texts(report.parent / "align.html")]
    assert titles == ["scale", "shift", "median relative residual of inliers", "inlier fraction"]


def test_flow_view_renders_validity_from_the_pairs(report, workspace):
    page = report.parent / "flow.html"
    images = parse(page).images
    masks = [local_target(page, link) for link in images if "/flow/valid_" in link]
    assert len(masks) == 4
    for mask_path in masks:
        i, j = (int(part) for part in mask_path.stem.split("_")[1:])
        with np.load(workspace / "flow" / "pairs" / f"{i:06d}_{j:06d}.npz") as pair:
            np.testing.assert_array_equal(read_gray(mask_path), pair["valid_forward"].astype(np.uint8) * 255)
    assert any("flow_legend.png" in link for link in images)
    legend = read_rgb(local_target(page, next(link for link in images if "flow_legend.png" in link)))
    assert legend.shape == (129, 129, 3) and (legend[64, 64] == 255).all() and (legend[0, 0] == 0).all()
    assert "pairs per frame offset 1: 11, 2: 10" in text_of(page)


def test_masks_cameras_and_tracks_views(report, workspace, tiny_scene):
    masks_page = report.parent / "masks.html"
    overlays = [Path(link).name for link in parse(masks_page).images if "masks/vis/" in link]
    assert overlays[:4] == ["000000.png", "000004.png", "000007.png", "000011.png"]
    assert "cube" in text_of(masks_page) and "blob" in text_of(masks_page)

    cameras = parse(report.parent / "cameras.html")
    scene = json.loads(cameras.scripts["scene-a-cameras"])
    assert len(scene["cameras"]) == tiny_scene.num_frames
    assert [c["interpolated"] for c in scene["cameras"]].count(True) == 1
    centre = -tiny_scene.w2c[2, :3, :3].T @ tiny_scene.w2c[2, :3, 3]
    np.testing.assert_allclose(scene["cameras"][2]["center"], centre, atol=1e-4)
    assert len(scene["xyz"]) == 3 * len(scene["rgb"]) // 3 > 0
    assert "vis/trajectory.png" in " ".join(cameras.links)  # listed with the other pictures

    tracks = report.parent / "tracks.html"
    images = parse(tracks).images
    (video,) = parse(tracks).videos
    assert local_target(tracks, video) == (workspace / "tracks" / "tracks.mp4").resolve()  # embedded as it is
    assert decode(local_target(tracks, video)) == ("h264", tiny_scene.num_frames, tiny_scene.width, tiny_scene.height)
    html_text = tracks.read_text()
    assert f'<video src="{video}" controls muted loop playsinline' in html_text
    assert f"{tiny_scene.num_frames} frames" in text_of(tracks)
    assert [title for title, _ in chart_texts(tracks)] == ["visible tracks per frame"]
    assert any(link.endswith("tracks/tracks.png") for link in images)
    assert "tracks.mp4" in " ".join(parse(tracks).links)
    assert f"tracks {len(tiny_scene.tracks_xy)}" in text_of(tracks)


def test_train_view_curves_renders_errors_and_videos(report, workspace):
    page = report.parent / "train.html"
    charts = chart_texts(page)
    assert [title for title, _ in charts] == ["loss", "psnr"]
    assert "step" in charts[0][1] and {"0.01", "0.1", "1"} <= set(charts[0][1])  # the loss spans decades: log scale
    assert "Curves: curves.json" in text_of(page)
    images = parse(page).images
    errors = [link for link in images if "/train/error_renders_" in link]
    assert len(errors) == 2
    truth = read_rgb(workspace / "train" / "eval" / "gt" / "000000.png").astype(np.float64)
    render = read_rgb(workspace / "train" / "eval" / "renders" / "000000.png").astype(np.float64)
    psnr = 10 * np.log10(1.0 / np.mean(((render - truth) / 255.0) ** 2))
    assert f"PSNR {psnr:.2f} dB" in text_of(page)
    videos = parse(page).videos
    assert [local_target(page, link) for link in videos] == [(workspace / "train" / "novel_view.mp4").resolve()]
    assert decode(local_target(page, videos[0]))[0] == "h264"


def test_videos_browsers_do_not_play_are_re_encoded_to_h264(workspace, tiny_scene, tmp_path):
    """An mp4v video (what OpenCV writes; an older workspace's) is shown as an H.264 copy in assets/."""
    import cv2

    copy = tmp_path / "legacy"
    shutil.copytree(workspace, copy, ignore=shutil.ignore_patterns("report"))
    legacy = copy / "train" / "legacy.mp4"
    writer = cv2.VideoWriter(str(legacy), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (tiny_scene.width, tiny_scene.height))
    for image in scene_frames(tiny_scene):
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    writer.release()
    assert decode(legacy)[0] == "mpeg4"
    index = write_report(copy)
    page = index.parent / "train.html"
    shown = [local_target(page, link) for link in parse(page).videos]
    assert shown == [(index.parent / "assets" / "a" / "train" / "video_legacy.mp4.mp4").resolve(),
                     (copy / "train" / "novel_view.mp4").resolve()]
    assert decode(shown[0]) == ("h264", tiny_scene.num_frames, tiny_scene.width, tiny_scene.height)
    assert "re-encoded from mpeg4" in text_of(page)
    assert "legacy.mp4" in " ".join(parse(page).links)  # the original stays linked


def scene_frames(scene) -> list[np.ndarray]:
    return [np.ascontiguousarray(image) for image in scene.images]


def test_no_picture_of_a_stage_is_hidden(report, workspace):
    for stage in ("frames", *HANDMADE_STAGES):
        page = report.parent / f"{stage}.html"
        linked = {local_target(page, link) for link in parse(page).links} - {None}
        for path in (workspace / stage).rglob("*"):
            if path.suffix.lower() in (".png", ".jpg", ".mp4", ".gif"):
                assert path.resolve() in linked, f"{path} is not in {page.name}"


def test_compare_shows_both_runs_and_the_parameter_difference(workspace, tiny_scene, tmp_path):
    other = build_workspace(tmp_path / "run_b", tiny_scene, overrides=("frames.max_side=64",), flow_offsets=(1,),
                            dynamic_params=3)
    index = write_report(workspace, compare=other, out_dir=tmp_path / "comparison")
    assert index == tmp_path / "comparison" / "index.html"
    text = text_of(index)
    assert "A: run_a" in text and "B: run_b" in text
    frames_page = index.parent / "frames.html"
    html_text = frames_page.read_text()
    assert '<tr class="diff"><th>max_side</th><td class="num">960' in html_text
    assert '<td class="num">64<span class="src">--set</span>' in html_text
    assert "-32 (-33.3%)" in text_of(frames_page)  # width 96 -> 64
    images = parse(frames_page).images
    assert any("/assets/a/frames/" in "/" + link for link in images)
    assert any("/assets/b/frames/" in "/" + link for link in images)
    masks_html = (index.parent / "masks.html").read_text()
    assert '<tr class="diff"><th>dilate</th>' in masks_html
    assert "1 figure, 1 parameter" in text  # flow: num_pairs and max_offset
    for page in index.parent.glob("*.html"):
        for link in parse(page).links:
            target = local_target(page, link)
            assert target is None or target.is_file(), f"{page.name}: {link}"


def test_unreadable_outputs_are_reported_not_fatal(workspace, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(workspace, copy, ignore=shutil.ignore_patterns("report"))
    for path in (copy / "flow" / "pairs").glob("*.npz"):
        path.write_bytes(b"not an npz")
    (copy / "tracks" / "tracks.mp4").write_bytes(b"not a video")
    (copy / "cameras" / "cameras.json").unlink()
    Workspace(copy).record_error("flow", StageFailure("DIS diverged", "try flow.backend=raft"))
    index = write_report(copy)
    flow_text = text_of(index.parent / "flow.html")
    assert "could not draw this view" in flow_text
    assert "last attempt failed: StageFailure: DIS diverged — try flow.backend=raft" in flow_text
    assert "flow unchecked last attempt failed" in text_of(index) or "flow stale last attempt failed" in text_of(index)
    assert "tracks.mp4: cannot decode this video (InvalidDataError" in text_of(index.parent / "tracks.html")
    assert "cameras" in text_of(index)


def test_text_from_the_workspace_is_escaped(workspace, tmp_path):
    """Notes, parameters and file names reach the pages as text (jinja2 autoescape), never as markup."""
    copy = tmp_path / "hostile"
    shutil.copytree(workspace, copy, ignore=shutil.ignore_patterns("report"))
    manifest_path = copy / "align" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["notes"] = ['<img src=x onerror="alert(1)"> & </td>']
    manifest["params"]["method"] = "<script>alert(2)</script>"
    manifest_path.write_text(json.dumps(manifest))
    write_rgb(copy / "align" / 'a"<b>.png', np.zeros((4, 4, 3), np.uint8))
    page = write_report(copy).parent / "align.html"
    html_text = page.read_text()
    assert "<script>alert" not in html_text and "<img src=x" not in html_text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt; &amp; &lt;/td&gt;" in html_text
    text = text_of(page)
    assert '<img src=x onerror="alert(1)"> & </td>' in text and "<script>alert(2)</script>" in text
    assert 'a"<b>.png' in text  # the file is listed by its name ...
    assert any(urllib.parse.unquote(link).endswith('align/a"<b>.png') for link in parse(page).links)  # ... and linked


def test_rewriting_replaces_the_previous_report_and_refuses_foreign_folders(workspace, tmp_path):
    out = tmp_path / "out"
    write_report(workspace, out_dir=out)
    (out / "old-stage.html").write_text("x")
    marker = json.loads((out / ".mono4d-report.json").read_text())
    marker["pages"].append("old-stage.html")
    (out / ".mono4d-report.json").write_text(json.dumps(marker))
    write_report(workspace, out_dir=out)
    assert not (out / "old-stage.html").exists() and (out / "index.html").is_file()

    foreign = tmp_path / "foreign"
    (foreign / "assets").mkdir(parents=True)
    with pytest.raises(ParameterError, match="did not write"):
        write_report(workspace, out_dir=foreign)
    with pytest.raises(ParameterError, match="not a mono4d workspace"):
        write_report(tmp_path)


def test_collect_series_reads_common_curve_layouts():
    groups: dict = {}
    collect_series({"step": [0, 10], "loss": [1.0, 0.5], "name": "x",
                    "stage2": [{"step": 0, "psnr": 20.0}, {"step": 5, "psnr": None}, {"step": 9, "psnr": 25.0}]},
                   "", groups)
    assert groups[""] == {"step": [0.0, 10.0], "loss": [1.0, 0.5]}
    assert groups["stage2"]["step"] == [0.0, 5.0, 9.0]
    assert np.isnan(groups["stage2"]["psnr"][1])


def test_line_chart_breaks_at_missing_values_and_picks_a_log_scale():
    import xml.etree.ElementTree as ElementTree

    def artists(svg: str) -> list[str]:
        return [node.get("id") for node in ElementTree.fromstring(svg.encode()).iter()
                if (node.get("id") or "").startswith(("line-", "point-"))]

    chart = line_chart({"loss": ([0, 1, 2, 3], [1.0, None, 0.01, 0.001])}, "loss")
    assert "<svg" in chart and artists(chart) == ["point-0-0", "line-0-1"]  # the NaN breaks the line
    assert ">0.001</text>" in chart  # log scale ticks reach the smallest value, as text
    assert ">10</text>" not in chart
    assert "no finite values" in line_chart({"x": ([0, 1], [None, None])}, "x")
    flat = line_chart({"x": ([0, 1], [2.0, 2.0])}, "x")
    assert artists(flat) == ["line-0-0"]
    two = line_chart({"a": ([0, 1, 2], [1.0, 2.0, 3.0]), "b": ([0, 1, 2], [3.0, None, None])}, "two", "step")
    assert artists(two) == ["line-0-0", "point-1-0"] and ">a</text>" in two and ">b</text>" in two  # legend
    linear = line_chart({"x": ([0, 1], [-1.0, 1000.0])}, "x")
    assert ">0.001</text>" not in linear and ">1000</text>" in linear  # not all positive: linear scale
