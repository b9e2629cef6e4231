"""Login throttling delays and the new-password policy."""

from __future__ import annotations

import pytest

from crewdb.services.passwords import check_password
from crewdb.services.throttle import (
    ACCOUNT_FREE_FAILURES,
    ADDRESS_FREE_FAILURES,
    FORGET_AFTER_SECONDS,
    MAX_DELAY_SECONDS,
    PAIR_FREE_FAILURES,
    LoginThrottle,
    RateLimit,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(throttle: LoginThrottle, times: int, account: str = "alice", address: str = "ip:1") -> None:
    """`times` attempts that are allowed and then fail (a failure is simply not followed by
    `succeeded`)."""
    for _ in range(times):
        assert throttle.begin(account, address) == 0


def test_the_attempt_after_five_failures_waits_and_delays_double() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    fail(throttle, PAIR_FREE_FAILURES)
    assert throttle.begin("alice", "ip:1") == pytest.approx(1)
    clock.now += 1
    fail(throttle, 1)
    assert throttle.begin("alice", "ip:1") == pytest.approx(2)


def test_a_burst_of_concurrent_attempts_gets_only_the_free_ones() -> None:
    throttle = LoginThrottle(FakeClock())
    allowed = [throttle.begin("alice", "ip:1") == 0 for _ in range(60)]
    assert sum(allowed) == PAIR_FREE_FAILURES


def test_the_delay_is_capped() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for _ in range(40):
        clock.now += MAX_DELAY_SECONDS
        throttle.begin("alice", "ip:1")
    assert throttle.begin("alice", "ip:1") <= MAX_DELAY_SECONDS


def test_guessing_from_many_addresses_never_locks_out_the_owners_clean_address() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for n in range(ACCOUNT_FREE_FAILURES * 3):
        throttle.begin("alice", f"attacker:{n}")
    assert throttle.begin("alice", "attacker:0") > 0  # the account counter holds guessers back
    assert throttle.begin("alice", "owner") == 0  # the owner's own address is not held back


def test_success_clears_the_account_and_forgives_the_address() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    fail(throttle, PAIR_FREE_FAILURES - 1)
    assert throttle.begin("alice", "ip:1") == 0
    throttle.succeeded("alice", "ip:1")
    fail(throttle, PAIR_FREE_FAILURES)  # a fresh allowance after signing in


def test_counters_are_forgotten_after_a_quiet_hour() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    fail(throttle, PAIR_FREE_FAILURES)
    clock.now += FORGET_AFTER_SECONDS + 1
    assert throttle.begin("alice", "ip:1") == 0


def test_one_address_guessing_many_accounts_is_held_back() -> None:
    throttle = LoginThrottle(FakeClock())
    for n in range(ADDRESS_FREE_FAILURES):
        assert throttle.begin(f"user{n}", "ip:1") == 0
    assert throttle.begin("someone-else", "ip:1") > 0


def test_rate_limit_allows_the_limit_per_window() -> None:
    clock = FakeClock()
    limit = RateLimit(3, 60, clock)
    assert [limit.take("a") for _ in range(3)] == [0, 0, 0]
    assert limit.take("a") == pytest.approx(60)
    assert limit.take("b") == 0
    clock.now += 60
    assert limit.take("a") == 0


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
