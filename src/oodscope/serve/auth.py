"""API keys, stored hashed: a key file of ``name:scope:sha256hex`` lines, checked as ``Authorization: Bearer``.

Scopes: ``read`` (score images, read the model card, the monitoring views and the metrics) and
``admin`` (everything ``read`` may, plus reloading a model and resetting an alarm). Only the SHA-256
of a key is kept (the key itself is shown once, by ``oodscope serve --hash-key``); keys are compared
in constant time. Blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SCOPES = ("read", "admin")
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
#: What each scope grants.
GRANTS = {"read": frozenset({"read"}), "admin": frozenset({"read", "admin"})}


class KeyFileError(ValueError):
    """A key file (or one of its lines) is not ``name:scope:sha256hex``."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    scope: str
    sha256: str

    def line(self) -> str:
        return f"{self.name}:{self.scope}:{self.sha256}"


def hash_key(key: str) -> str:
    """The SHA-256 hex digest that a key file stores for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe text)."""
    return "oods_" + secrets.token_urlsafe(32)


def parse_line(line: str, where: str = "key file") -> ApiKey | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = text.split(":")
    if len(parts) != 3:
        raise KeyFileError(f"{where}: expected name:scope:sha256hex, got {len(parts)} field(s)")
    name, scope, digest = (p.strip() for p in parts)
    digest = digest.lower()
    if not _NAME.match(name):
        raise KeyFileError(f"{where}: key name {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ @ -")
    if scope not in SCOPES:
        raise KeyFileError(f"{where}: scope {scope!r} must be one of {', '.join(SCOPES)}")
    if not _HEX.match(digest):
        raise KeyFileError(f"{where}: the third field must be the key's SHA-256 as 64 hex digits "
                           "(oodscope serve --hash-key), not the key itself")
    return ApiKey(name, scope, digest)


def load_keys(path: str | Path) -> list[ApiKey]:
    """The keys of a key file; raises :class:`KeyFileError` naming the line that is wrong."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise KeyFileError(f"cannot read the key file {p}: {err.strerror or err}") from None
    keys = [k for n, line in enumerate(lines, 1) if (k := parse_line(line, f"{p}:{n}")) is not None]
    names = [k.name for k in keys]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise KeyFileError(f"{p}: key name(s) given twice: {', '.join(twice)}")
    return keys


class KeyRing:
    """The keys a service accepts. An empty ring means no authentication (loopback use)."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys = list(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, token: str) -> ApiKey | None:
        """The key whose hash matches ``token`` (every key compared, in constant time), or None."""
        digest = hash_key(token)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    @staticmethod
    def allows(key: ApiKey, scope: str) -> bool:
        return scope in GRANTS.get(key.scope, frozenset())


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


__all__ = ["ApiKey", "GRANTS", "KeyFileError", "KeyRing", "SCOPES", "bearer_token", "hash_key", "load_keys",
           "new_key", "parse_line"]
