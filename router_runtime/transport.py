"""uvicorn's httptools protocol, receiving large inference bodies straight into one buffer.

Stock uvicorn hands a request body to the app as a series of ``bytes`` chunks: the event loop copies
each socket read into a new ``bytes``, appends it to a ``bytearray``, copies that again into the ASGI
message, pauses and resumes reading every 64 kB, and the app joins the chunks once more. For a
786 kB binary tensor that is four user-space copies and a dozen loop wake-ups per request, most of
the event loop's CPU. This protocol is also an ``asyncio.BufferedProtocol``: once the headers of
``POST /v2/models/{name}/infer`` with a ``Content-Length`` are parsed, the rest of the body is read by
the kernel directly into one preallocated buffer (``recv_into``), and the app gets that buffer from
``scope["extensions"]["moe_router.body"]`` without calling ``receive()``. Every other request (and
chunked or ``Expect: 100-continue`` uploads) goes through uvicorn unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import httptools
import numpy as np
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEADER_LENGTH = b"inference-header-content-length"
#: The ASGI scope extension carrying a ``DirectBody`` for the request.
BODY_EXTENSION = "moe_router.body"
INFER_PREFIX = "/v2/models/"
INFER_SUFFIX = "/infer"
_VERSIONS = "/versions/"
#: Bodies below this size come in one or two socket reads anyway: uvicorn's usual path is as cheap.
DIRECT_MIN_BYTES = 32 * 1024
_SCRATCH_BYTES = 256 * 1024
_ALIGN = 64
#: Read size while a new request's head is expected: the head, and little body that would be copied twice.
_HEAD_READ_BYTES = 8 * 1024


def infer_target(scope: dict[str, Any] | Any) -> tuple[str, str | None] | None:
    """``(model name, version or None)`` when ``scope`` is ``POST /v2/models/{name}[/versions/{version}]/infer``
    with no ``root_path``, else None."""
    if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not (path.startswith(INFER_PREFIX) and path.endswith(INFER_SUFFIX)):
        return None
    name = path[len(INFER_PREFIX) : -len(INFER_SUFFIX)]
    if "/" not in name:
        return (name, None) if name else None
    name, versions, version = name.partition(_VERSIONS)
    if not (versions and name and version) or "/" in name or "/" in version:
        return None
    return name, version


class BodyIncomplete(Exception):
    """The client went away before sending the whole body it announced."""


class _BufferPool:
    """Released body buffers of this thread's event loop, for the next requests to reuse.

    A fresh multi-megabyte buffer per request costs page faults and zeroing in the kernel for every
    page the body lands on. Bounded in bytes so idle keep-alive connections hold no buffers.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.free: list[np.ndarray] = []
        self.bytes = 0

    def take(self, size: int) -> np.ndarray:
        for index, buffer in enumerate(self.free):
            # Reuse one that fits without wasting more than half of it.
            if size <= buffer.shape[0] <= 2 * size:
                self.bytes -= buffer.shape[0]
                return self.free.pop(index)
        return np.empty(size, dtype=np.uint8)  # not zeroed: every byte is received before it is read

    def give(self, buffer: np.ndarray) -> None:
        if self.bytes + buffer.shape[0] <= self.max_bytes:
            self.free.append(buffer)
            self.bytes += buffer.shape[0]


_POOL_BYTES = 64 * 1024 * 1024
_local = threading.local()


def _thread_pool() -> _BufferPool:
    pool: _BufferPool | None = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = _BufferPool(_POOL_BYTES)
    return pool


def _thread_scratch() -> memoryview:
    """One read buffer per event-loop thread: each read is copied out before the next one starts."""
    scratch: memoryview | None = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = memoryview(bytearray(_SCRATCH_BYTES))
    return scratch


class DirectBody:
    """A request body being received into one buffer; ``await body.wait()`` for it.

    The app calls ``release()`` once nothing reads the body any more (its batch has been copied), which
    returns the buffer to this thread's pool for a later request, or ``discard()`` when it answers before
    the body is in (a refused request), so the rest of the body is read and dropped, not stored.
    """

    __slots__ = ("_pool", "_view", "buffer", "discarded", "filled", "future", "size")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop, tensor_offset: int = 0) -> None:
        self.size = size
        self._pool = _thread_pool()
        self.buffer: np.ndarray | None = self._pool.take(size + _ALIGN)
        # Start the body so that the tensor after the JSON header is 64-byte aligned: numpy reduces an
        # unaligned float32 array through a copy, and every later pass over it is slower.
        pad = -(self.buffer.ctypes.data + tensor_offset) % _ALIGN
        self._view = self.buffer.data[pad : pad + size]
        self.filled = 0
        self.discarded = False
        self.future: asyncio.Future[memoryview] = loop.create_future()

    def release(self) -> None:
        """Nothing reads this body any more: its buffer may take another request."""
        if self.buffer is not None:
            self._pool.give(self.buffer)
            self.buffer = None

    def discard(self) -> None:
        """The request is answered without its body: read the rest of it into scratch space and drop it."""
        if not self.complete:
            self.discarded = True
            self.release()

    @property
    def body(self) -> memoryview:
        return self._view

    @property
    def complete(self) -> bool:
        return self.filled == self.size

    def remaining(self) -> memoryview:
        if self.discarded:  # each read lands in scratch space, never past this body's end
            return _thread_scratch()[: self.size - self.filled]
        return self._view[self.filled :]

    def append(self, chunk: bytes) -> None:
        end = min(self.size, self.filled + len(chunk))
        if not self.discarded:
            self._view[self.filled : end] = chunk[: end - self.filled]
        self.filled = end

    def finish(self) -> None:
        if not self.future.done():
            self.future.set_result(self._view)

    def fail(self) -> None:
        if not self.future.done():
            self.future.set_exception(BodyIncomplete(f"client disconnected after {self.filled} of {self.size} bytes"))
            self.future.exception()  # retrieved: nobody may be waiting any more

    async def wait(self) -> memoryview:
        return await self.future


