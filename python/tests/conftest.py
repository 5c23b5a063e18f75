import json
import os
import subprocess
from pathlib import Path

import pytest

import agent_sentinel

ROOT = Path(__file__).resolve().parents[2]


def sentinel_bin() -> str:
    """The `sentinel` CLI, to check ledgers the way users do."""
    explicit = os.environ.get("SENTINEL_BIN")
    if explicit:
        return explicit
    for profile in ("release", "debug"):
        p = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / profile / "sentinel"
        if p.exists():
            return str(p)
    pytest.fail("the `sentinel` binary is not built: run `cargo build -p sentinel-cli` or set SENTINEL_BIN")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh ledger directory and a fresh policy for each test."""
    d = tmp_path / "home"
    monkeypatch.setenv("AGENT_SENTINEL_HOME", str(d))
    agent_sentinel.PolicyEngine.reset()
    agent_sentinel.set_context(agent_id="default", run_id="default", session_id="test-session")
    yield d
    agent_sentinel.PolicyEngine.reset()


def read_jsonl(path: Path) -> list:
    agent_sentinel.flush()  # entries are written in groups; this process's latest ones first
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verify(path: Path) -> dict:
    agent_sentinel.flush()
    out = subprocess.run([sentinel_bin(), "ledger", "verify", str(path), "--format", "json"], capture_output=True, text=True)
    report = json.loads(out.stdout)
    assert out.returncode == 0, report
    return report
