"""Client-secret expiry maths: where in the warning window a date is, and when that next changes.

Pure functions over aware datetimes; the caller passes ``now`` (tests pass a fixed clock). A threshold of
``d`` days is *crossed* once ``now >= expires_at - d days``; the state names the most urgent threshold
crossed, so a secret created three days before expiry raises the 7-day alarm once, not 30, 14 and 7.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from smtp_oauth_operator.domain.reasons import Reason

__all__ = ["ExpiryState", "days_phrase", "evaluate", "format_date"]

DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class ExpiryState:
    reason: Reason  # NotExpiring, ExpiringSoon, Expired or ExpiryUnknown
    expires_at: datetime | None
    remaining: timedelta | None
    threshold_days: int | None  # the most urgent threshold crossed while ExpiringSoon
    next_change: datetime | None  # when ``reason`` or ``threshold_days`` changes next

    @property
    def condition_status(self) -> str:
        if self.reason is Reason.EXPIRY_UNKNOWN:
            return "Unknown"
        return "False" if self.reason is Reason.NOT_EXPIRING else "True"


def evaluate(expires_at: datetime | None, now: datetime, warn_before_days: Sequence[int]) -> ExpiryState:
    if expires_at is None:
        return ExpiryState(Reason.EXPIRY_UNKNOWN, None, None, None, None)
    expires_at = expires_at.astimezone(UTC)
    now = now.astimezone(UTC)
    remaining = expires_at - now
    if remaining <= timedelta(0):
        return ExpiryState(Reason.EXPIRED, expires_at, remaining, None, None)
    crossed = [d for d in warn_before_days if now >= expires_at - d * DAY]
    upcoming = [expires_at - d * DAY for d in warn_before_days if expires_at - d * DAY > now]
    next_change = min([*upcoming, expires_at])
    if crossed:
        return ExpiryState(Reason.EXPIRING_SOON, expires_at, remaining, min(crossed), next_change)
    return ExpiryState(Reason.NOT_EXPIRING, expires_at, remaining, None, next_change)


def format_date(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    if moment.time() == datetime.min.time():
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def days_phrase(remaining: timedelta) -> str:
    """``in 7 days``, ``in 1 day``, ``in 5 hours`` — whole units, rounded down."""
    if remaining >= DAY:
        days = remaining // DAY
        return f"in {days} day{'s' if days != 1 else ''}"
    hours = max(int(remaining.total_seconds() // 3600), 0)
    if hours >= 1:
        return f"in {hours} hour{'s' if hours != 1 else ''}"
    return "in less than an hour"
