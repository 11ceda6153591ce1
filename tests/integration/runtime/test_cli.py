"""``moe-router route`` against a served router, and how ``serve`` finds its API key."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe_operator.sandbox import free_port
from router_runtime.__main__ import build_parser, main
from router_runtime.server import resolve_api_key
from tests.integration.runtime.conftest import API_KEY


def test_route_prints_routing_statistics(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "--url", server_url, "--model", "tiny", "--tokens", "32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 32
    assert 1 <= summary["mean_k"] <= 4
    assert len(summary["expert_load"]) == 8 and sum(summary["expert_load"]) == sum(
        int(k) * n for k, n in summary["k_histogram"].items()
    )
    assert set(summary["server"]) >= {"mean_k", "dropped_mass", "flops_ratio"}


def test_route_over_json_gives_the_same_statistics(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    main(["route", "--url", server_url, "--model", "tiny", "--tokens", "16"])
    binary = json.loads(capsys.readouterr().out)
    main(["route", "--url", server_url, "--model", "tiny", "--tokens", "16", "--json"])
    assert json.loads(capsys.readouterr().out)["expert_load"] == binary["expert_load"]


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_route_sends_16_bit_tokens_in_binary_and_json_alike(
    stateless_url: str, datatype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["route", "--url", stateless_url, "--model", "tiny", "--tokens", "16", "--datatype", datatype]
    assert main(command) == 0
    binary = json.loads(capsys.readouterr().out)
    assert binary["tokens"] == 16
    assert main([*command, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["expert_load"] == binary["expert_load"]


def test_route_reports_a_rejected_api_key(secured_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "--url", secured_url, "--model", "tiny", "--api-key", "wrong"]) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert main(["route", "--url", secured_url, "--model", "tiny", "--api-key", API_KEY]) == 0


def test_route_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "--url", "http://127.0.0.1:9", "--model", "tiny"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_serve_accepts_host_and_port_overrides() -> None:
    args = build_parser().parse_args(["serve", "--config", "router.yaml", "--host", "127.0.0.1", "--port", "9000"])
    assert (args.config, args.host, args.port) == ("router.yaml", "127.0.0.1", 9000)


def test_api_key_comes_from_env_first_then_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key({"MOE_ROUTER_API_KEY": "from-env", "MOE_ROUTER_API_KEY_FILE": str(key_file)}) == "from-env"
    assert resolve_api_key({"MOE_ROUTER_API_KEY_FILE": str(key_file)}) == "from-file"
    assert resolve_api_key({}) is None


def test_unreadable_api_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        resolve_api_key({"MOE_ROUTER_API_KEY_FILE": str(tmp_path / "missing")})


def test_serve_with_a_broken_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "router.yaml"
    config.write_text("router:\n  maxExperts: 9\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "maxExperts" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "257", "two"])
def test_serve_rejects_a_bad_worker_count(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--workers", value])
    assert "--workers must be" in capsys.readouterr().err


def test_serve_with_workers_on_a_taken_port_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--workers", "2", "--host", "127.0.0.1", "--port", port]) == 1
    assert "cannot listen" in capsys.readouterr().err


def missing_weights_config(tmp_path: Path) -> Path:
    config = tmp_path / "router.yaml"
    config.write_text(f"router:\n  weights:\n    path: {tmp_path / 'nope.safetensors'}\n")
    return config


def test_serve_that_cannot_build_its_router_says_why_in_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(missing_weights_config(tmp_path)), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "moe-router serve: cannot start the router: weights file" in err and "does not exist" in err
    assert "Traceback" not in err


def test_workers_that_cannot_start_stop_the_server_with_exit_1_instead_of_restarting(tmp_path: Path) -> None:
    # In a pod: exit, so the kubelet's back-off (CrashLoopBackOff) and the log show the cause.
    done = subprocess.run(
        [sys.executable, "-m", "router_runtime", "serve", "--config", str(missing_weights_config(tmp_path)),
         "--workers", "2", "--host", "127.0.0.1", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "before it could serve" in done.stderr
    assert "restarting" not in done.stderr and "Traceback" not in done.stderr
    assert 1 <= done.stderr.count("cannot start the router: weights file") <= 2  # once per worker, never again
