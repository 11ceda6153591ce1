"""The only Prometheus client: one range query for a MoERouter's request-rate history.

Synchronous (prometheus-api-client over requests); the controller calls it in its own pool of
threads. Every fault comes out as a ``PrometheusQueryError`` whose ``reason`` is the
``PredictionReady`` condition reason to report, so the controller never has to know about HTTP.
"""

from __future__ import annotations

import math
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

UNAVAILABLE = "PrometheusUnavailable"
QUERY_FAILED = "QueryFailed"
NO_DATA = "QueryReturnedNoData"
#: Prometheus (or the proxy in front of it) answered 401 or 403: the credentials are missing, wrong or not enough.
AUTH_FAILED = "PrometheusAuthFailed"
#: The TLS handshake failed: most often a server certificate the operator does not trust.
TLS_FAILED = "PrometheusTLSFailed"
#: Window of ``rate()`` in the default query: four scrapes at the default 30 s interval.
DEFAULT_RATE_WINDOW = "2m"
#: Prometheus refuses a range query of more than 11,000 points per series ("exceeded maximum resolution"):
#: a longer lookback (8 days at 60 s is 11,521) is fetched in consecutive windows of at most this many.
MAX_POINTS_PER_QUERY = 11_000
#: A cached history is re-read whole this often (samples that arrive late, a Prometheus restored from backup);
#: in between each tick reads only the steps since the cache's end.
FULL_REFRESH_SECONDS = 3600.0
#: Steps at the end of the cached history read again each tick: the newest rates move as scrapes land.
REFETCH_STEPS = 10


@dataclass(frozen=True)
class PrometheusAuth:
    """Credentials resolved by the handler from Secrets; all optional."""

    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None
    ca_pem: str | None = None
    insecure_skip_verify: bool = False

    def __repr__(self) -> str:
        # Never print secrets into logs or test output.
        return (
            f"PrometheusAuth(bearer_token={'***' if self.bearer_token else None}, username={self.username!r}, "
            f"password={'***' if self.password else None}, ca_pem={'...' if self.ca_pem else None}, "
            f"insecure_skip_verify={self.insecure_skip_verify})"
        )


def ca_bundle_problem(pem: str) -> str | None:
    """Why ``pem`` cannot serve as the CA bundle that verifies Prometheus's certificate (None when it can)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        return f"holds no PEM certificate ({_first_line(exc)})"
    return None


class PrometheusQueryError(Exception):
    """A range query that gave no usable history; ``reason`` is the condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class RangeResult:
    """Samples on the regular grid ``start + i * step``; NaN where Prometheus returned no sample."""

    start: float
    step: float
    values: FloatArray
    series: int


def default_query(name: str, namespace: str) -> str:
    """Request rate (requests/s) of one MoERouter's runtime pods, summed over pods and status codes.

    Selected by the ``moerouter`` label, which both the per-router ServiceMonitor and the chart's
    PodMonitor set from the pods' ``moerouter.io/router`` label (a ``service`` label exists only with the former).
    """
    return (
        f'sum(rate(moe_router_requests_total{{namespace="{_escape(namespace)}",'
        f'moerouter="{_escape(name)}"}}[{DEFAULT_RATE_WINDOW}]))'
    )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def align_end(now: float, step: float) -> float:
    """The last grid point at or before ``now`` (a stable grid keeps successive fetches comparable)."""
    return math.floor(now / step) * step


def lookback_start(end: float, lookback_seconds: float, step_seconds: float) -> float:
    """The first grid point of the lookback that ends at ``end`` (a point of the step grid)."""
    return end - math.floor(lookback_seconds / step_seconds) * step_seconds


def client_timeout(timeout_seconds: float) -> int:
    """The HTTP client's timeout for connecting and for each read: whole seconds, never below the spec's."""
    return math.ceil(timeout_seconds)


