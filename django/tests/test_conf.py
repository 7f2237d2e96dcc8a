"""Settings read at class-building time: the ledger's schema."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "outbox_relay"],
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "unused"}},
    OUTBOX_RELAY={"SCHEMA": "relay_two"},
)
django.setup()
from django.db import connection
from outbox_relay.models import Delivery
print(connection.ops.quote_name(Delivery._meta.db_table))
"""


def test_schema_setting_moves_the_ledger_table():
    # A fresh interpreter: the model class is built once per process, from the settings of the moment.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '"relay_two"."deliveries"'
