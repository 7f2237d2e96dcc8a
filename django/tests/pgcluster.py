"""A throwaway PostgreSQL cluster for the Python suite, like the Rust suite's (src/demo/embedded_pg.rs).

initdb into a fresh /tmp/outbox-relay-pg-* directory (the prefix .ci/run checks
for leftovers), a server on a free 127.0.0.1 port with wal_level=logical (the
relay's logical mode needs it), trust authentication. `stop()` ends the server
with SIGQUIT (immediate shutdown) and deletes the directory; a watchdog shell
does the same if pytest dies without running its teardown (SIGKILL, a CI
timeout), so no stray postgres outlives the run.

Both initdb and postgres refuse to run as root: as root they run as the
`postgres` system user (created by .ci/run or the Debian package).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _binaries() -> tuple[Path, Path]:
    """$PG_BIN, else the newest /usr/lib/postgresql/*/bin (Debian), else PATH."""
    if os.environ.get("PG_BIN"):
        d = Path(os.environ["PG_BIN"])
        return d / "initdb", d / "postgres"

    def version(p: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in Path(p).parent.parent.name.split("."))
        except ValueError:
            return ()

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        d = Path(found[-1]).parent
        return d / "initdb", d / "postgres"
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        return Path(initdb), Path(postgres)
    raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql, or set PG_BIN")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_WATCHDOG = r"""
read _unused
pid=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -QUIT "$pid"
    i=0
    while [ -e "$1/data/postmaster.pid" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
fi
rm -rf "$1"
"""


class Cluster:
    def __init__(self) -> None:
        initdb, postgres = _binaries()
        self.as_user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as e:
                raise RuntimeError("running as root and no `postgres` user to run PostgreSQL as") from e
            self.as_user = "postgres"
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-relay-pg-", dir="/tmp"))
        if self.as_user:
            shutil.chown(self.dir, self.as_user, self.as_user)
        # EOF on the watchdog's stdin (this process gone, however) stops the server.
        self._watchdog = subprocess.Popen(
            ["sh", "-c", _WATCHDOG, "outbox-relay-pg-watchdog", str(self.dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.data = self.dir / "data"
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0
        try:
            self._run(
                [
                    str(initdb),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-locale",
                ]
            )
            self._start(postgres)
        except BaseException:
            self.stop()
            raise

    def _run(self, cmd: list[str]) -> None:
        result = subprocess.run(cmd, user=self.as_user, cwd=self.dir, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {result.stderr}{result.stdout}")

    def _start(self, postgres: Path) -> None:
        for _ in range(5):  # another process may take the port between probe and bind
            port = _free_port()
            log = open(self.dir / "postgres.log", "ab")
            self.server = subprocess.Popen(
                [
                    str(postgres),
                    "-D",
                    str(self.data),
                    "-p",
                    str(port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.dir}",
                    "-c",
                    "wal_level=logical",
                    "-c",
                    "max_replication_slots=16",
                    "-c",
                    "max_wal_senders=16",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=100",
                ],
                user=self.as_user,
                cwd=self.dir,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
            log.close()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.server.poll() is None:
                if self._ready(port):
                    self.port = port
                    return
                time.sleep(0.05)
            self.server.send_signal(signal.SIGQUIT)
            self.server.wait()
            if "Address already in use" not in (self.dir / "postgres.log").read_text(errors="replace"):
                break
        raise RuntimeError("PostgreSQL did not start:\n" + (self.dir / "postgres.log").read_text(errors="replace"))

    def _ready(self, port: int) -> bool:
        # Like `pg_ctl start -w`: postmaster.pid's 8th line says "ready", then the port answers.
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    def url(self, dbname: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGQUIT)
            self.server.wait(timeout=30)
        self.server = None
        if self._watchdog.poll() is None:
            self._watchdog.kill()
            self._watchdog.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
