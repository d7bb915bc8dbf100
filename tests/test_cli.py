"""The ``mono4d`` command line's help texts."""
from __future__ import annotations

import pytest

from mono4d.data import synthetic
from mono4d.pipeline.cli import main


def test_synth_help_lists_every_scene_preset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert {"tiny", "ci", "bench", "walker"} <= set(synthetic.PRESETS)
    for name, config in synthetic.PRESETS.items():
        assert f"{name} ({config.width}x{config.height}, {config.num_frames} frames" in text
    assert "walking figure" in text
