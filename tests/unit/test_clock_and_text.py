"""The strictly increasing clock, the stored timestamp format, and search snippets."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from crewdb.clock import Clock, format_timestamp, parse_timestamp
from crewdb.services.conversations import snippet


def test_clock_readings_strictly_increase_across_threads() -> None:
    clock = Clock()
    readings: list[datetime] = []
    lock = threading.Lock()

    def read() -> None:
        local = [clock.now() for _ in range(2000)]
        with lock:
            readings.extend(local)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(readings)) == len(readings)


def test_stored_format_is_fixed_width_and_sorts_as_time() -> None:
    early = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    late = datetime(2026, 1, 2, 3, 4, 5, 10, tzinfo=UTC)
    assert format_timestamp(early) == "2026-01-02T03:04:05.000000Z"
    assert format_timestamp(early) < format_timestamp(late)
    assert parse_timestamp(format_timestamp(late)) == late


def test_every_year_the_api_accepts_is_stored_four_digits_wide_in_time_order() -> None:
    moments = [datetime(year, 1, 1, tzinfo=UTC) for year in (1, 9, 99, 999, 1000, 2026, 9999)]
    texts = [format_timestamp(moment) for moment in moments]
    assert texts[0] == "0001-01-01T00:00:00.000000Z"
    assert texts[3] == "0999-01-01T00:00:00.000000Z"
    assert {len(text) for text in texts} == {27}
    assert sorted(texts) == texts
    assert [parse_timestamp(text) for text in texts] == moments


def test_older_naive_timestamps_are_read_as_utc() -> None:
    assert parse_timestamp("2024-05-01 10:00:00") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_timestamp("2024-05-01T10:00:00.000Z") == datetime(2024, 5, 1, 10, tzinfo=UTC)


def test_snippet_centres_on_the_match_and_marks_cuts() -> None:
    text = "x" * 300 + " the NEEDLE is here " + "y" * 300
    piece = snippet(text, "needle")
    assert "NEEDLE" in piece
    assert piece.startswith("…")
    assert piece.endswith("…")
    assert len(piece) <= 162


def test_snippet_of_short_text_is_the_text_with_whitespace_collapsed() -> None:
    assert snippet("hello\n\n  world", "world") == "hello world"
