"""Page tokens are opaque, bound to their listing, and refuse any alteration."""

from __future__ import annotations

import pytest

from crewdb.errors import InvalidArgumentError
from crewdb.services.pagination import PageTokens, check_page_size, page_size

KEY = b"k" * 32


def test_token_round_trips_its_position() -> None:
    tokens = PageTokens(KEY)
    token = tokens.encode("messages:c1", ("2026-12-03T16:43:09.123456Z", "m1"))
    assert tokens.decode("messages:c1", token) == ("2026-12-03T16:43:09.123456Z", "m1")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: "A" + t[1:] if t[0] != "A" else "B" + t[1:],
        lambda t: t[: len(t) // 2],
        lambda _: "",
        lambda _: "not base64 at all!",
        lambda _: "AAAA",
    ],
)
def test_altered_tokens_are_invalid_page_tokens(mangle: object) -> None:
    tokens = PageTokens(KEY)
    token = tokens.encode("conversations", ("t", "id"))
    with pytest.raises(InvalidArgumentError) as caught:
        tokens.decode("conversations", mangle(token))  # type: ignore[operator]
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in caught.value.violations] == ["page_token"]


def test_token_of_one_listing_is_refused_by_another() -> None:
    tokens = PageTokens(KEY)
    token = tokens.encode("messages:a", ("t", "id"))
    with pytest.raises(InvalidArgumentError):
        tokens.decode("messages:b", token)


def test_token_from_another_key_is_refused() -> None:
    token = PageTokens(b"a" * 32).encode("conversations", ("t", "id"))
    with pytest.raises(InvalidArgumentError):
        PageTokens(b"b" * 32).decode("conversations", token)


def test_page_size_defaults_and_clamps() -> None:
    assert page_size(0, default=50, maximum=200) == 50
    assert page_size(10, default=50, maximum=200) == 10
    assert page_size(10_000, default=50, maximum=200) == 200


def test_negative_page_size_is_a_violation_of_that_field() -> None:
    assert [v.field for v in check_page_size(-1)] == ["page_size"]
    assert check_page_size(0) == []
