"""Process set-up that must not import torch (the multi-worker supervisor uses it): CPUs, workers, API key."""

from __future__ import annotations

import math
import os
from pathlib import Path

from router_runtime.config import API_KEY_ENV, API_KEY_FILE_ENV


def resolve_api_key(environ: dict[str, str] | None = None) -> str | None:
    """The API key from ``MOE_ROUTER_API_KEY`` or the file named by ``MOE_ROUTER_API_KEY_FILE``."""
    env = os.environ if environ is None else environ
    key = env.get(API_KEY_ENV, "").strip()
    if key:
        return key
    key_file = env.get(API_KEY_FILE_ENV, "").strip()
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{API_KEY_FILE_ENV}={key_file} cannot be read: {exc}") from exc
        if not key:
            raise ValueError(f"{API_KEY_FILE_ENV}={key_file} is empty")
        return key
    return None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs the container may use (cgroup v2 ``cpu.max`` or v1 CFS quota), rounded up; None when unlimited."""
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        v1_quota = root / "cpu" / "cpu.cfs_quota_us"
        if v1_quota.is_file():
            quota_us = int(v1_quota.read_text())
            period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a cpuset, the static CPU manager, taskset), not the node's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity API on this platform
        return os.cpu_count() or 1


def resolve_workers(setting: int, cpu_limit: int | None, cpu_count: int) -> int:
    """Worker processes for ``server.workers``: itself when set, else the CPU limit (1 without one)."""
    if setting > 0:
        return setting
    return max(1, min(cpu_limit, cpu_count)) if cpu_limit is not None else 1


def threads_per_worker(workers: int, cpu_limit: int | None, cpu_count: int) -> int:
    """torch threads of each worker: the CPUs the pod may use, shared out, at least one."""
    return max(1, (cpu_limit if cpu_limit is not None else cpu_count) // workers)
