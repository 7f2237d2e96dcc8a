"""static/outbox_relay/client.js under Node's test runner (tests/js/client.test.mjs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import outbox_relay

HERE = Path(__file__).resolve().parent
# The installed package's copy: the file Django's staticfiles would serve.
CLIENT_JS = Path(outbox_relay.__file__).parent / "static" / "outbox_relay" / "client.js"


def test_client_js():
    node = shutil.which("node")
    assert node, "Node.js is needed to test static/outbox_relay/client.js (apt-get install nodejs)"
    result = subprocess.run(
        [node, "--test", str(HERE / "js" / "client.test.mjs")],
        env={**os.environ, "CLIENT_JS": str(CLIENT_JS)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout
