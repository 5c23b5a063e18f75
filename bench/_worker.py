"""Runs one implementation on the shared workload and prints JSON timings. Started by overhead.py."""

import asyncio
import atexit
import json
import os
import shutil
import sys
import tempfile
import time

IMPL, MODE, CALLS = sys.argv[1], sys.argv[2], int(sys.argv[3])
WORK = tempfile.mkdtemp(prefix=f"bench-{IMPL}-")
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
os.chdir(WORK)
os.environ["AGENT_SENTINEL_HOME"] = os.path.join(WORK, "home")

DENIED = [f"forbidden_tool_{i:04d}" for i in range(1000)]
# 20 conditional rules on the benchmarked action; none fires for the arguments used.
RULES = [
    {
        "id": f"rule_{i}",
        "name": f"Rule {i}",
        "function_pattern": "tool" if i % 2 == 0 else "tool*",
        "conditions": [{"param": "amount", "operator": "gt", "value": 1_000_000 + i}],
        "action": "block" if i % 3 else "require_approval",
        "message": f"rule {i}",
    }
    for i in range(20)
]
RULES_FILE = os.path.join(WORK, "rules.json")
with open(RULES_FILE, "w") as f:
    json.dump({"version": "1.0", "default_action": "allow", "rules": RULES}, f)
RATE = {"tool": {"max_count": 10_000_000, "window_seconds": 1}}


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def build():
    """Returns (sync_fn, async_fn, note) for the implementation under test."""
    if IMPL == "ours":
        import agent_sentinel as a

        yaml = ["budgets:", "  session: 1000000", "  run: 1000000", "denied_actions:"]
        yaml += [f"  - {d}" for d in DENIED]
        yaml += ["rate_limits:", "  tool: { max_count: 10000000, window_seconds: 1 }", "rules:"]
        yaml += [f"  - {json.dumps(r)}" for r in RULES]
        path = os.path.join(WORK, "policy.yaml")
        with open(path, "w") as f:
            f.write("\n".join(yaml) + "\n")
        a.PolicyEngine.load_from_yaml(path)

        @a.guarded_action(name="tool", cost_usd=0.000001)
        def tool(query, amount=1):
            return amount

        @a.guarded_action(name="tool", cost_usd=0.000001)
        async def atool(query, amount=1):
            return amount

        return tool, atool, "guarded_action: budgets, 1,000 denied, rate limit, 20 rules, ledger"
    if IMPL == "ours-protect":
        import agent_sentinel as a

        cfg = a.SentinelConfig(rules_path=RULES_FILE, audit_log_dir=os.path.join(WORK, "logs"), approval_interface=None)

        @a.protect(cfg)
        def tool(query, amount=1):
            return amount

        @a.protect(cfg)
        async def atool(query, amount=1):
            return amount

        return tool, atool, "protect: 20 rules, ledger"
    if IMPL == "agentsentinel-sdk":
        import agent_sentinel as a

        a.PolicyEngine.configure(session_budget=1e6, run_budget=1e6, denied_actions=DENIED, rate_limits=RATE)

        @a.guarded_action(name="tool", cost_usd=0.000001)
        def tool(query, amount=1):
            return amount

        @a.guarded_action(name="tool", cost_usd=0.000001)
        async def atool(query, amount=1):
            return amount

        return tool, atool, "guarded_action: budgets, 1,000 denied, rate limit, ledger (it has no rules)"
    if IMPL == "agentic-sentinel":
        from sentinel import SentinelConfig, protect

        cfg = SentinelConfig(rules_path=RULES_FILE, audit_log=True, audit_log_dir=os.path.join(WORK, "logs"))

        @protect(cfg)
        def tool(query, amount=1):
            return amount

        @protect(cfg)
        async def atool(query, amount=1):
            return amount

        return tool, atool, "protect: 20 rules, audit log (it has no budgets, deny list or rate limit)"
    if IMPL == "agt-lite":
        from agent_os.lite import govern

        gate = govern(deny=DENIED, deny_patterns=[f"^tool_{i}_x$" for i in range(20)], max_calls=0, log=True)

        def tool(query, amount=1):
            gate("tool")
            return amount

        async def atool(query, amount=1):
            gate("tool")
            return amount

        return tool, atool, "agent_os.lite.govern: 1,000 denied, 20 deny patterns, in-memory log (no budgets, ledger)"
    raise SystemExit(f"unknown implementation {IMPL}")


def main():
    tool, atool, note = build()
    n = CALLS
    result = {"impl": IMPL, "mode": MODE, "calls": n, "note": note}
    if MODE == "sync":
        for i in range(min(2000, n)):
            tool("q", amount=i)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for i in range(n):
                tool("q", amount=i)
            best = min(best, time.perf_counter() - t)
        result["us_per_call"] = best / n * 1e6
    elif MODE == "async":

        async def run():
            for i in range(min(2000, n)):
                await atool("q", amount=i)
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for i in range(n):
                    await atool("q", amount=i)
                best = min(best, time.perf_counter() - t)
            return best

        result["us_per_call"] = asyncio.run(run()) / n * 1e6
    elif MODE == "memory":
        # Warm up past one rate-limit window, so every structure has reached its steady size.
        for i in range(300_000):
            tool("q", amount=i)
        before = rss_kib()
        # RSS at every fifth of the run as well, so a plateau is told apart from a slow leak.
        steps, marks = 5, []
        t = time.perf_counter()
        for s in range(steps):
            for i in range(s * n // steps, (s + 1) * n // steps):
                tool("q", amount=i)
            marks.append(rss_kib())
        result["us_per_call"] = (time.perf_counter() - t) / n * 1e6
        result["rss_before_kib"] = before
        result["rss_after_kib"] = marks[-1]
        result["rss_marks_kib"] = marks
    print(json.dumps(result))


main()
