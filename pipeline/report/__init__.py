"""`mono4d inspect DIR [--compare OTHER] [--out PATH]`: a static HTML report of a workspace.

Written under ``out_dir`` (default ``DIR/report``)::

    index.html        the run (input, preset, overrides) and a table of stages: state
                      (done / stale and why / missing), wall time, key figures
    <stage>.html      one page per stage: state, figures, notes, parameters, pictures, inputs,
                      versions, log
    assets/           style.css, report.js and generated files (thumbnails, charts as SVG, flow
                      validity masks, colour bars and legends, error maps, H.264 copies of videos
                      browsers do not play), per run and stage in assets/<run>/<stage>/
    .mono4d-report.json  what the last report wrote here (replaced on the next one)

Pictures and videos the stages wrote are linked by relative paths into the workspace, so the
report opens from disk (file://) with no server and no network, as long as the workspace and
the report keep their relative places. Videos are embedded as ``<video>`` elements: the H.264
MP4s of data/video.py ``write_video`` as they are, other codecs (e.g. mp4v from older runs)
re-encoded to H.264 once.

The package: :mod:`.model` (runs, stage states, the page being drawn), :mod:`.views` and
:mod:`.outputs` (one builder per kind of stage output), :mod:`.media` (thumbnails, legends,
videos), :mod:`.plots` (matplotlib SVG charts), :mod:`.markup` (the jinja2 environment, autoescape
on) and :mod:`.pages` (pages and :func:`write_report`); HTML lives in ``templates/*.html.j2``,
the style sheet and the script in ``static/``.

The pages are driven by the files found in each stage folder (documented formats in
../shared/DESIGN.md), not by the stage's name alone: a view appears where its files exist
(``frames.json`` -> frame strip, ``depth.json``/``alignment.json`` -> mono vs aligned depth,
``pairs.json`` -> flow, ``labels.json``/``masks/`` -> masks, ``cameras.json`` -> 3D cameras,
``tracks.npz``/``tracks.png``/``tracks.mp4`` -> tracks, ``*curve*``/``*loss*``/``*metric*``/
``*history*.json`` -> training curves, an image folder named ``gt``/``ground_truth``/``target``
next to another image folder with the same file names -> renders vs ground truth with error
maps, any video -> a video player), and every other picture or video is listed, so nothing is
hidden. A view that cannot read its files says why instead of failing the report.

With ``compare``, every page puts the two workspaces side by side: figures with their change,
parameters and versions with differences highlighted, pictures next to each other.
"""
from __future__ import annotations

from mono4d.pipeline.report.media import video_figure, video_stream_info
from mono4d.pipeline.report.model import Run, StagePage, View, load_run
from mono4d.pipeline.report.outputs import collect_series, curves_views, layers_views, render_views
from mono4d.pipeline.report.pages import MARKER_FILE, VIEW_BUILDERS, build_views, write_report
from mono4d.pipeline.report.plots import line_chart
from mono4d.pipeline.report.views import cameras_views, depth_views, flow_views, masks_views, orbit_scene, tracks_views

__all__ = ["MARKER_FILE", "VIEW_BUILDERS", "Run", "StagePage", "View", "build_views", "cameras_views",
           "collect_series", "curves_views", "depth_views", "flow_views", "layers_views", "line_chart", "load_run",
           "masks_views", "orbit_scene", "render_views", "tracks_views", "video_figure", "video_stream_info",
           "write_report"]
