"""The runtime installed where nothing but ``$TMPDIR`` is writable: a hardened host, ``docker run --read-only``.

numba's default cache places are next to the package and under ``$HOME``; both are read-only here. As root,
write permission bits do not bind, so the processes run without the capabilities that bypass them.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from router_runtime.protocol import encode_request
from tests.integration.runtime.conftest import small_config
from tests.integration.runtime.serving import serve_process

_PR_CAPBSET_DROP = 24
#: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: what lets root write into a directory it may not.
_FILE_CAPABILITIES = (1, 2, 3)
PACKAGE = Path(__file__).resolve().parents[3] / "router_runtime"


def drop_file_capabilities() -> None:
    """In the child before exec: permission bits bind even for root (a no-op for other users)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in _FILE_CAPABILITIES:
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def read_only_tree(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def installed(tmp_path: Path) -> dict[str, str]:
    """The environment of a process that imports a read-only copy of the package with a read-only ``$HOME``."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "router_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    home.mkdir()
    writable = tmp_path / "tmp"
    writable.mkdir()
    read_only_tree(site)
    read_only_tree(home)
    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=drop_file_capabilities, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"cannot run a process without root's file capabilities here: {exc}")
    environ = {name: value for name, value in os.environ.items() if not name.startswith("NUMBA_")}
    return environ | {"HOME": str(home), "TMPDIR": str(writable), "PYTHONPATH": str(site),
                      "PYTHONDONTWRITEBYTECODE": "1", "MOE_ROUTER_API_KEY": ""}  # fmt: skip


def test_kernels_import_without_a_writable_cache_and_say_how_to_keep_them(
    installed: dict[str, str], tmp_path: Path
) -> None:
    unwritable = tmp_path / "home" / "numba-cache"
    site = str(tmp_path / "site")
    script = (
        f"import numpy as np, router_runtime.kernels as k; assert k.__file__.startswith({site!r}); "
        "x = np.arange(8, dtype=np.float32).reshape(2, 4); out = np.empty_like(x); "
        "k.shift_rows(x, 0, 2, 4, out); print(out[1].tolist())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=installed | {"NUMBA_CACHE_DIR": str(unwritable)},
        cwd=tmp_path, preexec_fn=drop_file_capabilities, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[-3.0,", "-2.0,", "-1.0,", "0.0]"]  # compiled and run all the same
    assert result.stderr.count("compiled again at each start") == 1
    assert "NUMBA_CACHE_DIR" in result.stderr


def test_serve_keeps_the_compiled_kernels_in_a_private_directory_under_tmpdir(
    installed: dict[str, str], tmp_path: Path
) -> None:
    wire = small_config().model_dump(by_alias=True, mode="json")
    with serve_process(
        wire, tmp_path / "tmp", env=installed, replace_env=True, cwd=tmp_path, preexec_fn=drop_file_capabilities,
        ready_timeout=240,
    ) as (url, _process):  # fmt: skip
        body, headers = encode_request(np.ones((4, 16), np.float32), binary=True)
        assert httpx.post(url + "/v2/models/tiny/infer", content=body, headers=headers, timeout=60).status_code == 200
    cache = tmp_path / "tmp" / f"moe-router-numba-{os.getuid()}"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert list(cache.rglob("*.nbi")), "no compiled kernel was cached"
