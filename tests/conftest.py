"""Shared fixtures: the synthetic scene with ground truth, its frames stage output, and the
location of the real data in ../shared (tests that need it skip when it is absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_MODELS = REPO_ROOT.parent / "shared" / "models"


def shared_path(relative: str) -> Path:
    """Path under ../shared/data, skipping the calling test when it is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data {path} is absent (../shared/data is not next to the repository)")
    return path


@pytest.fixture(scope="session")
def synthetic_scene(tmp_path_factory):
    """The CI preset of the synthetic scene (seed 0), generated once per test session."""
    from mono4d.data import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "scene", preset="ci", seed=0)


@pytest.fixture(scope="session")
def synthetic_frames_dir(synthetic_scene, tmp_path_factory) -> Path:
    """Output folder of the frames stage run on the synthetic scene's lossless images."""
    from mono4d.stages import frames

    out = tmp_path_factory.mktemp("frames")
    frames.run({"source": synthetic_scene.root / "images"}, frames.Params(), out)
    return out


@pytest.fixture(scope="session")
def synthetic_flow_dir(synthetic_frames_dir, tmp_path_factory) -> Path:
    """Flow stage output (DIS, default consecutive and long-range pairs) over the synthetic frames."""
    from mono4d.stages import flow

    out = tmp_path_factory.mktemp("flow")
    flow.run({"frames": synthetic_frames_dir}, flow.Params(), out)
    return out


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread for a module's tests: on the shared 2-core machines a second thread
    mostly waits (several times slower when other processes run); restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
