"""The SDK README's quick start, basic usage, async support, custom names and tags."""

import asyncio

from agent_sentinel import guarded_action


def call_search_api(query):
    return [f"result for {query}"]


@guarded_action(name="search_tool", cost_usd=0.01, tags=["search", "api"])
def search_web(query: str) -> dict:
    """Search the web for a query"""
    results = call_search_api(query)
    return {"results": results, "count": len(results)}


@guarded_action(name="generate_text", cost_usd=0.05, tags=["llm"])
async def generate_text(prompt: str) -> str:
    """Generate text using an LLM (stubbed here)"""
    await asyncio.sleep(0)
    return f"a haiku about {prompt}"


@guarded_action(cost_usd=0.01)
def my_function():
    pass  # Action name: "my_function"


@guarded_action(name="expensive_operation", cost_usd=1.50, tags=["llm", "gpt4", "production"])
def expensive_operation():
    pass


response = search_web("Python best practices")
print(response)
print(asyncio.run(generate_text("Write a haiku about Python")))
my_function()
expensive_operation()
