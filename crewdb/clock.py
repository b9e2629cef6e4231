"""Time for crewdb: a strictly increasing UTC clock and the one text format timestamps are stored in."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

# Fixed width (four-digit year, microseconds always present, `Z` suffix), so text order is
# time order in the database and keyset pagination can compare timestamps as strings.
# isoformat rather than strftime: strftime's %Y does not pad years before 1000 on Linux.
_ONE_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_timestamp(moment: datetime) -> str:
    """The stored form of a moment: `2026-12-03T16:43:09.123456Z` (`0999-...` for the year 999)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def microseconds(moment: datetime) -> int:
    """The moment as whole microseconds since 1970 (UTC)."""
    return (moment - _EPOCH) // _ONE_MICROSECOND


def parse_timestamp(text: str) -> datetime:
    """Reads a stored timestamp, also the looser ISO-8601 forms older databases may hold.

    Raises:
        ValueError: the text is not an ISO-8601 timestamp.
    """
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:  # the original application stored naive UTC times
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class Clock:
    """UTC wall clock whose readings never repeat or go backwards within this process.

    Message order within a conversation is (timestamp, id); a strictly increasing clock keeps
    that order equal to insertion order even when two messages land in the same microsecond or
    the system clock steps back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = datetime.min.replace(tzinfo=UTC)

    def now(self) -> datetime:
        with self._lock:
            moment = datetime.now(UTC)
            if moment <= self._last:
                moment = self._last + _ONE_MICROSECOND
            self._last = moment
            return moment
