"""Replay: recorded outputs, in order, without running; divergence names the first difference."""

import pytest

import agent_sentinel
from agent_sentinel import ReplayDivergenceError, ReplayedCallError, guarded_action, replay_mode

calls = []


@guarded_action(name="search", cost_usd=0.01)
def search(query, limit=10):
    calls.append(query)
    return {"hits": [query] * 2, "limit": limit}


@guarded_action(name="fail")
def fail(x):
    raise RuntimeError(f"boom {x}")


def record_run(run_id):
    with agent_sentinel.context(run_id=run_id):
        search("alpha")
        search("beta", limit=3)
        with pytest.raises(RuntimeError):
            fail(1)


def test_replay_returns_recorded_outputs_without_running(home):
    record_run("r1")
    record_run("r2")
    calls.clear()
    with replay_mode(ledger_path=home / "ledger.jsonl", run_id="r1") as r:
        assert search("alpha") == {"hits": ["alpha", "alpha"], "limit": 10}
        assert search("beta", limit=3) == {"hits": ["beta", "beta"], "limit": 3}
        with pytest.raises(ReplayedCallError, match="boom 1"):
            fail(1)
        assert r.remaining == 0
    assert calls == [], "nothing ran"


def test_divergence_names_the_first_difference(home):
    record_run("r1")
    with replay_mode(run_id="r1"):
        with pytest.raises(ReplayDivergenceError, match=r"call 1 \(`search`\): inputs.args\[0\] is 'gamma', but the ledger recorded 'alpha'"):
            search("gamma")
    with replay_mode(run_id="r1"):
        search("alpha")
        with pytest.raises(ReplayDivergenceError, match="inputs.kwargs.limit is 4, but the ledger recorded 3"):
            search("beta", limit=4)
    with replay_mode(run_id="r1"):
        with pytest.raises(ReplayDivergenceError, match="call 1: `fail` was called, but the ledger recorded `search`"):
            fail(1)
    with replay_mode(run_id="r1"):
        search("alpha")
        search("beta", limit=3)
        with pytest.raises(ReplayedCallError):
            fail(1)
        with pytest.raises(ReplayDivergenceError, match="recorded only 3 call"):
            search("delta")


def test_missing_ledger(home, tmp_path):
    with pytest.raises(FileNotFoundError):
        with replay_mode(ledger_path=tmp_path / "nope" / "ledger.jsonl"):
            pass
