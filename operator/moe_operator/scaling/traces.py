"""Traffic traces: the ``timestamp,value`` rate CSV the simulator reads, and converters into it.

A trace is a step function: ``rates[i]`` requests/s hold from ``times[i]`` until ``times[i + 1]``
(the last sample holds for the median sample spacing). Two public formats convert to it:

- count-per-step (the NAB files): ``timestamp,value`` where value counts requests in the step that
  starts at the timestamp, so the rate is ``value / step``;
- per-request logs (the Azure LLM inference trace): one row per request with a ``TIMESTAMP`` column,
  binned into counts per ``bin_seconds``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
TraceFormat = Literal["rate", "counts", "requests"]
TRACE_FORMATS: tuple[TraceFormat, ...] = ("rate", "counts", "requests")

#: Bin width used when a per-request log is turned into a rate.
DEFAULT_REQUEST_BIN_SECONDS = 60.0


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file, line and problem."""


@dataclass(frozen=True)
class Trace:
    """A request-rate step function. ``times`` are seconds since ``start`` (epoch seconds), ascending."""

    start: float
    times: FloatArray
    rates: FloatArray

    def __post_init__(self) -> None:
        if self.times.ndim != 1 or self.times.shape != self.rates.shape:
            raise TraceError("times and rates must be 1-D arrays of the same length")
        if self.times.size == 0:
            raise TraceError("a trace needs at least one sample")
        if self.times[0] != 0.0:
            raise TraceError("the first sample of a trace must be at time 0")
        if np.any(np.diff(self.times) <= 0):
            raise TraceError("sample times must be strictly increasing")
        if not np.all(np.isfinite(self.rates)) or np.any(self.rates < 0):
            raise TraceError("rates must be finite and >= 0")

    @property
    def sample_seconds(self) -> float:
        """The typical spacing of samples (the median), which the last sample holds for."""
        return float(np.median(np.diff(self.times))) if self.times.size > 1 else 60.0

    @property
    def duration(self) -> float:
        return float(self.times[-1]) + self.sample_seconds

    def rate_at(self, t: FloatArray) -> FloatArray:
        """The rate in force at each time (the last sample at or before it; no interpolation)."""
        index = np.searchsorted(self.times, t, side="right") - 1
        return np.asarray(self.rates[np.clip(index, 0, None)], dtype=np.float64)

    def mean_rates(self, step: float, end: float | None = None) -> FloatArray:
        """Mean rate over each interval ``[i * step, (i + 1) * step)`` up to ``end`` (a full step each)."""
        end = self.duration if end is None else end
        edges = np.arange(0.0, end + 1e-9, step)
        if edges.size < 2:
            return np.zeros(0, dtype=np.float64)
        # The integral of the step function at each edge, then differences.
        index = np.clip(np.searchsorted(self.times, edges, side="right") - 1, 0, None)
        starts = np.concatenate(([0.0], np.cumsum(self.rates[:-1] * np.diff(self.times))))
        area = starts[index] + self.rates[index] * (edges - self.times[index])
        return np.asarray(np.diff(area) / step, dtype=np.float64)

    def with_future_replaced(self, from_index: int, rates: FloatArray) -> Trace:
        """A copy whose samples from ``from_index`` on take ``rates`` (the causality check)."""
        new = self.rates.copy()
        new[from_index:] = rates
        return Trace(self.start, self.times, new)


