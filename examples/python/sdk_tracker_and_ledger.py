"""The SDK README's CostTracker, Ledger, error handling, configuration and log-reading examples."""

import json
import os
import tempfile
from pathlib import Path

# Change log directory via environment variable (before the first guarded call)
os.environ["AGENT_SENTINEL_HOME"] = tempfile.mkdtemp(prefix="my-agent-")

from agent_sentinel import CostTracker, Ledger, guarded_action  # noqa: E402


@guarded_action(name="expensive_llm", cost_usd=0.02)
def llm(prompt):
    return "text"


@guarded_action(name="might_fail", cost_usd=0.01)
def risky_operation(something_bad=True):
    if something_bad:
        raise ValueError("Oops!")  # This exception is raised normally
    return "success"


llm("a")
llm("b")
try:
    risky_operation()
except ValueError as e:
    print(f"Caught: {e}")

session_total = CostTracker.get_session_total()
run_total = CostTracker.get_run_total()
stats = CostTracker.get_action_stats("expensive_llm")
print(f"Calls: {stats['count']}, Cost: ${stats['total_cost']:.2f}")
all_stats = CostTracker.get_action_stats()
for action, cost in all_stats["costs"].items():
    count = all_stats["counts"][action]
    print(f"{action}: {count} calls, ${cost:.2f}")
CostTracker.reset_run()
snapshot = CostTracker.get_snapshot()
print(snapshot)

Ledger.record(
    action="manual_entry",
    inputs={"key": "value"},
    outputs={"result": 42},
    cost_usd=0.01,
    duration_ms=100.0,
    outcome="success",
    tags=["manual"],
)

# Reading logs programmatically
ledger_path = Path(os.environ["AGENT_SENTINEL_HOME"]) / "ledger.jsonl"
with open(ledger_path) as f:
    entries = [json.loads(line) for line in f]
total_cost = sum(e["cost_usd"] for e in entries)
print(f"Total cost: ${total_cost:.2f}")
errors = [e for e in entries if e["outcome"] == "error"]
print(f"Found {len(errors)} errors")
assert len(errors) == 1
