"""Several server processes on one port: ``server.workers`` (0 = the container's CPU limit).

One Python event loop parses, validates and answers every request of its process, so one process uses
about one core for HTTP however many CPUs the pod has. With N workers the supervisor (this module,
which never imports torch) binds the port once and starts N spawned processes that accept on the same
socket, each with its own router, batcher and ``cpus / N`` torch threads. Prometheus metrics go through
prometheus_client's multiprocess mode (per-process files in a fresh directory under ``$TMPDIR``, a tmpfs
at ``/tmp`` in the pod), so any worker's ``/metrics`` shows the pod's totals.

Shutdown: SIGTERM or SIGINT to the supervisor is passed to every worker as SIGTERM; each turns its
readiness false, finishes its in-flight and queued requests within ``server.shutdownGraceSeconds`` and
exits; the supervisor exits 0 once all have.

A worker that dies after it started serving is restarted, after a pause that doubles (up to
``MAX_RESTART_DELAY_S``) while its replacements keep dying within ``STABLE_AFTER_S`` of their start. A worker
that dies before it ever served (missing weights file, a CUDA device the build cannot use, a bad config)
would die the same way again: the supervisor stops the others and exits 1, so the pod's container
restarts with the kubelet's own back-off (CrashLoopBackOff) and the cause is the last thing in its log.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from router_runtime.config import RuntimeFileConfig

log = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds a worker gets beyond the grace period before it is killed.
_KILL_MARGIN_S = 5.0
#: Pause before restarting a worker that died after serving; doubled per quick death, up to the maximum.
FIRST_RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
#: A worker that served this long before it died is restarted after the first delay again.
STABLE_AFTER_S = 60.0
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The listening socket all workers accept on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def _worker_main(
    config: RuntimeFileConfig, api_key: str | None, log_level: str, sock: socket.socket, threads: int, ready: Any
) -> None:
    """A spawned worker: set its thread count before torch loads, then serve on the shared socket.

    ``ready`` (a multiprocessing Event) is set once it serves, so the supervisor can tell a worker that
    crashed while serving from one that could not start at all.
    """
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which passes on one SIGTERM
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=log_level.upper(), format=_LOG_FORMAT)
    from router_runtime.server import StartupError, serve

    try:
        raise SystemExit(serve(config, api_key=api_key, log_level=log_level, sockets=[sock], on_started=ready.set))
    except StartupError as exc:
        logging.getLogger("router_runtime").error("%s", exc)
        raise SystemExit(1) from None


class _Worker:
    """One worker slot: its process, whether it ever served, and its restart back-off."""

    __slots__ = ("failures", "process", "ready", "restart_at", "started_at")

    def __init__(self) -> None:
        self.process: BaseProcess | None = None
        self.ready: Any = None
        self.started_at = 0.0
        self.failures = 0
        self.restart_at: float | None = None


class Supervisor:
    """Starts, watches and stops the worker processes (see the module docstring)."""

    def __init__(
        self, config: RuntimeFileConfig, api_key: str | None, sock: socket.socket, workers: int, threads: int,
        log_level: str = "info",
    ) -> None:  # fmt: skip
        self.config = config
        self.api_key = api_key
        self.sock = sock
        self.workers = workers
        self.threads = threads
        self.log_level = log_level
        self.slots: list[_Worker] = []
        self.stopping = threading.Event()
        self._context = multiprocessing.get_context("spawn")

    @property
    def processes(self) -> list[BaseProcess]:
        return [slot.process for slot in self.slots if slot.process is not None]

    def _start(self, slot: _Worker) -> None:
        slot.ready = self._context.Event()
        slot.process = self._context.Process(
            target=_worker_main,
            args=(self.config, self.api_key, self.log_level, self.sock, self.threads, slot.ready),
            name="moe-router-worker",
        )
        slot.started_at = time.monotonic()
        slot.restart_at = None
        slot.process.start()

    def _request_stop(self, sig: int, frame: FrameType | None) -> None:
        if not self.stopping.is_set():
            log.info("received %s: stopping %d workers", signal.Signals(sig).name, len(self.processes))
        self.stopping.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._request_stop)
        self.slots = [_Worker() for _ in range(self.workers)]
        for slot in self.slots:
            self._start(slot)
        log.info("%d workers with %d torch threads each", self.workers, self.threads)
        while not self.stopping.wait(0.2):
            if not self._watch(time.monotonic()):
                self.stop()
                return 1
        return self.stop()

    def _watch(self, now: float) -> bool:
        """Restart dead workers when their back-off is over; False when one could not start at all."""
        for index, slot in enumerate(self.slots):
            process = slot.process
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    self._start(slot)
                continue
            if process is None or process.is_alive() or self.stopping.is_set():
                continue
            _mark_dead(process)
            if not slot.ready.is_set():
                log.error(
                    "worker %d (pid %s) exited with %s before it could serve: stopping (see its error above)",
                    index, process.pid, process.exitcode,
                )  # fmt: skip
                return False
            slot.failures = slot.failures + 1 if now - slot.started_at < STABLE_AFTER_S else 1
            delay = min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2 ** (slot.failures - 1))
            log.error(
                "worker %d (pid %s) exited with %s: restarting it in %.1f s",
                index, process.pid, process.exitcode, delay,
            )  # fmt: skip
            slot.restart_at = now + delay
            slot.process = None
        return True

    def stop(self) -> int:
        """SIGTERM every worker, wait for them to drain, kill stragglers; 0 when all exited cleanly."""
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace_seconds + _KILL_MARGIN_S
        clean = True
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker pid %s did not stop within the grace period: killing it", process.pid)
                process.kill()
                process.join()
                clean = False
            clean = clean and process.exitcode == 0
            _mark_dead(process)
        return 0 if clean else 1


def _mark_dead(process: BaseProcess) -> None:
    """Drop a dead worker's live gauges (in-flight requests) from the shared metrics."""
    if process.pid is None or not os.environ.get(MULTIPROC_DIR_ENV):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(process.pid)


def serve_workers(
    config: RuntimeFileConfig,
    workers: int,
    threads: int,
    api_key: str | None = None,
    host: str | None = None,
    port: int | None = None,
    log_level: str = "info",
) -> int:
    """Serve with ``workers`` processes on one port until SIGTERM; the metrics directory is removed after."""
    host = host if host is not None else config.server.host
    sock = bind_socket(host, port if port is not None else config.server.port)
    metrics_dir = tempfile.mkdtemp(prefix="moe-router-metrics-")
    previous = os.environ.get(MULTIPROC_DIR_ENV)
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir  # inherited by the spawned workers
    try:
        return Supervisor(config, api_key, sock, workers, threads, log_level).run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop(MULTIPROC_DIR_ENV, None)
        else:
            os.environ[MULTIPROC_DIR_ENV] = previous
