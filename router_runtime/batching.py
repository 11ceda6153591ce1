"""Dynamic batching across concurrent requests, with a bounded queue for back-pressure.

Requests wait at most ``max_delay`` for others to join them, batches hold at most ``max_batch_tokens``
tokens (a bigger single request runs alone), and the routing runs on one worker thread so the event
loop keeps accepting connections. When the queue is full ``submit`` raises ``Overloaded`` at once:
the server answers 503 with ``Retry-After`` instead of letting memory and latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

Result = TypeVar("Result")

#: ``process(tokens [N, d], sizes)`` routes a concatenated batch and returns one result per request.
BatchProcessor = Callable[[np.ndarray, Sequence[int]], Sequence[Result]]


class Overloaded(Exception):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, queued: int, retry_after: int = 1) -> None:
        super().__init__(f"server overloaded: {queued} requests already queued, retry later")
        self.retry_after = retry_after


class Stopped(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass
class _Pending(Generic[Result]):
    tokens: np.ndarray
    future: asyncio.Future[Result]


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
        self._queue: asyncio.Queue[_Pending[Result]] | None = None
        self._carry: _Pending[Result] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._idle = asyncio.Event()

    @property
    def queued(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + (1 if self._carry else 0)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        if self.running:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue_requests)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-router")
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="moe-router-batcher")

    async def submit(self, tokens: np.ndarray) -> Result:
        """Queue ``tokens [T, d]`` and wait for its result; ``Overloaded`` when the queue is full."""
        if self._stopping or self._queue is None:
            raise Stopped("the router is shutting down")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(tokens, future))
        except asyncio.QueueFull:
            raise Overloaded(self.queued) from None
        self._idle.clear()
        return await future

    async def stop(self, grace_s: float) -> None:
        """Refuse new work, let queued requests finish for up to ``grace_s`` seconds, then stop."""
        self._stopping = True
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

    def _fail_queued(self, error: Exception) -> None:
        pending = [self._carry] if self._carry else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if not item.future.done():
                item.future.set_exception(error)

    async def _next_batch(self) -> list[_Pending[Result]]:
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, tokens = [first], first.tokens.shape[0]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while tokens < self.max_batch_tokens:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if tokens + item.tokens.shape[0] > self.max_batch_tokens:
                self._carry = item
                break
            batch.append(item)
            tokens += item.tokens.shape[0]
        return [item for item in batch if not item.future.done()]

    def _concatenate_and_process(self, arrays: list[np.ndarray], sizes: list[int]) -> Sequence[Result]:
        tokens = np.concatenate(arrays, axis=0)  # also a writable copy of read-only request buffers
        return self._process(tokens, sizes)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                if self._carry is None and self._queue is not None and self._queue.empty():
                    self._idle.set()
                continue
            try:
                sizes = [item.tokens.shape[0] for item in batch]
                arrays = [item.tokens for item in batch]
                # Concatenating megabytes is done on the worker thread, not on the event loop.
                results = await loop.run_in_executor(self._executor, self._concatenate_and_process, arrays, sizes)
            except Exception as exc:  # a routing failure fails this batch's requests, not the worker
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            else:
                for item, result in zip(batch, results, strict=True):
                    if not item.future.done():
                        item.future.set_result(result)
            if self._carry is None and self._queue is not None and self._queue.empty():
                self._idle.set()
