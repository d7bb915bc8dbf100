"""The pipeline core: caching, reruns, status, atomic writes, configuration and CLI errors."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from mono4d.data.errors import ParameterError
from mono4d.pipeline import config as config_module
from mono4d.pipeline.cli import main
from mono4d.pipeline.config import load_config
from mono4d.pipeline.registry import STAGES
from mono4d.pipeline.workspace import Workspace

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_video(path: Path, num_frames: int = 12, width: int = 96, height: int = 64, fps: float = 10.0) -> Path:
    """A small mp4 of a textured pattern sliding right by 2 px per frame."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 255, (height, width + 2 * num_frames, 3), dtype=np.uint8), (5, 5), 0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for i in range(num_frames):
        writer.write(np.ascontiguousarray(texture[:, 2 * i:2 * i + width]))
    writer.release()
    return path


@pytest.fixture()
def video(tmp_path) -> Path:
    return write_video(tmp_path / "clip.mp4")


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def manifest(work: Path, stage: str) -> dict:
    return json.loads((work / stage / "manifest.json").read_text())


def test_run_writes_manifest_with_everything_recorded(video, tmp_path):
    work = tmp_path / "ws"
    assert run_cli("run", video, "--work", work, "--until", "frames") == 0
    record = manifest(work, "frames")
    assert record["stage"] == "frames"
    assert record["figures"]["num_frames"] == 12
    assert record["params"]["max_side"] == load_config("cpu").params["frames"].max_side
    assert len(record["inputs"]["source"]["sha256"]) == 64
    assert record["versions"]["numpy"] == np.__version__
    assert record["wall_time_s"] >= 0
    assert (work / "frames" / "log.txt").is_file()
    config = json.loads((work / "config.json").read_text())
    assert config["input"] == str(video.resolve())
    assert config["config"]["stages"]["frames"] == record["params"]
    assert not any((work / ".tmp").iterdir()) if (work / ".tmp").exists() else True


def test_rerun_with_nothing_changed_recomputes_nothing(video, tmp_path):
    work = tmp_path / "ws"
    run_cli("run", video, "--work", work, "--until", "frames")
    before = (work / "frames" / "manifest.json").stat().st_mtime_ns
    first_frame = (work / "frames" / "images" / "000000.png").stat().st_mtime_ns
    from mono4d.pipeline.runner import run_pipeline

    summary = run_pipeline(work, video, until="frames")
    assert summary.ran == []
    assert [o.action for o in summary.outcomes] == ["cached"]
    assert (work / "frames" / "manifest.json").stat().st_mtime_ns == before
    assert (work / "frames" / "images" / "000000.png").stat().st_mtime_ns == first_frame


def test_parameter_change_reruns_the_stage_and_status_says_why(video, tmp_path, capsys):
    work = tmp_path / "ws"
    run_cli("run", video, "--work", work, "--until", "frames")
    capsys.readouterr()
    assert run_cli("status", work, "--set", "frames.max_side=48") == 0
    out = capsys.readouterr().out
    assert "frames" in out and "stale" in out and "parameter max_side changed" in out
    assert run_cli("run", video, "--work", work, "--until", "frames", "--set", "frames.max_side=48") == 0
    record = manifest(work, "frames")
    assert record["params"]["max_side"] == 48
    assert max(record["figures"]["width"], record["figures"]["height"]) == 48
    capsys.readouterr()
    run_cli("status", work)
    assert "done" in capsys.readouterr().out


def test_forced_rerun(video, tmp_path):
    work = tmp_path / "ws"
    from mono4d.pipeline.runner import run_pipeline

    first = run_pipeline(work, video, until="frames")
    again = run_pipeline(work, video, until="frames", rerun=["frames"])
    assert first.ran == ["frames"] and again.ran == ["frames"]
    assert run_pipeline(work, video, until="frames").ran == []


