"""The rules-and-approvals README's anomaly detection example."""

from pathlib import Path

from agent_sentinel import PolicyViolationError, SentinelConfig, protect

config = SentinelConfig(
    rules_path=str(Path(__file__).with_name("rules.json")),
    anomaly_detection=True,
    anomaly_statistical=True,
)


@protect(config)
def pay_invoice(amount: float) -> str:
    return f"paid ${amount}"


for amount in (50, 60, 70, 80, 90):  # normal behaviour
    print(pay_invoice(amount))
try:
    pay_invoice(5000)  # anomalous request
except PolicyViolationError as e:
    print(f"BLOCKED: {e}")
