"""The ledger in the admin: read-only, filters, search by source row, and the
dead-letter actions doing exactly what `outbox-relay dead-letters` does."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client

from outbox_relay import ledger, notify
from outbox_relay.models import Delivery

from . import ledger_rows, relay

CHANGELIST = "/admin/outbox_relay/delivery/"


@pytest.fixture
def admin_client_():
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    c = Client()
    c.force_login(user)
    return c


def ids_listed(response) -> set[int]:
    # The changelist's checkboxes carry the primary keys of the rows shown.
    return {int(v) for v in re.findall(r'name="_selected_action" value="(\d+)"', response.content.decode())}


@pytest.mark.django_db
def test_changelist_filters_and_search(admin_client_):
    a = ledger_rows.insert(source_pk="41", channel="in_app", event="order_shipped", recipient="7", status="sent")
    b = ledger_rows.insert(source_pk="42", channel="email", event="order_shipped", recipient="7", status="dead")
    c = ledger_rows.insert(source_pk="42", channel="sms", event="password_changed", recipient="8", status="failed")
    d = ledger_rows.insert(
        source_table="public.operators_notificationoperateur", source_pk="42", recipient="8", status="skipped"
    )
    get = lambda **q: ids_listed(admin_client_.get(CHANGELIST, q))  # noqa: E731
    assert get() == {a, b, c, d}
    assert get(status__exact="dead") == {b}
    assert get(channel="email") == {b}
    assert get(event="password_changed") == {c}
    assert get(recipient="7") == {a, b}
    # By source row: table#pk, with or without the schema; a key alone; part of a table name.
    assert get(q="outbox_relay_outboxevent#42") == {b, c}
    assert get(q="public.outbox_relay_outboxevent#42") == {b, c}
    assert get(q="42") == {b, c, d}
    assert get(q="notificationoperateur") == {d}
    # Filters combine with the search, and the recipient box keeps both in its form.
    page = admin_client_.get(CHANGELIST, {"q": "42", "status__exact": "failed"}).content.decode()
    assert ids_listed(admin_client_.get(CHANGELIST, {"q": "42", "status__exact": "failed"})) == {c}
    assert 'name="status__exact" value="failed"' in page and 'name="q" value="42"' in page


@pytest.mark.django_db
def test_ledger_is_read_only(admin_client_):
    pk = ledger_rows.insert(status="dead", last_error="boom")
    page = admin_client_.get(CHANGELIST).content.decode()
    assert "/admin/outbox_relay/delivery/add/" not in page
    detail = admin_client_.get(f"{CHANGELIST}{pk}/change/")
    assert detail.status_code == 200
    assert "boom" in detail.content.decode()
    assert 'name="_save"' not in detail.content.decode()
    before = ledger_rows.fetch([pk])
    admin_client_.post(f"{CHANGELIST}{pk}/change/", {"status": "sent"})
    assert admin_client_.post(f"{CHANGELIST}{pk}/delete/", {"post": "yes"}).status_code == 403
    assert ledger_rows.fetch([pk]) == before


@pytest.mark.django_db
def test_actions_need_their_permission():
    staff = get_user_model().objects.create_user("staff", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_delivery"))
    c = Client()
    c.force_login(staff)
    ledger_rows.insert(status="dead")
    page = c.get(CHANGELIST).content.decode()
    assert "retry_dead_letters" not in page and "discard_dead_letters" not in page
    staff.user_permissions.add(Permission.objects.get(codename="retry_delivery"))
    c.force_login(get_user_model().objects.get(pk=staff.pk))
    page = c.get(CHANGELIST).content.decode()
    assert "retry_dead_letters" in page and "discard_dead_letters" not in page


STATUSES = ["dead", "failed", "sent", "pending", "skipped", "discarded", "delivered"]


def _rows_for(source_table: str) -> list[int]:
    past = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)
    return [
        ledger_rows.insert(
            source_table=source_table,
            source_pk=str(i),
            status=status,
            attempts=8,
            last_error=f"error {i}",
            next_attempt_at=past,
            updated_at=past,
        )
        for i, status in enumerate(STATUSES)
    ]


def _comparable(row: dict, before: dict) -> dict:
    """A row with what differs by construction (ids, keys) removed, and times as changed/unchanged."""
    out = {}
    for k, v in row.items():
        if k in ("id", "idempotency_key", "source_table"):
            continue
        out[k] = ("changed" if v != before[k] else "kept") if isinstance(v, dt.datetime) else v
    return out


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("action", "cli"), [("retry_dead_letters", "retry"), ("discard_dead_letters", "discard")])
def test_admin_action_does_exactly_what_the_relay_cli_does(
    admin_client_, relay_bin: Path, relay_config: Path, action: str, cli: str
):
    by_cli, by_admin = f"tests.cli_{cli}", f"tests.admin_{cli}"
    try:
        cli_ids, admin_ids = _rows_for(by_cli), _rows_for(by_admin)
        cli_before, admin_before = ledger_rows.fetch(cli_ids), ledger_rows.fetch(admin_ids)

        out = relay.run(relay_bin, relay_config, "dead-letters", cli, *map(str, cli_ids))
        r = admin_client_.post(CHANGELIST, {"action": action, "_selected_action": admin_ids, "index": 0}, follow=True)
        assert r.status_code == 200

        cli_after, admin_after = ledger_rows.fetch(cli_ids), ledger_rows.fetch(admin_ids)
        for c_row, c_before, a_row, a_before in zip(cli_after, cli_before, admin_after, admin_before, strict=True):
            assert _comparable(a_row, a_before) == _comparable(c_row, c_before), c_row["status"]
        # Only the dead and failed rows moved, and both sides say how many.
        moved = [row["status"] for row, old in zip(cli_after, cli_before, strict=True) if row != old]
        assert len(moved) == 2
        assert "2 delivery(ies)" in out.stdout
        message = r.content.decode()
        assert "2 delivery(ies)" in message and "5 left alone" in message
    finally:
        ledger_rows.delete_source_table(by_cli)
        ledger_rows.delete_source_table(by_admin)


@pytest.mark.django_db
def test_python_api_retries_only_dead_or_failed():
    ids = _rows_for("tests.api")
    assert ledger.retry(ids) == 2
    assert ledger.retry([]) == 0
    assert sorted(Delivery.objects.filter(pk__in=ids).values_list("status", flat=True)) == sorted(
        ["pending", "pending", "sent", "pending", "skipped", "discarded", "delivered"]
    )
    assert Delivery.objects.get(pk=ids[0]).attempts == 0
    assert ledger.discard(ids) == 0  # nothing is dead or failed any more


@pytest.mark.django_db
def test_outbox_event_links_to_its_deliveries(admin_client_):
    user = get_user_model().objects.get(username="root")
    event = notify(user, "order_shipped", {"title": "t"}, channels=["in_app", "email"])
    mine = [
        ledger_rows.insert(source_pk=str(event.pk), channel=ch, status="sent", recipient=str(user.pk))
        for ch in ("in_app", "email")
    ]
    ledger_rows.insert(source_pk=str(event.pk + 1000), status="sent")
    page = admin_client_.get("/admin/outbox_relay/outboxevent/").content.decode()
    link = re.search(r'href="(/admin/outbox_relay/delivery/\?q=[^"]+)">ledger</a>', page)
    assert link, page
    assert ids_listed(admin_client_.get(link.group(1).replace("&amp;", "&"))) == set(mine)
    # The outbox is written by code in transactions, not typed into the admin.
    assert admin_client_.get("/admin/outbox_relay/outboxevent/add/").status_code == 403


@pytest.mark.django_db
def test_the_readmes_grants_are_enough_for_reading_and_the_actions(pg_server):
    """A Django role with exactly the README's GRANT can read the ledger and run both actions."""
    import uuid

    import psycopg
    from django.conf import settings

    from outbox_relay.ledger import _DISCARD, _RETRY

    grant = re.search(r"`(GRANT USAGE ON SCHEMA outbox_relay TO app;.*?)`", relay.README.read_text(), flags=re.S)
    assert grant, "the README's GRANT statement"
    role = f"app_{uuid.uuid4().hex[:8]}"
    host, port = pg_server
    dbname = settings.DATABASES["default"]["NAME"]
    as_admin = f"host={host} port={port} user=postgres dbname={dbname}"
    with psycopg.connect(as_admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(grant.group(1).replace(" TO app;", f" TO {role};"))
    try:
        with psycopg.connect(f"host={host} port={port} user={role} dbname={dbname}", autocommit=True) as conn:
            conn.execute("SELECT id, status, source_table, source_pk FROM outbox_relay.deliveries LIMIT 1")
            for template in (_RETRY, _DISCARD):
                sql = template.format(table='"outbox_relay"."deliveries"').replace("%s", "%(ids)s")
                conn.execute(sql, {"ids": [0]})
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM outbox_relay.deliveries WHERE id = 0")
    finally:
        with psycopg.connect(as_admin, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
