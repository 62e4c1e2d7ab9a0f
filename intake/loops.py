"""Loop protection: one named rule over the facts the store gathered (DESIGN 4 "No loops"). Pure.

May this mail be queued? Each check is a small named function; the first that says no
wins, and its name and reason go on the case timeline (``mail_skipped``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from intake.mail.classify import MESSAGE

LOOP_TAG = "mail-loop"
#: Written by a person (an agent), not by intake: sent even on a case flagged as a loop.
HUMAN_TEMPLATES = frozenset({"agent_reply"})
#: Addressed to the agent who acted, about that very mail (a refused command): the one
#: kind of mail an agent gets about their own action.
ANSWER_TEMPLATES = frozenset({"agent_notice"})


@dataclass(frozen=True)
class LoopLimits:
    ack_per_sender_per_hour: int = 5
    ack_per_case_per_hour: int = 2
    loop_max: int = 10
    notices_per_agent_per_hour: int = 10


@dataclass(frozen=True)
class LoopFacts:
    """What the store knows when a mail is about to be queued."""

    template: str
    recipient: str
    trigger_kind: str = MESSAGE  # kind of the mail that caused it (message/automated/bounce)
    actor: str | None = None  # who caused it (an agent's or customer's address)
    own_address: bool = False  # the recipient is one of our mailboxes
    noreply: bool = False
    suppressed: str | None = None  # why the recipient gets no automated mail
    case_flagged: bool = False  # the case is tagged mail-loop
    acks_to_recipient_last_hour: int = 0
    acks_on_case_last_hour: int = 0
    notices_to_recipient_last_hour: int = 0  # agent notices (ANSWER_TEMPLATES) to this agent
    case_traffic_in_window: int = 0  # mails in and out of the case with the outside, recently


@dataclass(frozen=True)
class Verdict:
    send: bool
    check: str = ""
    reason: str = ""
    flag_loop: bool = False  # the case must be flagged now


def _own_action(f: LoopFacts, _: LoopLimits) -> str | None:
    if f.actor and f.actor.lower() == f.recipient.lower() and f.template not in ANSWER_TEMPLATES:
        return "agents are not notified of their own actions"
    return None


def _own_address(f: LoopFacts, _: LoopLimits) -> str | None:
    return f"{f.recipient} is one of our own addresses" if f.own_address else None


def _noreply(f: LoopFacts, _: LoopLimits) -> str | None:
    return f"{f.recipient} is a no-reply address" if f.noreply else None


def _automated_trigger(f: LoopFacts, _: LoopLimits) -> str | None:
    if f.template not in HUMAN_TEMPLATES and f.trigger_kind != MESSAGE:
        return f"caused by {f.trigger_kind} mail (auto-reply, bounce or mailing list): never answered"
    return None


def _suppressed(f: LoopFacts, _: LoopLimits) -> str | None:
    if f.suppressed and f.template not in HUMAN_TEMPLATES:
        return f"{f.recipient} failed permanently: {f.suppressed}"
    return None


def _flagged(f: LoopFacts, _: LoopLimits) -> str | None:
    if f.case_flagged and f.template not in HUMAN_TEMPLATES:
        return f"the case is flagged as a mail loop (tag {LOOP_TAG})"
    return None


def _ack_rate(f: LoopFacts, lim: LoopLimits) -> str | None:
    if f.template != "ack":
        return None
    if f.acks_to_recipient_last_hour >= lim.ack_per_sender_per_hour:
        return f"{f.recipient} already got {f.acks_to_recipient_last_hour} acknowledgements this hour"
    if f.acks_on_case_last_hour >= lim.ack_per_case_per_hour:
        return f"the case already sent {f.acks_on_case_last_hour} acknowledgements this hour"
    return None


def _notice_rate(f: LoopFacts, lim: LoopLimits) -> str | None:
    if f.template in ANSWER_TEMPLATES and f.notices_to_recipient_last_hour >= lim.notices_per_agent_per_hour:
        return f"{f.recipient} already got {f.notices_to_recipient_last_hour} notices about their mail this hour"
    return None


def _loop_threshold(f: LoopFacts, lim: LoopLimits) -> str | None:
    if f.template not in HUMAN_TEMPLATES and f.case_traffic_in_window + 1 > lim.loop_max:
        return f"the case exchanged {f.case_traffic_in_window} mails recently (limit {lim.loop_max}): mail loop"
    return None


#: The checks of the loop-protection rule, in the order they are reported.
LOOP_CHECKS: tuple[tuple[str, Callable[[LoopFacts, LoopLimits], str | None]], ...] = (
    ("own-action", _own_action),
    ("own-address", _own_address),
    ("noreply", _noreply),
    ("automated-trigger", _automated_trigger),
    ("suppressed", _suppressed),
    ("flagged", _flagged),
    ("ack-rate", _ack_rate),
    ("notice-rate", _notice_rate),
    ("loop-threshold", _loop_threshold),
)


def loop_protection(facts: LoopFacts, limits: LoopLimits) -> Verdict:
    """The loop-protection rule: may this mail be queued? The first check that says no wins."""
    for name, check in LOOP_CHECKS:
        reason = check(facts, limits)
        if reason:
            return Verdict(False, name, reason, flag_loop=name == "loop-threshold")
    return Verdict(True)
