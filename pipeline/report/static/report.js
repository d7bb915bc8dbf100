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
