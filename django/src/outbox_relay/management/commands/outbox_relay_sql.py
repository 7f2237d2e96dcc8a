"""`manage.py outbox_relay_sql`: the SQL a DBA runs once, as the relay prints it.

The relay binary stays the only source of that SQL (publication, slot, role,
listen-mode triggers): this command runs `outbox-relay --config FILE setup
--print-sql` and passes its output through, so it can never drift from the
relay version actually deployed.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import conf


class Command(BaseCommand):
    help = "Print the SQL the DBA runs once for the relay (outbox-relay setup --print-sql)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--relay-bin",
            default=None,
            help="The outbox-relay binary (default: OUTBOX_RELAY['RELAY_BIN'], else outbox-relay on PATH).",
        )
        parser.add_argument(
            "--config",
            default=None,
            help="The relay's TOML (default: OUTBOX_RELAY['RELAY_CONFIG'], else the relay's own default).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        binary = options["relay_bin"] or conf.relay_bin()
        resolved = shutil.which(binary)
        if resolved is None:
            raise CommandError(
                f"outbox-relay binary {binary!r} not found: install the relay, or set "
                "OUTBOX_RELAY['RELAY_BIN'] or --relay-bin to its path"
            )
        command = [resolved]
        config = options["config"] or conf.relay_config()
        if config:
            command += ["--config", config]
        command += ["setup", "--print-sql"]
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0:
            # The relay's message names the key or file to fix; pass it on as is.
            raise CommandError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}")
        self.stdout.write(result.stdout, ending="")
