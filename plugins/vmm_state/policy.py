"""What to do when a kind's import answers FAIL: one configured rule per reason.

A rule is ``abort`` (fail the stage: the migration's state changes on this
host are reverted, and at PREPARE the migration is vetoed before the VM
moves), ``continue`` (carry on without that kind's state: the VM moves "at
risk", and the stage notes it), or ``retry:N`` (transfer that kind again up
to N more times, then abort; ``retry:N:continue`` continues at risk
instead). The defaults follow the state-migration drafts: a destination
without room, or whose local policy refuses the state, must not get the VM.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import time
from collections.abc import Callable, Mapping, Sequence

from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.statekind import Reason
from vmm_state.importer import KindAnswer

GROUP = "state"

_RULE_RE = re.compile(r"^(abort|continue|retry:(\d{1,3})(?::(abort|continue))?)$")
RULE_SYNTAX = "abort | continue | retry:N | retry:N:abort | retry:N:continue"


class Action(str, enum.Enum):
    """What a stage does about one failed kind."""

    ABORT = "abort"
    CONTINUE = "continue"
    RETRY = "retry"


@dataclasses.dataclass(frozen=True)
class Rule:
    """``retries`` further attempts, then ``then`` (ABORT or CONTINUE)."""

    retries: int
    then: Action

    def action(self, attempts: int) -> Action:
        """The action after ``attempts`` attempts (1 = the first one) all failed."""
        return Action.RETRY if attempts <= self.retries else self.then

    def __str__(self) -> str:
        if self.retries == 0:
            return self.then.value
        return f"retry:{self.retries}:{self.then.value}"


def parse_rule(text: str, option: str = "rule") -> Rule:
    """Parse ``abort``, ``continue``, ``retry:N`` (then abort) or ``retry:N:<then>``."""
    found = _RULE_RE.match(text.strip().lower())
    if found is None:
        raise ConfigError(
            f"[state] {option} = {text!r} is not a policy rule",
            hint=f"write one of: {RULE_SYNTAX}",
        )
    if found.group(2) is None:
        return Rule(0, Action(found.group(1)))
    return Rule(int(found.group(2)), Action(found.group(3) or "abort"))


def _rule_opt(reason: Reason, default: str, why: str) -> cfg.Opt:
    return cfg.StrOpt(
        f"on_{reason.value}",
        default=default,
        regex=_RULE_RE.pattern,
        help=f"What a migration does when a kind's import answers FAIL/{reason.value}: "
        f"{RULE_SYNTAX}. {why}",
    )


POLICY_OPTS: list[cfg.Opt] = [
    _rule_opt(
        Reason.RESOURCE_LIMIT,
        "abort",
        "Default abort: the destination cannot hold the VM's state (a table or set is "
        "full, the bundle is over the limits), so the VM must not move there ('stop "
        "trying to move the VM here'); at PREPARE this vetoes the migration before the "
        "VM moves.",
    ),
    _rule_opt(
        Reason.POLICY_CONFLICT,
        "abort",
        "Default abort: the state contradicts the destination's security policy (a "
        "poisoned entry naming another VM's addresses, a bad or missing signature, a "
        "replayed bundle); installing or ignoring it would weaken the tenant's "
        "isolation, so the move stops.",
    ),
    _rule_opt(
        Reason.TRANSFER_FAILED,
        "retry:3",
        "Default retry:3 (then abort): a broken or timed-out transfer is usually "
        "transient, so the failed kinds are sent again; if it keeps failing the state "
        "cannot follow the VM and the move stops. Use retry:3:continue to move at risk "
        "instead.",
    ),
    _rule_opt(
        Reason.UNSUPPORTED,
        "continue",
        "Default continue: one host cannot hold or export that kind (a missing kernel "
        "feature, a kind not enabled there); the VM moves without that state, at risk "
        "(for example its sessions restart), and the stage notes the kind as at risk.",
    ),
]


class Policy:
    """The configured rule of each reason."""

    def __init__(self, rules: Mapping[Reason, Rule]) -> None:
        missing = [r.value for r in Reason if r not in rules]
        if missing:
            raise ValueError(f"no rule for reason(s) {', '.join(missing)}")
        self.rules = dict(rules)

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> Policy:
        from vmm_orchestrator.options import require

        require(conf, GROUP, "the state policy")
        group = conf[GROUP]
        return cls({r: parse_rule(str(group[f"on_{r.value}"]), f"on_{r.value}") for r in Reason})

    @classmethod
    def defaults(cls) -> Policy:
        defaults = {opt.name: str(opt.default) for opt in POLICY_OPTS}
        return cls({r: parse_rule(defaults[f"on_{r.value}"]) for r in Reason})

    def rule(self, reason: Reason) -> Rule:
        return self.rules[reason]


@dataclasses.dataclass
class Verdict:
    """The outcome of transferring a set of kinds under a policy.

    ``answers`` holds each kind's last answer; ``attempts`` how often it was
    tried; ``at_risk`` the kinds that failed and were let go (continue);
    ``aborting`` the failed kinds whose rule says abort (empty: go on).
    """

    answers: dict[str, KindAnswer]
    attempts: dict[str, int]
    at_risk: list[str] = dataclasses.field(default_factory=list)
    aborting: list[str] = dataclasses.field(default_factory=list)

    @property
    def abort(self) -> bool:
        return bool(self.aborting)

    def failure_text(self) -> str:
        """Why the migration stops, kind by kind (for StageFailed)."""
        parts = []
        for kind in self.aborting:
            a = self.answers[kind]
            reason = a.reason.value if a.reason else "unknown"
            parts.append(
                f"{kind}: FAIL/{reason} after {self.attempts[kind]} attempt(s): {a.detail}"
            )
        return "; ".join(parts)


def run(
    policy: Policy,
    attempt: Callable[[list[str]], Mapping[str, KindAnswer]],
    kinds: Sequence[str],
    retry_delay: float,
    remaining: Callable[[], float],
    sleep: Callable[[float], None] = time.sleep,
) -> Verdict:
    """Transfer ``kinds`` with ``attempt`` and apply the policy to every FAIL.

    ``attempt(kinds)`` transfers and imports those kinds and answers per
    kind (a kind it does not answer for counts as FAIL/transfer_failed).
    Failed kinds whose rule says retry are attempted again, alone, while
    time is left (``remaining()`` seconds, more than ``retry_delay``); a
    retry that no longer fits falls through to the rule's final action.
    Once one kind must abort no further retry is made: the migration stops.
    """
    verdict = Verdict({}, dict.fromkeys(kinds, 0))
    pending = list(kinds)
    while pending:
        answers = attempt(list(pending))
        retry: list[str] = []
        for kind in pending:
            answer = answers.get(kind) or KindAnswer.fail(
                kind, Reason.TRANSFER_FAILED, "the importing host gave no answer for this kind"
            )
            verdict.answers[kind] = answer
            verdict.attempts[kind] += 1
            if answer.ok:
                continue
            reason = answer.reason or Reason.TRANSFER_FAILED
            rule = policy.rule(reason)
            action = rule.action(verdict.attempts[kind])
            if action is Action.RETRY and remaining() <= retry_delay:
                action = rule.then
                answer.detail += " (no time left for a retry before the stage deadline)"
            if action is Action.RETRY:
                retry.append(kind)
            elif action is Action.CONTINUE:
                verdict.at_risk.append(kind)
            else:
                verdict.aborting.append(kind)
        if verdict.aborting:
            break
        pending = retry
        if pending:
            sleep(retry_delay)
    return verdict
