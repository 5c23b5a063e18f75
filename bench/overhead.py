#!/usr/bin/env python3
"""Per-call overhead of agent_sentinel versus the packages it replaces, in one run.

    python bench/overhead.py [--calls 20000] [--repeat 5] [--memory-calls 1000000]

Builds agent_sentinel in release mode into .venv, installs the peers from PyPI into
bench/.venv-peers (agentsentinel-sdk, agentic-sentinel, agent-governance-toolkit-core), and runs
every implementation on the same workload, each measurement in a fresh process, `--repeat` times
in turn (the implementations interleaved, so a slow spell of the machine hits them alike). Prints
the median µs per call, the range, and the ratios of the medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS_VENV = ROOT / ".venv"
PEERS_VENV = ROOT / "bench" / ".venv-peers"
PEERS = ["agentsentinel-sdk", "agentic-sentinel", "agent-governance-toolkit-core"]


def sh(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, **kw)


def setup(skip_build):
    py = sys.executable
    if not (OURS_VENV / "bin" / "python").exists():
        sh([py, "-m", "venv", OURS_VENV])
    if not skip_build:
        sh([OURS_VENV / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "maturin>=1.16,<2"])
        sh([OURS_VENV / "bin" / "maturin", "develop", "--release", "-q"], cwd=ROOT)
    if not (PEERS_VENV / "bin" / "python").exists():
        sh([py, "-m", "venv", PEERS_VENV])
    installed = {}
    for p in PEERS:
        r = subprocess.run(
            [PEERS_VENV / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", p],
            capture_output=True, text=True,
        )
        installed[p] = r.returncode == 0
        if r.returncode != 0:
            print(f"note: {p} did not install: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return installed


def run(python, impl, mode, calls):
    r = subprocess.run([python, ROOT / "bench" / "_worker.py", impl, mode, str(calls)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"impl": impl, "mode": mode, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000, help="calls per timed pass (best of 3 passes)")
    ap.add_argument("--repeat", type=int, default=5, help="fresh processes per implementation and mode (median reported)")
    ap.add_argument("--memory-calls", type=int, default=1_000_000, help="calls for the RSS check")
    ap.add_argument("--skip-build", action="store_true", help="use the agent_sentinel already in .venv")
    args = ap.parse_args()
    installed = setup(args.skip_build)
    ours_py = OURS_VENV / "bin" / "python"
    peers_py = PEERS_VENV / "bin" / "python"
    plan = [("ours", ours_py), ("ours-protect", ours_py)]
    if installed.get("agentsentinel-sdk"):
        plan.append(("agentsentinel-sdk", peers_py))
    if installed.get("agentic-sentinel"):
        plan.append(("agentic-sentinel", peers_py))
    if installed.get("agent-governance-toolkit-core"):
        plan.append(("agt-lite", peers_py))
    samples = {}
    for _ in range(max(1, args.repeat)):
        for impl, py in plan:
            for mode in ("sync", "async"):
                # The slow peers get fewer calls so the run stays short; per-call figures are comparable.
                calls = args.calls if impl.startswith("ours") or impl == "agt-lite" else max(2000, args.calls // 10)
                samples.setdefault((impl, mode), []).append(run(py, impl, mode, calls))
    results = {}
    for key, runs in samples.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            results[key] = runs[-1]
            continue
        times = sorted(r["us_per_call"] for r in good)
        results[key] = dict(good[0], us_per_call=statistics.median(times), low=times[0], high=times[-1])
    print()
    print(f"{'implementation':<20} {'mode':<6} {'µs/call':>10} {'range':>15} {'vs ours':>9}  workload")
    for (impl, mode), r in results.items():
        base_key = ("ours-protect", mode) if impl == "agentic-sentinel" else ("ours", mode)
        base = results.get(base_key, {}).get("us_per_call")
        if "error" in r:
            print(f"{impl:<20} {mode:<6} {'-':>10} {'-':>15} {'-':>9}  not measured: {r['error']}")
            continue
        ratio = f"{r['us_per_call'] / base:.1f}x" if base and not impl.startswith("ours") else ""
        spread = f"{r['low']:.2f}-{r['high']:.2f}"
        print(f"{impl:<20} {mode:<6} {r['us_per_call']:>10.2f} {spread:>15} {ratio:>9}  {r['note']}")
    print(f"\nmedians of {max(1, args.repeat)} fresh processes each; ratios: the peer's median divided by ours on the same workload "
          "(agentic-sentinel is compared with our `protect`, the others with `guarded_action`)")
    mem = run(ours_py, "ours", "memory", args.memory_calls)
    if "error" in mem:
        print(f"memory: not measured: {mem['error']}")
    else:
        print(f"memory over {args.memory_calls:,} calls: RSS {mem['rss_before_kib'] / 1024:.1f} MiB before, "
              f"{mem['rss_after_kib'] / 1024:.1f} MiB after ({mem['us_per_call']:.2f} µs/call); at each fifth: "
              + ", ".join(f"{m / 1024:.1f}" for m in mem.get("rss_marks_kib", [])) + " MiB")


if __name__ == "__main__":
    main()
