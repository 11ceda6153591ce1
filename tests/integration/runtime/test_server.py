"""The OIP v2 server over real HTTP (uvicorn in a thread): answers, errors, auth, limits, metrics."""

from __future__ import annotations

import gzip
import json

import httpx
import numpy as np
import pytest
import torch

from router_runtime.client import RouterClientError, route
from router_runtime.protocol import HEADER_LENGTH, encode_request
from router_runtime.router import DynamicRouter
from tests.integration.runtime.conftest import API_KEY, small_config
from tests.integration.runtime.serving import running_server

INFER = "/v2/models/tiny/infer"


def tokens(t: int = 5, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((t, d), dtype=np.float32)


def post_json(url: str, document: object, **headers: str) -> httpx.Response:
    return httpx.post(url + INFER, content=json.dumps(document).encode(), headers=headers, timeout=10)


def hidden(shape: list[int], data: object, datatype: str = "FP32") -> dict[str, object]:
    return {"inputs": [{"name": "hidden_states", "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/health", "/ready", "/v2/models/tiny/ready"])
def test_health_endpoints_answer_200_when_started(server_url: str, path: str) -> None:
    assert httpx.get(server_url + path).status_code == 200


def test_model_metadata_describes_input_and_outputs(server_url: str) -> None:
    meta = httpx.get(server_url + "/v2/models/tiny").json()
    assert meta["inputs"] == [{"name": "hidden_states", "datatype": "FP32", "shape": [-1, 16]}]
    assert [o["name"] for o in meta["outputs"]] == ["expert_indices", "expert_weights", "num_experts", "moe_output"]
    assert meta["parameters"]["input_datatypes"] == ["FP32", "FP16", "BF16"]  # the 16-bit ones are taken too


def test_json_request_returns_routing_outputs(server_url: str) -> None:
    result = route(server_url, "tiny", tokens(), binary=False)
    assert result.indices.shape == (5, 4) and result.indices.dtype == np.int64
    assert result.weights.shape == (5, 4) and result.weights.dtype == np.float32
    assert result.moe_output is not None and result.moe_output.shape == (5, 16)
    assert np.array_equal((result.indices >= 0).sum(1), result.k)


def test_binary_and_json_requests_route_identically(server_url: str) -> None:
    x = tokens(seed=3)
    as_binary = route(server_url, "tiny", x, binary=True)
    as_json = route(server_url, "tiny", x, binary=False)
    assert np.array_equal(as_binary.indices, as_json.indices)
    np.testing.assert_allclose(as_binary.weights, as_json.weights, rtol=1e-6)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_16_bit_requests_route_as_their_float32_values_with_hosted_experts(stateless_url: str, datatype: str) -> None:
    # This server hosts expert FFNs: its batches are gathered into one float32 buffer, 16-bit requests widened.
    x = tokens(t=7, seed=4)
    rounded = np.asarray(
        torch.from_numpy(x).to(torch.bfloat16 if datatype == "BF16" else torch.float16).float().numpy()
    )
    for binary in (True, False):
        sent = route(stateless_url, "tiny", x, binary=binary, datatype=datatype)
        exact = route(stateless_url, "tiny", rounded, binary=True)
        assert np.array_equal(sent.indices, exact.indices)
        np.testing.assert_allclose(sent.weights, exact.weights, rtol=1e-6)
        assert sent.moe_output is not None and exact.moe_output is not None
        np.testing.assert_allclose(sent.moe_output, exact.moe_output, rtol=1e-5, atol=1e-6)


def test_an_fp16_json_value_out_of_range_is_answered_400_naming_the_range(server_url: str) -> None:
    response = post_json(server_url, hidden([1, 16], [70000.0] + [0.0] * 15, datatype="FP16"))
    assert response.status_code == 400
    assert "outside the FP16 range" in response.json()["error"]


def test_binary_response_carries_header_length(server_url: str) -> None:
    body, headers = encode_request(tokens(), binary=True)
    response = httpx.post(server_url + INFER, content=body, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert int(response.headers[HEADER_LENGTH]) < len(response.content)


def test_batch_sequence_input_keeps_its_leading_dimensions(server_url: str) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 16), dtype=np.float32)
    result = route(server_url, "tiny", x)
    assert result.indices.shape == (2, 3, 4)
    assert result.k.shape == (2, 3)


def test_requested_output_subset_is_all_that_is_returned(server_url: str) -> None:
    document = hidden([2, 16], [0.5] * 32) | {"outputs": [{"name": "num_experts"}]}
    outputs = post_json(server_url, document).json()["outputs"]
    assert [o["name"] for o in outputs] == ["num_experts"]


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (hidden([2, 15], [0.0] * 30), "dimension mismatch"),
        (hidden([2, 16], [0.0] * 32, datatype="INT32"), "wrong datatype 'INT32'"),
        (hidden([2, 16], [0.0] * 31), "holds 31 values"),
        (hidden([0, 16], []), "empty tensor"),
        (hidden([32], [0.0] * 32), "wrong shape"),
        (hidden([1, 16], [float("nan")] + [0.0] * 15), "NaN or Inf"),
        (hidden([1, 16], ["a"] * 16), 'data[0] is the JSON string "a": every element must be a number'),
        ({"inputs": []}, "non-empty 'inputs'"),
        ({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}]}, "unknown input 'x'"),
        (hidden([1, 16], [0.0] * 16) | {"outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    ],
)
def test_bad_input_is_answered_400_naming_the_problem(server_url: str, document: object, fragment: str) -> None:
    response = post_json(server_url, document)
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_malformed_json_is_answered_400(server_url: str) -> None:
    response = httpx.post(server_url + INFER, content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]


def test_truncated_binary_body_is_answered_400(server_url: str) -> None:
    body, headers = encode_request(tokens(), binary=True)
    response = httpx.post(server_url + INFER, content=body[:-7], headers=headers)
    assert response.status_code == 400
    assert "truncated binary body" in response.json()["error"]


def test_header_length_beyond_body_is_answered_400(server_url: str) -> None:
    response = httpx.post(server_url + INFER, content=b"{}", headers={HEADER_LENGTH: "99"})
    assert response.status_code == 400
    assert HEADER_LENGTH in response.json()["error"]


def test_too_many_tokens_is_answered_413(server_url: str) -> None:
    response = post_json(server_url, hidden([513, 16], [0.0] * (513 * 16)))
    assert response.status_code == 413
    assert "too many tokens" in response.json()["error"]


def test_oversize_body_is_answered_413(server_url: str) -> None:
    response = httpx.post(server_url + INFER, content=b" " * 70_000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "over the limit" in response.json()["error"]


def test_unknown_model_is_answered_404(server_url: str) -> None:
    response = httpx.post(server_url + "/v2/models/other/infer", content=b"{}")
    assert response.status_code == 404
    assert "unknown model 'other'" in response.json()["error"]


def test_paths_beside_the_infer_fast_path_keep_the_framework_answers(server_url: str) -> None:
    assert httpx.get(server_url + INFER).status_code == 405
    assert httpx.post(server_url + "/v2/models/tiny%2Fx/infer", content=b"{}").status_code == 404
    assert httpx.post(server_url + "/v2/models//infer", content=b"{}").status_code == 404
    assert httpx.post(server_url + "/v2/models/tiny/infer/extra", content=b"{}").status_code == 404


def huge_binary_request(t: int = 3) -> tuple[bytes, dict[str, str]]:
    """Finite values whose gate logits overflow float32 (3e38 x a sum of weights)."""
    x = tokens(t=t, seed=9)
    x[1, :] = 3e38
    return encode_request(x, binary=True)


def test_finite_values_whose_logits_overflow_are_answered_400_with_hosted_experts(server_url: str) -> None:
    # This server gathers each batch into one array for its expert FFNs: the logits are checked there too.
    body, headers = huge_binary_request()
    response = httpx.post(server_url + INFER, content=body, headers=headers, timeout=10)
    assert response.status_code == 400
    assert "too large for the router" in response.json()["error"]


@pytest.mark.parametrize("experts", [True, False])
def test_a_refused_request_leaves_no_trace_in_the_routing_state(experts: bool) -> None:
    # complexity's calibration and the selection bias learn from every routed batch: a refused one must not count.
    config = small_config(strategy="complexity", experts={"enabled": experts, "hiddenDim": 8})
    served, reference = DynamicRouter(config.router), DynamicRouter(config.router)
    body, headers = huge_binary_request()
    with running_server(config, router=served) as (url, _app):
        for seed in (11, 12):
            x = tokens(t=64, seed=seed)
            response = httpx.post(url + INFER, content=body, headers=headers, timeout=10)
            assert response.status_code == 400
            got = route(url, "tiny", x)
            expected = reference.route(x)
            assert np.array_equal(got.k, expected.k.numpy())
            assert np.array_equal(got.indices, expected.indices.numpy())
    assert served.calibrator is not None and reference.calibrator is not None
    assert (served.calibrator.mean, served.calibrator.var) == (reference.calibrator.mean, reference.calibrator.var)


def test_server_keeps_serving_after_bad_requests(server_url: str) -> None:
    for _ in range(3):
        httpx.post(server_url + INFER, content=b"\xff\xfe garbage")
    assert route(server_url, "tiny", tokens()).k.shape == (5,)


def test_inference_without_api_key_is_answered_401(secured_url: str) -> None:
    with pytest.raises(RouterClientError) as caught:
        route(secured_url, "tiny", tokens())
    assert caught.value.status == 401


def test_wrong_api_key_is_answered_401(secured_url: str) -> None:
    response = httpx.post(secured_url + INFER, content=b"{}", headers={"X-API-Key": "nope"})
    assert response.status_code == 401


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
def test_right_api_key_is_accepted_in_either_header(secured_url: str, header: str) -> None:
    value = f"Bearer {API_KEY}" if header == "Authorization" else API_KEY
    body, headers = encode_request(tokens(), binary=True)
    response = httpx.post(secured_url + INFER, content=body, headers=headers | {header: value})
    assert response.status_code == 200


def test_health_and_metrics_stay_open_with_an_api_key(secured_url: str) -> None:
    assert httpx.get(secured_url + "/v2/health/ready").status_code == 200
    assert httpx.get(secured_url + "/metrics").status_code == 200


def test_metrics_expose_the_documented_names(server_url: str) -> None:
    route(server_url, "tiny", tokens())
    post_json(server_url, hidden([1, 3], [0.0] * 3))
    text = httpx.get(server_url + "/metrics").text
    for name in [
        'moe_router_requests_total{code="200"}',
        'moe_router_requests_total{code="400"}',
        "moe_router_request_duration_seconds_bucket",
        'moe_router_errors_total{reason="bad_request"}',
        "moe_router_tokens_total",
        "moe_router_experts_per_token_bucket",
        'moe_router_expert_utilization{expert="7"}',
        "moe_router_load_cv",
        "moe_router_batch_tokens_bucket",
    ]:
        assert name in text, name


def test_openapi_document_is_served(server_url: str) -> None:
    paths = httpx.get(server_url + "/openapi.json").json()["paths"]
    assert "/v2/models/{model_name}/infer" in paths


def test_the_advertised_version_is_served_under_its_versioned_paths(server_url: str) -> None:
    versioned = server_url + "/v2/models/tiny/versions/1"
    assert httpx.get(server_url + "/v2/models/tiny").json()["versions"] == ["1"]
    assert httpx.get(versioned).json() == httpx.get(server_url + "/v2/models/tiny").json()
    assert httpx.get(versioned + "/ready").status_code == 200
    for binary in (True, False):  # the binary body takes the fast path, as the unversioned one does
        body, headers = encode_request(tokens(), binary=binary)
        response = httpx.post(versioned + "/infer", content=body, headers=headers)
        assert response.status_code == 200
        header = response.content[: int(response.headers.get(HEADER_LENGTH, len(response.content)))]
        assert json.loads(header)["model_version"] == "1"


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("GET", "/ready"), ("POST", "/infer")])
def test_another_version_is_answered_404_naming_the_one_served(server_url: str, method: str, suffix: str) -> None:
    response = httpx.request(method, server_url + "/v2/models/tiny/versions/2" + suffix, content=b"{}")
    assert response.status_code == 404
    assert response.json()["error"] == "model 'tiny' has no version '2'; this server serves version '1' only"