def parse_timestamp(text: str) -> float:
    """Epoch seconds from an ISO-8601 timestamp (naive means UTC) or a number of epoch seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        # Python's ISO parser takes at most six fractional digits; the Azure trace has seven.
        head, dot, fraction = text.partition(".")
        if not dot:
            raise
        moment = datetime.fromisoformat(f"{head}.{fraction[:6]}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def from_rate_samples(timestamps: Sequence[float] | FloatArray, rates: Sequence[float] | FloatArray) -> Trace:
    """A trace from epoch timestamps and the rate in force from each (sorted here)."""
    t = np.asarray(timestamps, dtype=np.float64)
    r = np.asarray(rates, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, r = t[order], r[order]
    _refuse_duplicates(t, "rate trace")
    return Trace(float(t[0]) if t.size else 0.0, t - (t[0] if t.size else 0.0), r)


def _refuse_duplicates(sorted_times: FloatArray, kind: str) -> None:
    """A sample's value holds until the next sample's time, so two samples at one time are ambiguous."""
    repeats = np.flatnonzero(np.diff(sorted_times) == 0)
    if repeats.size:
        first = datetime.fromtimestamp(float(sorted_times[repeats[0]]), UTC).isoformat()
        more = f" and {repeats.size - 1} more" if repeats.size > 1 else ""
        raise TraceError(
            f"duplicate timestamps in a {kind}: {first}{more}; every sample needs its own time "
            "(local-time stamps repeat at a daylight-saving change: write them in UTC)"
        )


def from_counts_per_step(timestamps: Sequence[float], counts: Sequence[float]) -> Trace:
    """A trace from counts per step (NAB): rate = count / the step that starts at each timestamp."""
    t = np.asarray(timestamps, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if t.size < 2:
        raise TraceError("a count-per-step trace needs at least two samples to know its step")
    order = np.argsort(t, kind="stable")
    t, c = t[order], c[order]
    _refuse_duplicates(t, "count-per-step trace")
    step = float(np.median(np.diff(t)))
    # Each count covers its own step; a longer gap (missing samples) holds the last rate, like a scrape gap.
    return from_rate_samples(t, c / step)


def from_request_times(request_times: Iterable[float], bin_seconds: float = DEFAULT_REQUEST_BIN_SECONDS) -> Trace:
    """A trace from individual request arrival times, counted per ``bin_seconds`` from the first one."""
    if not bin_seconds > 0:
        raise TraceError(f"bin width must be > 0 seconds, got {bin_seconds}")
    t = np.sort(np.asarray(list(request_times), dtype=np.float64))
    if t.size == 0:
        raise TraceError("a request log needs at least one request")
    start = math.floor(t[0] / bin_seconds) * bin_seconds
    bins = np.floor((t - start) / bin_seconds).astype(np.int64)
    counts = np.bincount(bins).astype(np.float64)
    return Trace(start, np.arange(counts.size, dtype=np.float64) * bin_seconds, counts / bin_seconds)


def read_trace(
    path: str | Path, trace_format: TraceFormat = "rate", bin_seconds: float = DEFAULT_REQUEST_BIN_SECONDS
) -> Trace:
    """Load a trace file.

    ``rate``: ``timestamp,value`` with value in requests/s (the simulator's own format). ``counts``:
    ``timestamp,value`` with a count per step (NAB). ``requests``: one row per request with a
    ``timestamp`` column (Azure), binned per ``bin_seconds``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_trace(text, str(path), trace_format, bin_seconds)


def parse_trace(
    text: str, source: str = "<trace>", trace_format: TraceFormat = "rate",
    bin_seconds: float = DEFAULT_REQUEST_BIN_SECONDS,
) -> Trace:
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None:
        raise TraceError(f"{source}: empty file")
    fmt = trace_format
    names = [name.strip().lower() for name in header]
    if fmt not in TRACE_FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; expected one of {', '.join(TRACE_FORMATS)}")
    if "timestamp" not in names or (fmt != "requests" and names[1:2] != ["value"]):
        expected = "a timestamp column" if fmt == "requests" else "timestamp,value"
        raise TraceError(f"{source}: header {header!r} is not {expected} (format {fmt})")
    column = names.index("timestamp")
    times: list[float] = []
    values: list[float] = []
    for line, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        try:
            times.append(parse_timestamp(row[column]))
            if fmt != "requests":
                values.append(float(row[1]))
        except (ValueError, IndexError) as exc:
            raise TraceError(f"{source}:{line}: cannot parse {row!r}: {exc}") from None
        if fmt != "requests" and not (math.isfinite(values[-1]) and values[-1] >= 0):
            raise TraceError(f"{source}:{line}: value {row[1].strip()!r} must be finite and >= 0")
    if not times:
        raise TraceError(f"{source}: no samples")
    try:
        if fmt == "requests":
            return from_request_times(times, bin_seconds)
        if fmt == "counts":
            return from_counts_per_step(times, values)
        return from_rate_samples(times, values)
    except TraceError as exc:
        raise TraceError(f"{source}: {exc}") from None


def format_rate_csv(trace: Trace) -> str:
    """The simulator's ``timestamp,value`` form (ISO-8601 UTC, requests/s)."""
    out = io.StringIO()
    out.write("timestamp,value\n")
    for t, rate in zip(trace.times, trace.rates, strict=True):
        moment = datetime.fromtimestamp(trace.start + float(t), tz=UTC)
        out.write(f"{moment.strftime('%Y-%m-%dT%H:%M:%S')},{rate:.6g}\n")
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe_operator.scaling.traces --format counts IN.csv OUT.csv``: convert to the rate CSV."""
    import argparse

    parser = argparse.ArgumentParser(description="Convert a trace to the simulator's timestamp,value rate CSV.")
    parser.add_argument("--format", choices=TRACE_FORMATS, required=True, help="format of the input file")
    parser.add_argument("--bin-seconds", type=float, default=DEFAULT_REQUEST_BIN_SECONDS,
                        help="bin width for per-request logs")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    try:
        trace = read_trace(args.input, args.format, args.bin_seconds)
    except TraceError as exc:
        parser.error(str(exc))
    args.output.write_text(format_rate_csv(trace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
