"""One import name: the folders pipeline/ stages/ models/ data/ install as mono4d.pipeline,
mono4d.stages, mono4d.models and mono4d.data (README "Packaging")."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "models", "data")


def _old_style_imports(path: Path) -> list[str]:
    """``line: module`` of every import in ``path`` (function-level ones included) of a module
    under one of the four folders by its top-level name (``data.x`` instead of ``mono4d.data.x``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if name.split(".")[0] in PACKAGES]
    return found


def test_no_module_imports_the_folders_by_their_top_level_names():
    """From the repository root (pytest's working folder) ``data.x`` would still import, as a
    second copy of ``mono4d.data.x``; an installed mono4d has no such module."""
    offending = {}
    for folder in PACKAGES + ("tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if lines := _old_style_imports(path):
                offending[path.relative_to(ROOT).as_posix()] = lines
    assert offending == {}


def test_the_stages_and_the_cli_import_from_outside_the_checkout(tmp_path):
    """In a fresh interpreter whose working folder is not the repository, every registered stage,
    the CLI and the report import under mono4d, from the repository's folders, and no module
    named after a bare folder is loaded."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mono4d.pipeline import cli, edit, export, report\n"
        "from mono4d.pipeline.registry import STAGES\n"
        "files = {name: str(Path(stage.load().__file__).resolve()) for name, stage in STAGES.items()}\n"
        "print(repr((files, str(Path(cli.__file__).resolve()),\n"
        "            sorted(n for n in sys.modules if n.split('.')[0] in %r))))\n" % (PACKAGES,)
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    files, cli_file, bare = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert bare == []
    assert cli_file == str(ROOT / "pipeline" / "cli.py")
    assert files and all(Path(path).parent == ROOT / "stages" for path in files.values()), files


def test_the_wheel_holds_only_mono4d(tmp_path):
    """A wheel built from the sources: every module of the four folders under mono4d/, the report's
    templates with them, the console script on mono4d.pipeline.cli, nothing else at the top."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("mono4d-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"mono4d"}
    sources = {f"mono4d/{path.relative_to(ROOT).as_posix()}" for name in PACKAGES
               for path in (ROOT / name).rglob("*") if path.suffix in (".py", ".j2", ".css", ".js")
               and "__pycache__" not in path.parts}
    assert sources - names == set()
    assert "mono4d/pipeline/report/templates/index.html.j2" in names
    assert "mono4d = mono4d.pipeline.cli:main" in entry_points
