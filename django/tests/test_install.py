"""The package README's install steps, followed literally in a fresh venv and a fresh
`django-admin startproject`: pip install, the settings and urls blocks, migrate,
outbox_relay_sql. Only the database (PostgreSQL instead of startproject's SQLite)
is added by the test, as the README says the app needs PostgreSQL.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from . import relay


def readme_python_block(first_line: str) -> str:
    blocks = [b for b in relay.readme_blocks("python") if b.startswith(first_line)]
    assert len(blocks) == 1, f"the README has no single python block starting with {first_line!r}"
    return blocks[0]


def readme_commands() -> tuple[list[str], list[str]]:
    """(the pip install line, the manage.py lines) of the README's Install section."""
    section = relay.README.read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"^```sh\n(.*?)^```", section, flags=re.S | re.M):
        lines += [line.split("#", 1)[0].strip() for line in block.splitlines()]
    lines = [line for line in lines if line]
    pip = [line for line in lines if line.startswith("pip install")]
    manage = [line for line in lines if line.startswith("python manage.py")]
    assert len(pip) == 1 and manage, lines
    return pip, manage


@pytest.fixture
def install_db(pg_server: tuple[str, int]):
    host, port = pg_server
    name = f"install_{uuid.uuid4().hex[:8]}"
    admin = f"host={host} port={port} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield host, port, name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_pip_install_into_a_fresh_startproject(tmp_path: Path, install_db, relay_bin: Path):
    host, port, dbname = install_db
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV")},
        # The README's `outbox-relay` on PATH: the binary cargo built.
        "PATH": f"{bin_dir}:{relay_bin.parent}:{os.environ['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }

    def sh(command: list[str], cwd: Path) -> str:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    pip_line, manage_lines = readme_commands()
    # `pip install ./django ...` is written for the repository root.
    sh([str(bin_dir / "pip"), "-q", *shlex.split(pip_line[0])[1:]], relay.REPO)

    site = tmp_path / "site"
    site.mkdir()
    sh([str(bin_dir / "django-admin"), "startproject", "mysite", str(site)], tmp_path)
    settings_py = site / "mysite" / "settings.py"
    settings_py.write_text(
        settings_py.read_text()
        + "\n"
        + readme_python_block("# settings.py")
        + f"\nDATABASES = {{'default': {{'ENGINE': 'django.db.backends.postgresql', 'NAME': '{dbname}',"
        f" 'USER': 'postgres', 'HOST': '{host}', 'PORT': '{port}'}}}}\n"
    )
    urls_py = site / "mysite" / "urls.py"
    urls_py.write_text(urls_py.read_text() + "\n" + readme_python_block("# urls.py"))
    url = f"postgres://postgres@{host}:{port}/{dbname}"
    (site / "relay.toml").write_text(relay.to_toml(relay.minimal_config(url, "install_slot")))

    python = str(bin_dir / "python")
    outputs = {line: sh([python, *shlex.split(line)[1:]], site) for line in manage_lines}
    assert "Applying outbox_relay.0001_initial... OK" in outputs["python manage.py migrate"]
    sql = outputs["python manage.py outbox_relay_sql"]
    assert "CREATE PUBLICATION" in sql and "outbox_relay_outboxevent" in sql

    # The shipped migrations match the models, and the pieces the README names are wired.
    sh([python, "manage.py", "makemigrations", "--check", "--dry-run", "outbox_relay"], site)
    sh([python, "manage.py", "check"], site)
    assert sh([python, "manage.py", "findstatic", "outbox_relay/client.js"], site).strip()
    probe = (
        "from django.contrib.auth.models import User\n"
        "from django.db import transaction\n"
        "from django.urls import reverse\n"
        "from outbox_relay import notify\n"
        "from outbox_relay.models import OutboxEvent\n"
        "u = User.objects.create_user('ada')\n"
        "with transaction.atomic():\n"
        "    notify(u, 'order_shipped', {'title': 't'}, channels=['in_app'])\n"
        "print(OutboxEvent.objects.count(), reverse('outbox_relay:pusher-auth'), reverse('outbox_relay:ably-token'),\n"
        "      reverse('admin:outbox_relay_delivery_changelist'))\n"
    )
    out = sh([python, "manage.py", "shell", "-c", probe], site)
    # The last line: Django 5.2+ shell first says how many objects it imported.
    assert out.strip().splitlines()[-1].split() == [
        "1",
        "/outbox-relay/pusher/auth",
        "/outbox-relay/ably/token",
        "/admin/outbox_relay/delivery/",
    ]
