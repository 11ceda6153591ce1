"""The runtime reads the container's CPU limit so torch does not oversubscribe the pod's quota."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from router_runtime.process import resolve_workers, threads_per_worker, usable_cpus
from router_runtime.server import cgroup_cpu_limit


def test_cgroup_v2_quota_is_rounded_up_to_whole_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2


def test_cgroup_v2_without_a_quota_is_unlimited(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota_is_read(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 4


def test_cgroup_v1_negative_quota_is_unlimited(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_missing_or_garbled_cgroup_files_mean_unknown(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("garbage")
    assert cgroup_cpu_limit(tmp_path) is None


def test_auto_workers_follow_the_cpu_limit() -> None:
    assert resolve_workers(0, cpu_limit=2, cpu_count=64) == 2
    assert threads_per_worker(2, cpu_limit=2, cpu_count=64) == 1


def test_auto_workers_without_a_limit_is_one_process_with_every_core() -> None:
    assert resolve_workers(0, cpu_limit=None, cpu_count=16) == 1
    assert threads_per_worker(1, cpu_limit=None, cpu_count=16) == 16


def test_auto_workers_never_exceed_the_cores() -> None:
    assert resolve_workers(0, cpu_limit=8, cpu_count=4) == 4


def test_an_explicit_worker_count_shares_out_the_cpus() -> None:
    assert resolve_workers(3, cpu_limit=8, cpu_count=64) == 3
    assert threads_per_worker(3, cpu_limit=8, cpu_count=64) == 2
    assert threads_per_worker(4, cpu_limit=2, cpu_count=64) == 1


def test_usable_cpus_follow_the_affinity_mask_not_the_node() -> None:
    # A process pinned to one CPU (a cpuset, the static CPU manager, taskset) must size itself for one.
    script = "from router_runtime.process import usable_cpus; print(usable_cpus())"
    pinned = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert pinned.stdout.strip() == "1"
    assert usable_cpus() == len(os.sched_getaffinity(0))
