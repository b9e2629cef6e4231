"""Queries over users and their refresh-token sessions, within the caller's transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, insert, or_, select, tuple_, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from crewdb.clock import format_timestamp, parse_timestamp
from crewdb.db.conversations import contains
from crewdb.db.schema import refresh_tokens, users
from crewdb.errors import AlreadyExistsError
from crewdb.models import Session, User, UserRole

Position = tuple[str, str]

_USER_COLUMNS = (
    users.c.id,
    users.c.email,
    users.c.username,
    users.c.role,
    users.c.is_active,
    users.c.created_at,
    users.c.updated_at,
    users.c.last_login_at,
)
_ROLES = {role.value: role for role in UserRole}


def _user(row: Any) -> User:
    user_id, email, username, role, active, created, updated, last_login = row[:8]
    return User(
        id=user_id,
        email=email,
        username=username,
        role=_ROLES.get(role, UserRole.USER),
        active=bool(active),
        created_at=parse_timestamp(created),
        updated_at=parse_timestamp(updated),
        last_login_at=parse_timestamp(last_login) if last_login else None,
    )


def user_position(user: User) -> Position:
    return format_timestamp(user.created_at), user.id


def insert_user(
    conn: Connection,
    *,
    user_id: str,
    email: str,
    username: str,
    password_hash: str,
    role: UserRole,
    now: datetime,
) -> User:
    """Raises: AlreadyExistsError (reason EMAIL_TAKEN or USERNAME_TAKEN)."""
    taken = conn.execute(
        select(users.c.email, users.c.username).where(
            or_(users.c.email == email, users.c.username == username)
        )
    ).first()
    if taken is not None:
        raise _taken(email_taken=taken.email == email)
    stamp = format_timestamp(now)
    try:
        conn.execute(
            insert(users).values(
                id=user_id,
                email=email,
                username=username,
                password_hash=password_hash,
                role=role.value,
                is_active=1,
                created_at=stamp,
                updated_at=stamp,
            )
        )
    except IntegrityError as error:  # lost a race with another registration
        raise _taken(email_taken="email" in str(error.orig)) from None
    return User(user_id, email, username, role, True, now, now, None)


def _taken(*, email_taken: bool) -> AlreadyExistsError:
    if email_taken:
        return AlreadyExistsError("that email is already registered", reason="EMAIL_TAKEN")
    return AlreadyExistsError("that username is taken", reason="USERNAME_TAKEN")


_GET_USER = select(*_USER_COLUMNS).where(users.c.id == bindparam("p_id"))


def get_user(conn: Connection, user_id: str) -> User | None:
    row = conn.execute(_GET_USER, {"p_id": user_id}).one_or_none()
    return _user(row) if row else None


def find_for_login(conn: Connection, identifier: str) -> tuple[User, str] | None:
    """The account whose email or username is `identifier` (lower case), with its password hash."""
    row = conn.execute(
        select(*_USER_COLUMNS, users.c.password_hash).where(
            or_(users.c.email == identifier, users.c.username == identifier)
        )
    ).first()
    return (_user(row), row.password_hash) if row else None


def password_hash(conn: Connection, user_id: str) -> str | None:
    return conn.execute(select(users.c.password_hash).where(users.c.id == user_id)).scalar_one_or_none()


def record_login(conn: Connection, user_id: str, now: datetime) -> None:
    conn.execute(update(users).where(users.c.id == user_id).values(last_login_at=format_timestamp(now)))


def set_password(conn: Connection, user_id: str, hashed: str, now: datetime) -> None:
    stamp = format_timestamp(now)
    conn.execute(update(users).where(users.c.id == user_id).values(password_hash=hashed, updated_at=stamp))


def update_user(conn: Connection, user_id: str, now: datetime, **values: Any) -> User | None:
    row = conn.execute(
        update(users)
        .where(users.c.id == user_id)
        .values(updated_at=format_timestamp(now), **values)
        .returning(*_USER_COLUMNS)
    ).one_or_none()
    return _user(row) if row else None


def active_admins(conn: Connection) -> int:
    query = select(func.count()).where(users.c.role == UserRole.ADMIN.value, users.c.is_active == 1)
    return int(conn.execute(query).scalar_one())


def list_users(
    conn: Connection,
    *,
    role: UserRole | None,
    active: bool | None,
    query: str,
    after: Position | None,
    limit: int,
) -> list[User]:
    """Newest first."""
    statement = select(*_USER_COLUMNS).order_by(users.c.created_at.desc(), users.c.id.desc()).limit(limit)
    if role is not None:
        statement = statement.where(users.c.role == role.value)
    if active is not None:
        statement = statement.where(users.c.is_active == (1 if active else 0))
    if query:
        statement = statement.where(or_(contains(users.c.email, query), contains(users.c.username, query)))
    if after is not None:
        statement = statement.where(tuple_(users.c.created_at, users.c.id) < after)
    return [_user(row) for row in conn.execute(statement).all()]


def user_stats(conn: Connection, since: datetime) -> tuple[int, int, dict[str, int], int]:
    """(total, active, count by role, created since `since`)."""
    total, active = conn.execute(select(func.count(), func.coalesce(func.sum(users.c.is_active), 0))).one()
    by_role = {
        row.role: int(row.n)
        for row in conn.execute(select(users.c.role, func.count().label("n")).group_by(users.c.role))
    }
    recent = conn.execute(
        select(func.count()).where(users.c.created_at >= format_timestamp(since))
    ).scalar_one()
    return int(total), int(active), by_role, int(recent)


# --- refresh tokens and sessions ---------------------------------------------------------


def insert_refresh_token(
    conn: Connection,
    *,
    token_id: str,
    user_id: str,
    family_id: str,
    token_hash: str,
    expires_at: datetime,
    now: datetime,
) -> None:
    conn.execute(
        insert(refresh_tokens).values(
            id=token_id,
            user_id=user_id,
            family_id=family_id,
            token_hash=token_hash,
            expires_at=format_timestamp(expires_at),
            created_at=format_timestamp(now),
        )
    )


def find_refresh_token(conn: Connection, token_hash: str) -> Any | None:
    """The row of a refresh token by its hash (id, user_id, family_id, expires_at, revoked_at, used_at)."""
    return conn.execute(
        select(
            refresh_tokens.c.id,
            refresh_tokens.c.user_id,
            func.coalesce(refresh_tokens.c.family_id, refresh_tokens.c.id).label("family_id"),
            refresh_tokens.c.expires_at,
            refresh_tokens.c.revoked_at,
            refresh_tokens.c.used_at,
        ).where(refresh_tokens.c.token_hash == token_hash)
    ).first()


def spend_refresh_token(conn: Connection, token_id: str, now: datetime) -> bool:
    """Marks a live token used; False when another call spent or revoked it first."""
    stamp = format_timestamp(now)
    result = conn.execute(
        update(refresh_tokens)
        .where(refresh_tokens.c.id == token_id, refresh_tokens.c.revoked_at.is_(None))
        .values(used_at=stamp, revoked_at=stamp)
    )
    return result.rowcount == 1


def revoke_sessions(
    conn: Connection,
    user_id: str,
    now: datetime,
    *,
    family_id: str | None = None,
    keep_family: str | None = None,
) -> list[str]:
    """Revokes the live tokens of one session (`family_id`) or of all the user's sessions
    (except `keep_family`); returns the session ids that were live."""
    conditions = [refresh_tokens.c.user_id == user_id, refresh_tokens.c.revoked_at.is_(None)]
    if family_id is not None:
        conditions.append(refresh_tokens.c.family_id == family_id)
    if keep_family is not None:
        conditions.append(refresh_tokens.c.family_id != keep_family)
    families = [
        row[0] for row in conn.execute(select(refresh_tokens.c.family_id).where(*conditions).distinct()).all()
    ]
    if families:
        conn.execute(update(refresh_tokens).where(*conditions).values(revoked_at=format_timestamp(now)))
    return families


def revoke_family(conn: Connection, family_id: str, now: datetime) -> None:
    """Ends a session whatever its user (refresh-token reuse)."""
    conn.execute(
        update(refresh_tokens)
        .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_(None))
        .values(revoked_at=format_timestamp(now))
    )


def list_sessions(conn: Connection, user_id: str, now: datetime, current: str) -> list[Session]:
    """The user's live sessions (a live, unexpired token), most recently used first."""
    stamp = format_timestamp(now)
    live = (
        select(
            refresh_tokens.c.family_id,
            refresh_tokens.c.created_at.label("last_used_at"),
            refresh_tokens.c.expires_at,
        )
        .where(
            refresh_tokens.c.user_id == user_id,
            refresh_tokens.c.revoked_at.is_(None),
            refresh_tokens.c.expires_at > stamp,
        )
        .subquery()
    )
    started = (
        select(refresh_tokens.c.family_id, func.min(refresh_tokens.c.created_at).label("created_at"))
        .where(refresh_tokens.c.user_id == user_id)
        .group_by(refresh_tokens.c.family_id)
        .subquery()
    )
    rows = conn.execute(
        select(live.c.family_id, started.c.created_at, live.c.last_used_at, live.c.expires_at)
        .join(started, started.c.family_id == live.c.family_id)
        .order_by(live.c.last_used_at.desc())
    ).all()
    return [
        Session(
            id=row.family_id,
            created_at=parse_timestamp(row.created_at),
            last_used_at=parse_timestamp(row.last_used_at),
            expires_at=parse_timestamp(row.expires_at),
            current=row.family_id == current,
        )
        for row in rows
    ]


_LIVE_SESSION = (
    select(users.c.role, users.c.is_active)
    .where(users.c.id == bindparam("p_user"))
    .where(
        exists().where(
            and_(
                refresh_tokens.c.family_id == bindparam("p_family"),
                refresh_tokens.c.user_id == users.c.id,
                refresh_tokens.c.revoked_at.is_(None),
            )
        )
    )
)


def live_session_role(conn: Connection, user_id: str, family_id: str) -> UserRole | None:
    """The user's current role when the session is open and the account active; else None."""
    row = conn.execute(_LIVE_SESSION, {"p_user": user_id, "p_family": family_id}).first()
    if row is None or not row.is_active:
        return None
    return _ROLES.get(row.role)
