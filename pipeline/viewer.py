"""``mono4d view``: an interactive web viewer of the trained 4D scene (viser).

The viewer serves viser's web client (http://HOST:PORT, loopback by default). The browser shows
the trained model rendered from the browser's own camera: every time the camera moves, or the
time slider changes, the server renders the model at that time with the rasterizer
(:func:`mono4d.pipeline.export.render_rgb`; the torch backend on CPU renders at low resolution,
``max_side`` pixels on the longer side) and sends the picture as the scene's background. The GUI
panel has the time slider, play, the render resolution, a button that jumps to the input camera
of the frame nearest the current time, the input cameras drawn as frustums (click one to
view from it at its time), the trained Gaussians' 3D tracks drawn as lines (the train stage's
``trajectories.npz``: at most :data:`MAX_TRACK_LINES` tracks, each in its Gaussian's colour; for
an online multi-view model one segment per timestep) and, for a model with more than one scene layer (:mod:`mono4d.models.layers`:
``static``, ``object_<k>``, ``hand``), a checkbox per layer that shows or hides its Gaussians.

Cameras: viser reports the browser camera as ``T_world_camera`` in the OpenCV convention (x right,
y down, z forward): rotation ``wxyz`` (unit quaternion, w first), camera centre ``position``, the
vertical field of view ``fov`` (radians) and the canvas size. :func:`viser_camera_to_opencv`
turns that into this project's ``K`` (3x3 pixels, principal point at the image centre) and
``w2c`` (4x4 world-to-camera).

Renders run on one background thread: requests coalesce per browser (only the latest camera
is rendered), so a slow render never queues up stale frames. ``stop()`` ends the threads and the
server.
"""
from __future__ import annotations

import logging
import threading
import time as timer
from pathlib import Path

import numpy as np

from mono4d.data.errors import ModelUnavailableError, ParameterError

logger = logging.getLogger(__name__)

#: Title shown at the top of the viewer's GUI panel.
VIEWER_LABEL = "mono4d"
#: Time steps per second while "play" is on (one step = one input frame).
PLAY_FPS = 6.0
#: At most this many input cameras are drawn as frustums (evenly spread over the posed frames).
MAX_FRUSTUMS = 60
#: Smallest and largest render resolution offered (longer side, pixels).
MIN_SIDE, MAX_SIDE = 32, 1024
#: At most this many Gaussian tracks are drawn as lines (evenly spread over the tracks).
MAX_TRACK_LINES = 3000
#: How long the render thread sleeps between checks of the stop flag when idle (seconds).
IDLE_WAIT_S = 0.25


def render_size(image_width: int, image_height: int, max_side: int) -> tuple[int, int]:
    """Render size with the canvas' aspect ratio and the longer side at most ``max_side``
    (never larger than the canvas)."""
    scale = min(1.0, max_side / max(image_width, image_height, 1))
    return max(1, int(round(image_width * scale))), max(1, int(round(image_height * scale)))


