"""Password-guess throttling: growing delays per client, per account and per address."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Failures allowed before any delay, per counter (see LoginThrottle).
PAIR_FREE_FAILURES = 5
ADDRESS_FREE_FAILURES = 20
ACCOUNT_FREE_FAILURES = 20
# The delay doubles with each further failure, up to this.
MAX_DELAY_SECONDS = 15 * 60
# A counter is forgotten after this long without a new failure.
FORGET_AFTER_SECONDS = 60 * 60
# Counters kept at most; the oldest go first, so cycling through names cannot grow memory.
MAX_KEYS = 100_000


@dataclass(slots=True)
class _Record:
    failures: int
    last_failure: float
    blocked_until: float


class LoginThrottle:
    """Three counters of failed password checks, each with free failures, then doubling delays:

    - the pair (account, address), 5 free: one client guessing one account;
    - the address, 20 free: one client guessing many accounts (more, since a NAT's users share
      an address);
    - the account, 20 free: many clients guessing one account. It only holds back addresses
      that have already failed against the account, so an address with a clean record for it
      (the owner's) is never locked out by someone else's guessing.

    An attempt is counted when it starts, before the slow password check, so a burst of
    concurrent guesses cannot slip past; a success takes its count back and clears the pair
    and the account. While blocked, every attempt is refused, right or wrong: the guesser
    learns nothing.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def begin(self, account: str, address: str) -> float:
        """Seconds to wait before this attempt may be made; 0 means go (and it is counted)."""
        now = self._clock()
        pair, by_address, by_account = _keys(account, address)
        wait = max(self._wait(pair, now), self._wait(by_address, now))
        if self._live(pair, now) is not None:
            wait = max(wait, self._wait(by_account, now))
        if wait > 0:
            return wait
        self._count(pair, PAIR_FREE_FAILURES, now)
        self._count(by_address, ADDRESS_FREE_FAILURES, now)
        self._count(by_account, ACCOUNT_FREE_FAILURES, now)
        return 0.0

    def succeeded(self, account: str, address: str) -> None:
        pair, by_address, by_account = _keys(account, address)
        self._records.pop(pair, None)
        self._records.pop(by_account, None)
        record = self._records.get(by_address)
        if record is not None:
            record.failures = max(0, record.failures - 1)
            if record.failures < ADDRESS_FREE_FAILURES:
                record.blocked_until = record.last_failure

    def _live(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and now - record.last_failure > FORGET_AFTER_SECONDS:
            del self._records[key]
            return None
        return record

    def _wait(self, key: str, now: float) -> float:
        record = self._live(key, now)
        return max(0.0, record.blocked_until - now) if record is not None else 0.0

    def _count(self, key: str, free: int, now: float) -> None:
        record = self._live(key, now) or _Record(0, now, now)
        self._records.pop(key, None)
        record.failures += 1
        record.last_failure = now
        excess = record.failures - free
        if excess >= 0:
            record.blocked_until = now + min(MAX_DELAY_SECONDS, math.pow(2, excess))
        self._records[key] = record
        while len(self._records) > MAX_KEYS:
            self._records.popitem(last=False)


def _keys(account: str, address: str) -> tuple[str, str, str]:
    return f"pair:{account}|{address}", f"address:{address}", f"account:{account}"


class RateLimit:
    """At most `limit` events per key in any `window` seconds (sliding window)."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._events: OrderedDict[str, list[float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Seconds to wait before the next event for `key`; 0 means it happens now (counted)."""
        now = self._clock()
        recent = [t for t in self._events.pop(key, []) if now - t < self._window]
        if len(recent) >= self._limit:
            self._events[key] = recent
            return recent[0] + self._window - now
        recent.append(now)
        self._events[key] = recent
        while len(self._events) > MAX_KEYS:
            self._events.popitem(last=False)
        return 0.0
