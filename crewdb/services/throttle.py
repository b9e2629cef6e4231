"""Login throttling: growing delays after failed sign-ins, per account and per client address."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Failures allowed before any delay: enough for honest typos. The attempt after the fifth
# failure waits.
FREE_FAILURES = 5
# The delay doubles with each further failure, up to this; never a permanent lock-out.
MAX_DELAY_SECONDS = 15 * 60
# A key's failures are forgotten after this long without a new one.
FORGET_AFTER_SECONDS = 60 * 60
# Keys tracked at most; the oldest are dropped first (an attacker cycling through many keys
# cannot grow memory without bound).
MAX_KEYS = 100_000


@dataclass(slots=True)
class _Record:
    failures: int
    last_failure: float
    blocked_until: float


class LoginThrottle:
    """Counts failures by key (`account:<name>`, `address:<ip>`) and says how long to wait.

    The delay applies to every attempt on a key, right or wrong, so a guesser learns nothing
    while blocked; the owner waits at most MAX_DELAY_SECONDS, and a success on the account
    clears it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def retry_after(self, *keys: str) -> float:
        """Seconds until the next attempt on these keys is allowed; 0 when it is now."""
        now = self._clock()
        wait = 0.0
        for key in keys:
            record = self._records.get(key)
            if record is None:
                continue
            if now - record.last_failure > FORGET_AFTER_SECONDS:
                del self._records[key]
                continue
            wait = max(wait, record.blocked_until - now)
        return wait

    def failed(self, *keys: str) -> None:
        now = self._clock()
        for key in keys:
            record = self._records.pop(key, None)
            if record is None or now - record.last_failure > FORGET_AFTER_SECONDS:
                record = _Record(0, now, now)
            record.failures += 1
            record.last_failure = now
            excess = record.failures - FREE_FAILURES
            if excess >= 0:
                record.blocked_until = now + min(MAX_DELAY_SECONDS, math.pow(2, excess))
            self._records[key] = record
        while len(self._records) > MAX_KEYS:
            self._records.popitem(last=False)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._records.pop(key, None)
