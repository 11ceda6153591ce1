"""The worker supervisor's restart policy (``router_runtime.workers``), with stand-in processes."""

from __future__ import annotations

import socket
import threading

import pytest

from router_runtime import workers
from router_runtime.config import RuntimeFileConfig
from router_runtime.workers import FIRST_RESTART_DELAY_S, MAX_RESTART_DELAY_S, STABLE_AFTER_S, Supervisor


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid, self.alive = pid, True
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return self.alive

    def die(self, code: int = 1) -> None:
        self.alive, self.exitcode = False, code


class Harness:
    """A supervisor whose ``_start`` makes fake processes; time is passed in explicitly."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, workers_count: int = 2) -> None:
        self.supervisor = Supervisor(RuntimeFileConfig(), None, socket.socket(), workers_count, 1)
        self.started: list[FakeProcess] = []
        self.now = 0.0
        monkeypatch.setattr(workers, "_mark_dead", lambda process: None)

        def start(slot: workers._Worker) -> None:
            slot.ready = threading.Event()
            slot.process = FakeProcess(len(self.started) + 1)  # type: ignore[assignment]
            slot.started_at = self.now
            slot.restart_at = None
            self.started.append(slot.process)  # type: ignore[arg-type]

        monkeypatch.setattr(self.supervisor, "_start", start)
        self.supervisor.slots = [workers._Worker() for _ in range(workers_count)]
        for slot in self.supervisor.slots:
            start(slot)

    def serve(self, index: int) -> FakeProcess:
        slot = self.supervisor.slots[index]
        slot.ready.set()
        assert slot.process is not None
        return slot.process  # type: ignore[return-value]

    def watch(self, at: float) -> bool:
        self.now = at
        return self.supervisor._watch(at)


def test_a_worker_that_dies_before_it_serves_stops_the_supervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(monkeypatch)
    harness.serve(0)
    harness.started[1].die()
    assert harness.watch(1.0) is False
    assert len(harness.started) == 2  # nothing restarted


def test_a_worker_that_dies_while_serving_is_restarted_after_a_doubling_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(monkeypatch)
    harness.serve(1)
    delays = []
    now = 1.0
    for restarts in range(1, 9):
        harness.serve(0).die()
        assert harness.watch(now) is True
        slot = harness.supervisor.slots[0]
        assert slot.process is None and slot.restart_at is not None
        delays.append(slot.restart_at - now)
        assert harness.watch(slot.restart_at - 0.01) and len(harness.started) == 1 + restarts  # not yet
        now = slot.restart_at
        assert harness.watch(now) and len(harness.started) == 2 + restarts  # restarted
        now += 1.0  # the new worker serves for a second, then dies again
    assert delays == [min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2**n) for n in range(8)]
    assert harness.supervisor.slots[1].process is harness.started[1]  # the healthy worker was left alone


def test_a_worker_that_served_long_enough_starts_again_from_the_first_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(monkeypatch, workers_count=1)
    for at in (1.0, 1.0 + FIRST_RESTART_DELAY_S):
        harness.serve(0).die()
        harness.watch(at)
        harness.watch(at + 2 * FIRST_RESTART_DELAY_S)
    assert harness.supervisor.slots[0].failures == 2
    now = 10.0 + STABLE_AFTER_S
    harness.serve(0).die()
    harness.watch(now)
    assert harness.supervisor.slots[0].failures == 1
    assert harness.supervisor.slots[0].restart_at == now + FIRST_RESTART_DELAY_S
