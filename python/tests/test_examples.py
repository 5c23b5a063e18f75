"""Every example from the two earlier products' READMEs runs, as a user would run it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "python").glob("*.py"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 7


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    env = dict(os.environ, AGENT_SENTINEL_HOME=str(tmp_path / "home"), SENTINEL_LOG_DIR=str(tmp_path / "logs"))
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, start_new_session=True,  # no controlling terminal, as in CI
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
