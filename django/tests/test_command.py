"""manage.py outbox_relay_sql prints what the relay binary prints, never its own copy."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from . import relay


def sql_of(**options: object) -> str:
    out = io.StringIO()
    call_command("outbox_relay_sql", stdout=out, **options)
    return out.getvalue()


def test_prints_the_relays_setup_sql(settings, relay_bin: Path, tmp_path: Path):
    config = tmp_path / "relay.toml"
    config.write_text(relay.to_toml(relay.minimal_config("postgres://relay@127.0.0.1:5432/app", "app_slot")))
    settings.OUTBOX_RELAY = {**settings.OUTBOX_RELAY, "RELAY_BIN": str(relay_bin), "RELAY_CONFIG": str(config)}
    printed = sql_of()
    direct = relay.run(relay_bin, config, "setup", "--print-sql").stdout
    assert printed == direct
    assert "CREATE PUBLICATION" in printed and '"public"."outbox_relay_outboxevent"' in printed
    assert "pg_create_logical_replication_slot('app_slot', 'pgoutput')" in printed


def test_options_override_the_settings(settings, relay_bin: Path, tmp_path: Path):
    settings.OUTBOX_RELAY = {**settings.OUTBOX_RELAY, "RELAY_BIN": "/nonexistent/outbox-relay"}
    doc = relay.minimal_config("postgres://relay@127.0.0.1:5432/app", "other_slot")
    doc["source"]["mode"] = "listen"
    config = tmp_path / "listen.toml"
    config.write_text(relay.to_toml(doc))
    printed = sql_of(relay_bin=str(relay_bin), config=str(config))
    # Listen mode's SQL is the relay's schema and triggers: whatever the relay says, passed through.
    assert printed == relay.run(relay_bin, config, "setup", "--print-sql").stdout
    assert "capture()" in printed and "CREATE PUBLICATION" not in printed


def test_missing_binary_says_how_to_fix_it(settings):
    settings.OUTBOX_RELAY = {**settings.OUTBOX_RELAY, "RELAY_BIN": "/nonexistent/outbox-relay"}
    with pytest.raises(CommandError, match="RELAY_BIN"):
        sql_of()


def test_relay_errors_are_passed_on(settings, relay_bin: Path, tmp_path: Path):
    config = tmp_path / "bad.toml"
    config.write_text('[source]\ndatabase_url = "postgres://x@127.0.0.1/app"\nsurprise = 1\n')
    settings.OUTBOX_RELAY = {**settings.OUTBOX_RELAY, "RELAY_BIN": str(relay_bin), "RELAY_CONFIG": str(config)}
    with pytest.raises(CommandError, match="surprise"):
        sql_of()
