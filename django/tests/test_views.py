"""Channel authorization: the logged-in user's own channel, and no other."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from outbox_relay.views import pusher_signature

pytestmark = pytest.mark.django_db

PUSHER_URL = "/outbox-relay/pusher/auth"
ABLY_URL = "/outbox-relay/ably/token"


@pytest.fixture
def alice():
    return get_user_model().objects.create_user("alice")


@pytest.fixture
def bob():
    return get_user_model().objects.create_user("bob")


@pytest.fixture
def as_alice(alice):
    c = Client()
    c.force_login(alice)
    return c


def test_pusher_signature_matches_the_documented_worked_example():
    # Pusher's worked example for private channels (key 278d425bdf160c739803,
    # secret 7ad3773142a6692b25b8, socket 1234.1234, channel private-foobar):
    # https://pusher.com/docs/channels/library_auth_reference/auth-signatures/
    assert (
        pusher_signature("7ad3773142a6692b25b8", "1234.1234", "private-foobar")
        == "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
    )


def test_pusher_auth_signs_the_users_own_channel(as_alice, alice):
    channel = f"private-user-{alice.pk}"
    r = as_alice.post(PUSHER_URL, {"socket_id": "123.456", "channel_name": channel})
    assert r.status_code == 200
    key, signature = r.json()["auth"].split(":")
    assert key == "test-key"
    # Recomputed here from the documented rule, not with the view's helper.
    expected = hmac.new(b"test-secret", f"123.456:{channel}".encode(), hashlib.sha256).hexdigest()
    assert signature == expected
    assert "no-cache" in r["Cache-Control"] or "max-age=0" in r["Cache-Control"]


def test_pusher_auth_refuses_another_users_channel(as_alice, bob):
    r = as_alice.post(PUSHER_URL, {"socket_id": "123.456", "channel_name": f"private-user-{bob.pk}"})
    assert r.status_code == 403
    assert b"auth" not in r.content


@pytest.mark.parametrize("channel", ["private-user-", "presence-user-{pk}", "private-user-{pk}x", "private-*"])
def test_pusher_auth_refuses_lookalike_channels(as_alice, alice, channel):
    r = as_alice.post(PUSHER_URL, {"socket_id": "1.2", "channel_name": channel.format(pk=alice.pk)})
    assert r.status_code == 403


def test_pusher_auth_refuses_anonymous_and_get(alice):
    anonymous = Client()
    r = anonymous.post(PUSHER_URL, {"socket_id": "1.2", "channel_name": f"private-user-{alice.pk}"})
    assert r.status_code == 403  # not a redirect to a login page: pusher-js reads the status
    c = Client()
    c.force_login(alice)
    assert c.get(PUSHER_URL).status_code == 405


@pytest.mark.parametrize("socket_id", ["", "abc", "1.2:private-user-9", "1.2\n", "1"])
def test_pusher_auth_refuses_malformed_socket_ids(as_alice, alice, socket_id):
    r = as_alice.post(PUSHER_URL, {"socket_id": socket_id, "channel_name": f"private-user-{alice.pk}"})
    assert r.status_code == 400


def test_pusher_auth_needs_the_csrf_token(alice):
    c = Client(enforce_csrf_checks=True)
    c.force_login(alice)
    data = {"socket_id": "1.2", "channel_name": f"private-user-{alice.pk}"}
    assert c.post(PUSHER_URL, data).status_code == 403
    c.get("/admin/login/")  # any page that sets the CSRF cookie
    token = c.cookies["csrftoken"].value
    assert c.post(PUSHER_URL, data, headers={"X-CSRFToken": token}).status_code == 200


def test_channel_name_follows_the_setting(as_alice, alice, settings):
    settings.OUTBOX_RELAY = {**settings.OUTBOX_RELAY, "CHANNEL_NAME": "private-notifications-{recipient}"}
    ok = as_alice.post(PUSHER_URL, {"socket_id": "1.2", "channel_name": f"private-notifications-{alice.pk}"})
    assert ok.status_code == 200
    old = as_alice.post(PUSHER_URL, {"socket_id": "1.2", "channel_name": f"private-user-{alice.pk}"})
    assert old.status_code == 403


def ably_text_to_sign(tr: dict) -> str:
    # Ably's token request spec: keyName, ttl, capability, clientId, timestamp,
    # nonce, each followed by a newline. https://ably.com/docs/api/token-request-spec
    return "".join(f"{tr[k]}\n" for k in ("keyName", "ttl", "capability", "clientId", "timestamp", "nonce"))


def test_ably_token_request_is_signed_for_the_users_own_channel_only(as_alice, alice):
    before = int(time.time() * 1000)
    r = as_alice.get(ABLY_URL)
    assert r.status_code == 200
    tr = r.json()
    assert tr["keyName"] == "testapp.testkey"
    assert "test-ably-secret" not in r.content.decode()  # the secret never leaves the server
    assert json.loads(tr["capability"]) == {f"private-user-{alice.pk}": ["subscribe"]}
    assert tr["clientId"] == str(alice.pk)
    assert before <= tr["timestamp"] <= int(time.time() * 1000)
    assert len(tr["nonce"]) >= 16
    assert tr["ttl"] == 3_600_000
    mac = base64.b64encode(
        hmac.new(b"test-ably-secret", ably_text_to_sign(tr).encode(), hashlib.sha256).digest()
    ).decode()
    assert tr["mac"] == mac
    # A fresh nonce each time: a token request cannot be replayed.
    assert as_alice.get(ABLY_URL).json()["nonce"] != tr["nonce"]


def test_ably_token_refuses_another_users_channel_or_client_id(as_alice, alice, bob):
    assert as_alice.get(ABLY_URL, {"channel": f"private-user-{bob.pk}"}).status_code == 403
    assert as_alice.get(ABLY_URL, {"clientId": str(bob.pk)}).status_code == 403
    # Naming oneself is fine (ably-js sends clientId when it was built with one).
    assert as_alice.get(ABLY_URL, {"clientId": str(alice.pk), "channel": f"private-user-{alice.pk}"}).status_code == 200


def test_ably_token_refuses_anonymous():
    assert Client().get(ABLY_URL).status_code == 403


def test_ably_token_post_needs_the_csrf_token(alice):
    c = Client(enforce_csrf_checks=True)
    c.force_login(alice)
    assert c.post(ABLY_URL).status_code == 403
    c.get("/admin/login/")  # any page that sets the CSRF cookie
    assert c.post(ABLY_URL, headers={"X-CSRFToken": c.cookies["csrftoken"].value}).status_code == 200


def test_only_the_providers_in_use_need_settings(as_alice, alice, settings):
    settings.OUTBOX_RELAY = {"PUSHER": {"KEY": "k", "SECRET": "s"}}  # no Ably
    r = as_alice.post(PUSHER_URL, {"socket_id": "1.2", "channel_name": f"private-user-{alice.pk}"})
    assert r.status_code == 200
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="ABLY"):
        as_alice.get(ABLY_URL)
