"""Dynamic batching across concurrent requests, with a bounded queue for back-pressure.

A request waits at most ``max_delay`` after it arrives for others to join it (under load the worker is
busy anyway and the next batch goes as soon as it is free), batches hold at most ``max_batch_tokens``
tokens (a bigger single request runs alone), and the routing runs on one worker thread so the event loop
keeps accepting connections. When the queue is full ``submit`` raises ``Overloaded`` at once: the server
answers 503 with ``Retry-After`` instead of letting memory and latency grow without bound.

The event-loop side is kept cheap because it runs once per request: a deque and one future per request,
no task or ``wait_for`` per request, one executor hand-off per batch. The processor gets the requests'
arrays where they lie (a router that reads each one in place needs no copy); ``BatchSlab`` gathers them
into one reused buffer for a processor that needs a contiguous batch, validating each on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

import numpy as np

Result = TypeVar("Result")

#: ``process(parts)`` routes the queued requests' token arrays (``[T_i, d]`` each, in arrival order) as one
#: batch and returns, per request, its result or the exception to fail that request with. It must not keep the
#: arrays after returning (their buffers take later requests).
BatchProcessor = Callable[[Sequence[np.ndarray]], Sequence[Result | Exception]]
#: ``validate(tokens [T, d])`` of one request on the worker thread: the exception to fail it with, or None.
Validator = Callable[[np.ndarray], Exception | None]
#: ``allocate(shape, dtype)``: the batch buffer (pinned host memory when the router copies it to a GPU).
Allocator = Callable[[tuple[int, ...], np.dtype], np.ndarray]
#: ``copy(target, part)``: one request's rows into the batch buffer (converting them to its dtype).
Copier = Callable[[np.ndarray, np.ndarray], object]


def _host_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


class BatchSlab:
    """One reused buffer that a batch's requests are copied into, for a processor that needs them contiguous.

    A fresh multi-megabyte array per batch costs page faults and zeroing; this one grows to the largest
    batch and stays. Each request is validated right after its copy, while its rows are still in cache:
    on the event loop the same check would read megabytes fresh from memory that the socket read had
    just written there.
    """

    def __init__(
        self,
        allocate: Allocator = _host_array,
        min_rows: int = 0,
        dtype: np.dtype | None = None,
        copy: Copier = np.copyto,
    ) -> None:
        """``dtype``: the batch's (None: the first request's); ``copy`` moves each request into it."""
        self._allocate = allocate
        self._min_rows = min_rows
        self._dtype = dtype
        self._copy = copy
        self._slab: np.ndarray | None = None

    def gather(
        self, parts: Sequence[np.ndarray], validate: Validator | None = None
    ) -> tuple[np.ndarray, list[int], dict[int, Exception]]:
        """``(tokens, sizes, rejected)``: the valid requests' rows in one array, their row counts in order,
        and the failed ones' exceptions by index. A single contiguous writeable request is used as it is."""
        rejected: dict[int, Exception] = {}
        first = parts[0]
        dtype = first.dtype if self._dtype is None else self._dtype
        if len(parts) == 1 and first.dtype == dtype and first.flags.writeable and first.flags.c_contiguous:
            error = validate(first) if validate is not None else None
            if error is not None:
                return first[:0], [], {0: error}
            return first, [first.shape[0]], rejected
        rows = sum(part.shape[0] for part in parts)
        shape = (rows, *first.shape[1:])
        slab = self._slab
        if slab is None or slab.dtype != dtype or slab.shape[1:] != shape[1:] or slab.shape[0] < rows:
            slab = self._allocate((max(rows, self._min_rows), *shape[1:]), dtype)
            self._slab = slab
        sizes: list[int] = []
        end = 0
        for index, part in enumerate(parts):
            target = slab[end : end + part.shape[0]]
            self._copy(target, part)
            error = validate(target) if validate is not None else None
            if error is None:
                end += part.shape[0]
                sizes.append(part.shape[0])
            else:  # left out: the next request's rows overwrite it
                rejected[index] = error
        return slab[:end], sizes, rejected


