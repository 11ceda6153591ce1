"""The dynamic batcher: joins concurrent requests, respects the token budget, sheds load when full."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from router_runtime.batching import BatchSlab, DynamicBatcher, InflightBytes, Overloaded, Stopped


class Recorder:
    """A batch processor that records batch sizes and answers each request with its row sums."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, parts: Sequence[np.ndarray]) -> list[float]:
        self.entered.set()
        self.release.wait(10)
        self.batches.append([part.shape[0] for part in parts])
        return [float(part.sum()) for part in parts]


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

    def flaky(parts: Sequence[np.ndarray]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("first batch fails")
        return [part.shape[0] for part in parts]

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


async def test_a_request_the_processor_rejects_fails_alone() -> None:
    def no_negatives(parts: Sequence[np.ndarray]) -> list[float | Exception]:
        return [ValueError("negative") if (part < 0).any() else float(part.sum()) for part in parts]

    batcher = DynamicBatcher(no_negatives, max_batch_tokens=100, max_delay_s=0.05, max_queue_requests=10)
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


async def test_a_processor_answering_the_wrong_number_of_requests_fails_the_batch() -> None:
    batcher: DynamicBatcher[float] = DynamicBatcher(
        lambda parts: [], max_batch_tokens=100, max_delay_s=0.0, max_queue_requests=10
    )
    await batcher.start()
    with pytest.raises(RuntimeError, match="answered 0 of 1 requests"):
        await batcher.submit(rows(1))
    await batcher.stop(1.0)


def test_the_slab_gathers_the_valid_requests_in_order_and_names_the_rejected() -> None:
    def no_negatives(tokens: np.ndarray) -> Exception | None:
        return ValueError("negative") if (tokens < 0).any() else None

    slab = BatchSlab(min_rows=16)
    tokens, sizes, rejected = slab.gather([rows(2, 1.0), rows(3, -1.0), rows(1, 3.0)], no_negatives)
    assert sizes == [2, 1]
    assert tokens.tolist() == [[1.0, 1.0], [1.0, 1.0], [3.0, 3.0]]
    assert list(rejected) == [1] and isinstance(rejected[1], ValueError)


def test_the_slab_is_reused_across_batches_and_grows_only_when_needed() -> None:
    allocations: list[tuple[int, ...]] = []

    def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        allocations.append(shape)
        return np.empty(shape, dtype=dtype)

    slab = BatchSlab(allocate, min_rows=4)
    first, _, _ = slab.gather([rows(1, 1.0), rows(2, 2.0)])
    assert first.tolist() == [[1.0, 1.0]] + [[2.0, 2.0]] * 2
    second, _, _ = slab.gather([rows(3, 5.0), rows(1, 7.0)])
    third, _, _ = slab.gather([rows(5, 1.0), rows(2, 2.0)])
    assert allocations == [(4, 2), (7, 2)]
    assert second.tolist() == [[5.0, 5.0]] * 3 + [[7.0, 7.0]]
    assert third.shape == (7, 2)


def test_a_single_writeable_request_is_not_copied() -> None:
    request = rows(3, 2.0)
    tokens, sizes, rejected = BatchSlab().gather([request])
    assert tokens is request and sizes == [3] and not rejected




def test_a_slab_of_a_fixed_dtype_converts_each_request_with_its_copier() -> None:
    copied: list[np.dtype] = []

    def widen(target: np.ndarray, part: np.ndarray) -> None:
        copied.append(part.dtype)
        np.copyto(target, part)

    slab = BatchSlab(dtype=np.dtype(np.float32), copy=widen)
    half = rows(2, 1.5).astype(np.float16)
    tokens, sizes, _ = slab.gather([half])  # a single request of another dtype is converted, not passed through
    assert tokens.dtype == np.float32 and tokens.tolist() == [[1.5, 1.5]] * 2 and sizes == [2]
    tokens, sizes, _ = slab.gather([rows(1, 3.0), half])
    assert tokens.tolist() == [[3.0, 3.0], [1.5, 1.5], [1.5, 1.5]] and sizes == [1, 2]
    assert copied == [np.float16, np.float32, np.float16]


def test_the_byte_budget_refuses_a_request_that_would_pass_it() -> None:
    inflight = InflightBytes(1000)
    inflight.admit(600)
    with pytest.raises(Overloaded, match=r"600 bytes of requests in flight, this one's 500 .* budget of 1000 bytes"):
        inflight.admit(500)
    inflight.admit(400)  # up to the budget exactly
    assert inflight.held == 1000


def test_one_request_alone_is_admitted_whatever_its_size() -> None:
    inflight = InflightBytes(1000)
    inflight.admit(5000)
    inflight.release(5000)
    inflight.admit(5000)
    assert inflight.held == 5000


def test_released_bytes_make_room_again() -> None:
    inflight = InflightBytes(1000)
    inflight.admit(800)
    inflight.admit(200)
    inflight.release(800)
    inflight.admit(700)
    assert inflight.held == 900


def test_without_a_budget_every_request_is_admitted() -> None:
    inflight = InflightBytes(None)
    for _ in range(3):
        inflight.admit(10**9)
    assert inflight.held == 3 * 10**9
