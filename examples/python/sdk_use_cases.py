"""The SDK README's use cases: LLM monitoring, tool calls, multi-agent systems."""

import asyncio

from agent_sentinel import guarded_action


class _Completions:
    async def create(self, model, messages):
        class R:
            class choices0:
                class message:
                    content = "hello"

            choices = [choices0]

        return R()


class _Chat:
    completions = _Completions()


class _Client:
    chat = _Chat()


openai_client = _Client()


class _DB:
    def execute(self, sql):
        class C:
            def fetchall(self):
                return [(1,)]

        return C()


database = _DB()


@guarded_action(name="llm_call", cost_usd=0.03, tags=["openai", "gpt4"])
async def call_llm(messages: list) -> str:
    response = await openai_client.chat.completions.create(model="gpt-4", messages=messages)
    return response.choices[0].message.content


@guarded_action(name="database_query", cost_usd=0.001, tags=["db"])
def query_database(sql: str) -> list:
    return database.execute(sql).fetchall()


@guarded_action(name="planner_think", cost_usd=0.02, tags=["agent1", "planning"])
def plan_tasks(goal: str) -> list:
    return ["task1", "task2", "task3"]


@guarded_action(name="executor_run", cost_usd=0.05, tags=["agent2", "execution"])
def execute_task(task: str) -> dict:
    return {"status": "done", "task": task}


print(asyncio.run(call_llm([{"role": "user", "content": "hi"}])))
print(query_database("select 1"))
for t in plan_tasks("ship it"):
    print(execute_task(t))