def fetch_time_limit(lookback_seconds: float, step_seconds: float, timeout_seconds: float) -> float:
    """How long ``fetch_range`` over a lookback can wait on its answers: the client timeout for each window.

    (A read times out between bytes, so a server that trickles its answer can hold a window longer.)
    """
    windows = query_windows(lookback_start(0.0, lookback_seconds, step_seconds), 0.0, step_seconds)
    return float(len(windows) * client_timeout(timeout_seconds))


def query_windows(
    start: float, end: float, step: float, max_points: int = MAX_POINTS_PER_QUERY
) -> list[tuple[float, float]]:
    """``[start, end]`` on the ``step`` grid cut into consecutive windows of at most ``max_points`` points each."""
    points = round((end - start) / step) + 1
    windows = []
    for first in range(0, points, max_points):
        last = min(points, first + max_points) - 1
        windows.append((start + first * step, start + last * step))
    return windows


def to_grid(result: Sequence[Mapping[str, Any]], start: float, end: float, step: float) -> RangeResult:
    """Sum the series of a ``query_range`` result onto the grid; NaN/Inf samples and gaps become NaN.

    Raises PrometheusQueryError(QueryReturnedNoData) when no finite sample exists.
    """
    size = round((end - start) / step) + 1
    total = np.zeros(size, dtype=np.float64)
    seen = np.zeros(size, dtype=bool)
    for series in result:
        for timestamp, text in series.get("values", []):
            index = round((float(timestamp) - start) / step)
            try:
                value = float(text)
            except (TypeError, ValueError):
                continue
            if 0 <= index < size and math.isfinite(value):
                total[index] += value
                seen[index] = True
    if not seen.any():
        detail = "an empty result" if not result else "only NaN or infinite samples"
        raise PrometheusQueryError(NO_DATA, f"the query returned {detail} over the lookback window")
    labels = {tuple(sorted(series.get("metric", {}).items())) for series in result}
    return RangeResult(start, step, np.where(seen, total, np.nan), len(labels))


@contextmanager
def _ca_file(pem: str | None) -> Iterator[str | None]:
    if pem is None:
        yield None
        return
    handle = tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False)  # noqa: SIM115
    try:
        with handle:
            handle.write(pem)
        yield handle.name
    finally:
        os.unlink(handle.name)


def fetch_range(
    url: str, query: str, *, end: float, lookback_seconds: float, step_seconds: float,
    timeout_seconds: float, auth: PrometheusAuth | None = None,
) -> RangeResult:
    """``query_range`` over ``[end - lookback, end]`` at ``step`` (``end`` aligned to the step), in as many
    consecutive windows as Prometheus's 11,000-points limit needs (two for the default 8 days at 60 s).

    Raises PrometheusQueryError: PrometheusUnavailable (connection refused, DNS, timeout, HTTP 5xx),
    PrometheusTLSFailed (an untrusted certificate, a failed handshake, an unusable CA bundle),
    PrometheusAuthFailed (HTTP 401 or 403), QueryFailed (another HTTP error status, bad PromQL, an
    unparsable answer), QueryReturnedNoData.
    """
    import requests
    from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
    from urllib3.util.retry import Retry

    auth = auth or PrometheusAuth()
    shown = _shown(url)
    if auth.ca_pem is not None and not auth.insecure_skip_verify:
        problem = ca_bundle_problem(auth.ca_pem)
        if problem is not None:
            raise PrometheusQueryError(TLS_FAILED, f"the CA bundle for Prometheus at {shown} {problem}")
    end = align_end(end, step_seconds)
    start = lookback_start(end, lookback_seconds, step_seconds)
    basic = (auth.username or "", auth.password or "") if auth.username or auth.password else None
    # One Authorization header: basic auth wins when both are set (requests would replace the token anyway).
    headers = {"Authorization": f"Bearer {auth.bearer_token}"} if auth.bearer_token and basic is None else None
    with _ca_file(auth.ca_pem) as ca_path, requests.Session() as session:
        session.verify = False if auth.insecure_skip_verify else (ca_path or True)
        client = PrometheusConnect(
            url=url.rstrip("/"), headers=headers, auth=basic, session=session,
            # The next tick is the retry: one slow attempt must not hold a worker thread for long.
            retry=Retry(total=0), timeout=client_timeout(timeout_seconds),
        )
        try:
            result = []
            for first, last in query_windows(start, end, step_seconds):
                window = client.custom_query_range(
                    query,
                    start_time=datetime.fromtimestamp(first, tz=UTC),
                    end_time=datetime.fromtimestamp(last, tz=UTC),
                    step=f"{step_seconds:g}s",
                    params={"timeout": f"{timeout_seconds:g}s"},
                )
                if not isinstance(window, list):
                    message = f"Prometheus at {shown} answered a {type(window).__name__}, not a matrix"
                    raise PrometheusQueryError(QUERY_FAILED, message)
                result.extend(window)
        except requests.exceptions.SSLError as exc:  # before ConnectionError, its base class
            raise PrometheusQueryError(TLS_FAILED, _tls_message(shown, exc, auth)) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PrometheusQueryError(UNAVAILABLE, f"cannot reach Prometheus at {shown}: {_first_line(exc)}") from None
        except PrometheusApiClientException as exc:
            status = _http_status(exc)
            if status in (401, 403):
                raise PrometheusQueryError(AUTH_FAILED, _auth_message(url, status, auth)) from None
            # A 5xx is the server (or a proxy in front of it) failing; another 4xx is our query.
            reason = UNAVAILABLE if status is not None and status >= 500 else QUERY_FAILED
            raise PrometheusQueryError(reason, f"Prometheus at {shown} refused the query: {_first_line(exc)}") from None
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            message = f"unusable answer from Prometheus at {shown}: {_first_line(exc)}"
            raise PrometheusQueryError(QUERY_FAILED, message) from None
    return to_grid(result, start, end, step_seconds)


