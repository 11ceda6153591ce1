"""Predictive scaling against a Prometheus behind TLS and basic auth, with the credentials in real Secrets.

One Prometheus (Debian's package) serves HTTPS with a certificate from a throwaway CA and requires
basic auth (``--web.config.file``). The MoERouter's Secrets live in the API sandbox; each test runs
the tick the kopf timer runs (``predictive_tick``): Secret -> PrometheusAuth -> range query ->
``PredictionReady`` and ``moe_operator_prometheus_query_failures_total{reason}``. Prometheus cannot
check bearer tokens itself, so a small gateway in front of it does (as Mimir or an ingress would).
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from moe_operator.kube import MOEROUTERS, Kube
from moe_operator.reconcile import Outcome, predictive_tick
from moe_operator.sandbox import Running
from tests.integration.operator.harness import example_router, sandbox_with_client
from tests.support.prometheus import PrometheusServer, SeriesSpec, WebConfig, prometheus_missing, start_prometheus

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.timeout(60),
    pytest.mark.skipif(prometheus_missing() is not None, reason=str(prometheus_missing())),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]

ROUTER = "r"
STEP = 300.0
USERNAME = "forecast-reader"
PASSWORD = "correct horse battery staple"
#: bcrypt (cost 10) of PASSWORD, made once with python-bcrypt: no dependency present here can make one.
PASSWORD_HASH = "$2b$10$LewAV/b18050BoZe/Eez3OwFpeZEaoJSCwuq4N0Y72kquEdQTFLve"
BEARER_TOKEN = "tenant-a-token"
#: A token the gateway knows but does not let query (another tenant's): 403, not 401.
FORBIDDEN_TOKEN = "tenant-b-token"


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and the server certificate it signed for 127.0.0.1 and localhost."""

    ca_pem: str
    ca_der: bytes
    cert_file: Path
    key_file: Path


def make_pki(folder: Path) -> Pki:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    ca_extensions = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-x509", *ec, *ca_extensions, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=test CA")  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nauthorityKeyIdentifier=keyid\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", "2",
            "-days", "2", "-extfile", "server.ext", "-out", "server.crt")  # fmt: skip
    openssl("x509", "-in", "ca.crt", "-outform", "DER", "-out", "ca.der")
    return Pki((folder / "ca.crt").read_text(), (folder / "ca.der").read_bytes(), folder / "server.crt",
               folder / "server.key")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[tuple[PrometheusServer, float]]:
    """HTTPS + basic auth; two days of 20 requests/s for router "r", ending now."""
    end = time.time()
    times = np.arange(end - 2 * 86_400.0, end, STEP)
    rates = 20.0 * np.random.default_rng(5).normal(1.0, 0.02, times.size)
    series = [SeriesSpec({"namespace": "default", "service": ROUTER, "moerouter": ROUTER}, times, rates)]
    web = WebConfig(pki.cert_file, pki.key_file, (USERNAME, PASSWORD, PASSWORD_HASH))
    with start_prometheus(tmp_path_factory.mktemp("prom"), series, web=web) as server:
        yield server, end


class BearerGateway(BaseHTTPRequestHandler):
    """401 without ``Authorization: Bearer BEARER_TOKEN``, 403 for FORBIDDEN_TOKEN; the rest goes on to Prometheus."""

    upstream: str
    context: ssl.SSLContext

    def do_GET(self) -> None:
        if self.headers.get("Authorization") == f"Bearer {FORBIDDEN_TOKEN}":
            self._answer(403, b"tenant-b may not read tenant-a")
            return
        if self.headers.get("Authorization") != f"Bearer {BEARER_TOKEN}":
            self._answer(401, b"missing or wrong bearer token")
            return
        request = urllib.request.Request(self.upstream + self.path)
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
                self._answer(response.status, response.read())
        except urllib.error.HTTPError as exc:
            self._answer(exc.code, exc.read())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def gateway(prometheus: tuple[PrometheusServer, float], pki: Pki) -> Iterator[str]:
    handler = type("Gateway", (BearerGateway,), {
        "upstream": prometheus[0].url, "context": ssl.create_default_context(cadata=pki.ca_pem),
    })
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
async def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Running, Kube]]:
    async with sandbox_with_client(tmp_path / "kubeconfig", monkeypatch, ready_delay=0.05) as pair:
        yield pair


def seed_secret(running: Running, name: str, data: Mapping[str, str | bytes]) -> None:
    encoded = {
        key: base64.b64encode(value.encode() if isinstance(value, str) else value).decode()
        for key, value in data.items()
    }
    running.sandbox.seed("", "v1", "secrets", {"metadata": {"name": name, "namespace": "default"}, "data": encoded})


def basic_auth(password: str = PASSWORD) -> dict[str, str]:
    return {"username": USERNAME, "password": password}