def viser_camera_to_opencv(position: np.ndarray, wxyz: np.ndarray, fov_y: float, image_width: int,
                           image_height: int, max_side: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``K (3, 3)``, ``w2c (4, 4)`` (float64, OpenCV) and the render ``width``, ``height`` of a
    viser camera: ``position (3,)`` camera centre (world), ``wxyz (4,)`` rotation of
    ``T_world_camera`` (OpenCV axes), ``fov_y`` vertical field of view (radians), canvas size in
    pixels; rendered at most ``max_side`` pixels on the longer side."""
    import viser.transforms as transforms

    from mono4d.data.geometry import invert_rigid

    width, height = render_size(image_width, image_height, max_side)
    focal = 0.5 * height / np.tan(0.5 * fov_y)
    K = np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])
    c2w = np.eye(4)
    c2w[:3, :3] = transforms.SO3(np.asarray(wxyz, np.float64)).as_matrix()
    c2w[:3, 3] = position
    return K, invert_rigid(c2w), width, height


def track_segments(xyz: np.ndarray, rgb: np.ndarray, max_tracks: int = MAX_TRACK_LINES
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Line segments of 3D tracks ``xyz (D, T, 3)`` (world) coloured ``rgb (D, 3)`` uint8: at most
    ``max_tracks`` tracks (evenly spread), each as its ``T - 1`` segments between consecutive
    times. Returns ``points (M, 2, 3)`` float32 and ``colors (M, 2, 3)`` uint8 (M may be 0)."""
    chosen = np.unique(np.linspace(0, len(xyz) - 1, min(max_tracks, len(xyz))).round().astype(int)) if len(xyz) else []
    tracks = xyz[chosen]
    points = np.stack([tracks[:, :-1], tracks[:, 1:]], axis=2).reshape(-1, 2, 3).astype(np.float32)
    colors = np.repeat(rgb[chosen][:, None, None], 2, axis=2)
    colors = np.broadcast_to(colors, (len(chosen), max(xyz.shape[1] - 1, 0), 2, 3)).reshape(-1, 2, 3)
    return points, colors.astype(np.uint8)


def opencv_to_viser_pose(w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``wxyz (4,)`` and ``position (3,)`` of ``T_world_camera`` for an OpenCV ``w2c (4, 4)``."""
    import viser.transforms as transforms

    from mono4d.data.geometry import invert_rigid

    c2w = invert_rigid(w2c)
    return transforms.SO3.from_matrix(c2w[:3, :3]).wxyz, c2w[:3, 3]


class SceneViewer:
    """A running viewer of a workspace's trained model (see the module docstring).

    Attributes: ``url`` (where a browser opens it), ``port``, ``model`` (the
    :class:`mono4d.models.gaussians.SceneModel`), ``K``/``w2c`` (the input cameras, ``(T, 3, 3)`` /
    ``(T, 4, 4)``), ``posed`` (indices of the frames with a pose), ``centre`` (world point the
    middle input camera looks at), ``view_distance`` (its distance from that camera, world units),
    ``renders`` (how many pictures were sent to browsers), ``layers`` (layer name -> label ids),
    ``shown_model`` (the model restricted to the layers shown; None when every layer is hidden).
    """

    def __init__(self, work: Path, host: str = "127.0.0.1", port: int = 8080, max_side: int = 256,
                 backend: str = "auto") -> None:
        try:
            import viser
        except ImportError as error:
            raise ModelUnavailableError(f"the viewer needs the viser package, which cannot be imported ({error})",
                                        "pip install viser") from None
        from mono4d.models.layers import model_layers
        from mono4d.pipeline.export import (TRAJECTORIES_FILE, look_at_centre, model_device, posed_cameras, scene_up,
                                            stage_output)
        from mono4d.stages.train import load_trained

        if not MIN_SIDE <= max_side <= MAX_SIDE:
            raise ParameterError(f"viewer resolution {max_side} is not in {MIN_SIDE}..{MAX_SIDE} pixels",
                                 "use e.g. 256 (CPU) or 512 (GPU)")
        if backend not in ("auto", "numba", "torch", "gsplat"):
            raise ParameterError(f"unknown rasterizer backend {backend!r}", "use auto, numba, torch or gsplat")
        work = Path(work)
        self.backend = backend
        self.model = load_trained(stage_output(work, "train", "model.pt"), model_device(backend))
        self.layers = model_layers(self.model)
        self.shown_model = self.model
        self.layer_toggles: dict[str, object] = {}
        _, self.K, self.w2c, self.posed = posed_cameras(work)
        self.num_frames = int(self.model.meta["num_frames"])
        self.width, self.height = int(self.model.meta["width"]), int(self.model.meta["height"])
        self.renders = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[int, object] = {}

        middle = int(self.posed[len(self.posed) // 2]) if len(self.posed) else None
        self.centre = (look_at_centre(self.model, self.K[middle], self.w2c[middle], self.width, self.height)
                       if middle is not None else self.model.params["means"].detach().cpu().numpy().mean(axis=0))
        distance = float(np.linalg.norm(self.centre - self._camera_centre(middle))) if middle is not None else 1.0
        self.view_distance = max(distance, 1e-6)

        self.server = viser.ViserServer(host=host, port=port, label=VIEWER_LABEL, verbose=False)
        self.port = int(self.server.get_port())
        self.url = f"http://{host}:{self.port}"
        if len(self.posed):
            self.server.scene.set_up_direction(tuple(scene_up(self.w2c[self.posed])))
        self._build_gui(max_side)
        if middle is not None:
            self._set_initial_camera(middle)
            self._add_frustums()
        self.tracks = self._add_tracks(stage_output(work, "train", "model.pt") / TRAJECTORIES_FILE)
        self.server.on_client_connect(self._on_connect)
        self.server.on_client_disconnect(self._on_disconnect)
        self._threads = [threading.Thread(target=self._render_loop, name="mono4d-viewer-render", daemon=True),
                         threading.Thread(target=self._play_loop, name="mono4d-viewer-play", daemon=True)]
        for thread in self._threads:
            thread.start()

    # --- geometry --------------------------------------------------------------------------
    def _camera_centre(self, frame: int) -> np.ndarray:
        from mono4d.data.geometry import camera_centers

        return camera_centers(self.w2c[frame])

    def fov_y(self, frame: int) -> float:
        """Vertical field of view (radians) of input frame ``frame``."""
        return float(2.0 * np.arctan(0.5 * self.height / self.K[frame][1, 1]))

    def frame_time(self, frame: int) -> float:
        """Normalised time of frame ``frame``: ``frame / (T - 1)``."""
        return frame / max(self.num_frames - 1, 1)

    def nearest_posed_frame(self, time: float) -> int:
        """The posed frame whose time is nearest to ``time``."""
        return int(self.posed[np.argmin(np.abs(self.posed / max(self.num_frames - 1, 1) - time))])

    # --- rendering -------------------------------------------------------------------------
    def render_view(self, position: np.ndarray, wxyz: np.ndarray, fov_y: float, image_width: int,
                    image_height: int, time: float, max_side: int | None = None) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB of the model at normalised ``time`` seen by a viser camera (see
        :func:`viser_camera_to_opencv`), at most ``max_side`` (default: the GUI's resolution)
        pixels on the longer side."""
        from mono4d.pipeline.export import model_background, render_rgb

        side = int(self.resolution.value) if max_side is None else int(max_side)
        K, w2c, width, height = viser_camera_to_opencv(position, wxyz, fov_y, image_width, image_height, side)
        shown = self.shown_model
        if shown is None:
            return np.full((height, width, 3), np.round(np.array(model_background(self.model)) * 255), np.uint8)
        return render_rgb(shown, time, K, w2c, width, height, self.backend)

    def _render_client(self, client) -> None:
        camera = client.camera
        if client.client_id not in self.server.get_clients() or camera.image_width <= 0 or camera.image_height <= 0:
            return
        started = timer.perf_counter()
        image = self.render_view(camera.position, camera.wxyz, camera.fov, camera.image_width, camera.image_height,
                                 float(self.time.value))
        client.scene.set_background_image(image, format="jpeg", jpeg_quality=90)
        self.renders += 1
        elapsed_ms = 1000.0 * (timer.perf_counter() - started)
        shown = self.shown_model
        counts = f"{shown.num_gaussians} Gaussians ({shown.num_dynamic} dynamic)" if shown is not None else "no layer"
        self.status.content = f"{image.shape[1]}x{image.shape[0]} px in {elapsed_ms:.0f} ms · {counts}"

    def _request(self, client) -> None:
        with self._lock:
            self._pending[client.client_id] = client
        self._wake.set()

    def _request_all(self) -> None:
        for client in self.server.get_clients().values():
            self._request(client)

    def _render_loop(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(IDLE_WAIT_S):
                continue
            self._wake.clear()
            with self._lock:
                clients = list(self._pending.values())
                self._pending.clear()
            for client in clients:
                if self._stop.is_set():
                    return
                try:
                    self._render_client(client)
                except Exception as error:  # a browser that left mid-render must not end the viewer
                    logger.warning("viewer: render for client %s failed: %s: %s", client.client_id,
                                   type(error).__name__, error)

    def _play_loop(self) -> None:
        step = 1.0 / max(self.num_frames - 1, 1)
        while not self._stop.wait(1.0 / PLAY_FPS):
            if self.play.value:
                following = float(self.time.value) + step
                self.time.value = following if following <= 1.0 + 1e-9 else 0.0  # its callback requests renders

    # --- GUI and scene ---------------------------------------------------------------------
    def _build_gui(self, max_side: int) -> None:
        gui = self.server.gui
        step = 1.0 / max(4 * (self.num_frames - 1), 1)
        self.time = gui.add_slider("time", 0.0, 1.0, step, 0.0,
                                   marks=((0.0, "frame 0"), (1.0, f"frame {self.num_frames - 1}")),
                                   hint="normalised time t = frame / (number of frames - 1)")
        self.play = gui.add_checkbox("play", False, hint="step through the frames")
        self.resolution = gui.add_slider("resolution", MIN_SIDE, MAX_SIDE, 32, max_side,
                                         hint="longer side of the rendered picture (pixels)")
        self.snap = gui.add_button("view from input camera", hint="jump to the input camera nearest in time")
        self.show_cameras = gui.add_checkbox("show input cameras", False, hint="draw the input cameras; click one "
                                             "to view from it at its time")
        self.show_tracks = gui.add_checkbox("show tracks", False, hint="draw the 3D tracks of the moving Gaussians "
                                            "over the whole clip")
        if len(self.layers) > 1:
            with gui.add_folder("layers"):
                for layer, labels in self.layers.items():
                    toggle = gui.add_checkbox(layer, True, hint=f"show the Gaussians of mask label(s) "
                                              f"{', '.join(map(str, labels))}")
                    toggle.on_update(lambda _: self._apply_layers())
                    self.layer_toggles[layer] = toggle
        self.status = gui.add_markdown("waiting for a browser")
        self.time.on_update(lambda _: self._request_all())
        self.resolution.on_update(lambda _: self._request_all())
        self.snap.on_click(self._on_snap)
        self.show_cameras.on_update(self._on_show_cameras)
        self.show_tracks.on_update(self._on_show_tracks)

    def set_layer_visible(self, layer: str, visible: bool) -> None:
        """Show or hide a layer (as its checkbox does) and re-render for every browser."""
        if layer not in self.layer_toggles:
            raise ParameterError(f"the model has no layer {layer!r} to toggle", f"use one of {', '.join(self.layers)}")
        self.layer_toggles[layer].value = bool(visible)
        self._apply_layers()

    def _apply_layers(self) -> None:
        from mono4d.models.layers import labels_mask, subset

        shown = [layer for layer, toggle in self.layer_toggles.items() if toggle.value]
        if len(shown) == len(self.layers):
            self.shown_model = self.model
        elif not shown:
            self.shown_model = None
        else:
            labels = [label for layer in shown for label in self.layers[layer]]
            self.shown_model = subset(self.model, labels_mask(self.model, labels))
        self._request_all()

    def _set_initial_camera(self, frame: int) -> None:
        initial = self.server.initial_camera
        initial.position = tuple(self._camera_centre(frame))
        initial.look_at = tuple(self._camera_centre(frame) + self.w2c[frame][2, :3] * self.view_distance)
        initial.up = tuple(-self.w2c[frame][1, :3])
        initial.fov = self.fov_y(frame)
        initial.near = 0.01 * self.view_distance
        initial.far = 100.0 * self.view_distance

    def _add_frustums(self) -> None:
        shown = self.posed[np.unique(np.linspace(0, len(self.posed) - 1, min(MAX_FRUSTUMS, len(self.posed))).round()
                                     .astype(int))]
        self.frustums = []
        for frame in shown:
            wxyz, position = opencv_to_viser_pose(self.w2c[frame])
            handle = self.server.scene.add_camera_frustum(
                f"/input_cameras/{frame:06d}", fov=self.fov_y(int(frame)), aspect=self.width / self.height,
                scale=0.08 * self.view_distance, thickness=1.5, thickness_units="screen", color=(255, 140, 0),
                wxyz=wxyz, position=position, visible=bool(self.show_cameras.value))
            handle.on_click(lambda event, frame=int(frame): self.move_client_to(event.client, frame))
            self.frustums.append(handle)

    def _add_tracks(self, path: Path):
        """Draw the tracks of ``trajectories.npz`` (:func:`track_segments`; hidden until "show
        tracks" is ticked); returns the line handle, or None without tracks."""
        if not path.is_file():
            return None
        with np.load(path) as tracks:
            points, colors = track_segments(tracks["xyz"], tracks["rgb"])
        if not len(points):
            return None
        return self.server.scene.add_line_segments("/tracks", points, colors, thickness=1.5, thickness_units="screen",
                                                   visible=bool(self.show_tracks.value))

    def _on_show_tracks(self, _) -> None:
        if self.tracks is not None:
            self.tracks.visible = bool(self.show_tracks.value)

    def move_client_to(self, client, frame: int) -> None:
        """Put a browser's camera on input frame ``frame`` and the time slider at its time."""
        centre = self._camera_centre(frame)
        with client.atomic():
            client.camera.fov = self.fov_y(frame)
            client.camera.position = centre
            client.camera.look_at = centre + self.w2c[frame][2, :3] * self.view_distance
            client.camera.up_direction = -self.w2c[frame][1, :3]
        self.time.value = self.frame_time(frame)
        self._request(client)

    def _on_snap(self, event) -> None:
        if event.client is not None and len(self.posed):
            self.move_client_to(event.client, self.nearest_posed_frame(float(self.time.value)))

    def _on_show_cameras(self, _) -> None:
        for handle in getattr(self, "frustums", []):
            handle.visible = bool(self.show_cameras.value)

    def _on_connect(self, client) -> None:
        client.camera.on_update(lambda camera: self._request(camera.client))
        self._request(client)

    def _on_disconnect(self, client) -> None:
        with self._lock:
            self._pending.pop(client.client_id, None)

    # --- lifetime --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the render and play threads and the server (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=10.0)
        self.server.stop()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until :meth:`stop` is called or ``timeout_s`` seconds pass; True once stopped."""
        return self._stop.wait(timeout_s)


def serve_viewer(work: Path, host: str = "127.0.0.1", port: int = 8080, max_side: int = 256,
                 backend: str = "auto") -> SceneViewer:
    """Start the viewer of the workspace ``work`` on ``host:port`` (``port`` 0: any free port; a
    busy port moves to the next free one, see ``viewer.port``) and return it running; call
    ``stop()`` on it to end it. Raises :class:`mono4d.data.errors.InputError` naming the stage to run
    when the train or cameras stage has not run."""
    return SceneViewer(Path(work), host, port, max_side, backend)


def run_viewer(work: Path, host: str = "127.0.0.1", port: int = 8080, max_side: int = 256, backend: str = "auto",
               duration_s: float | None = None) -> None:
    """Serve the viewer until Ctrl-C (or for ``duration_s`` seconds), logging its address."""
    viewer = serve_viewer(work, host, port, max_side, backend)
    logger.info("mono4d viewer of %s at %s (Ctrl-C to stop)", work, viewer.url)
    try:
        viewer.wait(duration_s)
    except KeyboardInterrupt:
        logger.info("stopping the viewer")
    finally:
        viewer.stop()
