"""Tokens: signed JWT access tokens, and opaque refresh tokens stored only as hashes."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from jose import jwt
from jose.exceptions import JWTError

from crewdb.errors import UnauthenticatedError
from crewdb.models import UserRole

ALGORITHM = "HS256"
ISSUER = "crewdb"
AUDIENCE = "crewdb.v1"
ACCESS = "access"
# crewdb's tokens are about 400 characters; anything much longer was not made here.
MAX_TOKEN_LENGTH = 2048
# Verified tokens remembered so that a client sending the same token again skips the
# signature check; entries still expire with their token.
_CACHE_SIZE = 10_000


# python-jose checks `aud`, `iss`, `exp` only when a token carries them; crewdb's tokens always
# do, so one without them was not made here.
_REQUIRED_CLAIMS = {
    "require_aud": True,
    "require_iss": True,
    "require_exp": True,
    "require_iat": True,
    "require_sub": True,
    "require_jti": True,
}


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    role: UserRole
    session_id: str
    expires_at: float


def new_refresh_token() -> str:
    """256 random bits, URL-safe."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_refresh_token(token: str) -> str:
    """SHA-256: enough for a 256-bit random secret (no guessing to slow down), and fast to look up."""
    return hashlib.sha256(token.encode()).hexdigest()


class AccessTokens:
    """Issues and checks access tokens: HS256 only, with issuer, audience and type pinned."""

    def __init__(self, secret: str, ttl_seconds: int) -> None:
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        self._verified: OrderedDict[str, AccessClaims] = OrderedDict()

    def issue(self, user_id: str, role: UserRole, session_id: str) -> str:
        now = int(time.time())
        claims = {
            "sub": user_id,
            "role": role.value,
            "sid": session_id,
            "typ": ACCESS,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + self.ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> AccessClaims:
        """The claims of a valid access token.

        Raises:
            UnauthenticatedError: bad signature, other algorithm (`none` included), expired,
                wrong issuer, audience or type, or malformed.
        """
        if len(token) > MAX_TOKEN_LENGTH:
            raise UnauthenticatedError("invalid or expired access token")
        cached = self._verified.get(token)
        if cached is not None:
            if cached.expires_at > time.time():
                return cached
            del self._verified[token]
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options=_REQUIRED_CLAIMS,
            )
            if claims.get("typ") != ACCESS:
                raise JWTError("not an access token")
            verified = AccessClaims(
                user_id=str(claims["sub"]),
                role=UserRole(claims["role"]),
                session_id=str(claims["sid"]),
                expires_at=float(claims["exp"]),
            )
        except Exception:  # noqa: BLE001 - any token that does not verify (JWTError, or a header
            # nested past the recursion limit, or absurd claims) is simply not a valid token
            raise UnauthenticatedError("invalid or expired access token") from None
        self._verified[token] = verified
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return verified
