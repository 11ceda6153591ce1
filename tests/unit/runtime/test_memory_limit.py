"""The in-flight byte budget each worker derives from the container's memory limit, and the kernel cache place."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from router_runtime.__main__ import _with_inflight_budget
from router_runtime.config import RuntimeFileConfig
from router_runtime.process import (
    WORKER_BASE_BYTES,
    cgroup_memory_limit,
    inflight_byte_budget,
    largest_request_bytes,
    private_kernel_cache_dir,
)

MIB = 1024 * 1024
GIB = 1024 * MIB


def test_cgroup_v2_memory_max_is_read_in_bytes(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("2147483648\n")
    assert cgroup_memory_limit(tmp_path) == 2 * GIB


def test_cgroup_v2_memory_max_of_max_is_no_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(tmp_path) is None


def test_cgroup_v1_limit_is_read_and_its_huge_unlimited_value_is_no_limit(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("1073741824\n")
    assert cgroup_memory_limit(tmp_path) == GIB
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(tmp_path) is None


def test_missing_or_garbled_memory_files_mean_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory_limit(tmp_path) is None
    (tmp_path / "memory.max").write_text("lots")
    assert cgroup_memory_limit(tmp_path) is None


def test_the_budget_is_half_of_each_workers_share_beyond_a_warm_worker() -> None:
    assert inflight_byte_budget(2 * GIB, 1, MIB) == (2 * GIB - WORKER_BASE_BYTES) // 2
    assert inflight_byte_budget(4 * GIB, 2, MIB) == (2 * GIB - WORKER_BASE_BYTES) // 2


def test_the_budget_never_falls_below_one_request_of_the_largest_size() -> None:
    assert inflight_byte_budget(2 * GIB, 4, 201 * MIB) == 201 * MIB  # 512 MiB a worker: less than a warm one


def test_without_a_memory_limit_there_is_no_budget() -> None:
    assert inflight_byte_budget(None, 2, MIB) is None


def test_a_worker_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        inflight_byte_budget(GIB, 0, MIB)


def test_the_largest_request_is_the_token_limit_in_fp32_capped_by_the_body_limit() -> None:
    assert largest_request_bytes(256 * MIB, 65536, 768) == 65536 * 768 * 4
    assert largest_request_bytes(64 * MIB, 65536, 768) == 64 * MIB


def test_serve_derives_the_budget_only_when_the_config_does_not_set_it() -> None:
    defaults = RuntimeFileConfig()
    derived = _with_inflight_budget(defaults, 1, 2 * GIB).server.max_inflight_bytes
    assert derived == (2 * GIB - WORKER_BASE_BYTES) // 2
    explicit = RuntimeFileConfig.model_validate({"server": {"maxInflightBytes": 4096}})
    assert _with_inflight_budget(explicit, 1, 2 * GIB).server.max_inflight_bytes == 4096
    assert _with_inflight_budget(defaults, 1, None).server.max_inflight_bytes is None


def test_the_kernel_cache_directory_is_private_to_this_user(tmp_path: Path) -> None:
    path = private_kernel_cache_dir(str(tmp_path))
    assert path == str(tmp_path / f"moe-router-numba-{os.getuid()}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert private_kernel_cache_dir(str(tmp_path)) == path  # found again at the next start


def test_a_kernel_cache_directory_others_can_write_is_not_used(tmp_path: Path) -> None:
    planted = tmp_path / f"moe-router-numba-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)  # numba unpickles what it finds there
    assert private_kernel_cache_dir(str(tmp_path)) is None
