"""The SDK README's remote sync: ledger uploads, policy sync and central decisions.

Against a running `sentinel serve`:

    SENTINEL_PLATFORM_URL=http://127.0.0.1:8080 \\
    SENTINEL_API_TOKEN=$(cat sentinel-data/bootstrap-admin-key) python examples/python/remote_sync.py

Without a server (the default URL below has nothing listening) it shows what happens when the
platform is down: logging fails open (the agent keeps working; its ledger stays local and is sent
once the server is back), while central decisions (`authority="server"`) fail closed.
"""

import os

from agent_sentinel import (
    AuthorityUnavailableError,
    BackgroundSync,
    SyncConfig,
    enable_remote_sync,
    flush_and_stop,
    guarded_action,
)

URL = os.environ.get("SENTINEL_PLATFORM_URL", "http://127.0.0.1:9")
TOKEN = os.environ.get("SENTINEL_API_TOKEN", "as_00000000000000000000000000000000")


@guarded_action(name="search_web", cost_usd=0.01, tags=["search"])
def search_web(query: str) -> dict:
    return {"results": [f"result for {query}"]}


# Background sync: uploads every 10 s, policies every 5 minutes (merged with the local policy).
sync = enable_remote_sync(
    platform_url=URL,
    api_token=TOKEN,
    agent_id="example-agent",
    run_id="run-001",
    flush_interval=10.0,
    max_retries=2,
)
for query in ("rust", "python"):
    print(search_web(query))
result = sync.flush_now()
print("uploaded" if result["ok"] else f"kept locally, retried later: {result['error']}")
flush_and_stop()  # also runs at exit

# Manual control, with the server as the authority for every decision.
config = SyncConfig(
    platform_url=URL,
    api_token=TOKEN,
    agent_id="example-agent",
    run_id="custom-run-id",
    flush_interval=5.0,
    batch_size=50,
    max_retries=1,
    authority="server",
)
sync = BackgroundSync(config)
sync.start()
try:
    print(search_web("agents"))
except AuthorityUnavailableError as e:
    print(f"refused, central decisions fail closed: {e}")
sync.stop()  # final flush