def test_input_change_makes_frames_stale(video, tmp_path, capsys):
    work = tmp_path / "ws"
    run_cli("run", video, "--work", work, "--until", "frames")
    write_video(video, num_frames=14)
    capsys.readouterr()
    run_cli("status", work)
    assert "input source changed" in capsys.readouterr().out
    run_cli("run", "--work", work, "--until", "frames")  # the recorded input is reused
    assert manifest(work, "frames")["figures"]["num_frames"] == 14


def test_status_of_fresh_and_missing_workspace(video, tmp_path, capsys):
    assert run_cli("status", tmp_path / "nothing") == 2
    assert "not a mono4d workspace" in capsys.readouterr().err
    work = tmp_path / "ws"
    run_cli("run", video, "--work", work, "--until", "frames")
    (work / "frames" / "manifest.json").unlink()
    capsys.readouterr()
    run_cli("status", work)
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("frames")][0]
    assert "missing" in line


@pytest.mark.parametrize("override, message", [
    ("frames.stride=0", "stride"),
    ("frames.max_sidee=100", "did you mean 'max_side'"),
    ("framez.stride=2", "unknown stage"),
    ("frames.stride=two", "expected an integer"),
    ("nonsense", "stage.param=value"),
])
def test_bad_parameters_are_reported_without_traceback(video, tmp_path, capsys, override, message):
    assert run_cli("run", video, "--work", tmp_path / "ws", "--set", override) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "ws" / "frames").exists()


def test_bad_inputs_are_reported_without_traceback(tmp_path, capsys):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    single = tmp_path / "single"
    single.mkdir()
    cv2.imwrite(str(single / "0001.png"), np.zeros((32, 32, 3), np.uint8))
    for source, message in [(tmp_path / "missing.mp4", "not found"), (text, "video"), (empty, "image"),
                            (single, "2 frames")]:
        work = tmp_path / f"ws-{source.name}"
        code = run_cli("run", source, "--work", work, "--until", "frames")
        err = capsys.readouterr().err
        assert code == 2, err
        assert message in err and "Traceback" not in err, err
        assert not (work / "frames" / "manifest.json").exists()


def test_luigi_cfg_lists_every_parameter_with_its_default():
    parser = config_module.read_config_files([config_module.DEFAULT_CONFIG_FILE])
    for stage, declared in STAGES.items():
        params = declared.params_class()
        assert parser.has_section(stage), f"luigi.cfg lacks [{stage}]"
        written = dict(parser.items(stage))
        expected = {k: v for k, v in vars(params).items()}
        assert set(written) == set(expected), f"[{stage}] keys differ from stages/{stage}.py Params"
        for key, value in expected.items():
            parsed = config_module.parse_value(written[key], type(value), f"{stage}.{key}")
            assert parsed == value, f"[{stage}] {key} = {written[key]} but the code default is {value!r}"


def test_config_precedence(tmp_path):
    extra = tmp_path / "extra.cfg"
    extra.write_text("[frames]\nmax_side = 320\nstride = 3\n")
    config = load_config("cpu", ["frames.stride=2"], [extra])
    assert config.params["frames"].max_side == 320
    assert config.params["frames"].stride == 2
    assert config.sources["frames.stride"] == "--set"
    with pytest.raises(ParameterError, match="config file not found"):
        load_config("cpu", [], [tmp_path / "absent.cfg"])
    with pytest.raises(ParameterError, match="unknown preset"):
        load_config("tpu")


