"""Workspace problems through `mono4d run`: a --work that is a file, a folder that refuses writes,
and a file system that fills up or turns read-only while a stage runs. Each gives one message,
exit code 2 (unusable --work) or 3 (a stage could not finish), no traceback, nothing marked
done, and the lock released.

The tests run as root, which chmod cannot stop, so the refusals are simulated where Python and
OpenCV write files (open, os.open, os.mkdir, cv2.imwrite) for paths inside the workspace only;
everything else (the pipeline, Luigi, the stages) runs for real.
"""
from __future__ import annotations

import builtins
import errno
import fcntl
import io
import json
import os
from pathlib import Path

import cv2
import pytest

from mono4d.pipeline.cli import main
from mono4d.pipeline.workspace import Workspace
from tests.test_pipeline import write_video

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class RefusedWrites:
    """Make the file system refuse writes under ``root`` with ``code`` (ENOSPC, EROFS, EACCES).

    With ``stage``, writes are refused only once ``after`` files were written in that stage's
    temp folder (``DIR/.tmp/<stage>-*``), i.e. mid-stage; ``only`` restricts the refusal to
    paths it accepts. ``armed`` can be cleared to "free the disk" again.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, code: int, stage: str | None = None,
                 after: int = 0, only=lambda path: True) -> None:
        self.root = root.resolve()
        self.code, self.stage, self.after, self.only = code, stage, after, only
        self.written = 0
        self.armed = stage is None
        self.refused = 0
        real_open, real_os_open, real_mkdir, real_imwrite = builtins.open, os.open, os.mkdir, cv2.imwrite

        def guarded(path, writing: bool) -> None:
            if not writing or not isinstance(path, (str, os.PathLike)):
                return
            path = Path(os.fspath(path)).resolve()
            if not path.is_relative_to(self.root):
                return
            if self.armed and self.only(path):
                self.refused += 1
                raise OSError(self.code, os.strerror(self.code), str(path))
            parts = path.relative_to(self.root).parts
            if self.stage and len(parts) > 1 and parts[0] == ".tmp" and parts[1].startswith(f"{self.stage}-"):
                self.written += 1
                self.armed = self.written > self.after

        def fake_open(file, mode="r", *args, **kwargs):
            guarded(file, any(flag in mode for flag in "wax+"))
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            guarded(path, bool(flags & _WRITE_FLAGS))
            return real_os_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            guarded(path, True)
            return real_mkdir(path, *args, **kwargs)

        def fake_imwrite(path, *args, **kwargs):
            try:
                guarded(path, True)
            except OSError:
                return False  # OpenCV reports a failed write by its return value only
            return real_imwrite(path, *args, **kwargs)

        for owner, name, fake in ((builtins, "open", fake_open), (io, "open", fake_open), (os, "open", fake_os_open),
                                  (os, "mkdir", fake_mkdir), (cv2, "imwrite", fake_imwrite)):
            monkeypatch.setattr(owner, name, fake)


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture()
def video(tmp_path) -> Path:
    return write_video(tmp_path / "clip.mp4")


def assert_one_clear_message(capsys, *phrases: str) -> str:
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert "Traceback" not in text
    errors = [line for line in captured.err.splitlines() if line.startswith("mono4d: error:")]
    assert len(errors) == 1, captured.err
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def assert_lock_free(work: Path) -> None:
    with open(work / ".lock") as handle:  # read-only: works on a full disk too
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError when still held
        fcntl.flock(handle, fcntl.LOCK_UN)


def test_work_that_is_a_regular_file_is_refused(video, tmp_path, capsys):
    work = tmp_path / "notes.txt"
    work.write_text("my notes")
    assert run_cli("run", video, "--work", work, "--until", "frames") == 2
    assert_one_clear_message(capsys, "is an existing file, not a folder", str(work))
    assert work.read_text() == "my notes"

    nested = work / "ws"
    assert run_cli("run", video, "--work", nested, "--until", "frames") == 2
    assert_one_clear_message(capsys, "cannot create the workspace folder", str(nested))


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_read_only_work_folder_is_refused(video, tmp_path, capsys, monkeypatch, code):
    work = tmp_path / "ws"
    work.mkdir()
    RefusedWrites(monkeypatch, work, code)
    assert run_cli("run", video, "--work", work, "--until", "frames") == 2
    assert_one_clear_message(capsys, "cannot write in the workspace", os.strerror(code))
    assert list(work.iterdir()) == []


def test_disk_full_mid_stage_fails_cleanly_and_the_next_run_finishes(video, tmp_path, capsys, monkeypatch):
    work = tmp_path / "ws"
    # Every write in the workspace fails once the frames stage wrote 3 files: the frame images,
    # the stage's error record and everything else (the worst case, a disk that is truly full).
    disk = RefusedWrites(monkeypatch, work, errno.ENOSPC, stage="frames", after=3)
    assert run_cli("run", video, "--work", work, "--until", "frames") == 3
    assert_one_clear_message(capsys, "frames", "No space left on device", str(work.resolve()))
    assert disk.refused > 0
    assert not (work / "frames").exists()
    assert list((work / ".tmp").iterdir()) == []
    assert_lock_free(work)

    disk.armed, disk.stage = False, None  # space freed
    assert run_cli("run", "--work", work, "--until", "frames") == 0
    assert json.loads((work / "frames" / "manifest.json").read_text())["figures"]["num_frames"] == 12


def test_workspace_turning_read_only_mid_stage(video, tmp_path, capsys, monkeypatch):
    work = tmp_path / "ws"
    assert run_cli("run", video, "--work", work, "--until", "frames") == 0
    capsys.readouterr()
    RefusedWrites(monkeypatch, work, errno.EROFS, stage="flow", after=4,
                  only=lambda path: ".tmp" in path.parts)  # the error record can still be written
    assert run_cli("run", video, "--work", work, "--until", "flow") == 3
    message = assert_one_clear_message(capsys, "stage flow", "Read-only file system", "cannot be written")
    assert "unexpectedly" not in message
    assert (work / "frames" / "manifest.json").is_file()
    assert not (work / "flow").exists()
    assert json.loads((work / ".errors" / "flow.json").read_text())["type"] == "StageFailure"
    assert_lock_free(work)


def test_failed_manifest_write_keeps_the_previous_result(video, tmp_path, capsys, monkeypatch):
    work = tmp_path / "ws"
    assert run_cli("run", video, "--work", work, "--until", "frames") == 0
    before = (work / "frames" / "manifest.json").read_bytes()
    capsys.readouterr()
    RefusedWrites(monkeypatch, work, errno.ENOSPC, stage="frames",
                  only=lambda path: path.name.startswith(".manifest.json"))
    assert run_cli("run", "--work", work, "--until", "frames", "--set", "frames.max_side=48") == 3
    assert_one_clear_message(capsys, "stage frames", "No space left on device")
    assert (work / "frames" / "manifest.json").read_bytes() == before  # the old result, complete
    assert list((work / ".tmp").iterdir()) == []
    assert_lock_free(work)
    monkeypatch.undo()
    assert run_cli("status", work, "--set", "frames.max_side=48") == 0
    assert "stale" in capsys.readouterr().out.splitlines()[1]


def test_write_failure_names_the_cause(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    workspace.check_usable()
    inside = OSError(errno.EACCES, "Permission denied", str(workspace.root / "frames" / "x.png"))
    assert "the workspace" in workspace.write_failure(inside).message
    elsewhere = OSError(errno.ENOSPC, "No space left on device", "/var/tmp/colmap/database.db")
    assert workspace.write_failure(elsewhere).message.startswith("/var/tmp/colmap/database.db cannot be written")
    # A read error on an input elsewhere and an errno-less error with a writable workspace are not write failures.
    assert workspace.write_failure(OSError(errno.EACCES, "Permission denied", "/data/clip.mp4")) is None
    assert workspace.write_failure(OSError("could not decode")) is None
