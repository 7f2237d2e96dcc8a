"""End to end: Django calls notify() in transaction.atomic(), the real relay binary
streams the commit, and a fake Pusher that checks signatures receives the event.
A rolled-back transaction's notification never arrives.

The relay runs with the package README's route and channels (read from the
README), Pusher for in-app, and the `log` provider in place of Brevo and Twilio:
the log provider still runs each channel's `preferences_query` and
`address_query`, so the README's preference and consent queries are exercised
by the relay itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction

from outbox_relay import notify
from outbox_relay.models import Delivery, NotificationContact, NotificationPreference

from . import relay
from .conftest import database_url
from .fake_pusher import FakePusher

SLOT = "django_e2e"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    # Generous: the machine may be shared with other builds; a pass costs no more for it.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def pusher() -> Iterator[FakePusher]:
    fake = FakePusher(app_id="4242", key="e2e-key", secret="e2e-secret")  # test-only credentials
    yield fake
    fake.stop()


@pytest.fixture
def running_relay(relay_bin: Path, tmp_path: Path, pusher: FakePusher) -> Iterator[Path]:
    readme = relay.readme_relay_toml()
    channels = {name: dict(ch) for name, ch in readme["channels"].items()}
    channels["in_app"]["provider"] = "pusher"
    for name in ("email", "sms", "whatsapp"):
        channels[name]["provider"] = "log"  # keeps the README's queries; prints instead of calling Brevo/Twilio
    config = tmp_path / "relay.toml"
    config.write_text(
        relay.to_toml(
            {
                "source": {"database_url": database_url(), "slot": SLOT, "publication": SLOT},
                "routes": readme["routes"],
                "channels": channels,
                "providers": {
                    "pusher": {"app_id": "4242", "key": "e2e-key", "secret": "e2e-secret", "base_url": pusher.base_url}
                },
                "relay": {"dispatch_poll_ms": 50},
                "metrics": {"listen": ""},
            }
        )
    )
    relay.run(relay_bin, config, "setup")
    stdout = tmp_path / "deliveries.jsonl"
    stderr = tmp_path / "relay.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen([str(relay_bin), "--config", str(config), "run"], stdout=out, stderr=err)
    try:

        def slot_active() -> bool:
            with connection.cursor() as cur:
                cur.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", [SLOT])
                row = cur.fetchone()
            assert proc.poll() is None, stderr.read_text()
            return bool(row and row[0])

        wait_for("the relay to stream from its slot", slot_active)
        yield stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)  # the relay promises a clean stop within 10 s
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        with connection.cursor() as cur:
            # A database with a logical slot cannot be dropped at the end of the run.
            cur.execute("SELECT pg_drop_replication_slot(%s)", [SLOT])
            cur.execute(f'DROP PUBLICATION IF EXISTS "{SLOT}"')
            cur.execute("DELETE FROM outbox_relay.deliveries WHERE source_table = 'public.outbox_relay_outboxevent'")
        assert code == 0, stderr.read_text()


@pytest.mark.django_db(transaction=True)
def test_committed_notifications_arrive_rolled_back_ones_never(running_relay: Path, pusher: FakePusher):
    users = get_user_model().objects
    ada = users.create_user("ada", "ada@example.com")  # e-mail; no SMS consent
    bob = users.create_user("bob", "bob@example.com")  # SMS consent; no order e-mails
    NotificationContact.objects.create(user=bob, phone="+33612345678").set_consent("sms", True)
    NotificationPreference.objects.create(recipient=bob, channel="email", event="order_shipped", enabled=False)

    class Rollback(Exception):
        pass

    with transaction.atomic():
        shipped = notify(ada, "order_shipped", {"title": "Order 7 shipped", "order": 7}, ["in_app", "email", "sms"])
        for_bob = notify(bob, "order_shipped", {"title": "Order 8 shipped", "order": 8}, ["in_app", "email", "sms"])
    with pytest.raises(Rollback), transaction.atomic():
        notify(ada, "rolled_back", {"title": "must never arrive"}, ["in_app", "email"])
        raise Rollback
    # The relay follows commit order: once this later commit is delivered, the
    # rolled-back one would have been delivered before it, had it ever existed.
    # No channels: the route's default (`channels = ["in_app"]` in the README's route).
    welcome = notify(bob, "welcome", {"title": "Welcome"})
    sentinel = notify(ada, "sentinel", {"title": "after the rollback"}, ["in_app"])

    got = wait_for(
        "the sentinel at the fake Pusher",
        lambda: [e for e in pusher.events() if e.name == "sentinel"] and pusher.events(),
    )
    assert not pusher.rejections()  # every call was correctly signed
    assert [e.name for e in got if e.name == "rolled_back"] == []
    by_channel = {(e.channel, e.name): e.data for e in got}
    assert by_channel[(f"private-user-{ada.pk}", "order_shipped")] == shipped.payload
    assert by_channel[(f"private-user-{bob.pk}", "order_shipped")] == for_bob.payload
    assert by_channel[(f"private-user-{ada.pk}", "sentinel")] == sentinel.payload
    assert by_channel[(f"private-user-{bob.pk}", "welcome")] == welcome.payload
    assert len(got) == 4  # once each

    # The ledger, read through the Delivery model, once the relay has decided every row.
    def settled() -> list[Delivery]:
        rows = list(Delivery.objects.filter(source_table="public.outbox_relay_outboxevent").order_by("id"))
        return rows if rows and all(r.status not in ("pending", "sending") for r in rows) and len(rows) == 8 else []

    rows = wait_for("every delivery to be decided", settled)
    outcome = {(r.source_pk, r.channel): (r.status, r.last_error or "") for r in rows}
    ada_pk, bob_pk = str(shipped.pk), str(for_bob.pk)
    assert outcome[(ada_pk, "in_app")] == ("sent", "")
    assert outcome[(ada_pk, "email")] == ("sent", "")
    assert outcome[(ada_pk, "sms")] == ("skipped", "no address or no consent")  # no consent given
    assert outcome[(bob_pk, "in_app")] == ("sent", "")
    assert outcome[(bob_pk, "email")][0] == "skipped"  # bob's preference
    assert outcome[(bob_pk, "email")][1].startswith("preference")
    assert outcome[(bob_pk, "sms")] == ("sent", "")
    assert outcome[(str(sentinel.pk), "in_app")] == ("sent", "")
    assert outcome[(str(welcome.pk), "in_app")] == ("sent", "")
    assert all(r.event != "rolled_back" for r in rows)
    # Each delivery names the committed change it came from (an insert, in the WAL).
    assert {r.operation for r in rows} == {"insert"}
    assert all(r.change_ref and r.change_ref.startswith("wal:") for r in rows)

    # The log provider stands in for Brevo and Twilio: what it printed is what they would have got.
    lines = [json.loads(line) for line in running_relay.read_text().splitlines() if line.strip()]
    printed = {line["delivery_id"] for line in lines}
    sent_by_log = {r.id for r in rows if r.channel in ("email", "sms") and r.status == "sent"}
    assert printed == sent_by_log
    assert all(line["event"] != "rolled_back" for line in lines)
