"""Who a new case goes to: a rule's ``assign``, else its queue's method (DESIGN 6 "Routing").

The pickers are pure; :func:`choose` reads what they need (the queue's round-robin position,
open cases per agent) from the transaction, and records a round robin's turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from intake.rules import Decision
from intake.team import Team

if TYPE_CHECKING:
    from intake.db import Tx


@dataclass(frozen=True)
class Assignment:
    """The outcome: ``agent`` None when nobody could be given the case (``reason`` says why)."""

    agent: str | None
    method: str  # round_robin | least_open | rule
    rule: str | None
    reason: str
    away: bool = False


def pick_round_robin(order: Sequence[str], available: Iterable[str], last: str | None) -> str | None:
    """The next available agent after ``last`` in the queue's order (wrapping around)."""
    avail = set(available)
    if not avail:
        return None
    start = order.index(last) + 1 if last in order else 0
    for i in range(len(order)):
        candidate = order[(start + i) % len(order)]
        if candidate in avail:
            return candidate
    return None


def pick_least_open(order: Sequence[str], available: Iterable[str], open_counts: dict[str, int]) -> str | None:
    """The available agent with the fewest open cases; ties go to the earlier in the queue."""
    wanted = set(available)
    avail = [a for a in order if a in wanted]
    if not avail:
        return None
    return min(avail, key=lambda a: (open_counts.get(a, 0), avail.index(a)))


def choose(tx: "Tx", team: Team, queue: str | None, decision: Decision, now: datetime) -> Assignment | None:
    """The assignment of a new case in ``queue``; None when neither rule nor queue assigns."""
    q = team.queue(queue)
    method = decision.assign or (q.assign if q else "none")
    rule = decision.set_by.get("assign") if decision.assign else None
    if method == "none":
        return None
    why = f"rule {rule}" if rule else f"queue {queue} assigns {method}"
    if method not in ("round_robin", "least_open"):
        return Assignment(method, "rule", rule, why, away=team.is_away(method))
    order = list(q.agents) if q else []
    available = team.available(queue)
    if method == "round_robin":
        agent = pick_round_robin(order, available, tx.ops.rotation_last(queue or "") if available else None)
        if agent:
            tx.ops.set_rotation_last(queue or "", agent, now)
    else:
        agent = pick_least_open(order, available, tx.cases.open_counts(available))
    if agent is None:
        reason = (f"queue {queue} is not defined in the rules" if q is None else
                  f"no agent of queue {queue} is available (all away or none listed)")
        return Assignment(None, method, rule, reason)
    return Assignment(agent, method, rule, why)
