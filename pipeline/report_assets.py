"""Static files of the HTML report (`mono4d inspect`): its style sheet and its one script.

Both are written next to the pages (``assets/style.css``, ``assets/report.js``) so the report
opens from disk with no server and no network. The script draws the interactive 3D view of the
cameras stage on a plain 2D canvas (no libraries): it reads a JSON scene from the element named
by the canvas's ``data-scene`` attribute::

    {"xyz": [x, y, z, ...] world points (flat), "rgb": [r, g, b, ...] 0..255 (flat),
     "cameras": [{"index": i, "center": [x, y, z], "corners": [[x, y, z] x 4],
                  "interpolated": bool}, ...],
     "center": [x, y, z] orbit centre, "rotation": [9 numbers] initial world-to-view rotation
     (row-major; OpenCV axes: x right, y down, z forward), "distance": viewer distance from the
     centre, "first": index of the highlighted (first posed) camera}

The first view looks from a little to the side of and above the first camera. Dragging orbits
around the centre, the wheel zooms, a double click restores the first view.
"""
from __future__ import annotations

STYLE_CSS = """\
:root { --fg: #1d232b; --muted: #6b7580; --line: #d9dee3; --bg-soft: #f4f6f8;
        --done: #1e8e3e; --stale: #b26a00; --missing: #c5221f; --unchecked: #5f6368; --diff: #fff3b0; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0; padding: 0 1.5rem 3rem; max-width: 1500px; }
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line);
      padding: .5rem 0; margin-bottom: 1rem; z-index: 2; display: flex; flex-wrap: wrap; gap: .3rem .9rem; }
nav a { text-decoration: none; color: var(--fg); }
nav a.current { font-weight: 600; text-decoration: underline; }
h1 { font-size: 1.5rem; margin: .6rem 0; }
h2 { font-size: 1.15rem; margin: 1.6rem 0 .5rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 1rem 0 .4rem; }
table { border-collapse: collapse; margin: .3rem 0 .8rem; }
th, td { border: 1px solid var(--line); padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.diff td, td.diff { background: var(--diff); }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--bg-soft); padding: .6rem; overflow-x: auto; max-height: 28rem; }
.muted, .src { color: var(--muted); }
.src { font-size: 11px; margin-left: .4rem; }
.badge { display: inline-block; padding: 0 .5rem; border-radius: .8rem; color: #fff; font-size: 12px;
         font-weight: 600; text-transform: uppercase; letter-spacing: .03em; }
.badge.done { background: var(--done); } .badge.stale { background: var(--stale); }
.badge.missing { background: var(--missing); } .badge.unchecked { background: var(--unchecked); }
nav .badge { padding: 0; width: .65rem; height: .65rem; vertical-align: middle; }
.reasons { margin: .2rem 0 0; padding-left: 1.1rem; color: var(--fg); }
.banner { border-left: 4px solid var(--stale); background: #fff8e6; padding: .5rem .8rem; margin: .6rem 0; }
.banner.missing, .banner.error { border-color: var(--missing); background: #fdecea; }
.banner.unchecked { border-color: var(--unchecked); background: var(--bg-soft); }
.strip { display: flex; flex-wrap: wrap; gap: .6rem; align-items: flex-start; }
figure { margin: 0; }
figure img, figure canvas { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
figcaption { font-size: 12px; color: var(--muted); margin-top: .15rem; max-width: 28rem; }
.strip figure img { width: 200px; }
.grid { display: grid; gap: .6rem; align-items: start; }
.grid figure img { width: 100%; }
.with-legend { display: flex; gap: 1rem; align-items: flex-start; }
.with-legend > div:first-child { flex: 1; min-width: 0; }
.legend { display: flex; gap: .5rem; align-items: stretch; }
.legend .scale { display: flex; flex-direction: column; justify-content: space-between; font-size: 12px; }
.legend img { width: 24px; height: 220px; border: 1px solid var(--line); }
.swatch { display: inline-block; width: .9rem; height: .9rem; border: 1px solid #999; vertical-align: middle; margin-right: .3rem; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1.2rem; }
.pair > div { min-width: 0; }
.pair > div > .runlabel { font-weight: 600; margin-bottom: .3rem; }
svg.chart { background: #fff; border: 1px solid var(--line); max-width: 100%; height: auto; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #333; }
details { margin: .4rem 0; }
summary { cursor: pointer; }
ul.files { columns: 3; font-size: 12px; }
"""

