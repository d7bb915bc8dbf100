"""The workspace: one folder per stage, manifests, fingerprints and atomic writes.

Layout of a workspace ``DIR``::

    DIR/config.json         effective configuration of the latest run (input, preset, params)
    DIR/<stage>/            outputs of a completed stage, with manifest.json written last
    DIR/.tmp/<stage>-<id>/  a stage while it runs; renamed to DIR/<stage> when it succeeds
    DIR/.errors/<stage>.json  the user-facing error of a stage's last failed attempt
    DIR/.cache/             fingerprint cache (content hashes keyed by path, size and mtime)
    DIR/.lock               held by the run using the workspace

A stage folder exists only once its outputs and manifest are complete, so an interrupted run
leaves either the previous complete result or nothing, never a half-written one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import traceback
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from mono4d.data.errors import Mono4dError, ParameterError, StageFailure

logger = logging.getLogger("mono4d")

MANIFEST = "manifest.json"
CONFIG = "config.json"

#: errno values of a write that the file system refuses wherever it happens: no space left, over
#: quota, read-only file system.
_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
#: errno values that mean "no write permission" (a workspace problem when the file is in it).
_NO_PERMISSION = (errno.EACCES, errno.EPERM)
WRITE_FAILURE_HINT = ("free disk space or make the folder writable (or choose another --work folder), then run the "
                      "same command again: completed stages stay cached")

#: Distributions whose versions every manifest records.
TRACKED_DISTRIBUTIONS = ("mono4d", "numpy", "opencv-python-headless", "opencv-python", "torch", "luigi",
                         "kornia", "pycolmap", "transformers", "gsplat", "segment-anything")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temp file in the same folder and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def read_json(path: Path) -> Any | None:
    """Parsed JSON of ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(data: Any) -> str:
    """Hash of a JSON-serialisable value, independent of key order."""
    return sha256_bytes(json.dumps(data, sort_keys=True, default=_json_default).encode())


