"""What Django writes (OutboxEvent), what the relay reads at send time
(NotificationPreference, NotificationContact) and what the relay writes (Delivery).

Table and column names here are part of the contract with the relay's TOML: the
package README shows the route and the queries that read them, and the test
suite runs those exact queries (and the relay itself) against these tables.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from . import conf

#: Value of NotificationPreference.event meaning "every event on this channel".
ANY_EVENT = "*"

#: Consent is asked per channel for these; e-mail goes to the user's address.
CONSENT_CHANNELS = ("sms", "whatsapp")


class OutboxEvent(models.Model):
    """One notification, written in the same transaction as the business change.

    The relay's route reads `recipient_id`, `event_type`, `channels` (text[]) and
    `payload` (jsonb) from the insert; nothing ever updates the row.
    """

    recipient = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="outbox_events")
    event_type = models.CharField(max_length=64)
    # varchar[]: the relay's channels_column takes text[] or varchar[]. Empty means
    # "the route's default channels".
    channels = ArrayField(models.CharField(max_length=32), default=list, blank=True)
    # jsonb; always an object (the relay records a non-object payload as failed).
    payload = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ("-id",)
        verbose_name = "outbox event"

    def __str__(self) -> str:
        return f"{self.event_type} → {self.recipient_id} {self.channels}"


class NotificationPreferenceQuerySet(models.QuerySet["NotificationPreference"]):
    def wants(self, recipient: Any, channel: str, event: str) -> bool:
        """What the README's `preferences_query` answers, for Django's own pages.

        The exact event's row wins over the channel-wide `*` row; no row means yes.
        """
        rows = self.filter(recipient=recipient, channel=channel, event__in=(event, ANY_EVENT))
        by_event = {p.event: p.enabled for p in rows}
        if event in by_event:
            return by_event[event]
        return by_event.get(ANY_EVENT, True)


class NotificationPreference(models.Model):
    """A user's on/off switch for one event (or every event: `*`) on one channel."""

    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notification_preferences"
    )
    channel = models.CharField(max_length=32)  # the relay's channel name: email, sms, ...
    event = models.CharField(max_length=64, help_text="An event name, or * for every event on the channel.")
    enabled = models.BooleanField(default=True)

    objects = NotificationPreferenceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["recipient", "channel", "event"], name="outbox_relay_pref_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.recipient_id} {self.channel}/{self.event}: {'on' if self.enabled else 'off'}"


e164 = RegexValidator(r"^\+[1-9][0-9]{1,14}$", "Use the E.164 form, e.g. +33612345678.")


class NotificationContact(models.Model):
    """A phone number and the consents to use it, per channel, with when they were given.

    The relay's `address_query` for SMS and WhatsApp reads `phone` only where the
    channel's consent is true, so withdrawing consent takes effect for anything
    not yet sent, including notifications already written.
    """

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notification_contact")
    phone = models.CharField(max_length=16, blank=True, validators=[e164])
    sms_opt_in = models.BooleanField(default=False)
    sms_opt_in_at = models.DateTimeField(null=True, blank=True)
    whatsapp_opt_in = models.BooleanField(default=False)
    whatsapp_opt_in_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"contact of {self.user_id}"

    def set_consent(self, channel: str, given: bool) -> None:
        """Records a consent given or withdrawn now (the time is the proof); saves."""
        if channel not in CONSENT_CHANNELS:
            raise ValueError(f"consent is kept for {CONSENT_CHANNELS}, not {channel!r}")
        setattr(self, f"{channel}_opt_in", given)
        setattr(self, f"{channel}_opt_in_at", timezone.now())
        self.save(update_fields=[f"{channel}_opt_in", f"{channel}_opt_in_at"])


class DeliveryStatus(models.TextChoices):
    # The relay's statuses (README, "The ledger").
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    BOUNCED = "bounced"
    FAILED = "failed"
    DEAD = "dead"
    SKIPPED = "skipped"
    DISCARDED = "discarded"


class Delivery(models.Model):
    """The relay's ledger (`<schema>.deliveries`), read-only: only the relay writes it,
    except the two operator actions in `outbox_relay.ledger`.

    Only the columns Django shows are mapped; this class is the one place to
    follow a ledger change.
    """

    id = models.BigIntegerField(primary_key=True)
    source_table = models.TextField()
    source_pk = models.TextField()
    channel = models.TextField()
    event = models.TextField()
    # Which committed change made this delivery (relay migration 006): insert, update or
    # delete, and wal:<commit LSN>#<n> (logical mode) or log:<id> (listen mode).
    operation = models.TextField(null=True)  # noqa: DJ001 - mirrors the relay's nullable column
    change_ref = models.TextField(null=True)  # noqa: DJ001 - mirrors the relay's nullable column
    recipient = models.TextField(null=True)  # noqa: DJ001 - mirrors the relay's nullable column
    payload = models.JSONField()
    status = models.TextField(choices=DeliveryStatus.choices)
    attempts = models.IntegerField()
    provider = models.TextField(null=True)  # noqa: DJ001 - mirrors the relay's nullable column
    provider_message_id = models.TextField(null=True)  # noqa: DJ001 - mirrors the relay's nullable column
    last_error = models.TextField(null=True)  # noqa: DJ001 - mirrors the relay's nullable column
    committed_at = models.DateTimeField()
    created_at = models.DateTimeField()
    next_attempt_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        # Django wraps db_table in double quotes, so this becomes "schema"."deliveries".
        db_table = f'{conf.schema()}"."deliveries'
        ordering = ("-id",)
        verbose_name_plural = "deliveries"
        # Never added, changed or deleted from Django; viewed, retried, discarded.
        default_permissions = ("view",)
        permissions = [
            ("retry_delivery", "Can queue dead or failed deliveries again"),
            ("discard_delivery", "Can discard dead or failed deliveries"),
        ]

    def __str__(self) -> str:
        return f"#{self.id} {self.source_table}#{self.source_pk} → {self.channel}: {self.status}"
