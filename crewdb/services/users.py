"""Account use cases: registration, sign-in, token rotation, sessions, and account administration."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from sqlalchemy.engine import Connection

from crewdb.clock import Clock, parse_timestamp
from crewdb.db import users as store
from crewdb.db.engine import Database
from crewdb.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from crewdb.models import Page, Principal, Session, TokenPair, User, UserRole, UserStats
from crewdb.services.pagination import PageTokens, check_page_size, page_size
from crewdb.services.passwords import PasswordHasher, check_password
from crewdb.services.throttle import LoginThrottle, RateLimit
from crewdb.services.tokens import AccessTokens, hash_refresh_token, new_refresh_token
from crewdb.services.validation import check_id, raise_if

log = logging.getLogger(__name__)
# Security events (refresh-token reuse, deactivations) go to their own logger so operators can
# route them; they never carry a token, hash or password.
security_log = logging.getLogger("crewdb.security")

EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
EMAIL_MAX_LENGTH = 254
USERNAME = re.compile(r"[a-z0-9._-]{3,32}")
USERS_PAGE = (50, 200)
REGISTRATIONS_PER_WINDOW = 30
REGISTRATION_WINDOW_SECONDS = 600.0
# How long a checked session (open, account active, role) is trusted before it is read
# again: the bound on how late a revocation made elsewhere reaches access tokens.
SESSION_CHECK_SECONDS = 1.0
INVALID_CREDENTIALS = "invalid email/username or password"


def _invalid_credentials() -> UnauthenticatedError:
    return UnauthenticatedError(INVALID_CREDENTIALS, reason="INVALID_CREDENTIALS")


def _user_not_found(user_id: str) -> NotFoundError:
    return NotFoundError(f"user {user_id!r} not found", reason="USER_NOT_FOUND")


class _Refresh(Enum):
    UNKNOWN = "unknown"
    REUSED = "reused"
    RACED = "raced"
    EXPIRED = "expired"
    INACTIVE = "inactive"


@dataclass(frozen=True, slots=True)
class _Rotated:
    user: User
    family_id: str


class Accounts:
    """Accounts, sessions and the checks every authenticated call goes through."""

    def __init__(
        self,
        db: Database,
        hasher: PasswordHasher,
        tokens: AccessTokens,
        page_tokens: PageTokens,
        clock: Clock,
        *,
        refresh_ttl: int,
        refresh_grace: float,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self._db = db
        self._hasher = hasher
        self._tokens = tokens
        self._page_tokens = page_tokens
        self._clock = clock
        self._refresh_ttl = timedelta(seconds=refresh_ttl)
        self._refresh_grace = refresh_grace
        self._throttle = throttle or LoginThrottle()
        self._registrations = RateLimit(REGISTRATIONS_PER_WINDOW, REGISTRATION_WINDOW_SECONDS)
        self._registering = asyncio.Semaphore(1)
        # (user id, session id) -> (role, or None when the session is over; checked at)
        self._sessions: dict[tuple[str, str], tuple[UserRole | None, float]] = {}

    # --- authentication (every call) -------------------------------------------------------

    def authenticate(self, access_token: str | None) -> Principal:
        """The caller behind an access token.

        Raises:
            UnauthenticatedError: no token, an invalid or expired one, or one whose session
                was ended or whose account was deactivated.
        """
        if not access_token:
            raise UnauthenticatedError("sign in first: send `authorization: Bearer <access token>`")
        claims = self._tokens.verify(access_token)
        key = (claims.user_id, claims.session_id)
        now = time.monotonic()
        cached = self._sessions.get(key)
        if cached is None or now - cached[1] > SESSION_CHECK_SECONDS:
            role = self._db.read_now(
                lambda conn: store.live_session_role(conn, claims.user_id, claims.session_id)
            )
            if len(self._sessions) > 100_000:
                self._sessions.clear()
            self._sessions[key] = cached = (role, now)
        role = cached[0]
        if role is None:
            raise UnauthenticatedError("this session has ended: sign in again")
        return Principal(user_id=claims.user_id, role=role, session_id=claims.session_id)

    def _forget_sessions(self) -> None:
        """Revocations made here reach access tokens at once, not after SESSION_CHECK_SECONDS."""
        self._sessions.clear()

    # --- public ----------------------------------------------------------------------------

    async def register(
        self,
        email: str,
        username: str,
        password: str,
        *,
        role: UserRole = UserRole.USER,
        address: str | None = None,
    ) -> User:
        """Registrations through the API pass the client's `address`, which limits how many it may
        make; they hash one at a time, so a flood of them cannot take every bcrypt thread from
        sign-ins.

        Raises: InvalidArgumentError, AlreadyExistsError (EMAIL_TAKEN, USERNAME_TAKEN),
        ResourceExhaustedError (TOO_MANY_ATTEMPTS).
        """
        if address is not None:
            wait = self._registrations.take(address)
            if wait > 0:
                raise ResourceExhaustedError(
                    f"too many registrations from this address; try again in {wait:.0f} s",
                    retry_after_seconds=wait,
                    reason="TOO_MANY_ATTEMPTS",
                )
        async with self._registering:
            return await create_user(
                self._db,
                self._hasher,
                self._clock,
                email=email,
                username=username,
                password=password,
                role=role,
            )

    async def login(self, identifier: str, password: str, address: str) -> TokenPair:
        """Starts a session.

        Raises: InvalidArgumentError, UnauthenticatedError (INVALID_CREDENTIALS),
        ResourceExhaustedError (TOO_MANY_ATTEMPTS).
        """
        identifier = identifier.strip().lower()
        violations = []
        if not identifier:
            violations.append(FieldViolation("email_or_username", "required"))
        if not password:
            violations.append(FieldViolation("password", "required"))
        if violations:
            raise InvalidArgumentError.of(violations)
        found = self._db.read_now(lambda conn: store.find_for_login(conn, identifier))
        user, hashed = found if found is not None else (None, None)
        # Counted by the account when there is one, so its email and username share a count.
        account = user.id if user is not None else f"name:{identifier}"
        self._begin_attempt(account, address)
        # Unknown account, wrong password, deactivated account: one answer, one cost.
        matches = await self._hasher.verify(password, hashed)
        if user is None or not matches or not user.active:
            # The account id, never the name typed: a password pasted into the name field must
            # not end up in a log.
            security_log.warning(
                "failed sign-in from %s for %s",
                address,
                user.id if user is not None else "an unknown account",
            )
            raise _invalid_credentials()
        self._throttle.succeeded(account, address)
        # Hashes made at another cost are redone now, while the password is at hand: a
        # stored cost that differs from the decoy's would tell accounts apart by timing.
        rehashed = await self._hasher.hash(password) if self._hasher.needs_rehash(hashed) else None
        family_id = str(uuid.uuid4())
        refresh_token = new_refresh_token()

        def work(conn: Connection) -> User:
            now = self._clock.now()
            store.insert_refresh_token(
                conn,
                token_id=str(uuid.uuid4()),
                user_id=user.id,
                family_id=family_id,
                token_hash=hash_refresh_token(refresh_token),
                expires_at=now + self._refresh_ttl,
                now=now,
            )
            store.record_login(conn, user.id, now)
            if rehashed is not None:
                store.set_password(conn, user.id, rehashed, now)
            return store.get_user(conn, user.id) or user

        signed_in = await self._db.write(work)
        return self._pair(signed_in, family_id, refresh_token)

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Spends a refresh token for a new pair in the same session.

        A token that was already spent ends its whole session (RFC 9700 section 4.14.2),
        unless it was spent less than `refresh_grace` seconds ago (a concurrent refresh).

        Raises: InvalidArgumentError, UnauthenticatedError.
        """
        if not refresh_token:
            raise InvalidArgumentError.of([FieldViolation("refresh_token", "required")])
        token_hash = hash_refresh_token(refresh_token)
        new_token = new_refresh_token()

        def work(conn: Connection) -> _Rotated | tuple[_Refresh, str | None]:  # noqa: PLR0911 - one exit per refusal
            now = self._clock.now()
            row = store.find_refresh_token(conn, token_hash)
            if row is None:
                return _Refresh.UNKNOWN, None
            if row.used_at is not None:
                spent_ago = (now - parse_timestamp(row.used_at)).total_seconds()
                if spent_ago <= self._refresh_grace:
                    return _Refresh.RACED, row.family_id
                store.revoke_family(conn, row.family_id, now)  # committed: the caller is refused
                return _Refresh.REUSED, row.family_id
            if row.revoked_at is not None:
                return _Refresh.UNKNOWN, None
            if parse_timestamp(row.expires_at) <= now:
                return _Refresh.EXPIRED, None
            user = store.get_user(conn, row.user_id)
            if user is None or not user.active:
                return _Refresh.INACTIVE, None
            if not store.spend_refresh_token(conn, row.id, now):
                return _Refresh.RACED, row.family_id
            store.insert_refresh_token(
                conn,
                token_id=str(uuid.uuid4()),
                user_id=user.id,
                family_id=row.family_id,
                token_hash=hash_refresh_token(new_token),
                expires_at=now + self._refresh_ttl,
                now=now,
            )
            return _Rotated(user, row.family_id)

        outcome = await self._db.write(work)
        if isinstance(outcome, _Rotated):
            return self._pair(outcome.user, outcome.family_id, new_token)
        problem, family_id = outcome
        if problem is _Refresh.REUSED:
            self._forget_sessions()
            security_log.warning(
                "refresh token reused: session %s ended (the token was likely stolen)", family_id
            )
        raise UnauthenticatedError(
            "invalid, expired or already used refresh token", reason="INVALID_REFRESH_TOKEN"
        )

    def _begin_attempt(self, account: str, address: str) -> None:
        """Counts a password check about to be made, or raises ResourceExhaustedError
        (TOO_MANY_ATTEMPTS) while this client must wait."""
        wait = self._throttle.begin(account, address)
        if wait > 0:
            security_log.warning("sign-in attempts from %s throttled for %.0f s", address, wait)
            raise ResourceExhaustedError(
                f"too many failed attempts; try again in {wait:.0f} s",
                retry_after_seconds=wait,
                reason="TOO_MANY_ATTEMPTS",
            )

    def _pair(self, user: User, family_id: str, refresh_token: str) -> TokenPair:
        access = self._tokens.issue(user.id, user.role, family_id)
        return TokenPair(access, refresh_token, self._tokens.ttl_seconds, user)

    # --- signed in -------------------------------------------------------------------------

    async def me(self, caller: Principal) -> User:
        """Raises: NotFoundError (the account is gone)."""
        found = self._db.read_now(lambda conn: store.get_user(conn, caller.user_id))
        if found is None:
            raise _user_not_found(caller.user_id)
        return found

    async def logout(self, caller: Principal, refresh_token: str, all_sessions: bool) -> None:
        """Ends one session (by its refresh token) or all of the caller's.

        Raises: InvalidArgumentError, NotFoundError (SESSION_NOT_FOUND).
        """
        if not all_sessions and not refresh_token:
            raise InvalidArgumentError.of(
                [FieldViolation("refresh_token", "required unless all_sessions is set")]
            )

        def work(conn: Connection) -> list[str]:
            now = self._clock.now()
            if all_sessions:
                return store.revoke_sessions(conn, caller.user_id, now)
            row = store.find_refresh_token(conn, hash_refresh_token(refresh_token))
            if row is None or row.user_id != caller.user_id:
                return []
            return store.revoke_sessions(conn, caller.user_id, now, family_id=row.family_id) or [
                row.family_id
            ]

        ended = await self._db.write(work)
        self._forget_sessions()
        if not ended and not all_sessions:
            raise NotFoundError("no such session of yours", reason="SESSION_NOT_FOUND")

    async def change_password(self, caller: Principal, current: str, new: str, address: str) -> None:
        """Sets a new password and ends the caller's other sessions.

        Raises: InvalidArgumentError, UnauthenticatedError (INVALID_CREDENTIALS).
        """
        user = await self.me(caller)
        personal = (user.username, user.email, user.email.split("@")[0])
        violations = check_password(new, field="new_password", personal=personal)
        if new == current:
            violations.append(FieldViolation("new_password", "must differ from the current password"))
        if not current:
            violations.insert(0, FieldViolation("current_password", "required"))
        if violations:
            raise InvalidArgumentError.of(violations)
        # Guessing the current password with a stolen access token is throttled like sign-in.
        self._begin_attempt(caller.user_id, address)
        stored = self._db.read_now(lambda conn: store.password_hash(conn, caller.user_id))
        if not await self._hasher.verify(current, stored):
            raise _invalid_credentials()
        self._throttle.succeeded(caller.user_id, address)
        hashed = await self._hasher.hash(new)

        def work(conn: Connection) -> None:
            now = self._clock.now()
            store.set_password(conn, caller.user_id, hashed, now)
            store.revoke_sessions(conn, caller.user_id, now, keep_family=caller.session_id)

        await self._db.write(work)
        self._forget_sessions()

    async def sessions(self, caller: Principal) -> list[Session]:
        now = self._clock.now()
        return await self._db.read(
            lambda conn: store.list_sessions(conn, caller.user_id, now, caller.session_id)
        )

    async def revoke_session(self, caller: Principal, session_id: str) -> None:
        """Raises: InvalidArgumentError, NotFoundError (SESSION_NOT_FOUND)."""
        raise_if(check_id("id", session_id))
        ended = await self._db.write(
            lambda conn: store.revoke_sessions(conn, caller.user_id, self._clock.now(), family_id=session_id)
        )
        self._forget_sessions()
        if not ended:
            raise NotFoundError(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND")

    # --- admin -----------------------------------------------------------------------------

    async def list_users(
        self, size: int, token: str, *, role: UserRole | None, active: bool | None, query: str
    ) -> Page[User]:
        """Newest first. Raises: InvalidArgumentError."""
        violations = check_page_size(size)
        if len(query) > 200:
            violations.append(FieldViolation("query", "at most 200 characters"))
        if violations:
            raise InvalidArgumentError.of(violations)
        limit = page_size(size, default=USERS_PAGE[0], maximum=USERS_PAGE[1])
        scope = f"users:{role}:{active}:{query}"
        after = self._page_tokens.after(scope, token)
        rows = await self._db.read(
            lambda conn: store.list_users(
                conn, role=role, active=active, query=query.strip(), after=after, limit=limit + 1
            )
        )
        return self._page_tokens.page(rows, limit, scope, store.user_position)

    async def get_user(self, user_id: str) -> User:
        """Raises: InvalidArgumentError, NotFoundError (USER_NOT_FOUND)."""
        raise_if(check_id("user_id", user_id))
        found = self._db.read_now(lambda conn: store.get_user(conn, user_id))
        if found is None:
            raise _user_not_found(user_id)
        return found

    async def set_role(self, user_id: str, role: UserRole | None) -> User:
        """Raises: InvalidArgumentError, NotFoundError, FailedPreconditionError (LAST_ADMIN)."""
        violations = check_id("user_id", user_id)
        if role is None:
            violations.append(FieldViolation("role", "required: user, moderator, worker or admin"))
        if violations or role is None:
            raise InvalidArgumentError.of(violations)

        def work(conn: Connection) -> User | None:
            current = store.get_user(conn, user_id)
            if current is None:
                return None
            if current.role is UserRole.ADMIN and role is not UserRole.ADMIN and current.active:
                _keep_an_admin(conn)
            return store.update_user(conn, user_id, self._clock.now(), role=role.value)

        updated = await self._db.write(work)
        self._forget_sessions()
        if updated is None:
            raise _user_not_found(user_id)
        return updated

    async def set_active(self, user_id: str, active: bool) -> User:
        """Deactivation ends every session of the account at once.

        Raises: InvalidArgumentError, NotFoundError, FailedPreconditionError (LAST_ADMIN).
        """
        raise_if(check_id("user_id", user_id))

        def work(conn: Connection) -> User | None:
            current = store.get_user(conn, user_id)
            if current is None:
                return None
            now = self._clock.now()
            if not active and current.active:
                if current.role is UserRole.ADMIN:
                    _keep_an_admin(conn)
                store.revoke_sessions(conn, user_id, now)
            return store.update_user(conn, user_id, now, is_active=1 if active else 0)

        updated = await self._db.write(work)
        self._forget_sessions()
        if updated is None:
            raise _user_not_found(user_id)
        if not active:
            security_log.info("account %s deactivated; its sessions were ended", user_id)
        return updated

    async def stats(self) -> UserStats:
        since: datetime = self._clock.now() - timedelta(days=7)
        total, active, by_role, recent = await self._db.read(lambda conn: store.user_stats(conn, since))
        return UserStats(
            total_users=total,
            active_users=active,
            users_by_role={role.value: by_role.get(role.value, 0) for role in UserRole},
            signups_last_7_days=recent,
        )


async def create_user(
    db: Database,
    hasher: PasswordHasher,
    clock: Clock,
    *,
    email: str,
    username: str,
    password: str,
    role: UserRole = UserRole.USER,
) -> User:
    """A new active account (also how `crewdb create-admin` makes the first admin).

    Raises: InvalidArgumentError, AlreadyExistsError (EMAIL_TAKEN, USERNAME_TAKEN).
    """
    email, username = email.strip().lower(), username.strip().lower()
    violations = []
    if not EMAIL.fullmatch(email) or len(email) > EMAIL_MAX_LENGTH:
        violations.append(FieldViolation("email", "a valid email address of at most 254 characters"))
    if not USERNAME.fullmatch(username):
        violations.append(FieldViolation("username", "3 to 32 characters: letters, digits, '.', '_', '-'"))
    violations += check_password(password, personal=(username, email, email.split("@")[0]))
    if violations:
        raise InvalidArgumentError.of(violations)
    hashed = await hasher.hash(password)
    user_id = str(uuid.uuid4())
    return await db.write(
        lambda conn: store.insert_user(
            conn,
            user_id=user_id,
            email=email,
            username=username,
            password_hash=hashed,
            role=role,
            now=clock.now(),
        )
    )


def _keep_an_admin(conn: Connection) -> None:
    if store.active_admins(conn) <= 1:
        raise FailedPreconditionError(
            "that would leave no active admin: make another admin first", reason="LAST_ADMIN"
        )
