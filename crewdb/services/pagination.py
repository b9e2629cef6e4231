"""Page sizes and page tokens: opaque, tamper-evident cursors for keyset pagination."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import TypeVar

from crewdb.errors import FieldViolation, InvalidArgumentError
from crewdb.models import Page

_MAC_BYTES = 16
T = TypeVar("T")


def check_page_size(requested: int, field: str = "page_size") -> list[FieldViolation]:
    """The violation of a negative page size, to report with the request's other problems."""
    return [FieldViolation(field, "must not be negative")] if requested < 0 else []


def page_size(requested: int, *, default: int, maximum: int) -> int:
    """0 means `default`; above `maximum` is clamped; negative means `default` (check first)."""
    return min(max(requested, 0) or default, maximum)


class PageTokens:
    """Signs and checks page tokens.

    A token is the base64url of a JSON position plus an HMAC over it and its scope (which
    listing, and over what), so a token cannot be forged, edited, or replayed on another
    listing.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("page token key must be at least 16 bytes")
        self._key = key

    def encode(self, scope: str, position: tuple[str, str]) -> str:
        payload = json.dumps(position, separators=(",", ":")).encode()
        token = payload + self._mac(scope, payload)
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode()

    def after(self, scope: str, token: str) -> tuple[str, str] | None:
        """The position a listing continues after: None for the first page (no token).

        Raises:
            InvalidArgumentError: (reason INVALID_PAGE_TOKEN) see `decode`.
        """
        return self.decode(scope, token) if token else None

    def page(
        self, rows: list[T], limit: int, scope: str, position: Callable[[T], tuple[str, str]]
    ) -> Page[T]:
        """The first `limit` of `rows` (fetched as limit + 1), with a token for the rest if any."""
        if len(rows) <= limit:
            return Page(rows, "")
        items = rows[:limit]
        return Page(items, self.encode(scope, position(items[-1])))

    def decode(self, scope: str, token: str, *, field: str = "page_token") -> tuple[str, str]:
        """The position in `token`.

        Raises:
            InvalidArgumentError: (reason INVALID_PAGE_TOKEN) the token was not issued for this
                listing by this server, or was altered.
        """
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
            if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(scope, payload)):
                raise ValueError("bad signature")
            position = json.loads(payload)
            if (
                not isinstance(position, list)
                or len(position) != 2
                or not all(isinstance(p, str) for p in position)
            ):
                raise ValueError("bad payload")
        except (ValueError, binascii.Error):
            raise InvalidArgumentError(
                "invalid page token: pass back next_page_token unchanged, with the same request",
                [FieldViolation(field, "not a page token issued for this listing")],
                reason="INVALID_PAGE_TOKEN",
            ) from None
        return position[0], position[1]

    def _mac(self, scope: str, payload: bytes) -> bytes:
        message = scope.encode() + b"\0" + payload
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]
