"""Ledger rows for admin and action tests, written straight into the relay's table.

The relay's schema comes from `outbox-relay migrate`, not from here, and may
gain columns: any NOT NULL column without a default that a test does not set is
filled with a placeholder of its type, so these helpers follow the schema.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.db import connection

TABLE = '"outbox_relay"."deliveries"'

_PLACEHOLDER = {
    "text": lambda: uuid.uuid4().hex,  # unique, in case the column is a key
    "character varying": lambda: uuid.uuid4().hex,
    "jsonb": lambda: "{}",
    "pg_lsn": lambda: "0/16B3748",
    "timestamp with time zone": lambda: "2026-11-26T10:00:00Z",
    "integer": lambda: 0,
    "bigint": lambda: 0,
    "smallint": lambda: 0,
    "boolean": lambda: False,
}


def _required_columns() -> dict[str, str]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'outbox_relay' AND table_name = 'deliveries'"
            " AND is_nullable = 'NO' AND column_default IS NULL AND is_identity = 'NO'"
        )
        return dict(cur.fetchall())


def insert(**values: Any) -> int:
    """Inserts one delivery; returns its id. Defaults: an in_app delivery, pending."""
    row: dict[str, Any] = {
        "source_table": "public.outbox_relay_outboxevent",
        "source_pk": "1",
        "channel": "in_app",
        "event": "order_shipped",
        "recipient": "1",
        "payload": {"title": "t"},
        "committed_at": "2026-11-26T10:00:00Z",
        **values,
    }
    for column, data_type in _required_columns().items():
        if column not in row:
            row[column] = _PLACEHOLDER[data_type]()
    if isinstance(row.get("payload"), dict):
        row["payload"] = json.dumps(row["payload"])
    columns = ", ".join(row)
    marks = ", ".join(["%s"] * len(row))
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {TABLE} ({columns}) VALUES ({marks}) RETURNING id", list(row.values()))
        return int(cur.fetchone()[0])


def fetch(ids: list[int]) -> list[dict[str, Any]]:
    """Every column of these rows, in the order of `ids`."""
    with connection.cursor() as cur:
        cur.execute(f"SELECT * FROM {TABLE} WHERE id = ANY(%s)", [ids])
        names = [d.name for d in cur.description]
        by_id = {r[names.index("id")]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}
    return [by_id[i] for i in ids]


def delete_source_table(source_table: str) -> None:
    with connection.cursor() as cur:
        cur.execute(f"DELETE FROM {TABLE} WHERE source_table = %s", [source_table])
