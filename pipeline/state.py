"""Is a stage done, stale (and why) or missing? Fingerprints of what a stage's result depends on.

A stage's fingerprint covers four parts, each recorded in its manifest so staleness can be
explained part by part:

- ``params``: its effective parameters that its chosen backend reads (a stage's other backends'
  parameters do not count; :meth:`mono4d.pipeline.registry.Stage.active_params`);
- ``inputs``: content hashes of the files it reads from outside the workspace: the run's input
  video or image folder for a stage that reads it, and the existing files or folders named by
  its declared path parameters (``path_params``, e.g. a folder of user depth maps);
- ``upstream``: the hashes of its upstream stages' manifests (a recomputed upstream changes them);
- ``code``: the hash of every project source file (packages ``mono4d.data``, ``mono4d.models``,
  ``mono4d.stages``, ``mono4d.pipeline``) the stage's module imports, transitively, function-level
  imports included; the manifest also records the per-file hashes (``code_files``) so a
  difference names the file.

A stage is done when its manifest's fingerprint equals the current one *and* all its upstream
stages are done; Luigi only walks down from the requested task until it finds a complete one,
so completeness must include the upstream check.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mono4d.pipeline import dag
from mono4d.pipeline.config import REPO_ROOT, Config
from mono4d.pipeline.registry import STAGES
from mono4d.pipeline.workspace import (FingerprintCache, Workspace, read_json, sha256_bytes, sha256_json,
                                       write_json_atomic)

#: Packages whose modules count in a stage's code hash -> the folder that holds each package's
#: folder: module ``mono4d.stages.train`` is ``stages/train.py`` there, recorded under that name.
SOURCE_ROOTS: dict[str, Path] = {f"mono4d.{name}": REPO_ROOT for name in ("data", "models", "stages", "pipeline")}


@dataclass
class StageState:
    stage: str
    status: str  # "done" | "stale" | "missing"
    reasons: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None


#: module -> {"path", "mtime_ns", "size", "sha256", "imports"} of its parsed source file, in this
#: process; also adopted from and saved to a workspace's ``.cache/sources.json`` so a new process
#: does not parse every file again. An entry is valid while its file's path, size and mtime match.
_SOURCES: dict[str, dict[str, Any]] = {}
_sources_changed = False


def module_file(module: str) -> tuple[Path, Path] | None:
    """``(file, root)`` of a project module (``root``: its package's :data:`SOURCE_ROOTS` folder,
    the longest package that matches), or None for a module outside the project packages or one
    that does not exist."""
    parts = module.split(".")
    depth = next((i for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in SOURCE_ROOTS), 0)
    if not depth:
        return None
    root = SOURCE_ROOTS[".".join(parts[:depth])]
    base = root.joinpath(*parts[depth - 1:])
    for candidate in (base.parent / f"{parts[-1]}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate, root
    return None


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``[a, a.b, a.b.c]``: importing a module runs its packages' ``__init__`` too."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module an ``import`` anywhere in ``tree`` (module level or inside functions) may load.

    ``from a import b`` may load ``a`` and, when ``b`` is a submodule, ``a.b``; both are listed
    (names that are not modules resolve to no file). Relative imports resolve against ``module``.
    """
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names += _with_parents(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base:
                continue
            names += _with_parents(base)
            names += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return names


def source_file(module: str, path: Path) -> dict[str, Any]:
    """Hash (``sha256``) and ``imports`` of a module's file, parsed once per file version."""
    global _sources_changed
    stat = path.stat()
    entry = _SOURCES.get(module)
    if (entry is None or entry["path"] != str(path) or entry["mtime_ns"] != stat.st_mtime_ns
            or entry["size"] != stat.st_size):
        data = path.read_bytes()
        try:
            imports = imported_modules(ast.parse(data, filename=str(path)), module, path.name == "__init__.py")
        except SyntaxError:  # the stage fails on import with Python's own message; hash the bytes only
            imports = []
        entry = _SOURCES[module] = {"path": str(path), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size,
                                    "sha256": sha256_bytes(data), "imports": imports}
        _sources_changed = True
    return entry


def load_source_cache(path: Path) -> None:
    """Adopt the parsed source files another process recorded in ``path`` (checked on use)."""
    for module, entry in (read_json(path) or {}).items():
        _SOURCES.setdefault(module, entry)


def save_source_cache(path: Path) -> None:
    """Record this process's parsed source files in ``path`` when it parsed any."""
    global _sources_changed
    if _sources_changed:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, _SOURCES)
            _sources_changed = False
        except OSError:  # a cache that cannot be written only makes the next process parse again
            pass


def code_files(module: str) -> dict[str, str]:
    """Project-relative path (``models/losses.py``) -> sha256 of every project source file that
    ``module`` imports, transitively, its own file and its packages' ``__init__.py`` included."""
    hashes: dict[str, str] = {}
    seen: set[str] = set()
    todo = _with_parents(module)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        located = module_file(name)
        if located is None:
            continue
        path, root = located
        parsed = source_file(name, path)
        hashes[path.relative_to(root).as_posix()] = parsed["sha256"]
        todo.extend(parsed["imports"])
    return dict(sorted(hashes.items()))