REPORT_JS = """\
/* mono4d report: cameras and sparse points on a 2D canvas, orbit with the mouse (no libraries). */
(function () {
  "use strict";

  function multiply(a, b) {
    const out = new Array(9).fill(0);
    for (let r = 0; r < 3; r++) {
      for (let c = 0; c < 3; c++) {
        let sum = 0;
        for (let k = 0; k < 3; k++) sum += a[3 * r + k] * b[3 * k + c];
        out[3 * r + c] = sum;
      }
    }
    return out;
  }
  function rotationX(angle) {
    const c = Math.cos(angle), s = Math.sin(angle);
    return [1, 0, 0, 0, c, -s, 0, s, c];
  }
  function rotationY(angle) {
    const c = Math.cos(angle), s = Math.sin(angle);
    return [c, 0, s, 0, 1, 0, -s, 0, c];
  }

  function setupOrbit(canvas) {
    const scene = JSON.parse(document.getElementById(canvas.dataset.scene).textContent);
    const context = canvas.getContext("2d");
    const numPoints = scene.xyz.length / 3;
    const start = {yaw: 0.5, pitch: -0.35};  // a little to the side of and above the first camera
    const state = {yaw: start.yaw, pitch: start.pitch, distance: scene.distance, dragging: false, x: 0, y: 0};

    function projector() {
      const R = multiply(multiply(rotationX(state.pitch), rotationY(state.yaw)), scene.rotation);
      const focal = 0.9 * canvas.height, cx = canvas.width / 2, cy = canvas.height / 2;
      const near = 1e-3 * state.distance;
      return function (p) {
        const dx = p[0] - scene.center[0], dy = p[1] - scene.center[1], dz = p[2] - scene.center[2];
        const x = R[0] * dx + R[1] * dy + R[2] * dz;
        const y = R[3] * dx + R[4] * dy + R[5] * dz;
        const z = R[6] * dx + R[7] * dy + R[8] * dz + state.distance;
        return z > near ? [cx + focal * x / z, cy + focal * y / z, z] : null;
      };
    }

    function draw() {
      const project = projector();
      context.fillStyle = "#ffffff";
      context.fillRect(0, 0, canvas.width, canvas.height);
      const visible = [];
      for (let i = 0; i < numPoints; i++) {
        const q = project([scene.xyz[3 * i], scene.xyz[3 * i + 1], scene.xyz[3 * i + 2]]);
        if (q) visible.push([q[2], q[0], q[1], i]);
      }
      visible.sort(function (a, b) { return b[0] - a[0]; });
      for (const [, u, v, i] of visible) {
        context.fillStyle = "rgb(" + scene.rgb[3 * i] + "," + scene.rgb[3 * i + 1] + "," + scene.rgb[3 * i + 2] + ")";
        context.fillRect(u - 1, v - 1, 2.5, 2.5);
      }
      context.lineWidth = 1;
      context.strokeStyle = "#9aa0a6";
      context.beginPath();
      let drawing = false;
      for (const camera of scene.cameras) {
        const c = project(camera.center);
        if (!c) { drawing = false; continue; }
        if (drawing) context.lineTo(c[0], c[1]); else context.moveTo(c[0], c[1]);
        drawing = true;
      }
      context.stroke();
      for (const camera of scene.cameras) {
        const c = project(camera.center);
        const corners = camera.corners.map(project);
        if (!c || corners.some(function (q) { return !q; })) continue;
        context.strokeStyle = camera.index === scene.first ? "#c5221f" : (camera.interpolated ? "#e37400" : "#1a67d2");
        context.lineWidth = camera.index === scene.first ? 2 : 1;
        context.beginPath();
        for (const q of corners) { context.moveTo(c[0], c[1]); context.lineTo(q[0], q[1]); }
        context.moveTo(corners[0][0], corners[0][1]);
        for (let k = 1; k < 4; k++) context.lineTo(corners[k][0], corners[k][1]);
        context.closePath();
        context.stroke();
      }
    }

    canvas.addEventListener("mousedown", function (event) {
      state.dragging = true; state.x = event.clientX; state.y = event.clientY; event.preventDefault();
    });
    window.addEventListener("mouseup", function () { state.dragging = false; });
    window.addEventListener("mousemove", function (event) {
      if (!state.dragging) return;
      state.yaw -= 0.01 * (event.clientX - state.x);
      state.pitch = Math.max(-1.55, Math.min(1.55, state.pitch + 0.01 * (event.clientY - state.y)));
      state.x = event.clientX; state.y = event.clientY;
      draw();
    });
    canvas.addEventListener("wheel", function (event) {
      event.preventDefault();
      state.distance *= Math.exp(0.001 * event.deltaY);
      draw();
    }, {passive: false});
    canvas.addEventListener("dblclick", function () {
      state.yaw = start.yaw; state.pitch = start.pitch; state.distance = scene.distance; draw();
    });
    draw();
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("canvas.orbit").forEach(setupOrbit);
  });
})();
"""
