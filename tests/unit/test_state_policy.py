"""Reason -> action: the configured rules, their defaults, and how a transfer
is retried, continued at risk, or aborted kind by kind."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.statekind import Reason
from vmm_state import options, policy
from vmm_state.importer import KindAnswer
from vmm_state.policy import Action, Policy, Rule, Verdict


def conf(**overrides: str) -> cfg.ConfigOpts:
    c = cfg.ConfigOpts()
    c(args=[], default_config_files=[])
    options.register_opts(c)
    for name, value in overrides.items():
        c.set_override(name, value, group="state")
    return c


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("abort", Rule(0, Action.ABORT)),
        ("continue", Rule(0, Action.CONTINUE)),
        ("retry:3", Rule(3, Action.ABORT)),
        ("retry:2:continue", Rule(2, Action.CONTINUE)),
        ("retry:1:abort", Rule(1, Action.ABORT)),
        (" Retry:5 ", Rule(5, Action.ABORT)),
    ],
)
def test_rules_parse(text: str, rule: Rule) -> None:
    assert policy.parse_rule(text) == rule


@pytest.mark.parametrize("text", ["", "stop", "retry", "retry:x", "retry:3:retry", "abort:1"])
def test_bad_rules_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ConfigError, match=r"retry:N:continue"):
        policy.parse_rule(text, "on_unsupported")


def test_a_rule_retries_then_takes_its_final_action() -> None:
    rule = Rule(2, Action.CONTINUE)
    assert [rule.action(n) for n in (1, 2, 3, 4)] == [
        Action.RETRY,
        Action.RETRY,
        Action.CONTINUE,
        Action.CONTINUE,
    ]
    assert str(rule) == "retry:2:continue"
    assert str(Rule(0, Action.ABORT)) == "abort"


def test_defaults_follow_the_design() -> None:
    p = Policy.from_conf(conf())
    assert p.rule(Reason.RESOURCE_LIMIT) == Rule(0, Action.ABORT)
    assert p.rule(Reason.POLICY_CONFLICT) == Rule(0, Action.ABORT)
    assert p.rule(Reason.TRANSFER_FAILED) == Rule(3, Action.ABORT)
    assert p.rule(Reason.UNSUPPORTED) == Rule(0, Action.CONTINUE)
    assert Policy.defaults().rules == p.rules


def test_every_rule_option_explains_its_default() -> None:
    for opt in policy.POLICY_OPTS:
        assert opt.help and "Default" in opt.help, opt.name
        assert policy.RULE_SYNTAX in opt.help


def test_configured_rules_override_the_defaults() -> None:
    p = Policy.from_conf(conf(on_unsupported="abort", on_transfer_failed="retry:1:continue"))
    assert p.rule(Reason.UNSUPPORTED) == Rule(0, Action.ABORT)
    assert p.rule(Reason.TRANSFER_FAILED) == Rule(1, Action.CONTINUE)


def test_oslo_refuses_a_garbage_rule_in_the_config() -> None:
    c = conf()
    with pytest.raises(ValueError):
        c.set_override("on_resource_limit", "maybe", group="state")


# ------------------------------------------------------------------ run


class Script:
    """An attempt function answering from a script: per kind, one answer per attempt."""

    def __init__(self, answers: Mapping[str, list[Reason | None]]) -> None:
        self.answers = {k: list(v) for k, v in answers.items()}
        self.calls: list[list[str]] = []

    def __call__(self, kinds: list[str]) -> dict[str, KindAnswer]:
        self.calls.append(list(kinds))
        out = {}
        for kind in kinds:
            reason = self.answers[kind].pop(0)
            if reason is None:
                out[kind] = KindAnswer.success(kind, 3, 3)
            else:
                out[kind] = KindAnswer.fail(kind, reason, f"{kind} said {reason.value}")
        return out


def run(
    script: Script, kinds: list[str], p: Policy | None = None, left: float = 60.0
) -> tuple[Verdict, list[float]]:
    sleeps: list[float] = []
    verdict = policy.run(
        p or Policy.defaults(), script, kinds, 0.01, lambda: left, sleep=sleeps.append
    )
    return verdict, sleeps


def test_everything_succeeds_in_one_attempt() -> None:
    script = Script({"a": [None], "b": [None]})
    verdict, sleeps = run(script, ["a", "b"])
    assert not verdict.abort and verdict.at_risk == []
    assert verdict.attempts == {"a": 1, "b": 1}
    assert script.calls == [["a", "b"]] and sleeps == []


def test_transfer_failed_retries_three_times_then_aborts() -> None:
    script = Script({"a": [Reason.TRANSFER_FAILED] * 4, "b": [None]})
    verdict, sleeps = run(script, ["a", "b"])
    assert verdict.abort and verdict.aborting == ["a"]
    assert verdict.attempts == {"a": 4, "b": 1}
    assert script.calls == [["a", "b"], ["a"], ["a"], ["a"]]  # only the failed kind again
    assert sleeps == [0.01, 0.01, 0.01]
    assert "a: FAIL/transfer_failed after 4 attempt(s): a said transfer_failed" in (
        verdict.failure_text()
    )


def test_a_retry_that_succeeds_ends_well() -> None:
    script = Script({"a": [Reason.TRANSFER_FAILED, None]})
    verdict, _ = run(script, ["a"])
    assert not verdict.abort and verdict.answers["a"].ok and verdict.attempts["a"] == 2


def test_unsupported_continues_at_risk() -> None:
    script = Script({"a": [Reason.UNSUPPORTED], "b": [None]})
    verdict, _ = run(script, ["a", "b"])
    assert not verdict.abort
    assert verdict.at_risk == ["a"]
    assert not verdict.answers["a"].ok


@pytest.mark.parametrize("reason", [Reason.RESOURCE_LIMIT, Reason.POLICY_CONFLICT])
def test_resource_limit_and_policy_conflict_abort_at_once(reason: Reason) -> None:
    script = Script({"a": [reason], "b": [Reason.TRANSFER_FAILED, None]})
    verdict, sleeps = run(script, ["a", "b"])
    assert verdict.aborting == ["a"]
    assert script.calls == [["a", "b"]]  # no retry of b: the migration stops anyway
    assert sleeps == []


def test_retry_then_continue_when_configured() -> None:
    p = Policy.from_conf(conf(on_transfer_failed="retry:1:continue"))
    script = Script({"a": [Reason.TRANSFER_FAILED, Reason.TRANSFER_FAILED]})
    verdict, _ = run(script, ["a"], p)
    assert not verdict.abort and verdict.at_risk == ["a"] and verdict.attempts["a"] == 2


def test_no_retry_without_time_left_falls_to_the_final_action() -> None:
    script = Script({"a": [Reason.TRANSFER_FAILED]})
    verdict, sleeps = run(script, ["a"], left=0.0)
    assert verdict.aborting == ["a"] and sleeps == []
    assert "no time left for a retry" in verdict.answers["a"].detail


def test_a_kind_without_an_answer_counts_as_a_failed_transfer() -> None:
    calls: list[list[str]] = []

    def silent(kinds: list[str]) -> dict[str, KindAnswer]:
        calls.append(kinds)
        return {}

    verdict = policy.run(Policy.defaults(), silent, ["a"], 0.0, lambda: 60.0, sleep=lambda s: None)
    assert verdict.aborting == ["a"] and verdict.attempts["a"] == 4
    assert verdict.answers["a"].reason is Reason.TRANSFER_FAILED
