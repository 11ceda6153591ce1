"""The runtime reads the container's CPU limit so torch does not oversubscribe the pod's quota."""

from __future__ import annotations

from pathlib import Path

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
