"""notify() writes one outbox row in the caller's transaction, shaped as the relay's route reads it."""

from __future__ import annotations

import json
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction

from outbox_relay import EVENT_ID_KEY, notify
from outbox_relay.models import OutboxEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def user():
    return get_user_model().objects.create_user("ada", "ada@example.com")


def test_row_has_what_the_route_reads(user):
    event = notify(user, "order_shipped", {"title": "Order 7 shipped", "order": 7}, channels=["in_app", "email"])
    with connection.cursor() as cur:
        # Read back with SQL, as the relay sees the table: types matter to its decoder.
        cur.execute(
            "SELECT recipient_id, event_type, channels, payload, pg_typeof(channels)::text, pg_typeof(payload)::text"
            " FROM outbox_relay_outboxevent WHERE id = %s",
            [event.pk],
        )
        recipient_id, event_type, channels, payload, channels_type, payload_type = cur.fetchone()
    assert (recipient_id, event_type, channels) == (user.pk, "order_shipped", ["in_app", "email"])
    assert channels_type == "character varying[]"  # channels_column takes text[] or varchar[]
    assert payload_type == "jsonb"
    payload = json.loads(payload)  # Django's connection leaves jsonb undecoded
    assert payload["title"] == "Order 7 shipped" and payload["order"] == 7
    uuid.UUID(payload[EVENT_ID_KEY])  # one id per notification, for the browser's de-duplication


def test_recipient_may_be_a_primary_key_and_channels_default_to_empty(user):
    event = notify(user.pk, "password_changed")
    event.refresh_from_db()
    assert event.recipient_id == user.pk
    assert event.channels == []  # the route's default channels apply
    assert set(event.payload) == {EVENT_ID_KEY}


def test_a_given_event_id_is_kept_and_the_callers_dict_untouched(user):
    payload = {"event_id": "order-7-shipped"}
    event = notify(user, "order_shipped", payload)
    assert event.payload == {"event_id": "order-7-shipped"}
    assert payload == {"event_id": "order-7-shipped"}
    other = {"title": "x"}
    notify(user, "order_shipped", other)
    assert other == {"title": "x"}


def test_rolled_back_transaction_leaves_no_row(user):
    class Boom(Exception):
        pass

    before = OutboxEvent.objects.count()
    with pytest.raises(Boom), transaction.atomic():
        notify(user, "order_shipped", {"title": "never"})
        assert OutboxEvent.objects.count() == before + 1  # visible inside the transaction
        raise Boom
    assert OutboxEvent.objects.count() == before


def test_no_on_commit_callback_and_no_signal(user, django_capture_on_commit_callbacks):
    from django.db.models.signals import post_save

    received = []

    def listener(**kwargs):
        received.append(kwargs["instance"])

    post_save.connect(listener, sender=OutboxEvent)
    try:
        with django_capture_on_commit_callbacks() as callbacks:
            notify(user, "order_shipped", {"title": "t"})
    finally:
        post_save.disconnect(listener, sender=OutboxEvent)
    # The row is the whole mechanism: nothing is deferred to after the commit.
    assert callbacks == []
    # post_save fires (Django's save does that); notify itself connects no receiver.
    assert len(received) == 1
    assert not post_save.has_listeners(OutboxEvent)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"event": ""}, ValueError),
        ({"event": "x" * 65}, ValueError),
        ({"channels": "email"}, TypeError),
        ({"channels": ["email", ""]}, TypeError),
        ({"payload": {1: "non-string key"}}, TypeError),
    ],
)
def test_bad_arguments_are_refused_before_writing(user, kwargs, error):
    args = {"recipient": user, "event": "order_shipped", **kwargs}
    with pytest.raises(error):
        notify(**args)
    assert not OutboxEvent.objects.exists()


def test_unsaved_user_is_refused():
    with pytest.raises(ValueError, match="primary key"):
        notify(get_user_model()(username="ghost"), "order_shipped")


def test_using_names_the_database(user):
    # For projects with several databases: the row goes where the caller's transaction is.
    event = notify(user, "order_shipped", using="default")
    assert OutboxEvent.objects.using("default").filter(pk=event.pk).exists()