class RunState:
    """Evaluates stage states for one workspace under one run configuration (``config.json``).

    States and fingerprints are computed once per instance: make a new instance to see changes.
    """

    def __init__(self, workspace: Workspace, run_config: dict[str, Any]) -> None:
        self.workspace = workspace
        self.run_config = run_config
        self.config = Config.from_json(run_config["config"])
        self.input = Path(run_config["input"])
        self.force = set(run_config.get("force", []))
        self.run_id = run_config.get("run_id", "")
        self.fingerprints = FingerprintCache(workspace)
        self.source_cache = workspace.root / ".cache" / "sources.json"
        load_source_cache(self.source_cache)
        self._states: dict[str, StageState] = {}
        self._parts: dict[str, dict[str, Any]] = {}

    def upstream(self, stage: str) -> list[str]:
        return dag.upstream(stage, self.config)

    def external_inputs(self, stage: str) -> dict[str, Path]:
        """Files and folders outside the workspace that the stage reads: the run's input for a
        stage that reads it, and existing paths named by the active declared path parameters
        (a value that names no path, such as a hub model id, is not an input)."""
        declared = STAGES[stage]
        inputs = {"source": self.input} if declared.reads_source else {}
        active = declared.active_params(self.config.params[stage])
        for name in declared.path_params:
            value = active.get(name)
            if isinstance(value, str) and value and Path(value).expanduser().exists():
                inputs[name] = Path(value).expanduser()
        return inputs

    def stage_inputs(self, stage: str) -> dict[str, Path]:
        """What the stage function receives: upstream output folders and the run's input."""
        names = STAGES[stage].input_names
        inputs = {names.get(name, name): self.workspace.stage_dir(name) for name in self.upstream(stage)}
        if STAGES[stage].reads_source:
            inputs["source"] = self.input
        return inputs

    def fingerprint_parts(self, stage: str) -> dict[str, Any]:
        """The recorded parts of the stage's fingerprint (see the module docstring)."""
        if stage not in self._parts:
            inputs = {}
            for name, path in self.external_inputs(stage).items():
                inputs[name] = {"path": str(path.resolve()),
                                "sha256": self.fingerprints.path_fingerprint(path) if path.exists() else None}
            self.fingerprints.save()
            files = code_files(STAGES[stage].module)
            save_source_cache(self.source_cache)
            self._parts[stage] = {
                "params": STAGES[stage].active_params(self.config.params[stage]),
                "inputs": inputs,
                "upstream": {name: self.workspace.manifest_hash(name) for name in self.upstream(stage)},
                "code": sha256_json(files),
                "code_files": files,
            }
        return self._parts[stage]

    @staticmethod
    def fingerprint(parts: dict[str, Any]) -> str:
        """One hash of the parts; input paths are left out so a moved but identical input still
        matches, and the per-file code hashes are summarised by ``code``."""
        comparable = {"params": parts["params"], "inputs": {k: v["sha256"] for k, v in parts["inputs"].items()},
                      "upstream": parts["upstream"], "code": parts["code"]}
        return sha256_json(comparable)

    def state(self, stage: str) -> StageState:
        if stage not in self._states:
            self._states[stage] = self._evaluate(stage)
        return self._states[stage]

    def _evaluate(self, stage: str) -> StageState:
        manifest = self.workspace.read_manifest(stage)
        reasons = []
        for name in self.upstream(stage):
            up = self.state(name)
            if up.status != "done":
                reasons.append(f"upstream {name} is {up.status}")
        if manifest is None:
            return StageState(stage, "missing", reasons)
        parts = self.fingerprint_parts(stage)
        if manifest.get("fingerprint") != self.fingerprint(parts):
            reasons += explain_difference(stage, manifest, parts)
            reasons = reasons or ["fingerprint differs"]
        if stage in self.force and manifest.get("run_id") != self.run_id:
            reasons.append("--rerun requested")
        return StageState(stage, "stale" if reasons else "done", reasons, manifest)


def explain_difference(stage: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable reasons why a recorded fingerprint (``old``: a manifest) differs from the
    current parts (``new``)."""
    reasons = []
    old_params, new_params = old.get("params", {}), new["params"]
    for key in sorted(set(old_params) & set(new_params)):
        if old_params[key] != new_params[key]:
            reasons.append(f"parameter {key} changed: {old_params[key]!r} -> {new_params[key]!r}")
    backend = STAGES[stage].backend_param
    if backend is None or old_params.get(backend) == new_params.get(backend):
        # A parameter only one side counts, under the same backend: the stage gained it.
        # (Parameters only the manifest has belong to other backends in manifests that recorded them all.)
        for key in sorted(set(new_params) - set(old_params)):
            reasons.append(f"parameter {key} is new: {new_params[key]!r}")
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if (old_inputs.get(key) or {}).get("sha256") != (new_inputs.get(key) or {}).get("sha256"):
            reasons.append(f"input {key} changed")
    old_up = old.get("upstream", {})
    for key, value in new["upstream"].items():
        if old_up.get(key) != value:
            reasons.append(f"upstream {key} was recomputed")
    if old.get("code") != new["code"]:
        old_files, new_files = old.get("code_files"), new["code_files"]
        if not isinstance(old_files, dict):
            reasons.append("stage code changed (its manifest predates per-file code hashes)")
        else:
            changed = []
            for name in sorted(set(old_files) | set(new_files)):
                if name not in old_files:
                    changed.append(f"{name} (newly imported)")
                elif name not in new_files:
                    changed.append(f"{name} (no longer imported)")
                elif old_files[name] != new_files[name]:
                    changed.append(name)
            reasons.append(f"code changed: {', '.join(changed)}" if changed else "stage code changed")
    return reasons
