"""`mono4d view`: the viser viewer of a small trained workspace, driven over loopback by a
minimal websocket client speaking viser's wire protocol (msgpack messages; server windows are
zstd-compressed), the way a browser does."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from mono4d.data.errors import InputError, ParameterError

pytest.importorskip("viser")

#: Upper bound (seconds) of every wait on the server.
WAIT_S = 30.0

from tests.test_report_browser import browser  # noqa: F401  (the shared headless-Chromium fixture)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.test_export import build_workspace

    return build_workspace(tmp_path_factory.mktemp("viewer_ws"))


@pytest.fixture
def viewer(workspace):
    from mono4d.pipeline.viewer import serve_viewer

    running = serve_viewer(workspace[0], host="127.0.0.1", port=0, max_side=96, backend="torch")
    yield running
    running.stop()


def render_from(viewer, frame: int, w2c: np.ndarray, width: int, height: int, time: float) -> np.ndarray:
    """The viewer's render through camera ``w2c`` with input frame ``frame``'s field of view."""
    from mono4d.pipeline.viewer import opencv_to_viser_pose

    wxyz, position = opencv_to_viser_pose(w2c)
    return viewer.render_view(position, wxyz, viewer.fov_y(frame), width, height, time)


class BrowserStandIn:
    """What a client does over viser's websocket: send camera / GUI messages, read the windows
    of messages the server pushes."""

    def __init__(self, port: int) -> None:
        import viser
        import zstandard
        from websockets.sync.client import connect

        self.socket = connect(f"ws://127.0.0.1:{port}", subprotocols=[f"viser-v{viser.__version__}"],
                              open_timeout=WAIT_S)
        self.decompressor = zstandard.ZstdDecompressor()
        self.received: list[dict] = []

    def send(self, message) -> None:
        import msgspec

        self.socket.send(msgspec.msgpack.encode(message.as_serializable_dict()))

    def send_camera(self, w2c: np.ndarray, fov_y: float, width: int, height: int) -> None:
        from viser import _messages

        from mono4d.pipeline.viewer import opencv_to_viser_pose

        wxyz, position = opencv_to_viser_pose(w2c)
        self.send(_messages.ViewerCameraMessage(
            wxyz=tuple(map(float, wxyz)), position=tuple(map(float, position)), fov=float(fov_y), near=0.01,
            far=100.0, image_height=height, image_width=width, look_at=tuple(map(float, position + w2c[2, :3])),
            up_direction=tuple(map(float, -w2c[1, :3]))))

    def wait_for(self, accept, timeout_s: float = WAIT_S) -> dict:
        """The first message (already received or arriving within ``timeout_s``) that ``accept``s."""
        import msgspec

        for message in self.received:
            if accept(message):
                self.received.remove(message)
                return message
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                data = self.socket.recv(timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            size, compressed = int.from_bytes(data[:8], "little"), int.from_bytes(data[8:16], "little")
            payload = self.decompressor.decompress(data[16:16 + compressed], max_output_size=size)
            window = msgspec.msgpack.decode(payload)
            self.received.extend(window["messages"])
            for message in self.received:
                if accept(message):
                    self.received.remove(message)
                    return message
        raise AssertionError(f"no matching message from the viewer within {timeout_s} s")

    def wait_for_image(self, expected: np.ndarray, tolerance: float = 6.0) -> np.ndarray:
        """The first background picture (JPEG) that matches ``expected (H, W, 3)`` within a mean
        absolute difference of ``tolerance``; earlier pictures (renders of superseded requests)
        are skipped."""

        def matches(message: dict) -> bool:
            if message["type"] != "BackgroundImageMessage" or message["rgb_data"] is None:
                return False
            assert message["format"] == "jpeg"
            image = cv2.imdecode(np.frombuffer(message["rgb_data"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            return image.shape == expected.shape and np.abs(image.astype(float) - expected).mean() < tolerance

        message = self.wait_for(matches)
        return cv2.imdecode(np.frombuffer(message["rgb_data"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]

    def close(self) -> None:
        self.socket.close()


def test_camera_conversion_round_trip(workspace):
    from mono4d.pipeline.viewer import opencv_to_viser_pose, render_size, viser_camera_to_opencv

    _, scene = workspace
    fov_y = 2.0 * np.arctan(0.5 * scene.height / scene.K[1, 1])
    for frame in (0, 7):
        wxyz, position = opencv_to_viser_pose(scene.w2c[frame])
        assert np.linalg.norm(wxyz) == pytest.approx(1.0)
        # A canvas 10x the input size rendered at most 96 px wide gives back the input camera.
        K, w2c, width, height = viser_camera_to_opencv(position, wxyz, fov_y, 10 * scene.width, 10 * scene.height,
                                                       max_side=scene.width)
        assert (width, height) == (scene.width, scene.height)
        np.testing.assert_allclose(w2c, scene.w2c[frame], atol=1e-9)
        np.testing.assert_allclose(K, scene.K, atol=1e-9)
    assert render_size(1920, 1080, 256) == (256, 144)
    assert render_size(200, 100, 256) == (200, 100)


def test_render_view_matches_the_rasterizer(viewer, workspace):
    from mono4d.pipeline.export import render_rgb

    _, scene = workspace
    frame = 5
    image = render_from(viewer, frame, scene.w2c[frame], scene.width, scene.height, viewer.frame_time(frame))
    expected = render_rgb(viewer.model, frame / (scene.num_frames - 1), scene.K, scene.w2c[frame], scene.width,
                          scene.height, "torch")
    assert image.shape == (scene.height, scene.width, 3)
    assert np.abs(image.astype(int) - expected).max() <= 1
    # The model was lifted from exact depth, so its render resembles the input frame.
    assert np.abs(image.astype(float) - scene.images[frame]).mean() < 40.0
    assert viewer.nearest_posed_frame(0.49) == 5


def test_viewer_serves_the_page_and_renders_for_a_browser_camera(viewer, workspace):
    from viser import _messages

    _, scene = workspace
    with urllib.request.urlopen(viewer.url + "/", timeout=WAIT_S) as response:
        page = response.read().decode("utf-8", errors="replace")
        assert response.status == 200
    assert "<title>Viser</title>" in page and 'id="root"' in page

    client = BrowserStandIn(viewer.port)
    try:
        client.send_camera(scene.w2c[0], viewer.fov_y(0), scene.width, scene.height)
        label = client.wait_for(lambda m: m["type"] == "SetGuiPanelLabelMessage")
        assert label["label"] == "mono4d"
        slider = client.wait_for(lambda m: m["type"] == "GuiSliderMessage" and m["props"]["label"] == "time")
        expected = render_from(viewer, 0, scene.w2c[0], scene.width, scene.height, 0.0)
        first = client.wait_for_image(expected)
        assert first.shape == (scene.height, scene.width, 3)

        # Moving the time slider (as the client does) renders the scene at the new time.
        client.send(_messages.GuiUpdateMessage(uuid=slider["uuid"], updates={"value": 1.0}))
        expected_later = render_from(viewer, 0, scene.w2c[0], scene.width, scene.height, 1.0)
        assert np.abs(expected_later.astype(float) - expected).mean() > 1.0  # the dynamic Gaussians move
        client.wait_for_image(expected_later)
        assert float(viewer.time.value) == 1.0

        # A camera move renders from the new camera (at the slider's time), at most max_side = 96 wide.
        client.send_camera(scene.w2c[11], viewer.fov_y(11), 2 * scene.width, 2 * scene.height)
        client.wait_for_image(render_from(viewer, 11, scene.w2c[11], scene.width, scene.height, 1.0))
        assert viewer.renders >= 3
    finally:
        client.close()
    viewer.stop()
    assert all(not thread.is_alive() for thread in viewer._threads)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(viewer.url + "/", timeout=5)


def test_run_viewer_returns_after_its_duration(workspace):
    from mono4d.pipeline.viewer import run_viewer

    started = time.monotonic()
    run_viewer(workspace[0], port=0, max_side=64, backend="torch", duration_s=0.5)
    assert time.monotonic() - started < WAIT_S


def test_viewer_reports_missing_stages_and_bad_options(workspace, tmp_path):
    import shutil

    from mono4d.pipeline.viewer import serve_viewer

    work, _ = workspace
    shutil.copytree(work / "cameras", tmp_path / "cameras")
    with pytest.raises(InputError) as error:
        serve_viewer(tmp_path, port=0)
    assert "--until train" in error.value.hint
    with pytest.raises(ParameterError):
        serve_viewer(work, port=0, max_side=4)
    with pytest.raises(ParameterError):
        serve_viewer(work, port=0, backend="vulkan")


def test_viewer_in_headless_chromium(workspace, browser, tmp_path):
    """viser's own web client (headless Chromium) connects, shows the render as the background,
    and shows the new render after the time changes."""
    from mono4d.data.images import read_rgb
    from mono4d.pipeline.viewer import serve_viewer

    viewer = serve_viewer(workspace[0], port=0, max_side=128, backend="torch")

    def wait_until(condition, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def settled_screenshot(name: str) -> np.ndarray:
        time.sleep(2.0)  # let the browser fade in the picture it received
        browser.screenshot(tmp_path / name)
        return read_rgb(tmp_path / name)[200:-200, 100:-400].astype(float)  # away from the GUI panels

    try:
        browser.call(f"{browser.base}/url", "POST", {"url": viewer.url})
        wait_until(lambda: viewer.renders >= 1, "the first render")
        first = settled_screenshot("first.png")
        saturation = first.max(axis=2) - first.min(axis=2)
        assert (saturation > 20).mean() > 0.5  # the rendered scene in colour, not viser's empty grey page
        rendered = viewer.renders
        viewer.time.value = 1.0
        wait_until(lambda: viewer.renders > rendered, "the render at the new time")
        later = settled_screenshot("later.png")
        assert np.abs(later - first).mean() > 3.0  # the dynamic Gaussians moved on screen
    finally:
        viewer.stop()


def test_track_segments_join_consecutive_times():
    from mono4d.pipeline.viewer import track_segments

    xyz = np.arange(5 * 3 * 3, dtype=np.float32).reshape(5, 3, 3)
    rgb = np.arange(15, dtype=np.uint8).reshape(5, 3)
    points, colors = track_segments(xyz, rgb, max_tracks=3)
    assert points.shape == (3 * 2, 2, 3) and colors.shape == (6, 2, 3)
    np.testing.assert_array_equal(points[0], xyz[0, :2])  # track 0, times 0 -> 1
    np.testing.assert_array_equal(points[3], xyz[2, 1:])  # the middle track (2 of 0, 2, 4), times 1 -> 2
    np.testing.assert_array_equal(colors[5, 1], rgb[4])
    assert track_segments(xyz[:0], rgb[:0])[0].shape == (0, 2, 3)


def test_viewer_draws_the_gaussian_tracks(workspace):
    from mono4d.pipeline.export import TRAJECTORIES_FILE
    from mono4d.pipeline.viewer import serve_viewer
    from mono4d.stages.train import load_trained
    from mono4d.stages.train_outputs import export_trajectories

    work, scene = workspace
    path = work / "train" / TRAJECTORIES_FILE
    count = export_trajectories(path, load_trained(work / "train"), np.linspace(0.0, 1.0, scene.num_frames))
    running = serve_viewer(work, host="127.0.0.1", port=0, max_side=96, backend="torch")
    try:
        assert count > 0 and running.tracks is not None and not running.tracks.visible
        assert running.tracks.points.shape == (min(count, 3000) * (scene.num_frames - 1), 2, 3)
        running.show_tracks.value = True
        running._on_show_tracks(None)
        assert running.tracks.visible
    finally:
        running.stop()
        path.unlink()
