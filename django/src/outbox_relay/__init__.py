"""Django side of outbox-relay: write notifications in your transaction; the relay delivers them.

`notify()` is importable from here without importing models at package import
time (Django must finish loading apps first), hence the import inside it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import OutboxEvent

__all__ = ["EVENT_ID_KEY", "notify"]

#: Payload key carrying a unique id per notification. Pusher passes no message
#: id to browsers, so this is what `client.js` de-duplicates a rare re-send on.
EVENT_ID_KEY = "event_id"


def notify(
    recipient: Any,
    event: str,
    payload: Mapping[str, Any] | None = None,
    channels: Iterable[str] = (),
    *,
    using: str | None = None,
) -> OutboxEvent:
    """Writes one outbox row for the relay, in the caller's transaction.

    Call it inside the `transaction.atomic()` block that makes the business
    change: if that block rolls back, the row never existed and nothing is sent;
    if it commits, the relay delivers it once per channel. There is deliberately
    no `on_commit` and no signal here: either can lose the notification when the
    process dies between the commit and the callback.

    `recipient` is a user or a user's primary key. `channels` name the relay's
    channels (`[channels.<name>]`); empty means the route's default channels.
    `payload` must be a JSON object; it is what providers receive, so keep
    addresses out of it (the relay looks them up at send time).
    """
    from .models import OutboxEvent

    if not event or len(event) > 64:
        raise ValueError("event must be 1 to 64 characters")
    body = dict(payload or {})  # a copy: the caller's dict is not changed
    for key in body:
        if not isinstance(key, str):
            raise TypeError(f"payload keys must be strings (JSON object keys), got {key!r}")
    if isinstance(channels, str):
        # "email" would otherwise become ["e", "m", "a", "i", "l"].
        raise TypeError("channels must be a list of channel names, not a string")
    channel_list = list(channels)
    for channel in channel_list:
        if not isinstance(channel, str) or not channel:
            raise TypeError(f"each channel must be a non-empty string, got {channel!r}")
    body.setdefault(EVENT_ID_KEY, str(uuid.uuid4()))
    recipient_pk = getattr(recipient, "pk", recipient)
    if recipient_pk is None:
        raise ValueError("recipient has no primary key (unsaved user?)")
    return OutboxEvent.objects.using(using).create(
        recipient_id=recipient_pk, event_type=event, channels=channel_list, payload=body
    )
