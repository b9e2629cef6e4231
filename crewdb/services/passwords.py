"""Passwords: the policy new passwords must meet, and bcrypt hashing off the event loop."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import bcrypt

from crewdb.errors import FieldViolation
from crewdb.threads import in_thread

MIN_LENGTH = 8
# bcrypt reads only the first 72 bytes; a longer password is refused rather than cut.
MAX_BYTES = 72

# Passwords at the top of every breach list; a guesser tries these first.
COMMON_PASSWORDS = frozenset(
    [
        "123456",
        "123456789",
        "12345678",
        "password",
        "qwerty123",
        "qwerty1",
        "111111",
        "12345",
        "1234567",
        "qwerty",
        "000000",
        "1q2w3e",
        "123123",
        "abc123",
        "password1",
        "1234567890",
        "iloveyou",
        "1qaz2wsx",
        "dragon",
        "monkey",
        "letmein",
        "football",
        "baseball",
        "welcome",
        "admin",
        "admin123",
        "login",
        "master",
        "hello",
        "freedom",
        "whatever",
        "princess",
        "qazwsx",
        "trustno1",
        "654321",
        "superman",
        "1q2w3e4r",
        "1q2w3e4r5t",
        "sunshine",
        "starwars",
        "passw0rd",
        "password123",
        "password12",
        "password1234",
        "p@ssw0rd",
        "p@ssword",
        "iloveyou1",
        "zaq12wsx",
        "asdfghjkl",
        "asdfgh",
        "qwertyuiop",
        "987654321",
        "11111111",
        "00000000",
        "12341234",
        "88888888",
        "87654321",
        "changeme",
        "secret123",
        "welcome1",
        "welcome123",
        "shadow",
        "michael",
        "jennifer",
        "jordan23",
        "hunter2",
        "computer",
        "internet",
        "mustang",
        "access",
        "charlie",
        "donald",
        "batman",
        "pokemon",
        "killer",
        "soccer",
        "hockey",
        "ranger",
        "chelsea",
        "liverpool",
        "arsenal",
        "summer2024",
        "winter2024",
        "spring2024",
        "autumn2024",
        "summer2025",
        "winter2025",
        "letmein123",
        "qwe123",
        "1qazxsw2",
        "google",
        "default",
        "administrator",
        "root",
        "toor",
        "test1234",
        "testtest",
        "guest12345",
        "crewdb123",
        "passpass",
        "abcd1234",
        "abcdefgh",
        "aaaaaaaa",
        "1234qwer",
        "q1w2e3r4",
    ]
)


def check_password(
    password: str, *, field: str = "password", personal: tuple[str, ...] = ()
) -> list[FieldViolation]:
    """What is wrong with `password` as a new password; empty when it is acceptable.

    `personal` holds words the password must not be (the username, the email).
    """
    if len(password) < MIN_LENGTH:
        return [FieldViolation(field, f"at least {MIN_LENGTH} characters")]
    if len(password.encode()) > MAX_BYTES:
        return [FieldViolation(field, f"at most {MAX_BYTES} bytes in UTF-8")]
    lowered = password.lower()
    if lowered in COMMON_PASSWORDS:
        return [FieldViolation(field, "too common: choose one that is not on breach lists")]
    if any(word and lowered == word.lower() for word in personal):
        return [FieldViolation(field, "must not be your username or email")]
    return []


class PasswordHasher:
    """bcrypt on its own threads: hashing takes tens of milliseconds by design, and bcrypt
    releases the GIL while it works, so sign-ins neither stall other calls nor each other."""

    def __init__(self, rounds: int, threads: int = 2) -> None:
        self._rounds = rounds
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="crewdb-bcrypt")
        # Checked against when the account does not exist, so that an unknown name costs the
        # same time as a wrong password and the two cannot be told apart.
        self._decoy = bcrypt.hashpw(b"decoy password", bcrypt.gensalt(rounds))

    async def hash(self, password: str) -> str:
        salt = bcrypt.gensalt(self._rounds)
        hashed = await in_thread(self._pool, bcrypt.hashpw, password.encode(), salt)
        return hashed.decode()

    async def verify(self, password: str, hashed: str | None) -> bool:
        """True when `password` matches `hashed`; with no hash, spends the same time and says no."""
        # Never cut to 72 bytes: a longer password matches nothing (none could be registered),
        # instead of matching whatever password shares its first 72 bytes.
        candidate = password.encode()
        target = hashed.encode() if hashed else self._decoy
        matches = await in_thread(self._pool, _checkpw, candidate, target)
        return matches and hashed is not None

    def needs_rehash(self, hashed: str | None) -> bool:
        """True for a bcrypt hash made at another cost than the current one."""
        parts = (hashed or "").split("$")
        return len(parts) > 2 and parts[2].isdigit() and int(parts[2]) != self._rounds

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _checkpw(password: bytes, hashed: bytes) -> bool:
    if len(password) > MAX_BYTES:
        return False
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a malformed stored hash matches nothing
        return False
