"""The rules-and-approvals README's examples, importing from agent_sentinel.

Without a terminal (as in CI), approval requests are rejected: the call does not run.
"""

import asyncio
from pathlib import Path

from agent_sentinel import ApprovalRejectedError, PolicyViolationError, SentinelConfig, protect

rules = str(Path(__file__).with_name("rules.json"))
config = SentinelConfig(rules_path=rules)


@protect(config)
async def transfer_funds(amount: float, destination: str) -> str:
    return f"Transferred ${amount} to {destination}"


config = SentinelConfig(
    rules_path=rules,
    approval_interface="terminal",
    fail_mode="secure",  # Block on errors, not allow
)


@protect(config)
async def delete_user(user_id: int) -> str:
    return f"Deleted user {user_id}"


async def main():
    print(await transfer_funds(50, "vendor@example.com"))
    try:
        print(await transfer_funds(5000, "vendor@example.com"))
    except ApprovalRejectedError as e:
        print(f"not approved: {e}")
    try:
        await delete_user(42)
    except PolicyViolationError as e:
        print(f"blocked: {e}")


asyncio.run(main())
