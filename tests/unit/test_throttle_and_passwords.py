"""Login throttling delays and the new-password policy."""

from __future__ import annotations

import pytest

from crewdb.services.passwords import check_password
from crewdb.services.throttle import FORGET_AFTER_SECONDS, FREE_FAILURES, MAX_DELAY_SECONDS, LoginThrottle


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delays_start_after_the_free_failures_and_double() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_FAILURES - 1):
        throttle.failed("account:a")
    assert throttle.retry_after("account:a") == 0
    throttle.failed("account:a")
    assert throttle.retry_after("account:a") == pytest.approx(1)
    throttle.failed("account:a")
    assert throttle.retry_after("account:a") == pytest.approx(2)


def test_the_delay_is_capped_so_the_owner_is_never_locked_out_for_good() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for _ in range(60):
        throttle.failed("account:a")
    assert throttle.retry_after("account:a") == pytest.approx(MAX_DELAY_SECONDS)
    clock.now += MAX_DELAY_SECONDS
    assert throttle.retry_after("account:a") == 0


def test_failures_are_forgotten_after_a_quiet_hour_and_on_success() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_FAILURES + 1):
        throttle.failed("account:a", "address:x")
    clock.now += FORGET_AFTER_SECONDS + 1
    assert throttle.retry_after("account:a", "address:x") == 0
    for _ in range(FREE_FAILURES + 1):
        throttle.failed("account:b")
    throttle.succeeded("account:b")
    assert throttle.retry_after("account:b") == 0


def test_the_longest_delay_of_the_keys_applies() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_FAILURES + 2):
        throttle.failed("address:x")
    assert throttle.retry_after("account:new", "address:x") == pytest.approx(4)


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("short", "at least 8"),
        ("x" * 73, "at most 72 bytes"),
        ("é" * 40, "at most 72 bytes"),  # 80 bytes in UTF-8
        ("Password123", "too common"),
        ("alice-the-user", "username or email"),
    ],
)
def test_weak_passwords_are_refused_with_the_reason(password: str, problem: str) -> None:
    violations = check_password(password, personal=("alice-the-user", "alice@example.com"))
    assert [v.field for v in violations] == ["password"]
    assert problem in violations[0].description


def test_a_long_unusual_password_is_accepted() -> None:
    assert check_password("plum kettle orbit 42", personal=("alice",)) == []
