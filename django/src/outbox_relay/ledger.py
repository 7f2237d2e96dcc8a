"""The two ledger writes an operator may do from Django, as the relay's CLI does them.

`outbox-relay dead-letters retry ID...` and `... discard ID...` run these same
statements (src/ledger.rs, `retry_dead` and `discard_dead`); the test suite runs
the binary and these functions on identical rows and compares the outcome.
Raw SQL rather than `QuerySet.update()` so that the statement is the relay's
word for word (`now()`, the status guard), not an ORM translation of it.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import connections, router

from .models import Delivery

_RETRY = (
    "UPDATE {table} SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()"
    " WHERE status IN ('dead', 'failed') AND id = ANY(%s)"
)
_DISCARD = (
    "UPDATE {table} SET status = 'discarded', updated_at = now() WHERE status IN ('dead', 'failed') AND id = ANY(%s)"
)


def _execute(template: str, ids: Iterable[int]) -> int:
    id_list = [int(i) for i in ids]
    if not id_list:
        return 0
    alias = router.db_for_write(Delivery)
    connection = connections[alias]
    table = connection.ops.quote_name(Delivery._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(template.format(table=table), [id_list])
        return int(cursor.rowcount)


def retry(ids: Iterable[int]) -> int:
    """Queues dead or failed deliveries again with fresh attempts; returns how many.

    Rows in any other status are left alone (a delivery already sent is never re-sent).
    """
    return _execute(_RETRY, ids)


def discard(ids: Iterable[int]) -> int:
    """Marks dead or failed deliveries discarded: kept for audit, never sent."""
    return _execute(_DISCARD, ids)
