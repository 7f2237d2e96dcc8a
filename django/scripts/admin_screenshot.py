"""Takes docs/django-admin.png: the deliveries admin page over a ledger the real relay wrote.

    cd django && python -m scripts.admin_screenshot [../docs/django-admin.png]

Needs what the test suite needs (PostgreSQL server binaries, the relay binary)
plus Debian's chromium. A throwaway cluster, the test project's settings, the
package README's route and channels; in-app goes to a Pusher address where
nothing listens with max_attempts = 1, so those deliveries end up dead letters
and the page shows the retry action's material. The page is rendered by Django
and photographed by headless Chromium; staff login is replaced by a middleware
defined here, for this script only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"

from tests import relay
from tests.pgcluster import Cluster

SLOT = "screenshot"


class AutoLogin:
    """Logs every request in as the superuser `root` (screenshots only)."""

    def __init__(self, get_response):  # type: ignore[no-untyped-def]
        self.get_response = get_response

    def __call__(self, request):  # type: ignore[no-untyped-def]
        from django.contrib.auth import get_user_model

        request.user = get_user_model().objects.get(username="root")
        return self.get_response(request)


def wait_for(check, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError("timed out")


def main(out: Path) -> None:
    cluster = Cluster()
    work = Path(tempfile.mkdtemp(prefix="outbox-relay-screenshot-"))
    try:
        with psycopg.connect(f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE screenshot")
        url = cluster.url("screenshot")

        import django
        from django.conf import settings

        settings.DATABASES["default"].update(PORT=str(cluster.port), NAME="screenshot")
        settings.MIDDLEWARE = [*settings.MIDDLEWARE, "scripts.admin_screenshot.AutoLogin"]
        settings.DEBUG = False
        django.setup()
        from django.contrib.auth import get_user_model
        from django.core.management import call_command
        from django.db import connection, transaction

        from outbox_relay import notify
        from outbox_relay.models import Delivery, NotificationContact, NotificationPreference

        call_command("migrate", verbosity=0)
        from django.contrib import admin

        admin.site.enable_nav_sidebar = False  # the ledger's columns need the width
        readme = relay.readme_relay_toml()
        channels = {name: dict(ch) for name, ch in readme["channels"].items()}
        channels["in_app"].update(provider="pusher", max_attempts=1)
        for name in ("email", "sms", "whatsapp"):
            channels[name]["provider"] = "log"
        config = work / "relay.toml"
        config.write_text(
            relay.to_toml(
                {
                    "source": {"database_url": url, "slot": SLOT, "publication": SLOT},
                    "routes": readme["routes"],
                    "channels": channels,
                    # Port 9 (discard): nothing listens, every call is refused.
                    "providers": {
                        "pusher": {"app_id": "1", "key": "k", "secret": "s", "base_url": "http://127.0.0.1:9"}
                    },
                    "metrics": {"listen": ""},
                }
            )
        )
        binary = relay.relay_binary()
        relay.run(binary, config, "migrate")
        relay.run(binary, config, "setup")
        proc = subprocess.Popen(
            [str(binary), "--config", str(config), "run"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:

            def slot_active() -> bool:
                with connection.cursor() as cur:
                    cur.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", [SLOT])
                    row = cur.fetchone()
                return bool(row and row[0])

            wait_for(slot_active)
            users = get_user_model().objects
            ada = users.create_user("ada", "ada@example.com")
            bob = users.create_user("bob", "bob@example.com")
            chloe = users.create_user("chloe", "chloe@example.com")
            NotificationContact.objects.create(user=bob, phone="+33612345678").set_consent("sms", True)
            NotificationPreference.objects.create(recipient=bob, channel="email", event="order_shipped", enabled=False)
            with transaction.atomic():
                notify(ada, "order_shipped", {"title": "Order 1042 shipped", "order": 1042}, ["in_app", "email", "sms"])
                notify(bob, "order_shipped", {"title": "Order 1043 shipped", "order": 1043}, ["in_app", "email", "sms"])
            notify(chloe, "password_changed", {"title": "Your password was changed"}, ["email"])
            notify(ada, "invoice_ready", {"title": "Invoice 77 is ready", "invoice": 77}, ["email", "in_app"])
            wait_for(
                lambda: (
                    Delivery.objects.count() == 9
                    and not Delivery.objects.filter(status__in=["pending", "sending"]).exists()
                )
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
            with connection.cursor() as cur:
                cur.execute("SELECT pg_drop_replication_slot(%s)", [SLOT])
        users.create_superuser("root", "root@example.com", "unused")

        from django.contrib.staticfiles.handlers import StaticFilesHandler
        from django.core.wsgi import get_wsgi_application

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = make_server("127.0.0.1", port, StaticFilesHandler(get_wsgi_application()), handler_class=Quiet)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            subprocess.run(
                [
                    "chromium",
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    f"--user-data-dir={work / 'chromium'}",
                    "--hide-scrollbars",
                    "--window-size=1800,1000",
                    f"--screenshot={out.resolve()}",
                    f"http://127.0.0.1:{port}/admin/outbox_relay/delivery/",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        finally:
            server.shutdown()
        print(f"wrote {out}")
    finally:
        from django.db import connections

        connections.close_all()
        cluster.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../docs/django-admin.png"))