def test_interrupted_stage_leaves_no_manifest_and_the_next_run_finishes(tmp_path):
    """Kill `mono4d run` while the frames stage is writing; nothing is marked complete."""
    video = write_video(tmp_path / "long.mp4", num_frames=400, width=640, height=480, fps=30)
    work = tmp_path / "ws"
    command = [sys.executable, "-m", "mono4d.pipeline.cli", "run", str(video), "--work", str(work), "--until", "frames",
               "--set", "frames.format=png"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    written = []
    while time.time() < deadline and len(written) < 20:
        written = list((work / ".tmp").glob("frames-*/images/*.png")) if (work / ".tmp").exists() else []
        time.sleep(0.05)
    assert len(written) >= 20, "the stage never started writing frames"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (work / "frames" / "manifest.json").exists()
    assert not (work / "frames").exists()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert manifest(work, "frames")["figures"]["num_frames"] == 400
    assert not list((work / ".tmp").glob("*")), "temp folders of the killed run were not cleaned"


def test_second_concurrent_run_is_refused(video, tmp_path):
    from mono4d.pipeline.workspace import Workspace

    work = tmp_path / "ws"
    with Workspace(work).lock():
        with pytest.raises(ParameterError, match="another mono4d run"):
            from mono4d.pipeline.runner import run_pipeline

            run_pipeline(work, video, until="frames")


def test_console_script_runs(video, tmp_path):
    """The installed `mono4d` entry point runs end to end from any folder."""
    work = tmp_path / "ws"
    mono4d = Path(sys.executable).parent / "mono4d"
    assert mono4d.is_file(), "the console script is not installed: pip install -e ."
    result = subprocess.run([str(mono4d), "run", str(video), "--work", str(work), "--until", "frames"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "frames" in result.stdout and "ran" in result.stdout
    result = subprocess.run([str(mono4d), "status", str(work)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "done" in result.stdout


def start_luigid(folder: Path) -> tuple[subprocess.Popen, int]:
    """A real luigid on a free loopback port, listening; its logs and state in ``folder``."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    luigid = subprocess.Popen([str(Path(sys.executable).parent / "luigid"), "--address", "127.0.0.1", "--port", str(port),
                               "--logdir", str(folder), "--state-path", str(folder / "state.pickle")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return luigid, port
        except OSError:
            time.sleep(0.1)
    luigid.terminate()
    pytest.fail("luigid did not start listening within 20 s")


def stop_luigid(luigid: subprocess.Popen) -> None:
    luigid.terminate()
    luigid.wait(timeout=10)


def test_central_scheduler(video, tmp_path, capsys):
    """Runs through a real luigid on loopback, as a multi-machine setup would."""
    luigid, port = start_luigid(tmp_path / "luigid")
    try:
        code = run_cli("run", video, "--work", tmp_path / "ws", "--until", "frames", "--scheduler-host", "127.0.0.1",
                       "--scheduler-port", port)
        assert code == 0
        assert manifest(tmp_path / "ws", "frames")["figures"]["num_frames"] == 12
    finally:
        stop_luigid(luigid)
    capsys.readouterr()
    assert run_cli("run", video, "--work", tmp_path / "ws2", "--scheduler-host", "127.0.0.1", "--scheduler-port", port) == 2
    assert "cannot reach the Luigi scheduler" in capsys.readouterr().err


def test_synth_command_writes_a_scene(tmp_path, capsys):
    assert run_cli("synth", tmp_path / "scene", "--preset", "tiny", "--set", "num_frames=6") == 0
    assert "wrote 6 frames" in capsys.readouterr().out
    assert len(list((tmp_path / "scene" / "images").glob("*.png"))) == 6
    assert run_cli("synth", tmp_path / "bad", "--preset", "huge") == 2
    assert "unknown synthetic preset" in capsys.readouterr().err


@pytest.fixture()
def full_run(tmp_path):
    """The DAG up to tracks on the tiny synthetic scene (weights-free backends); init and train
    have their own tests (they take minutes at a useful budget)."""
    from mono4d.data import synthetic
    from mono4d.pipeline.runner import run_pipeline

    scene = synthetic.generate(tmp_path / "scene", preset="tiny", seed=1)
    work = tmp_path / "ws"
    summary = run_pipeline(work, scene.root / "video.mp4", until="tracks", preset="cpu")
    return work, scene, summary


def stage_mtimes(work: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in work.glob("*/manifest.json")}


def test_parameter_change_reruns_exactly_the_stage_and_its_downstream(full_run):
    from mono4d.pipeline.runner import run_pipeline

    work, scene, summary = full_run
    stages = list(STAGES)
    # every stage up to tracks, in pipeline order (tracks does not read the refined masks)
    assert summary.ran == [stage for stage in stages[:stages.index("tracks") + 1] if stage != "masks_refine"]
    before = stage_mtimes(work)
    again = run_pipeline(work, until="tracks", preset="cpu", overrides=["depth.sfm_median=3"])
    assert again.ran == ["depth", "align", "tracks"]
    after = stage_mtimes(work)
    for stage in ("frames", "flow", "masks", "cameras"):
        assert after[stage] == before[stage], f"{stage} was rewritten"
    for stage in ("depth", "align", "tracks"):
        assert after[stage] > before[stage], f"{stage} was not rewritten"
    assert manifest(work, "depth")["params"]["sfm_median"] == 3
    assert manifest(work, "align")["upstream"]["depth"] == Workspace(work).manifest_hash("depth")
    assert run_pipeline(work, until="tracks", preset="cpu", overrides=["depth.sfm_median=3"]).ran == []
    # depth.backend is sfm: the transformers backend's parameters do not count
    inactive = ["depth.sfm_median=3", "depth.model=some/other-model", "depth.batch_size=9", "flow.raft_iterations=3"]
    assert run_pipeline(work, until="tracks", preset="cpu", overrides=inactive).ran == []
    assert "model" not in manifest(work, "depth")["params"] and "raft_iterations" not in manifest(work, "flow")["params"]


def test_forced_rerun_of_a_middle_stage_reruns_its_downstream(full_run, capsys):
    from mono4d.pipeline.runner import run_pipeline

    work, _, _ = full_run
    capsys.readouterr()
    run_cli("status", work, "--preset", "cpu", "--set", "tracks.grid_step=6")
    table = capsys.readouterr().out
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "stale" in lines["tracks"] and "parameter grid_step changed: 8 -> 6" in lines["tracks"]
    assert all("done" in lines[s] for s in ("frames", "flow", "masks", "cameras", "depth", "align"))
    summary = run_pipeline(work, until="tracks", preset="cpu", rerun=["cameras"])
    assert summary.ran == ["cameras", "depth", "align", "tracks"]


def test_stage_edges_follow_the_configuration(tmp_path):
    from mono4d.pipeline import dag

    config = load_config("cpu")
    assert dag.upstream("masks", config) == ["frames", "flow"]
    assert dag.upstream("cameras", config) == ["frames", "masks"]
    assert dag.upstream("depth", config) == ["frames", "cameras"]
    config = load_config("cpu", ["masks.backend=file", f"masks.mask_path={tmp_path}", "cameras.mode=static", "depth.backend=transformers",
                                 "align.use_masks=false"])
    assert dag.upstream("masks", config) == ["frames"]
    assert dag.upstream("cameras", config) == ["frames"]
    assert dag.upstream("depth", config) == ["frames"]
    assert dag.upstream("align", config) == ["depth", "cameras"]
    assert "masks" not in dag.closure("tracks", config)


def test_registry_declarations_name_real_parameters():
    """Every backend, path and backend-choosing parameter a stage declares exists in its Params."""
    for name, declared in STAGES.items():
        fields = {f.name for f in dataclasses.fields(declared.params_class)}
        named = set(declared.path_params) | {p for group in declared.backends.values() for p in group}
        if declared.backend_param is not None:
            named.add(declared.backend_param)
        assert named <= fields, f"{name}: {sorted(named - fields)} are not parameters of {declared.module}.Params"
        assert callable(declared.run)


def test_only_the_active_backends_parameters_count():
    depth = STAGES["depth"]
    sfm = depth.active_params(load_config("cpu").params["depth"])
    assert sfm["backend"] == "sfm" and "sfm_median" in sfm and "model" not in sfm and "file_path" not in sfm
    learned = depth.active_params(load_config("cpu", ["depth.backend=transformers"]).params["depth"])
    assert "model" in learned and "fp16" in learned and "sfm_median" not in learned
    cameras = STAGES["cameras"].active_params(load_config("cpu", ["cameras.mode=static"]).params["cameras"])
    assert "focal_px" in cameras and "matcher" not in cameras and "known_path" not in cameras


def test_code_hash_covers_every_imported_project_module():
    """Module-level and function-level imports, transitively; nothing outside the project."""
    from mono4d.pipeline.state import code_files

    train = code_files("mono4d.stages.train")
    for path in ("stages/train.py", "stages/train_outputs.py", "stages/init.py", "models/losses.py",
                 "models/rasterizer_torch.py", "models/gaussians.py", "data/geometry.py", "data/dnerf.py",
                 "data/errors.py", "stages/__init__.py"):
        assert path in train, path
    assert all(len(digest) == 64 for digest in train.values())
    frames = code_files("mono4d.stages.frames")
    assert "data/video.py" in frames and "stages/frames.py" in frames
    assert "models/losses.py" not in frames and "stages/train.py" not in frames  # only what frames imports
    assert all(path.split("/")[0] in ("data", "models", "stages", "pipeline") for path in train)


def test_gpu_resource_follows_the_chosen_backend(tmp_path):
    """Only stages whose chosen backend runs on CUDA hold the gpu unit, whatever the preset."""
    from mono4d.pipeline.tasks import task_class

    def resources(stage: str, overrides: list[str]) -> dict:
        work = tmp_path / f"ws{len(list(tmp_path.iterdir()))}"
        Workspace(work).write_config({"input": str(tmp_path), "config": load_config("gpu", overrides).to_json()})
        return task_class(stage)(work=str(work)).resources

    assert resources("masks", []) == {}  # motion masks are CPU code even under --preset gpu
    assert resources("frames", []) == {} and resources("cameras", []) == {}
    assert resources("depth", ["depth.backend=transformers", "depth.device=cuda"]) == {"gpu": 1}
    assert resources("depth", ["depth.backend=transformers", "depth.device=cpu"]) == {}
    assert resources("depth", ["depth.backend=sfm", "depth.device=cuda"]) == {}
    assert resources("flow", ["flow.backend=raft", "flow.device=cuda"]) == {"gpu": 1}
    assert resources("flow", ["flow.backend=dis", "flow.device=cuda"]) == {}
    assert resources("train", ["train.backend=gsplat"]) == {"gpu": 1}
    assert resources("train", ["train.backend=torch", "train.device=cpu"]) == {}


def test_stage_states_are_evaluated_once_per_run_state(video, tmp_path, monkeypatch):
    from mono4d.pipeline import state as state_module
    from mono4d.pipeline.status import workspace_states

    run_cli("run", video, "--work", tmp_path / "ws", "--until", "frames")
    evaluated = []
    original = state_module.RunState._evaluate
    monkeypatch.setattr(state_module.RunState, "_evaluate",
                        lambda self, stage: evaluated.append(stage) or original(self, stage))
    states = workspace_states(tmp_path / "ws")
    assert [s.stage for s in states] == list(STAGES)
    assert sorted(evaluated) == sorted(STAGES)  # each stage once, though most are upstream of several
    assert states[0].status == "done" and all(s.status == "missing" for s in states[1:])


TOY_STAGE = '''"""A toy stage: counts the frames, times ``factor``."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Params:
    factor: int = 1
    data_path: str = ""
    label: str = ""

    def validate(self) -> None:
        from mono4d.data.errors import ParameterError

        if self.factor < 1:
            raise ParameterError("toy.factor must be >= 1", "use 1")


def run(inputs, params, out_dir):
    from toy_mono4d import helper

    count = helper.scaled(len(list((inputs["frames"] / "images").glob("*.png"))), params.factor)
    (out_dir / "count.txt").write_text(str(count))
    return {"count": count}
'''


@pytest.fixture()
def toy_stage(tmp_path, monkeypatch):
    """A stage added through the registry alone: its module (a package outside the repository,
    registered as a project source root so its code counts), one registry entry, and its
    luigi.cfg-style section."""
    from mono4d.pipeline import registry, state

    package = tmp_path / "src" / "toy_mono4d"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text(TOY_STAGE)
    (package / "helper.py").write_text("def scaled(count, factor):\n    return count * factor\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setitem(state.SOURCE_ROOTS, "toy_mono4d", tmp_path / "src")
    monkeypatch.setitem(registry.STAGES, "toy", registry.Stage(
        "toy", "toy_mono4d.stage", "Count the frames (a test stage).", upstream=lambda p: ["frames"],
        path_params=("data_path",)))
    section = tmp_path / "toy.cfg"
    section.write_text("[toy]\nfactor = 3\n")
    yield package, section
    for name in [m for m in sys.modules if m.split(".")[0] == "toy_mono4d"]:
        del sys.modules[name]


def test_a_stage_added_through_the_registry_runs_caches_and_explains(toy_stage, video, tmp_path, capsys):
    from mono4d.pipeline.runner import run_pipeline

    package, section = toy_stage
    work = tmp_path / "ws"
    data_file, label_file = tmp_path / "data.txt", tmp_path / "label.txt"
    data_file.write_text("one")
    label_file.write_text("one")
    paths = [f"toy.data_path={data_file}", f"toy.label={label_file}"]
    summary = run_pipeline(work, video, preset="cpu", overrides=paths, config_files=[section])
    assert summary.target == "toy" and summary.ran == ["frames", "toy"]  # the last registered stage
    assert (work / "toy" / "count.txt").read_text() == "36"  # 12 frames x factor 3 from the section
    record = manifest(work, "toy")
    assert record["params"]["factor"] == 3 and set(record["inputs"]) == {"data_path"}
    assert set(record["code_files"]) == {"toy_mono4d/__init__.py", "toy_mono4d/stage.py", "toy_mono4d/helper.py",
                                         "data/__init__.py", "data/errors.py"}
    assert run_pipeline(work, video, preset="cpu", overrides=paths, config_files=[section]).ran == []

    label_file.write_text("two")  # a string parameter that happens to name a file is not an input
    assert run_pipeline(work, video, preset="cpu", overrides=paths, config_files=[section]).ran == []
    data_file.write_text("two")  # a declared path parameter is
    capsys.readouterr()
    assert run_cli("status", work) == 0
    assert "input data_path changed" in capsys.readouterr().out
    assert run_pipeline(work, video, preset="cpu", overrides=paths, config_files=[section]).ran == ["toy"]

    (package / "helper.py").write_text("def scaled(count, factor):\n    return count * factor  # edited\n")
    capsys.readouterr()
    assert run_cli("status", work) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("toy")][0]
    assert "stale" in line and "code changed: toy_mono4d/helper.py" in line, line
    assert run_pipeline(work, video, preset="cpu", overrides=paths, config_files=[section]).ran == ["toy"]


def test_manifest_without_per_file_code_hashes_is_stale_with_a_reason(toy_stage, video, tmp_path, capsys):
    from mono4d.pipeline.runner import run_pipeline

    _, section = toy_stage
    work = tmp_path / "ws"
    run_pipeline(work, video, preset="cpu", config_files=[section])
    path = work / "toy" / "manifest.json"
    record = json.loads(path.read_text())
    del record["code_files"]
    record.update(code="an older code hash", fingerprint="an older fingerprint")
    path.write_text(json.dumps(record))
    capsys.readouterr()
    run_cli("status", work)
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("toy")][0]
    assert "stale" in line and "predates per-file code hashes" in line, line
    assert run_pipeline(work, video, preset="cpu", config_files=[section]).ran == ["toy"]
