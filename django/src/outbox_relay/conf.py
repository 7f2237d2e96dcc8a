"""The app's settings, read from ``settings.OUTBOX_RELAY`` (a dict) on every use.

Read on every use rather than once at import so that ``override_settings`` in a
project's tests works, and so a missing secret fails the request that needs it,
not the whole site at start-up. The one exception is the ledger's schema, which
the unmanaged ``Delivery`` model needs when its class is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

#: The relay's default `channels.<name>.channel_name`. The auth views must build
#: the same name the relay publishes to, so both default to it.
DEFAULT_CHANNEL_NAME = "private-user-{recipient}"
#: The relay's default `relay.schema`.
DEFAULT_SCHEMA = "outbox_relay"


def _raw() -> dict[str, Any]:
    value = getattr(settings, "OUTBOX_RELAY", {}) or {}
    if not isinstance(value, dict):
        raise ImproperlyConfigured("settings.OUTBOX_RELAY must be a dict")
    return value


@dataclass(frozen=True)
class PusherKeys:
    key: str
    secret: str


@dataclass(frozen=True)
class AblyKey:
    key_name: str  # "<app id>.<key id>", public
    secret: str  # the part after ":", never leaves the server


def channel_name_template() -> str:
    """`CHANNEL_NAME`: must equal the relay's `channels.<name>.channel_name`."""
    template = str(_raw().get("CHANNEL_NAME", DEFAULT_CHANNEL_NAME))
    if "{recipient}" not in template:
        raise ImproperlyConfigured("OUTBOX_RELAY['CHANNEL_NAME'] must contain {recipient}")
    return template


def channel_for(recipient_pk: object) -> str:
    """The provider channel the relay publishes a recipient's events to."""
    return channel_name_template().replace("{recipient}", str(recipient_pk))


def pusher_keys() -> PusherKeys:
    raw = _raw().get("PUSHER") or {}
    key, secret = raw.get("KEY"), raw.get("SECRET")
    if not key or not secret:
        raise ImproperlyConfigured("OUTBOX_RELAY['PUSHER'] needs KEY and SECRET (from the Pusher dashboard)")
    return PusherKeys(key=str(key), secret=str(secret))


def ably_key() -> AblyKey:
    api_key = str((_raw().get("ABLY") or {}).get("API_KEY") or "")
    # Ably API keys are "<app id>.<key id>:<key secret>".
    name, sep, secret = api_key.partition(":")
    if not sep or "." not in name or not secret:
        raise ImproperlyConfigured("OUTBOX_RELAY['ABLY']['API_KEY'] must look like 'appid.keyid:secret'")
    return AblyKey(key_name=name, secret=secret)


def ably_token_ttl_ms() -> int:
    # Ably's own default TTL is 60 minutes; the client asks again before expiry.
    return int((_raw().get("ABLY") or {}).get("TOKEN_TTL_MS", 60 * 60 * 1000))


def schema() -> str:
    return str(_raw().get("SCHEMA", DEFAULT_SCHEMA))


def relay_bin() -> str:
    """The relay binary for `manage.py outbox_relay_sql` (a path, or a name on PATH)."""
    return str(_raw().get("RELAY_BIN", "outbox-relay"))


def relay_config() -> str | None:
    """The relay's TOML file; None lets the relay use its own default (env or relay.toml)."""
    value = _raw().get("RELAY_CONFIG")
    return str(value) if value else None
