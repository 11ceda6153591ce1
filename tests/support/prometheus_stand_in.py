"""A stand-in for Prometheus's ``/api/v1/query_range`` that is as slow as a test needs.

A real Prometheus cannot be made to answer late, hang or trickle its answer; this small HTTP server
(one thread per connection) can. Its answer is one series at ``RATE`` requests/s on the asked grid.
Modes: ``answer`` (after ``delay`` seconds), ``hang`` (never answer; the connection is closed once
``release`` is set) and ``trickle`` (the headers at once, then the body a byte every 0.2 s until
``release`` is set, then the rest: a slow proxy that no read timeout catches).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs, urlsplit

RATE = 10.0
TRICKLE_INTERVAL = 0.2

Mode = Literal["answer", "hang", "trickle"]


@dataclass(frozen=True)
class RangeRequest:
    start: float
    end: float
    step: float

    @property
    def points(self) -> int:
        return round((self.end - self.start) / self.step) + 1


@dataclass
class StandIn:
    port: int = 0
    mode: Mode = "answer"
    delay: float = 0.0
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[RangeRequest] = field(default_factory=list)
    #: Answers sent to the end (a hung or trickling request counts once it is released and done).
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _answer(request: RangeRequest) -> bytes:
    first = math.ceil(request.start / request.step) * request.step
    values = [[first + i * request.step, f"{RATE:g}"] for i in range(round((request.end - first) / request.step) + 1)]
    body = {"status": "success", "data": {"resultType": "matrix", "result": [{"metric": {}, "values": values}]}}
    return json.dumps(body).encode()


def _handler(stand_in: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._query_range(parse_qs(urlsplit(self.path).query))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self._query_range(parse_qs(self.rfile.read(length).decode()))

        def _query_range(self, params: dict[str, list[str]]) -> None:
            request = RangeRequest(
                float(params["start"][0]), float(params["end"][0]), float(params["step"][0].rstrip("s"))
            )
            with stand_in.lock:
                stand_in.requests.append(request)
                mode, delay = stand_in.mode, stand_in.delay
            if mode == "hang":
                stand_in.release.wait()
                self.close_connection = True
                return
            time.sleep(delay)
            body = _answer(request)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            sent = 0
            while mode == "trickle" and not stand_in.release.wait(TRICKLE_INTERVAL) and sent < len(body) - 1:
                self.wfile.write(body[sent : sent + 1])
                self.wfile.flush()
                sent += 1
            self.wfile.write(body[sent:])
            with stand_in.lock:
                stand_in.answered += 1

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


@contextmanager
def prometheus_stand_in() -> Iterator[StandIn]:
    """The stand-in on a free loopback port; on exit every held request is released."""
    stand_in = StandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stand_in))
    server.daemon_threads = True
    stand_in.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        stand_in.release.set()
        server.shutdown()
        server.server_close()
