"""Pusher's HTTP API on 127.0.0.1, checking what Pusher checks, for the end-to-end test.

Only `POST /apps/{app_id}/batch_events`. The request signature is recomputed
from Pusher's documented rules, independently of the relay's code:
https://pusher.com/docs/channels/library_auth_reference/rest-api/#authentication
Accepted events and refusals are recorded for the test to inspect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass
class Event:
    channel: str
    name: str
    data: Any


@dataclass
class Record:
    events: list[Event] = field(default_factory=list)
    rejections: list[tuple[int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakePusher:
    def __init__(self, app_id: str, key: str, secret: str) -> None:
        self.app_id, self.key, self.secret = app_id, key, secret
        self.record = Record()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, reason = fake.handle(self.path, self.headers.get("Content-Type", ""), body)
                payload = b"{}" if status == 200 else reason.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[Event]:
        with self.record.lock:
            return list(self.record.events)

    def rejections(self) -> list[tuple[int, str]]:
        with self.record.lock:
            return list(self.record.rejections)

    def handle(self, raw_path: str, content_type: str, body: bytes) -> tuple[int, str]:
        status, reason, events = self._check(raw_path, content_type, body)
        with self.record.lock:
            if status == 200:
                self.record.events.extend(events)
            else:
                self.record.rejections.append((status, reason))
        return status, reason

    def _check(self, raw_path: str, content_type: str, body: bytes) -> tuple[int, str, list[Event]]:
        url = urlsplit(raw_path)
        if url.path != f"/apps/{self.app_id}/batch_events":
            return 404, f"unknown path {url.path}", []
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if params.get("auth_key") != self.key:
            return 401, "unknown auth_key", []
        if params.get("auth_version") != "1.0":
            return 401, "auth_version must be 1.0", []
        try:
            timestamp = int(params.get("auth_timestamp", ""))
        except ValueError:
            return 401, "auth_timestamp missing", []
        if abs(time.time() - timestamp) > 600:  # Pusher allows 600 s of clock skew
            return 401, "timestamp expired", []
        if params.get("body_md5") != hashlib.md5(body).hexdigest():  # noqa: S324 - Pusher's protocol uses MD5
            return 401, "body_md5 does not match", []
        # HMAC-SHA256 hex of "POST\n<path>\n<params sorted by key, without auth_signature>".
        signed = "&".join(f"{k.lower()}={v}" for k, v in sorted(params.items()) if k != "auth_signature")
        expected = hmac.new(self.secret.encode(), f"POST\n{url.path}\n{signed}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(params.get("auth_signature", ""), expected):
            return 401, "invalid signature", []
        if not content_type.startswith("application/json"):
            return 400, "Content-Type must be application/json", []
        batch = json.loads(body).get("batch")
        if not isinstance(batch, list) or len(batch) > 10:
            return 400, "batch must be a list of at most 10 events", []
        events = []
        for item in batch:
            data = item["data"]
            try:
                data = json.loads(data)
            except ValueError:
                pass
            events.append(Event(channel=item["channel"], name=item["name"], data=data))
        return 200, "", events
