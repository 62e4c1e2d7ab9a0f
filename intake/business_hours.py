"""The business calendar: working days, opening hours, public holidays and closed days. Pure.

Used by the ``business_hours`` rule condition (and open to the SLA clock). Public holidays
come from the ``holidays`` package (``JP`` by default: 元日, 成人の日 … 振替休日 included);
company closures such as 年末年始 are listed as ``closed`` dates, either once
(``2026-12-29``) or every year (``12-29``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timezone
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_YEARLY = re.compile(r"^(\d{2})-(\d{2})$")


@dataclass(frozen=True)
class BusinessHours:
    """When the support team works, in its own time zone."""

    time_zone: str = "Asia/Tokyo"
    days: tuple[int, ...] = (0, 1, 2, 3, 4)
    # (start, end) minutes since midnight; end may be 1440 (24:00).
    hours: tuple[tuple[int, int], ...] = ((9 * 60, 18 * 60),)
    holidays: str = "JP"
    closed_dates: frozenset[date] = frozenset()
    closed_yearly: frozenset[tuple[int, int]] = frozenset()

    @classmethod
    def from_settings(cls, *, time_zone: str, days: Any, hours: Any, holidays: str, closed: Any,
                      check_country: bool = True) -> "BusinessHours":
        """Build from config values; raises ``ValueError`` with a readable reason.

        ``check_country=False`` leaves the holiday country unchecked (loading the holiday
        tables takes a tenth of a second: a command that reads cases need not pay it)."""
        try:
            ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {time_zone!r}") from None
        day_numbers = []
        for d in days:
            name = str(d).strip().lower()[:3]
            if name not in DAY_NAMES:
                raise ValueError(f"not a day: {d!r} (use mon, tue, wed, thu, fri, sat, sun)")
            day_numbers.append(DAY_NAMES.index(name))
        ranges = []
        for h in hours:
            m = _RANGE.match(str(h))
            if not m:
                raise ValueError(f"not a time range: {h!r} (use e.g. 09:00-18:00)")
            h1, m1, h2, m2 = (int(x) for x in m.groups())
            start, end = h1 * 60 + m1, h2 * 60 + m2
            if m1 > 59 or m2 > 59 or start >= 24 * 60 or end > 24 * 60 or end <= start:
                raise ValueError(f"not a time range: {h!r} (start before end, within 00:00-24:00)")
            ranges.append((start, end))
        if holidays and check_country:
            _country_holidays(holidays)  # an unknown country fails here, at load
        dates, yearly = set(), set()
        for c in closed:
            text = str(c).strip()
            ym = _YEARLY.match(text)
            try:
                if ym:
                    date(2024, int(ym.group(1)), int(ym.group(2)))  # a leap year accepts 02-29
                    yearly.add((int(ym.group(1)), int(ym.group(2))))
                else:
                    dates.add(date.fromisoformat(text))
            except ValueError:
                raise ValueError(f"not a date: {c!r} (use 2026-12-29, or 12-29 for every year)") from None
        return cls(time_zone=time_zone, days=tuple(sorted(set(day_numbers))), hours=tuple(sorted(ranges)),
                   holidays=holidays, closed_dates=frozenset(dates), closed_yearly=frozenset(yearly))

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def closed_reason(self, day: date) -> str | None:
        """Why the whole day is closed (weekend, holiday name, closure), or ``None``."""
        if day.weekday() not in self.days:
            return f"{DAY_NAMES[day.weekday()]} is not a working day"
        if day in self.closed_dates or (day.month, day.day) in self.closed_yearly:
            return "closed day"
        if self.holidays:
            name = _country_holidays(self.holidays).get(day)
            if name:
                return f"public holiday: {name}"
        return None

    def is_open(self, at: datetime) -> bool:
        """True when ``at`` (aware; naive is UTC) falls within the working hours."""
        local = _local(at, self.tz)
        if self.closed_reason(local.date()) is not None:
            return False
        minute = local.hour * 60 + local.minute
        return any(start <= minute < end for start, end in self.hours)

    def describe(self, at: datetime) -> str:
        """``open`` / ``closed`` with the reason, for ``intake rules explain``."""
        local = _local(at, self.tz)
        reason = self.closed_reason(local.date())
        stamp = local.strftime("%Y-%m-%d %a %H:%M") + f" {self.time_zone}"
        if reason:
            return f"closed ({stamp}: {reason})"
        if self.is_open(at):
            return f"open ({stamp})"
        spans = ", ".join(f"{s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d}" for s, e in self.hours)
        return f"closed ({stamp}: outside {spans})"


def _local(at: datetime, tz: ZoneInfo) -> datetime:
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.astimezone(tz)


@lru_cache(maxsize=8)
def _country_holidays(country: str) -> Any:
    import holidays  # imported when a calendar with public holidays is first used

    try:
        return holidays.country_holidays(country.upper(), language="ja" if country.upper() == "JP" else None)
    except NotImplementedError:
        raise ValueError(f"no public holiday calendar for country {country!r}") from None


DEFAULT = BusinessHours()