def merge_range(old: RangeResult, new: RangeResult, start: float) -> RangeResult:
    """The grid from ``start`` to ``new``'s end, from ``old`` where only it has samples and ``new`` elsewhere.

    Both grids share the step and its alignment (``align_end``); ``new`` wins where they overlap.
    """
    step = new.step
    size = round((new.start - start) / step) + new.values.size
    values = np.full(size, np.nan)
    offset = round((old.start - start) / step)
    first, last = max(0, offset), min(size, offset + old.values.size)
    if first < last:
        values[first:last] = old.values[first - offset : last - offset]
    values[size - new.values.size :] = new.values
    return RangeResult(start, step, values, max(old.series, new.series))


@dataclass
class HistoryCache:
    """One MoERouter's last fetched history, so a tick asks Prometheus for minutes, not the whole lookback."""

    key: tuple[str, str, float, float] | None = None
    result: RangeResult | None = None
    #: When the next whole read is due (the ``end`` of the tick that reaches it).
    refresh_due: float = -math.inf


def fetch_history(
    cache: HistoryCache, url: str, query: str, *, end: float, lookback_seconds: float, step_seconds: float,
    timeout_seconds: float, auth: PrometheusAuth | None = None, fetch: Callable[..., RangeResult] | None = None,
    first_refresh_seconds: float = FULL_REFRESH_SECONDS,
) -> RangeResult:
    """``fetch_range`` over the lookback, reading only the newest steps when ``cache`` holds the rest.

    A whole read happens on the first call, when the URL, query, step or lookback changed, when the cache
    no longer reaches the lookback, and when a refresh is due: ``first_refresh_seconds`` after a whole read
    of the first kinds (a per-router spread, so routers that started together do not refresh together),
    then every ``FULL_REFRESH_SECONDS``. Otherwise the range from ``REFETCH_STEPS`` before the cached end to
    ``end`` is read and merged in. Errors propagate as from ``fetch_range`` and leave the cache as it was.
    """
    fetch = fetch or fetch_range
    aligned = align_end(end, step_seconds)
    start = lookback_start(aligned, lookback_seconds, step_seconds)
    key = (url, query, float(step_seconds), float(lookback_seconds))
    old = cache.result
    same = old is not None and cache.key == key
    if old is not None and same and end < cache.refresh_due:
        old_end = old.start + (old.values.size - 1) * old.step
        since = max(start, old_end - REFETCH_STEPS * step_seconds)
        if start <= old_end <= aligned:
            recent = fetch(url, query, end=end, lookback_seconds=aligned - since, step_seconds=step_seconds,
                           timeout_seconds=timeout_seconds, auth=auth)  # fmt: skip
            cache.result = merge_range(old, recent, start)
            return cache.result
    result: RangeResult = fetch(url, query, end=end, lookback_seconds=lookback_seconds, step_seconds=step_seconds,
                                timeout_seconds=timeout_seconds, auth=auth)  # fmt: skip
    periodic = same and end >= cache.refresh_due
    cache.key, cache.result = key, result
    cache.refresh_due = end + (FULL_REFRESH_SECONDS if periodic else first_refresh_seconds)
    return result


