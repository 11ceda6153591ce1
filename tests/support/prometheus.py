"""A real Prometheus for tests: Debian's ``prometheus`` on a free loopback port, with history.

History is backfilled with ``promtool tsdb create-blocks-from openmetrics`` from a request-rate
trace, as the counter ``moe_router_requests_total`` the runtime exports, so the operator's default
query (``sum(rate(moe_router_requests_total{namespace=..., service=...}[2m]))``) reads it back.

    server = start_prometheus(tmp_path, [SeriesSpec(labels, times, rates)])
    ...  server.url  ...
    server.stop(); server.start()   # simulate an outage and the recovery
    server.close()

Or as a context manager: ``with start_prometheus(...) as server: ...``. Tests that need it should
skip when ``prometheus_missing()`` returns a reason. ``web=WebConfig(...)`` puts TLS and/or basic auth
in front of every endpoint (Prometheus's ``--web.config.file``); ``server.url`` is then ``https://``.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

from moe_operator.sandbox import free_port

PROMETHEUS = "prometheus"
PROMTOOL = "promtool"
COUNTER = "moe_router_requests"
STARTUP_TIMEOUT_SECONDS = 30.0


def prometheus_missing() -> str | None:
    """Why the real Prometheus cannot run here (None when it can)."""
    for binary in (PROMETHEUS, PROMTOOL):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (Debian package 'prometheus')"
    return None


@dataclass(frozen=True)
class SeriesSpec:
    """One counter series: its labels and the request rate in force from each epoch time."""

    labels: Mapping[str, str]
    times: Sequence[float] | np.ndarray
    rates: Sequence[float] | np.ndarray
    scrape_seconds: float = 60.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_text(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(labels.items())) + "}"


def counter_samples(series: SeriesSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scrape times every ``scrape_seconds`` over the series and the counter's value at each.

    The rate is a step function (each rate holds until the next time); the counter is its integral.
    """
    times = np.asarray(series.times, dtype=np.float64)
    rates = np.asarray(series.rates, dtype=np.float64)
    step = float(np.median(np.diff(times))) if times.size > 1 else series.scrape_seconds
    end = times[-1] + step
    scrapes = np.arange(times[0], end + 1e-9, series.scrape_seconds)
    index = np.clip(np.searchsorted(times, scrapes, side="right") - 1, 0, None)
    area_at_start = np.concatenate(([0.0], np.cumsum(rates[:-1] * np.diff(times))))
    counts = area_at_start[index] + rates[index] * (scrapes - times[index])
    return scrapes, counts


def openmetrics(series: Sequence[SeriesSpec]) -> str:
    """OpenMetrics text of the counters (the input ``promtool`` backfills from)."""
    lines = [f"# HELP {COUNTER} Requests served.", f"# TYPE {COUNTER} counter"]
    for spec in series:
        labels = _label_text(spec.labels)
        scrapes, counts = counter_samples(spec)
        lines.extend(
            f"{COUNTER}_total{labels} {count:.3f} {int(t)}" for t, count in zip(scrapes, counts, strict=True)
        )
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def backfill(data_dir: Path, series: Sequence[SeriesSpec]) -> None:
    """Write TSDB blocks holding ``series`` into ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    source = data_dir.parent / f"{data_dir.name}.om.txt"
    source.write_text(openmetrics(series))
    subprocess.run(
        [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data_dir)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    source.unlink()


@dataclass(frozen=True)
class WebConfig:
    """What ``--web.config.file`` puts in front of every endpoint: TLS from PEM files, basic auth for one user."""

    cert_file: Path | None = None
    key_file: Path | None = None
    #: (username, password, bcrypt hash of the password): Prometheus keeps only the hash, the probe sends the rest.
    basic_auth: tuple[str, str, str] | None = None

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def text(self) -> str:
        lines = []
        if self.cert_file is not None and self.key_file is not None:
            lines += ["tls_server_config:", f'  cert_file: "{self.cert_file}"', f'  key_file: "{self.key_file}"']
        if self.basic_auth is not None:
            username, _, hashed = self.basic_auth
            lines += ["basic_auth_users:", f'  "{username}": "{hashed}"']
        return "\n".join(lines) + "\n"


@dataclass
class PrometheusServer:
    """A Prometheus process over ``data_dir`` on ``port``; stop/start keep the data and the port."""

    data_dir: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    web: WebConfig | None = None
    config_path: Path = field(init=False)
    web_config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = self.data_dir.parent / "prometheus.yml"
        self.config_path.write_text("global:\n  scrape_interval: 60s\nscrape_configs: []\n")
        self.web_config_path = self.data_dir.parent / "web.yml"
        if self.web is not None:
            self.web_config_path.write_text(self.web.text())

    @property
    def url(self) -> str:
        scheme = "https" if self.web is not None and self.web.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.process is not None:
            return
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data_dir}",
                "--storage.tsdb.retention.time=3650d",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
                *([f"--web.config.file={self.web_config_path}"] if self.web is not None else []),
            ],
            stdout=log, stderr=log,
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        request = urllib.request.Request(f"{self.url}/-/ready")
        # The probe only waits for the process to serve; trusting its certificate is what tests check.
        context = ssl._create_unverified_context() if self.web is not None and self.web.tls else None
        if self.web is not None and self.web.basic_auth is not None:
            username, password, _ = self.web.basic_auth
            token = base64.b64encode(f"{username}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(request, timeout=1, context=context) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready within {STARTUP_TIMEOUT_SECONDS:.0f}s: {self.log_tail()}")

    def stop(self) -> None:
        """Terminate the process (an outage); ``start`` brings it back on the same port and data."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def close(self) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        return ""

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_prometheus(
    work_dir: Path, series: Sequence[SeriesSpec], port: int | None = None, web: WebConfig | None = None
) -> PrometheusServer:
    """Backfill ``series`` into a fresh TSDB under ``work_dir`` and start Prometheus over it (behind ``web``)."""
    data_dir = work_dir / "prometheus-data"
    if series:
        backfill(data_dir, series)
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
    server = PrometheusServer(data_dir, port or free_port(), work_dir / "prometheus.log", web=web)
    server.start()
    return server