def library_versions() -> dict[str, str]:
    """Versions of Python, the platform and the tracked libraries that are installed."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in TRACKED_DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class Workspace:
    """Paths and file operations of one workspace folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    # --- paths -------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def manifest_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / MANIFEST

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    def error_path(self, stage: str) -> Path:
        return self.root / ".errors" / f"{stage}.json"

    # --- manifests ---------------------------------------------------------------------------
    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        return read_json(self.manifest_path(stage))

    def manifest_hash(self, stage: str) -> str | None:
        """Hash of a stage's manifest file: it changes whenever the stage is recomputed."""
        try:
            return sha256_bytes(self.manifest_path(stage).read_bytes())
        except OSError:
            return None

    def read_config(self) -> dict[str, Any]:
        config = read_json(self.config_path)
        if config is None:
            raise ParameterError(f"{self.root} is not a mono4d workspace (no {CONFIG})",
                                 "run `mono4d run INPUT --work DIR` first")
        return config

    def write_config(self, config: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_path, config)

    # --- usability -----------------------------------------------------------------------------
    def check_usable(self) -> None:
        """Create the workspace folder if needed and check that files can be written in it.

        Raises :class:`ParameterError` (the ``--work`` given is unusable) when the path is an
        existing file, cannot be created, or refuses a write (read-only, full, no permission).
        """
        if self.root.exists() and not self.root.is_dir():
            raise ParameterError(f"--work {self.root} is an existing file, not a folder",
                                 "give the path of a folder (it is created when missing), e.g. --work runs/NAME")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ParameterError(f"cannot create the workspace folder {self.root}: {error.strerror or error}",
                                 "give a --work folder in a writable place (every parent must be a folder)") from None
        problem = self.probe_write()
        if problem is not None:
            raise ParameterError(f"cannot write in the workspace {self.root}: {problem.strerror or problem}",
                                 WRITE_FAILURE_HINT) from None

    def probe_write(self) -> OSError | None:
        """Write, flush to disk and delete a small file in the workspace; the error, or None if it worked."""
        probe = self.root / f".probe-{uuid.uuid4().hex[:12]}"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"mono4d write probe\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            return error
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        return None

    def write_failure(self, error: OSError) -> StageFailure | None:
        """The user-facing error for ``error`` when it came from a write the file system refused
        (no space, read-only, no permission in the workspace) or the workspace refuses a write
        now (OpenCV reports a failed image write without an errno), else None."""
        filename = Path(error.filename).resolve() if isinstance(error.filename, (str, os.PathLike)) else None
        in_workspace = filename is not None and filename.is_relative_to(self.root)
        refused = error.errno in _FULL_OR_READ_ONLY or (error.errno in _NO_PERMISSION and in_workspace)
        workspace_problem = self.probe_write()
        if not refused and workspace_problem is None:
            return None
        reason = (error if refused else workspace_problem).strerror or str(error if refused else workspace_problem)
        if in_workspace or workspace_problem is not None:
            where = f"the workspace {self.root} cannot be written"
        elif filename is not None:
            where = f"{filename} cannot be written"
        else:
            where = ("a temporary file cannot be written (the workspace is writable; temporary files go to "
                     f"{tempfile.gettempdir()})")
        detail = f" ({filename})" if in_workspace and filename is not None else ""
        return StageFailure(f"{where}: {reason}{detail}", WRITE_FAILURE_HINT)

    # --- atomic stage outputs ------------------------------------------------------------------
    def new_temp_dir(self, stage: str) -> Path:
        """An empty folder next to the stage folder (same filesystem, so renaming is atomic)."""
        path = self.root / ".tmp" / f"{stage}-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path

    def commit(self, stage: str, temp_dir: Path, manifest: dict[str, Any]) -> None:
        """Write the manifest into ``temp_dir`` (last), then swap it in as the stage folder.

        When the file system refuses (full, read-only), the previous stage folder stays as it
        was, ``temp_dir`` is removed, the error is recorded and raised as :class:`StageFailure`.
        """
        final = self.stage_dir(stage)
        trash = None
        try:
            write_json_atomic(temp_dir / MANIFEST, manifest)
            if final.exists():
                trash = self.root / ".tmp" / f"{stage}-old-{uuid.uuid4().hex[:12]}"
                os.replace(final, trash)
            os.replace(temp_dir, final)
        except OSError as error:
            if trash is not None and not final.exists():
                with contextlib.suppress(OSError):
                    os.replace(trash, final)
                trash = None
            shutil.rmtree(temp_dir, ignore_errors=True)
            failure = self.write_failure(error) or StageFailure(
                f"could not save the results of stage {stage}: {error}", WRITE_FAILURE_HINT)
            self.record_error(stage, failure)
            raise failure from None
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def clean_temp(self) -> None:
        """Remove what interrupted runs left in ``.tmp`` (call while holding the lock)."""
        shutil.rmtree(self.root / ".tmp", ignore_errors=True)

    # --- errors --------------------------------------------------------------------------------
    def record_error(self, stage: str, error: BaseException) -> None:
        """Record the user-facing form of a stage's error (an OSError from a refused write becomes
        a :class:`StageFailure` naming the cause). Never raises: when the record itself cannot be
        written, the runner finds none and checks the workspace itself."""
        if isinstance(error, OSError):
            error = self.write_failure(error) or error
        if isinstance(error, Mono4dError):
            record = {"type": type(error).__name__, "message": error.message, "hint": error.hint,
                      "exit_code": error.exit_code}
        else:
            record = {"type": type(error).__name__, "message": str(error) or repr(error), "hint": None,
                      "exit_code": 1, "traceback": "".join(traceback.format_exception(error))}
        path = self.error_path(stage)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, record)
        except OSError as problem:
            logger.debug("could not record the error of stage %s: %s", stage, problem)

    def read_error(self, stage: str) -> dict[str, Any] | None:
        return read_json(self.error_path(stage))

    def clear_errors(self) -> None:
        shutil.rmtree(self.root / ".errors", ignore_errors=True)

    # --- locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the workspace lock for the duration of a run; refuse a second concurrent run."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(self.root / ".lock", "w")
        except OSError as error:
            raise ParameterError(f"cannot write in the workspace {self.root}: {error.strerror or error}",
                                 WRITE_FAILURE_HINT) from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ParameterError(f"another mono4d run is using {self.root}",
                                     "wait for it to finish, or use a different --work folder") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class FingerprintCache:
    """Content hashes of input files, cached by (path, size, mtime) so unchanged inputs cost a stat."""

    def __init__(self, workspace: Workspace) -> None:
        self.path = workspace.root / ".cache" / "fingerprints.json"
        self.entries: dict[str, Any] = read_json(self.path) or {}
        self.dirty = False

    def file_hash(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        entry = self.entries.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["sha256"]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
        self.dirty = True
        return digest.hexdigest()

    def path_fingerprint(self, path: Path) -> str:
        """Content hash of a file; for a folder, the hash of its files' relative names and hashes."""
        if path.is_file():
            return self.file_hash(path)
        listing = [(str(p.relative_to(path)), self.file_hash(p)) for p in sorted(path.rglob("*")) if p.is_file()]
        return sha256_json(listing)

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)
            self.dirty = False