#: The spec's ``tls`` block naming the CA Secret the tests seed.
WITH_CA: dict[str, Any] = {"tls": {"caSecretRef": {"name": "prom-ca", "key": "ca.crt"}}}


@dataclass
class Tick:
    outcome: Outcome
    body: dict[str, Any]

    @property
    def ready(self) -> dict[str, Any]:
        return next(c for c in self.body["status"]["conditions"] if c["type"] == "PredictionReady")


async def tick(kube: Kube, prometheus: dict[str, Any], end: float) -> Tick:
    """One forecast tick of a ForecastOnly MoERouter reading ``prometheus`` (the spec's prometheus block)."""
    body = example_router(ROUTER)
    body["spec"]["autoscaling"]["predictive"] = {
        "mode": "ForecastOnly", "prometheus": {"timeoutSeconds": 5, **prometheus}, "capacityPerReplica": 20,
        "horizonSeconds": 900, "lookbackSeconds": 2 * 86_400, "stepSeconds": int(STEP),
    }
    await kube.apply(MOEROUTERS, body)
    stored = await kube.get(MOEROUTERS, "default", ROUTER)
    assert stored is not None
    outcome = await predictive_tick(kube, stored, {}, now=datetime.fromtimestamp(end, tz=UTC))
    after = await kube.get(MOEROUTERS, "default", ROUTER)
    assert after is not None
    return Tick(outcome, after)


def failures(reason: str) -> float:
    labels = {"namespace": "default", "moerouter": ROUTER, "reason": reason}
    return REGISTRY.get_sample_value("moe_operator_prometheus_query_failures_total", labels) or 0.0


async def test_basic_auth_over_https_with_the_ca_from_a_secret_forecasts(sandbox, prometheus, pki):
    running, kube = sandbox
    server, end = prometheus
    seed_secret(running, "prom-basic", basic_auth())
    seed_secret(running, "prom-ca", {"ca.crt": pki.ca_pem})
    result = await tick(kube, {"url": server.url, "basicAuthSecretRef": {"name": "prom-basic"}, **WITH_CA}, end)
    assert (result.ready["status"], result.ready["reason"]) == ("True", "Forecasting"), result.ready["message"]
    assert result.body["status"]["prediction"]["predictedLoad"] == pytest.approx(20.0, rel=0.1)
    assert result.outcome.problem is None


async def test_the_ca_bundle_leaves_no_file_behind(sandbox, prometheus, pki, tmp_path, monkeypatch):
    running, kube = sandbox
    server, end = prometheus
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seed_secret(running, "prom-basic", basic_auth())
    seed_secret(running, "prom-ca", {"ca.crt": pki.ca_pem})
    result = await tick(kube, {"url": server.url, "basicAuthSecretRef": {"name": "prom-basic"}, **WITH_CA}, end)
    assert result.ready["reason"] == "Forecasting", result.ready["message"]
    assert list(scratch.iterdir()) == []


async def test_a_wrong_password_is_an_auth_failure_not_prometheus_down(sandbox, prometheus, pki):
    running, kube = sandbox
    server, end = prometheus
    seed_secret(running, "prom-basic", basic_auth("not the password"))
    seed_secret(running, "prom-ca", {"ca.crt": pki.ca_pem})
    before = failures("PrometheusAuthFailed")
    result = await tick(kube, {"url": server.url, "basicAuthSecretRef": {"name": "prom-basic"}, **WITH_CA}, end)
    assert (result.ready["status"], result.ready["reason"]) == ("False", "PrometheusAuthFailed")
    assert f"answered 401 Unauthorized to basic auth as user '{USERNAME}'" in result.ready["message"]
    assert failures("PrometheusAuthFailed") == before + 1
    assert "not the password" not in json.dumps(result.body)


async def test_no_credentials_against_a_prometheus_that_wants_them_says_which_to_set(sandbox, prometheus, pki):
    running, kube = sandbox
    server, end = prometheus
    seed_secret(running, "prom-ca", {"ca.crt": pki.ca_pem})
    result = await tick(kube, {"url": server.url, **WITH_CA}, end)
    assert result.ready["reason"] == "PrometheusAuthFailed"
    assert "no credentials are configured: set prometheus.basicAuthSecretRef" in result.ready["message"]


async def test_without_the_ca_the_untrusted_certificate_is_reported_with_what_to_set(sandbox, prometheus):
    running, kube = sandbox
    server, end = prometheus
    seed_secret(running, "prom-basic", basic_auth())
    before = failures("PrometheusTLSFailed")
    result = await tick(kube, {"url": server.url, "basicAuthSecretRef": {"name": "prom-basic"}}, end)
    assert (result.ready["status"], result.ready["reason"]) == ("False", "PrometheusTLSFailed")
    assert "is not trusted (unable to get local issuer certificate)" in result.ready["message"]
    assert "set prometheus.tls.caSecretRef" in result.ready["message"]
    assert failures("PrometheusTLSFailed") == before + 1


