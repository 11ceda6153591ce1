"""Process set-up that must not import torch (the multi-worker supervisor uses it): CPUs, workers, API key."""

from __future__ import annotations

import math
import os
import stat
import tempfile
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


#: numba's environment variable for where it keeps compiled kernels.
NUMBA_CACHE_DIR_ENV = "NUMBA_CACHE_DIR"


def private_kernel_cache_dir(parent: str | None = None) -> str | None:
    """A directory for numba's compiled kernels under ``$TMPDIR`` that only this user can write, created if needed.

    numba's default places (the package directory, ``$HOME/.cache``) are read-only in a hardened image or
    install. The name holds the uid and the directory must be ours and closed to others: numba unpickles what
    it finds there, so a directory another user of a shared ``/tmp`` created first is not used (None).
    """
    path = os.path.join(parent if parent is not None else tempfile.gettempdir(), f"moe-router-numba-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return None
    private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022
    return path if private else None


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


#: cgroup v1 reports "no limit" as the largest page-aligned 64-bit count; anything this big is no limit.
_V1_NO_MEMORY_LIMIT = 1 << 62
#: Resident memory of a warm worker before it holds any request (measured: ~590 MB, d=768, E=8, experts off).
WORKER_BASE_BYTES = 600 * 1024 * 1024
#: Share of a worker's spare memory that request bodies may hold; the rest is for decoding and routing them.
INFLIGHT_SHARE = 0.5


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the container may use (cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``); None when unlimited."""
    try:
        if (root / "memory.max").is_file():
            value = (root / "memory.max").read_text().strip()
            return None if value == "max" else int(value)
        v1_limit = root / "memory" / "memory.limit_in_bytes"
        if v1_limit.is_file():
            limit = int(v1_limit.read_text())
            return None if limit >= _V1_NO_MEMORY_LIMIT else limit
    except (OSError, ValueError):
        return None
    return None


def inflight_byte_budget(memory_limit: int | None, workers: int, largest_request: int) -> int | None:
    """Bytes of request bodies one worker may hold at once (``server.maxInflightBytes`` when not set).

    Each worker's share of the memory limit, less a warm worker's own memory, times ``INFLIGHT_SHARE``; never
    below ``largest_request`` (one request of the largest size the limits allow); None without a limit.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if memory_limit is None:
        return None
    spare = memory_limit // workers - WORKER_BASE_BYTES
    return max(largest_request, int(spare * INFLIGHT_SHARE))


def largest_request_bytes(max_body_bytes: int, max_request_tokens: int, input_dim: int) -> int:
    """The largest body the limits admit: ``maxRequestTokens`` FP32 tokens in binary, or ``maxBodyBytes``."""
    return min(max_body_bytes, max_request_tokens * input_dim * 4)


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
