"""The SDK README's budget enforcement, YAML configuration, and action control lists."""

from pathlib import Path

from agent_sentinel import BudgetExceededError, CostTracker, PolicyEngine, PolicyViolationError, guarded_action

PolicyEngine.configure(
    session_budget=5.0,  # Max $5 for entire session
    run_budget=1.0,  # Max $1 per run
    action_budgets={"expensive_llm": 0.50},  # Max $0.50 for this action
)


def generate_text(prompt):
    return f"answer to {prompt}"


@guarded_action(name="expensive_llm", cost_usd=0.30)
def call_gpt4(prompt: str) -> str:
    return generate_text(prompt)


call_gpt4("first")
try:
    call_gpt4("second")  # 0.30 + 0.30 > 0.50
except BudgetExceededError as e:
    print(f"Budget exceeded: {e}")
print(f"Run total: ${CostTracker.get_run_total():.2f}")
CostTracker.reset_run()

# YAML configuration
Path("callguard.yaml").write_text(
    """budgets:
  session: 5.0
  run: 1.0
  actions:
    expensive_llm: 0.50

denied_actions:
  - delete_database
  - dangerous_operation

strict_mode: true
"""
)
PolicyEngine.load_from_yaml("callguard.yaml")

PolicyEngine.configure(denied_actions=["delete_database", "send_money"])


@guarded_action(name="delete_database")
def delete_database():
    pass


try:
    delete_database()
except PolicyViolationError as e:
    print(f"Policy violation: {e}")

PolicyEngine.configure(allowed_actions=["read_file", "search_web"])


@guarded_action(name="send_email")
def send_email():
    pass


try:
    send_email()
except PolicyViolationError as e:
    print(f"Policy violation: {e}")

# PolicyEngine reference
PolicyEngine.configure(
    session_budget=10.0,
    run_budget=1.0,
    action_budgets={"expensive_action": 0.50},
    denied_actions=["dangerous_op"],
    allowed_actions=None,  # None = all allowed (except denied)
    strict_mode=True,
)
if PolicyEngine.is_configured():
    config = PolicyEngine.get_config()
    print(f"Run budget: ${config.run_budget}")
PolicyEngine.reset()