async def test_insecure_skip_verify_queries_without_the_ca(sandbox, prometheus):
    running, kube = sandbox
    server, end = prometheus
    seed_secret(running, "prom-basic", basic_auth())
    spec = {"url": server.url, "basicAuthSecretRef": {"name": "prom-basic"}, "tls": {"insecureSkipVerify": True}}
    with pytest.warns(Warning, match="Unverified HTTPS request"):  # urllib3 says so, once per host
        result = await tick(kube, spec, end)
    assert result.ready["reason"] == "Forecasting", result.ready["message"]


async def test_a_ca_secret_that_is_not_pem_names_the_secret_and_key(sandbox, prometheus):
    running, kube = sandbox
    server, end = prometheus
    seed_secret(running, "prom-basic", basic_auth())
    seed_secret(running, "prom-ca", {"ca.crt": "MIIBszCCAVmgAwIBAgIU (a certificate pasted without its PEM lines)"})
    before = failures("SecretKeyInvalid")
    result = await tick(kube, {"url": server.url, "basicAuthSecretRef": {"name": "prom-basic"},
                               "tls": {"caSecretRef": {"name": "prom-ca", "key": "ca.crt"}}}, end)  # fmt: skip
    assert (result.ready["status"], result.ready["reason"]) == ("False", "SecretKeyInvalid")
    assert "tls.caSecretRef: key 'ca.crt' of Secret default/prom-ca holds no PEM certificate" in result.ready["message"]
    assert result.outcome.problem is not None and result.outcome.problem.reason == "SecretKeyInvalid"  # an event
    assert failures("SecretKeyInvalid") == before + 1


async def test_a_der_encoded_ca_secret_is_reported_instead_of_stopping_the_tick(sandbox, prometheus, pki):
    running, kube = sandbox
    server, end = prometheus
    seed_secret(running, "prom-basic", basic_auth())
    seed_secret(running, "prom-ca", {"ca.crt": pki.ca_der})
    result = await tick(kube, {"url": server.url, "basicAuthSecretRef": {"name": "prom-basic"}, **WITH_CA}, end)
    assert (result.ready["status"], result.ready["reason"]) == ("False", "SecretKeyInvalid")
    assert "tls.caSecretRef: key 'ca.crt' of Secret default/prom-ca is not UTF-8 text" in result.ready["message"]


async def test_the_bearer_token_from_a_secret_is_sent_as_an_authorization_header(sandbox, prometheus, gateway):
    running, kube = sandbox
    _, end = prometheus
    seed_secret(running, "prom-token", {"token": BEARER_TOKEN + "\n"})  # a trailing newline, as `echo >` leaves
    result = await tick(kube, {"url": gateway, "bearerTokenSecretRef": {"name": "prom-token", "key": "token"}}, end)
    assert result.ready["reason"] == "Forecasting", result.ready["message"]


async def test_a_refused_bearer_token_is_an_auth_failure_that_names_the_token(sandbox, prometheus, gateway):
    running, kube = sandbox
    _, end = prometheus
    seed_secret(running, "prom-token", {"token": "revoked-token"})
    result = await tick(kube, {"url": gateway, "bearerTokenSecretRef": {"name": "prom-token", "key": "token"}}, end)
    assert result.ready["reason"] == "PrometheusAuthFailed"
    assert "answered 401 Unauthorized to the bearer token of prometheus.bearerTokenSecretRef" in result.ready["message"]
    assert "revoked-token" not in json.dumps(result.body)


async def test_a_token_that_may_not_query_is_told_apart_from_a_wrong_one(sandbox, prometheus, gateway):
    running, kube = sandbox
    _, end = prometheus
    seed_secret(running, "prom-token", {"token": FORBIDDEN_TOKEN})
    result = await tick(kube, {"url": gateway, "bearerTokenSecretRef": {"name": "prom-token", "key": "token"}}, end)
    assert result.ready["reason"] == "PrometheusAuthFailed"
    assert "answered 403 Forbidden to the bearer token" in result.ready["message"]
    assert "valid but not allowed to query" in result.ready["message"]


async def test_a_password_in_the_url_is_masked_in_the_condition(sandbox, prometheus, pki):
    running, kube = sandbox
    server, end = prometheus
    seed_secret(running, "prom-ca", {"ca.crt": pki.ca_pem})
    url = server.url.replace("https://", f"https://{USERNAME}:stale-password@")
    result = await tick(kube, {"url": url, **WITH_CA}, end)
    assert result.ready["reason"] == "PrometheusAuthFailed"
    assert f"https://{USERNAME}:***@127.0.0.1" in result.ready["message"]
    assert f"to basic auth as user '{USERNAME}' from the URL" in result.ready["message"]
    assert "stale-password" not in result.ready["message"]
