"""The relay's pure rules: local limits, slowed-down failed logins, and what the client is answered.

Exchange Online blocks a mailbox for 24 hours when it sends more than 30 messages a minute or to more
than 10,000 recipients a day; refusing locally with a 4xx first keeps the mailbox usable and lets the
client's own retry logic wait. Every function takes the time as an argument, so it is tested with a
fake clock and holds no I/O.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "DAY",
    "MINUTE",
    "LoginThrottle",
    "MailboxLimits",
    "Refusal",
    "credentials_match",
    "merge_refusals",
    "one_line",
    "upstream_answer",
]

MINUTE = 60.0
DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """An SMTP reply that refuses the command (code and enhanced status text)."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def credentials_match(given_user: str, given_password: str, user: str, password: str) -> bool:
    """Constant-time comparison of both halves, so timing reveals neither a user nor a prefix."""
    user_ok = hmac.compare_digest(given_user.lower().encode(), user.lower().encode())
    password_ok = hmac.compare_digest(given_password.encode(), password.encode())
    return user_ok and password_ok


@dataclass(slots=True)
class _Window:
    """Events (time, weight) within a sliding window."""

    span: float
    events: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def trim(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - self.span:
            _, weight = self.events.popleft()
            self.total -= weight

    def add(self, now: float, weight: int) -> None:
        self.events.append((now, weight))
        self.total += weight

    def oldest(self) -> float:
        return self.events[0][0] if self.events else 0.0


class MailboxLimits:
    """Messages per minute and recipients per day, per mailbox, in this process (one relay replica).

    ``check_*`` refuse early (at MAIL and RCPT) without counting; :meth:`take` counts a message right
    before it is handed to Exchange, atomically with the check, so concurrent sessions cannot overrun.
    A message that Exchange then refuses stays counted: Exchange counts the attempt too.
    """

    def __init__(self) -> None:
        self._minute: dict[str, _Window] = {}
        self._day: dict[str, _Window] = {}

    def _windows(self, mailbox: str, now: float) -> tuple[_Window, _Window]:
        key = mailbox.lower()
        minute = self._minute.setdefault(key, _Window(MINUTE))
        day = self._day.setdefault(key, _Window(DAY))
        minute.trim(now)
        day.trim(now)
        return minute, day

    def check_message(self, mailbox: str, per_minute: int, now: float) -> Refusal | None:
        minute, _ = self._windows(mailbox, now)
        if minute.total >= per_minute:
            wait = max(1, round(minute.oldest() + MINUTE - now))
            return Refusal(
                451,
                f"4.7.0 Rate limit: {mailbox} may send {per_minute} messages a minute; try again in {wait} s",
            )
        return None

    def check_recipients(self, mailbox: str, count: int, per_day: int, now: float) -> Refusal | None:
        _, day = self._windows(mailbox, now)
        if day.total + count > per_day:
            return Refusal(
                451,
                f"4.7.0 Rate limit: {mailbox} may send to {per_day} recipients a day; try again later",
            )
        return None

    def take(
        self, mailbox: str, recipients: int, *, per_minute: int, per_day: int, now: float
    ) -> Refusal | None:
        refusal = self.check_message(mailbox, per_minute, now) or self.check_recipients(
            mailbox, recipients, per_day, now
        )
        if refusal is None:
            minute, day = self._windows(mailbox, now)
            minute.add(now, 1)
            day.add(now, recipients)
        return refusal


class LoginThrottle:
    """Failed logins per client address slow that address down: the n-th failure within ``window``
    seconds is answered after ``base * 2**(n-1)`` seconds (at most ``cap``). A success clears it.

    The delay holds the failing session only, so a brute force needs a connection per guess, each
    held for seconds; a legitimate client that mistyped once pays one second.
    """

    def __init__(
        self, *, base: float = 1.0, cap: float = 30.0, window: float = 900.0, max_addresses: int = 10_000
    ) -> None:
        self.base = base
        self.cap = cap
        self.window = window
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def failures(self, address: str, now: float) -> int:
        times = self._failures.get(address)
        if not times:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return 0
        return len(times)

    def failed(self, address: str, now: float) -> float:
        """Record a failure; returns how long to wait before answering it."""
        count = self.failures(address, now) + 1
        if address not in self._failures and len(self._failures) >= self.max_addresses:
            # Bounded memory under a spray of addresses: forget the one idle longest.
            oldest = min(self._failures, key=lambda a: self._failures[a][-1])
            del self._failures[oldest]
        self._failures.setdefault(address, deque()).append(now)
        return float(min(self.base * 2 ** (count - 1), self.cap))

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def one_line(text: str, limit: int = 400) -> str:
    """A server's (possibly multi-line) reply text as one safe reply line for our client."""
    flat = " ".join(part.strip() for part in text.replace("\r", "\n").split("\n") if part.strip())
    flat = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in flat)
    return flat[:limit]


def upstream_answer(code: int, text: str) -> str:
    """Exchange's answer to the end of DATA as our answer to the client's.

    2xx → ``250`` with Exchange's text (its queue id); 4xx and 5xx keep their code and text, so the
    client retries what Exchange would have it retry and bounces what Exchange refused for good.
    Anything else (a 3xx where a final answer belongs) is a temporary failure.
    """
    line = one_line(text)
    if 200 <= code < 300:
        return f"250 {line}" if line else "250 2.0.0 OK"
    if 400 <= code < 600:
        return f"{code} {line}" if line else f"{code} {code // 100}.0.0 Exchange Online refused the message"
    return f"451 4.3.0 Exchange Online answered {code} {line}".rstrip()


def merge_refusals(replies: Iterable[tuple[int, str]]) -> tuple[int, str]:
    """Several recipient refusals as one answer for the whole message: temporary if any is temporary
    (a retry may then succeed for all), else the first permanent one."""
    items = list(replies)
    temporary = [r for r in items if 400 <= r[0] < 500]
    return temporary[0] if temporary else items[0]