def spread_first_refresh(phase: float) -> float:
    """When a router with ``phase`` in [0, 1) re-reads its history whole after its first read: in the second
    half of ``FULL_REFRESH_SECONDS``, so after an operator start the routers' whole reads are spread over it."""
    if not 0.0 <= phase < 1.0:
        raise ValueError(f"a router's phase must be in [0, 1), got {phase}")
    return FULL_REFRESH_SECONDS * (0.5 + phase / 2.0)


def _http_status(exc: BaseException) -> int | None:
    """The status of prometheus-api-client's ``HTTP Status Code NNN (body)`` errors."""
    words = str(exc).split()
    if len(words) > 3 and words[:3] == ["HTTP", "Status", "Code"] and words[3].isdigit():
        return int(words[3])
    return None


def _shown(url: str) -> str:
    """``url`` with the password of a ``user:password@`` part masked: messages go into conditions and events."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return url.replace(f"{userinfo}@", f"{userinfo.split(':', 1)[0]}:***@", 1)


def _auth_message(url: str, status: int, auth: PrometheusAuth) -> str:
    answer = "401 Unauthorized" if status == 401 else "403 Forbidden"
    if auth.username or auth.password:
        sent = f"basic auth as user {auth.username or ''!r} from prometheus.basicAuthSecretRef"
    elif auth.bearer_token:
        sent = "the bearer token of prometheus.bearerTokenSecretRef"
    elif urlsplit(url).username is not None:
        sent = f"basic auth as user {urlsplit(url).username!r} from the URL"
    else:
        return (f"Prometheus at {_shown(url)} answered {answer} and no credentials are configured: "
                "set prometheus.basicAuthSecretRef or prometheus.bearerTokenSecretRef")  # fmt: skip
    if status == 401:
        return f"Prometheus at {_shown(url)} answered {answer} to {sent}: the credentials are wrong or expired"
    return f"Prometheus at {_shown(url)} answered {answer} to {sent}: they are valid but not allowed to query"


def _tls_message(url: str, exc: BaseException, auth: PrometheusAuth) -> str:
    cause = _ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        if auth.ca_pem is not None:
            advice = "the CA bundle in prometheus.tls.caSecretRef does not hold the CA that signed it"
        else:
            advice = "set prometheus.tls.caSecretRef to the CA bundle that signed it"
        return f"the certificate of Prometheus at {url} is not trusted ({cause.verify_message}): {advice}"
    detail = (cause.reason if cause is not None else None) or _first_line(cause or exc)
    if detail == "WRONG_VERSION_NUMBER":
        detail += ": it does not speak TLS on this port; an http:// URL may be meant"
    return f"TLS handshake with Prometheus at {url} failed ({detail})"


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error under requests' wrapping (SSLError > MaxRetryError > urllib3 SSLError > ssl.SSLError)."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if isinstance(current, ssl.SSLError):
            return current
        if id(current) in seen:
            continue
        seen.add(id(current))
        linked = (*current.args, getattr(current, "reason", None), current.__cause__, current.__context__)
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
