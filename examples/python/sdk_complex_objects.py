"""The SDK README's complex-objects example: values JSON cannot hold are recorded as strings."""

import socket
from dataclasses import dataclass

from agent_sentinel import guarded_action


@dataclass
class Context:
    user_id: int
    session: str
    connection: socket.socket  # Not JSON-serializable!


@guarded_action(name="process_data", cost_usd=0.001)
def process_data(ctx: Context, data: dict):
    return {"processed": True, "user": ctx.user_id}


with socket.socket() as s:
    ctx = Context(user_id=123, session="abc", connection=s)
    print(process_data(ctx, {"value": 42}))
