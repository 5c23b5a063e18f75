"""Every accepted option works; every unknown or mistyped one is an error that names it."""

import pytest

from agent_sentinel import PolicyConfigError, PolicyEngine


def test_every_keyword_works_and_get_config_reflects_it(home):
    PolicyEngine.configure(
        session_budget=10.0,
        run_budget=1.0,
        action_budgets={"expensive_action": 0.50},
        denied_actions=["dangerous_op"],
        allowed_actions=["search", "dangerous_op", "expensive_action"],
        rate_limits={"search": {"max_count": 10, "window_seconds": 60}},
        strict_mode=True,
    )
    assert PolicyEngine.is_configured()
    c = PolicyEngine.get_config()
    assert (c.session_budget, c.run_budget) == (10.0, 1.0)
    assert c.action_budgets == {"expensive_action": 0.5}
    assert c.denied_actions == ["dangerous_op"]
    assert c.allowed_actions == ["search", "dangerous_op", "expensive_action"]
    assert c.rate_limits["search"]["max_count"] == 10
    assert c.strict_mode is True
    PolicyEngine.reset()
    assert not PolicyEngine.is_configured()


def test_unknown_keyword_is_a_type_error_naming_it(home):
    with pytest.raises(TypeError, match="run_budgett"):
        PolicyEngine.configure(run_budgett=1.0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"session_budget": "5"}, "session_budget"),
        ({"run_budget": True}, "run_budget"),
        ({"run_budget": -1}, "run_budget"),
        ({"run_budget": float("nan")}, "run_budget"),
        ({"action_budgets": [1, 2]}, "action_budgets"),
        ({"action_budgets": {"llm": "cheap"}}, "action_budgets['llm']"),
        ({"denied_actions": "delete_database"}, "denied_actions"),
        ({"allowed_actions": [1]}, "allowed_actions"),
        ({"rate_limits": {"search": 10}}, "rate_limits['search']"),
        ({"rate_limits": {"search": {"max_count": 0, "window_seconds": 1}}}, "rate_limits['search']['max_count']"),
        ({"rate_limits": {"search": {"max_count": 1, "window": 1}}}, "rate_limits['search']"),
        ({"strict_mode": "yes"}, "strict_mode"),
    ],
)
def test_wrong_types_name_the_parameter(home, kwargs, name):
    with pytest.raises((TypeError, ValueError)) as err:
        PolicyEngine.configure(**kwargs)
    assert f"`{name}" in str(err.value)
    assert not PolicyEngine.is_configured(), "a rejected configuration changes nothing"


def test_load_from_yaml(home, tmp_path):
    p = tmp_path / "callguard.yaml"
    p.write_text("budgets:\n  session: 5.0\n  run: 1.0\n  actions:\n    expensive_llm: 0.50\n"
                 "denied_actions:\n  - delete_database\nstrict_mode: true\n")
    PolicyEngine.load_from_yaml(p)
    c = PolicyEngine.get_config()
    assert (c.session_budget, c.run_budget, c.action_budgets) == (5.0, 1.0, {"expensive_llm": 0.5})
    assert c.denied_actions == ["delete_database"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("budjets:\n  session: 5\n", ["callguard.yaml:1:1", "unknown key `budjets`", "did you mean `budgets`?"]),
        ("budgets:\n  run: [1, 2\n", ["callguard.yaml:2:8"]),
        ("budgets:\n  run: -3\n", ["callguard.yaml:2:8", "must not be negative"]),
        ("rules:\n  - {id: a, function_pattern: x, conditions: [{param: p, operator: greater, value: 1}], action: block}\n",
         ["unknown value `greater`", "did you mean `gt`?"]),
        ("", ["file is empty"]),
    ],
)
def test_bad_yaml_raises_with_file_line_and_suggestion(home, tmp_path, text, expected):
    p = tmp_path / "callguard.yaml"
    p.write_text(text)
    with pytest.raises(PolicyConfigError) as err:
        PolicyEngine.load_from_yaml(p)
    assert isinstance(err.value, ValueError)
    for part in expected:
        assert part in str(err.value)


def test_missing_yaml_file(home, tmp_path):
    with pytest.raises(FileNotFoundError):
        PolicyEngine.load_from_yaml(tmp_path / "nope.yaml")
