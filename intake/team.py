"""The support team: agents, queues and their supervisors, as the rule files define them. Pure.

The directory is read from the ``agents:`` and ``queues:`` sections of the routing rules
(``intake.rules`` loads and checks them) and answers who works a queue, who is away and
who hears of a case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from intake.states import Status


@dataclass(frozen=True)
class Agent:
    address: str
    name: str = ""
    language: str = ""
    away: bool = False


@dataclass(frozen=True)
class Queue:
    key: str
    name: str = ""
    agents: tuple[str, ...] = ()
    assign: str = "none"
    sla: dict[str, Any] = field(default_factory=dict)
    escalate_to: str | None = None
    supervisors: tuple[str, ...] = ()
    # The lifecycle (DESIGN 5), per queue.
    reply_status: str = Status.PENDING.value  # after a public agent reply: pending, or open (keep working)
    resolved_notice: bool = True  # status_changed to the customer when the case is resolved
    on_reply_to_closed: str = "reopen"  # a reply to a closed case: reopen (within reopen_days) or new_case
    reopen_days: int | None = None  # None: [cases] reopen_days


@dataclass(frozen=True)
class Team:
    """Agents by lower-case address, queues by key."""

    agents: Mapping[str, Agent] = field(default_factory=dict)
    queues: Mapping[str, Queue] = field(default_factory=dict)

    @property
    def addresses(self) -> frozenset[str]:
        """Every agent's address (lower case)."""
        return frozenset(self.agents)

    def agent(self, address: str | None) -> Agent | None:
        return self.agents.get((address or "").lower())

    def queue(self, key: str | None) -> Queue | None:
        return self.queues.get(key or "")

    def is_away(self, address: str) -> bool:
        agent = self.agent(address)
        return bool(agent and agent.away)

    def available(self, queue: str | None) -> list[str]:
        """The agents of a queue who are not away, in the queue's order."""
        q = self.queue(queue)
        return [a for a in (q.agents if q else ()) if not self.is_away(a)]

    def name_of(self, address: str | None) -> str:
        agent = self.agent(address)
        return agent.name if agent else ""

    def notified_of(self, assignee: str | None, queue: str | None) -> list[tuple[str, str]]:
        """Who hears of a case, (address, name): its assignee, else its queue's agents; not those away."""
        q = self.queue(queue)
        addresses = [assignee.lower()] if assignee else list(q.agents if q else ())
        return [(a, self.name_of(a)) for a in dict.fromkeys(addresses) if not self.is_away(a)]

    def colleagues(self, queue: str | None, besides: str | None) -> list[tuple[str, str]]:
        """The queue's agents (not away) other than ``besides``: who hears of an internal note."""
        me = (besides or "").lower()
        return [(a, self.name_of(a)) for a in self.available(queue) if a != me]