class _CoalescingWriter:
    """The response transport of a direct-body request: head and body leave in one write.

    uvicorn writes the status line and headers, then the body, in two ``transport.write`` calls; on
    loopback and small responses each is a syscall that also runs the receiver's TCP processing.
    """

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is None:
            self._head = data
            return
        self._transport.write(self._head + data)
        self._head = b""  # later writes (none for a complete response) go straight through

    def flush(self) -> None:
        if self._head:
            self._transport.write(self._head)
        self._head = b""

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class DirectBodyHttp(HttpToolsProtocol):
    """``HttpToolsProtocol`` that can switch a request's body to one preallocated buffer."""

    #: Bodies over this are left to the app, which answers 413 from ``Content-Length``.
    max_body_bytes = 256 * 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scratch = _thread_scratch()
        self.head_scratch = self.scratch[:_HEAD_READ_BYTES]
        self.direct: DirectBody | None = None
        self.expecting_head = True

    def get_buffer(self) -> memoryview:
        direct = self.direct
        if direct is not None:
            return direct.remaining()
        return self.head_scratch if self.expecting_head else self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        direct = self.direct
        if direct is None:
            self.data_received(bytes(self.scratch[:nbytes]))
            return
        self._unset_keepalive_if_required()
        direct.filled += nbytes
        if direct.complete:
            # The parser never saw these bytes: a fresh one starts at the next request's first byte.
            self.parser = httptools.HttpRequestParser(self)
            # As uvicorn does: answer the first of pipelined requests before a close (httptools >= 0.6.3).
            with contextlib.suppress(AttributeError):
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            self._finish_direct()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.expecting_head = True

    def on_headers_complete(self) -> None:
        self.expecting_head = False
        super().on_headers_complete()
        cycle = self.cycle
        if self.pipeline or cycle is None or cycle.scope is not self.scope or self.expect_100_continue:
            return
        if infer_target(self.scope) is None:
            return
        length: int | None = None
        tensor_offset = 0
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return
            if name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == _HEADER_LENGTH and value.isdigit():
                tensor_offset = int(value)
        if length is None or length < DIRECT_MIN_BYTES or length > self.max_body_bytes:
            return
        self.direct = DirectBody(length, self.loop, tensor_offset)
        cycle.transport = _CoalescingWriter(self.transport)  # type: ignore[assignment]
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[BODY_EXTENSION] = self.direct

    def on_body(self, body: bytes) -> None:
        direct = self.direct
        if direct is None:
            super().on_body(body)
        else:  # the tail of the socket read that held the headers
            direct.append(body)

    def on_message_complete(self) -> None:
        self.expecting_head = True
        if self.direct is None:
            super().on_message_complete()
        else:  # the whole body came in the same read as the headers
            self._finish_direct()

    def _finish_direct(self) -> None:
        direct = self.direct
        assert direct is not None
        self.direct = None
        self.expecting_head = True
        direct.finish()
        cycle = self.cycle
        if not cycle.response_complete:
            # Anyone calling receive() after all (not the fast path) still gets the body.
            cycle.body = direct.body  # type: ignore[assignment]
            cycle.more_body = False
            cycle.message_event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.direct is not None:
            self.direct.fail()
            self.direct = None
        super().connection_lost(exc)


class DirectBodyProtocol(asyncio.BufferedProtocol):
    """The transport's protocol: reads into ``DirectBodyHttp``'s buffers and delegates everything else.

    A wrapper rather than a subclass: uvloop only reads into caller buffers for protocols that are
    not ``asyncio.Protocol`` instances, and uvicorn's protocol is one.
    """

    http_class: type[DirectBodyHttp] = DirectBodyHttp

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.http = self.http_class(*args, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.http.connection_made(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.http.eof_received()  # type: ignore[func-returns-value]

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.http.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.http.buffer_updated(nbytes)


def direct_body_protocol(max_body_bytes: int) -> type[DirectBodyProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this body limit."""
    http = type("DirectBodyHttp", (DirectBodyHttp,), {"max_body_bytes": max_body_bytes})
    return type("DirectBodyProtocol", (DirectBodyProtocol,), {"http_class": http})
