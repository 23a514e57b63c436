"""Window maths of client-secret expiry with a fixed clock: boundaries, zones, leap days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from smtp_oauth_operator.domain.expiry import days_phrase, evaluate, format_date
from smtp_oauth_operator.domain.reasons import Reason

WARN = (30, 14, 7, 1)
EXPIRES = datetime(2027, 5, 31, tzinfo=UTC)


@pytest.mark.parametrize(
    ("before", "reason", "threshold"),
    [
        (timedelta(days=40), Reason.NOT_EXPIRING, None),
        (timedelta(days=30, seconds=1), Reason.NOT_EXPIRING, None),
        (timedelta(days=30), Reason.EXPIRING_SOON, 30),  # exactly at the boundary: crossed
        (timedelta(days=14, seconds=1), Reason.EXPIRING_SOON, 30),
        (timedelta(days=14), Reason.EXPIRING_SOON, 14),
        (timedelta(days=3), Reason.EXPIRING_SOON, 7),
        (timedelta(hours=5), Reason.EXPIRING_SOON, 1),
        (timedelta(seconds=1), Reason.EXPIRING_SOON, 1),
        (timedelta(0), Reason.EXPIRED, None),
        (-timedelta(days=2), Reason.EXPIRED, None),
    ],
)
def test_window(before: timedelta, reason: Reason, threshold: int | None) -> None:
    state = evaluate(EXPIRES, EXPIRES - before, WARN)
    assert state.reason is reason
    assert state.threshold_days == threshold


def test_no_date_is_unknown() -> None:
    state = evaluate(None, EXPIRES, WARN)
    assert state.reason is Reason.EXPIRY_UNKNOWN
    assert state.condition_status == "Unknown"
    assert state.next_change is None


def test_next_change_is_the_next_threshold_then_expiry() -> None:
    now = EXPIRES - timedelta(days=20)
    assert evaluate(EXPIRES, now, WARN).next_change == EXPIRES - timedelta(days=14)
    now = EXPIRES - timedelta(hours=12)
    assert evaluate(EXPIRES, now, WARN).next_change == EXPIRES
    assert evaluate(EXPIRES, EXPIRES + timedelta(seconds=1), WARN).next_change is None


def test_time_zones_are_normalised() -> None:
    cest = timezone(timedelta(hours=2))
    local = datetime(2027, 5, 31, 2, 0, tzinfo=cest)  # the same instant as EXPIRES
    now = datetime(2027, 5, 24, 0, 0, tzinfo=UTC)
    assert evaluate(local, now, WARN) == evaluate(EXPIRES, now, WARN)
    assert evaluate(local, now, WARN).threshold_days == 7


def test_leap_day() -> None:
    leap = datetime(2028, 2, 29, tzinfo=UTC)
    state = evaluate(leap, datetime(2028, 2, 22, tzinfo=UTC), WARN)
    assert state.reason is Reason.EXPIRING_SOON
    assert state.threshold_days == 7
    assert format_date(leap) == "2028-02-29"
    # 2028-01-30 + 30 days is 2028-02-29: the 30-day threshold lands on the leap day itself.
    assert evaluate(leap, datetime(2028, 1, 30, tzinfo=UTC), WARN).threshold_days == 30


def test_unsorted_thresholds() -> None:
    state = evaluate(EXPIRES, EXPIRES - timedelta(days=10), (7, 30, 14))
    assert state.threshold_days == 14


def test_phrases() -> None:
    assert days_phrase(timedelta(days=7, hours=3)) == "in 7 days"
    assert days_phrase(timedelta(days=1)) == "in 1 day"
    assert days_phrase(timedelta(hours=5, minutes=59)) == "in 5 hours"
    assert days_phrase(timedelta(minutes=3)) == "in less than an hour"
    assert format_date(datetime(2027, 5, 31, 13, 5, tzinfo=UTC)) == "2027-05-31 13:05 UTC"
