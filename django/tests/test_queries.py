"""The package README's relay queries, run against the models' real tables.

They are read out of the README (not copied here), prepared the way the relay
prepares them (PostgreSQL infers $1 and $2 types from the tables), and compared
with what the models promise: `NotificationPreference.objects.wants()` and the
contact's consents.
"""

from __future__ import annotations

import itertools

import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from outbox_relay.models import NotificationContact, NotificationPreference

from . import relay

pytestmark = pytest.mark.django_db

CHANNELS = relay.readme_relay_toml()["channels"]


def run_prepared(sql: str, *params: object) -> object:
    """One value, or None for no row — what the relay's lookup gets."""
    with connection.cursor() as cur:
        cur.execute(f"PREPARE readme_query AS {sql}")
        try:
            placeholders = ", ".join(["%s"] * len(params))
            cur.execute(f"EXECUTE readme_query({placeholders})", list(params))
            row = cur.fetchone()
        finally:
            cur.execute("DEALLOCATE readme_query")
    return None if row is None else row[0]


def test_readme_documents_every_channel_the_models_serve():
    assert {"in_app", "email", "sms", "whatsapp"} <= set(CHANNELS)
    for name in ("email", "sms"):
        assert "outbox_relay_notificationpreference" in CHANNELS[name]["preferences_query"]
    for name in ("sms", "whatsapp"):
        assert "outbox_relay_notificationcontact" in CHANNELS[name]["address_query"]


@pytest.mark.parametrize("channel", ["email", "sms"])
def test_preferences_query_agrees_with_wants(channel):
    user = get_user_model().objects.create_user("pref")
    sql = CHANNELS[channel]["preferences_query"]
    events = ["order_shipped", "password_changed"]
    # Every combination of: no row / on / off, for the event and for "*".
    for specific, wildcard in itertools.product([None, True, False], repeat=2):
        NotificationPreference.objects.filter(recipient=user).delete()
        if specific is not None:
            NotificationPreference.objects.create(recipient=user, channel=channel, event=events[0], enabled=specific)
        if wildcard is not None:
            NotificationPreference.objects.create(recipient=user, channel=channel, event="*", enabled=wildcard)
        # Another channel's switch must not leak into this one.
        NotificationPreference.objects.create(recipient=user, channel="other", event=events[0], enabled=False)
        for event in events:
            expected = NotificationPreference.objects.wants(user, channel, event)
            assert run_prepared(sql, user.pk, event) is expected, (specific, wildcard, event)
    # The exact event wins over "*", and no row at all means yes.
    NotificationPreference.objects.filter(recipient=user).delete()
    NotificationPreference.objects.create(recipient=user, channel=channel, event="*", enabled=False)
    NotificationPreference.objects.create(recipient=user, channel=channel, event=events[0], enabled=True)
    assert run_prepared(sql, user.pk, events[0]) is True
    assert run_prepared(sql, user.pk, events[1]) is False
    assert run_prepared(sql, user.pk + 1000, events[1]) is True


@pytest.mark.parametrize("channel", ["sms", "whatsapp"])
def test_address_query_needs_consent(channel):
    user = get_user_model().objects.create_user("phone")
    sql = CHANNELS[channel]["address_query"]
    assert run_prepared(sql, user.pk) is None  # no contact row
    contact = NotificationContact.objects.create(user=user, phone="+33612345678")
    assert run_prepared(sql, user.pk) is None  # no consent yet
    contact.set_consent(channel, True)
    contact.refresh_from_db()
    assert getattr(contact, f"{channel}_opt_in_at") is not None  # when it was given is kept
    assert run_prepared(sql, user.pk) == "+33612345678"
    other = "whatsapp" if channel == "sms" else "sms"
    assert run_prepared(CHANNELS[other]["address_query"], user.pk) is None  # consents are per channel
    contact.set_consent(channel, False)
    assert run_prepared(sql, user.pk) is None


def test_email_address_query_reads_the_user():
    active = get_user_model().objects.create_user("mail", "mail@example.com")
    inactive = get_user_model().objects.create_user("gone", "gone@example.com", is_active=False)
    no_mail = get_user_model().objects.create_user("nomail")
    sql = CHANNELS["email"]["address_query"]
    assert run_prepared(sql, active.pk) == "mail@example.com"
    assert run_prepared(sql, inactive.pk) is None
    assert run_prepared(sql, no_mail.pk) is None


def test_consent_is_only_for_phone_channels():
    contact = NotificationContact(user=get_user_model().objects.create_user("c"))
    with pytest.raises(ValueError, match="consent"):
        contact.set_consent("email", True)


def test_phone_must_be_e164():
    from django.core.exceptions import ValidationError

    contact = NotificationContact(user=get_user_model().objects.create_user("e"), phone="06 12 34 56 78")
    with pytest.raises(ValidationError):
        contact.full_clean()
    contact.phone = "+33612345678"
    contact.full_clean()
