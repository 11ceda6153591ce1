"""The dynamic batcher: joins concurrent requests, respects the token budget, sheds load when full."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from router_runtime.batching import DynamicBatcher, Overloaded, Stopped


class Recorder:
    """A batch processor that records batch sizes and answers each request with its row sums."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, tokens: np.ndarray, sizes: Sequence[int]) -> list[float]:
        self.entered.set()
        self.release.wait(10)
        self.batches.append(list(sizes))
        bounds = np.cumsum([0, *sizes])
        return [float(tokens[a:b].sum()) for a, b in itertools.pairwise(bounds)]


def rows(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 2), value, np.float32)


async def test_concurrent_requests_share_one_batch_and_get_their_own_results() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch_tokens=100, max_delay_s=0.05, max_queue_requests=10)
    await batcher.start()
    results = await asyncio.gather(*(batcher.submit(rows(i + 1, value=i)) for i in range(4)))
    await batcher.stop(1.0)
    assert recorder.batches == [[1, 2, 3, 4]]
    assert results == [0.0, 4.0, 12.0, 24.0]


async def test_batches_never_exceed_max_batch_tokens() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch_tokens=5, max_delay_s=0.05, max_queue_requests=10)
    await batcher.start()
    await asyncio.gather(*(batcher.submit(rows(2)) for _ in range(5)))
    await batcher.stop(1.0)
    assert all(sum(batch) <= 5 for batch in recorder.batches)
    assert sum(map(sum, recorder.batches)) == 10


async def test_a_request_larger_than_the_budget_runs_alone() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch_tokens=4, max_delay_s=0.0, max_queue_requests=10)
    await batcher.start()
    assert await batcher.submit(rows(9)) == 18.0
    await batcher.stop(1.0)
    assert recorder.batches == [[9]]


async def test_full_queue_raises_overloaded() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batcher = DynamicBatcher(recorder, max_batch_tokens=1, max_delay_s=0.0, max_queue_requests=1)
    await batcher.start()
    busy = asyncio.ensure_future(batcher.submit(rows(1)))
    assert await asyncio.to_thread(recorder.entered.wait, 5)  # the worker is blocked in the processor
    waiting = asyncio.ensure_future(batcher.submit(rows(1)))
    await asyncio.sleep(0)
    assert batcher.queued == 1
    with pytest.raises(Overloaded):
        await batcher.submit(rows(1))
    recorder.release.set()
    assert await busy == 2.0 and await waiting == 2.0
    await batcher.stop(1.0)


async def test_processor_failure_fails_the_batch_but_not_the_worker() -> None:
    calls = {"n": 0}

    def flaky(tokens: np.ndarray, sizes: Sequence[int]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("first batch fails")
        return list(sizes)

    batcher = DynamicBatcher(flaky, max_batch_tokens=10, max_delay_s=0.0, max_queue_requests=10)
    await batcher.start()
    with pytest.raises(RuntimeError, match="first batch fails"):
        await batcher.submit(rows(1))
    assert await batcher.submit(rows(3)) == 3
    await batcher.stop(1.0)


async def test_stop_lets_queued_work_finish_then_refuses_new_work() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch_tokens=100, max_delay_s=0.02, max_queue_requests=10)
    await batcher.start()
    pending = asyncio.ensure_future(batcher.submit(rows(2)))
    await asyncio.sleep(0)
    await batcher.stop(1.0)
    assert await pending == 4.0
    with pytest.raises(Stopped):
        await batcher.submit(rows(1))


async def test_a_request_that_waited_behind_a_busy_worker_is_not_delayed_again() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batcher = DynamicBatcher(recorder, max_batch_tokens=100, max_delay_s=0.5, max_queue_requests=10)
    await batcher.start()
    busy = asyncio.ensure_future(batcher.submit(rows(1)))
    await asyncio.sleep(0.6)  # the first request's own delay passed; the worker is now blocked on it
    assert await asyncio.to_thread(recorder.entered.wait, 5)
    waiting = asyncio.ensure_future(batcher.submit(rows(1)))
    await asyncio.sleep(0.6)  # the second request waits its whole delay while the worker is busy
    recorder.release.set()
    loop = asyncio.get_running_loop()
    freed = loop.time()
    await busy
    assert await waiting == 2.0
    assert loop.time() - freed < 0.3  # routed as soon as the worker was free, not after another 0.5 s
    await batcher.stop(1.0)


async def test_consecutive_batches_of_different_sizes_keep_their_own_rows() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch_tokens=8, max_delay_s=0.01, max_queue_requests=10)
    await batcher.start()
    first = await asyncio.gather(*(batcher.submit(rows(3, value=v)) for v in (1.0, 2.0)))
    second = await asyncio.gather(batcher.submit(rows(1, value=5.0)), batcher.submit(rows(2, value=7.0)))
    await batcher.stop(1.0)
    assert first == [6.0, 12.0]
    assert second == [10.0, 28.0]


async def test_a_request_failing_validation_is_left_out_of_its_batch() -> None:
    recorder = Recorder()

    def no_negatives(tokens: np.ndarray) -> Exception | None:
        return ValueError("negative") if (tokens < 0).any() else None

    batcher = DynamicBatcher(
        recorder, max_batch_tokens=100, max_delay_s=0.05, max_queue_requests=10, validate=no_negatives
    )
    await batcher.start()
    results = await asyncio.gather(
        batcher.submit(rows(2, value=1.0)),
        batcher.submit(rows(3, value=-1.0)),
        batcher.submit(rows(1, value=3.0)),
        return_exceptions=True,
    )
    await batcher.stop(1.0)
    assert results[0] == 4.0 and results[2] == 6.0
    assert isinstance(results[1], ValueError)
    assert recorder.batches == [[2, 1]]