def test_an_unknown_model_under_a_versioned_path_is_named(server_url: str) -> None:
    response = httpx.post(server_url + "/v2/models/other/versions/1/infer", content=b"{}")
    assert response.status_code == 404
    assert "unknown model 'other'" in response.json()["error"]


def test_a_compressed_body_is_answered_415_naming_the_encoding(server_url: str) -> None:
    body, headers = encode_request(tokens(), binary=True)
    compressed = headers | {"Content-Encoding": "gzip"}
    response = httpx.post(server_url + INFER, content=gzip.compress(body), headers=compressed)
    assert response.status_code == 415
    assert response.json()["error"].startswith("Content-Encoding 'gzip' is not supported: send the request body")
    assert response.headers["accept-encoding"] == "identity"
    plain = httpx.post(server_url + INFER, content=body, headers=headers | {"Content-Encoding": "identity"})
    assert plain.status_code == 200


def test_a_stale_header_length_is_answered_400_naming_the_bytes_read(server_url: str) -> None:
    body, headers = encode_request(tokens(), binary=True)
    response = httpx.post(server_url + INFER, content=body, headers=headers | {HEADER_LENGTH: "20"})
    assert response.status_code == 400
    assert response.json()["error"].startswith(
        f"the first 20 bytes ({HEADER_LENGTH}: 20) are not a JSON object: malformed JSON"
    )


def test_an_output_asked_as_a_classification_is_answered_400(server_url: str) -> None:
    outputs = [{"name": "expert_indices", "parameters": {"classification": 2}}]
    document = hidden([1, 16], [0.0] * 16) | {"outputs": outputs}
    response = post_json(server_url, document)
    assert response.status_code == 400
    assert "output 'expert_indices' parameters.classification is not supported" in response.json()["error"]