class Overloaded(Exception):
    """The queue or the in-flight byte budget is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InflightBytes:
    """The bytes of request bodies admitted and not yet answered, kept under ``budget`` (None: no budget).

    Counting requests does not bound memory when one request may be hundreds of megabytes. One request alone
    is always admitted whatever its size, so the largest request the other limits allow still works.
    """

    __slots__ = ("budget", "held")

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.held = 0

    def admit(self, size: int) -> None:
        """Count ``size`` bytes in, or raise ``Overloaded`` if they would take the total over the budget."""
        if self.budget is not None and self.held and self.held + size > self.budget:
            raise Overloaded(
                f"server overloaded: {self.held} bytes of requests in flight, this one's {size} would pass the "
                f"budget of {self.budget} bytes (server.maxInflightBytes), retry later"
            )
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size


class Stopped(Exception):
    """The batcher is shutting down and takes no new work."""


class _Pending(Generic[Result]):
    __slots__ = ("arrived", "future", "tokens")

    def __init__(self, tokens: np.ndarray, future: asyncio.Future[Result], arrived: float) -> None:
        self.tokens = tokens
        self.future = future
        self.arrived = arrived


class DynamicBatcher(Generic[Result]):
    """Collects requests into batches and runs ``process`` on them in a single worker thread."""

    def __init__(
        self,
        process: BatchProcessor[Result],
        *,
        max_batch_tokens: int,
        max_delay_s: float,
        max_queue_requests: int,
    ) -> None:
        if max_batch_tokens < 1 or max_queue_requests < 1 or max_delay_s < 0:
            raise ValueError("max_batch_tokens and max_queue_requests must be >= 1 and max_delay_s >= 0")
        self._process = process
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_delay_s
        self.max_queue_requests = max_queue_requests
        self._pending: deque[_Pending[Result]] = deque()
        self._pending_tokens = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._idle = asyncio.Event()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the batch being routed)."""
        return len(self._pending)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-router")
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker = self._loop.create_task(self._run(), name="moe-router-batcher")

    async def submit(self, tokens: np.ndarray) -> Result:
        """Queue ``tokens [T, d]`` and wait for its result; ``Overloaded`` when the queue is full."""
        loop = self._loop
        if self._stopping or loop is None or not self.running:
            raise Stopped("the router is shutting down")
        if len(self._pending) >= self.max_queue_requests:
            raise Overloaded(f"server overloaded: {len(self._pending)} requests already queued, retry later")
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append(_Pending(tokens, future, loop.time()))
        self._pending_tokens += tokens.shape[0]
        self._idle.clear()
        # Waking the batcher is only news when it sleeps with nothing queued or the batch just filled up;
        # otherwise its deadline timer (or the end of the running batch) brings it back anyway.
        if len(self._pending) == 1 or self._pending_tokens >= self.max_batch_tokens:
            self._wake()
        return await future

    async def stop(self, grace_s: float) -> None:
        """Refuse new work, let queued requests finish for up to ``grace_s`` seconds, then stop."""
        self._stopping = True
        self._wake()
        if self.running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._fail_queued(Stopped("the router shut down before this request was routed"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _sleep_until_woken(self, seconds: float | None) -> None:
        """Wait for a new request (or ``stop``), at most ``seconds``: one future and one timer, no task."""
        assert self._loop is not None
        wakeup = self._wakeup = self._loop.create_future()
        timer = self._loop.call_later(seconds, self._wake) if seconds is not None else None
        try:
            await wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def _fail_queued(self, error: Exception) -> None:
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(error)
        self._pending_tokens = 0

    def _take_batch(self) -> list[_Pending[Result]]:
        """Pop the oldest requests up to ``max_batch_tokens`` (the first one whatever its size)."""
        pending = self._pending
        batch = [pending.popleft()]
        tokens = batch[0].tokens.shape[0]
        while pending and tokens + pending[0].tokens.shape[0] <= self.max_batch_tokens:
            item = pending.popleft()
            tokens += item.tokens.shape[0]
            batch.append(item)
        self._pending_tokens -= tokens
        return [item for item in batch if not item.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._idle.set()
                await self._sleep_until_woken(None)
                continue
            deadline = self._pending[0].arrived + self.max_delay_s
            while self._pending_tokens < self.max_batch_tokens and not self._stopping:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._sleep_until_woken(remaining)
            batch = self._take_batch()
            if not batch:
                continue
            try:
                arrays = [item.tokens for item in batch]
                outcomes = await loop.run_in_executor(self._executor, self._process, arrays)
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"the batch processor answered {len(outcomes)} of {len(batch)} requests")
            except Exception as exc:  # a routing failure fails this batch's requests, not the worker
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            else:
                for item, outcome in zip(batch, outcomes, strict=True):
                    if item.future.done():  # its client went away
                        continue
                    if isinstance(outcome, Exception):
                        item.future.set_exception(outcome)
                    else:
                        item.future.set_result(outcome)
