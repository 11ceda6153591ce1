"""benchmarks/public_traces.py: NAB files fetched over HTTP, normalised for the trace reader."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

from moe_operator.scaling.traces import TraceError, parse_trace, read_trace
from tests.support.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def fetcher() -> ModuleType:
    return load_benchmark("public_traces.py", "public_traces")


def series(start: str, samples: int, extra_columns: str = "") -> list[str]:
    t0 = datetime.fromisoformat(start)
    return [f"{(t0 + timedelta(minutes=5 * i)):%Y-%m-%d %H:%M:%S},{10 + i % 7}{extra_columns}" for i in range(samples)]


def dst_glitch() -> str:
    """Like NAB's CloudWatch files on 2014-03-09: the skipped hour's 12 samples all stamped 03:00."""
    before = series("2014-03-09 00:06:00", 23)  # 00:06 .. 01:56
    after = series("2014-03-09 03:01:00", 20)
    return "timestamp,value\n" + "\n".join([*before, *["2014-03-09 03:00:00,42.0"] * 12, *after]) + "\n"


def test_a_daylight_saving_run_is_spread_over_the_skipped_hour(fetcher: ModuleType) -> None:
    with pytest.raises(TraceError, match="duplicate timestamps"):
        parse_trace(dst_glitch(), "raw.csv", "counts")
    text, repaired = fetcher.normalise(dst_glitch(), "glitch.csv")
    assert repaired == 12
    stamps = [line.split(",")[0] for line in text.splitlines()[1:]]
    assert stamps[22:36] == ["2014-03-09 01:56:00", *[f"2014-03-09 02:{m:02d}:00" for m in range(1, 57, 5)],
                             "2014-03-09 03:01:00"]
    trace = parse_trace(text, "fixed.csv", "counts")
    assert trace.times.size == 55 and trace.duration == pytest.approx(55 * 300.0)


def test_labelled_columns_are_dropped_and_a_foreign_file_is_refused(fetcher: ModuleType) -> None:
    labelled = "timestamp,value,label,notes\n" + "\n".join(series("2014-02-14 14:30:00", 3, ",0,"))
    text, repaired = fetcher.normalise(labelled, "rds.csv")
    assert (text.splitlines(), repaired) == (["timestamp,value", *series("2014-02-14 14:30:00", 3)], 0)
    with pytest.raises(fetcher.FetchError, match=r"page\.html: not a NAB series"):
        fetcher.normalise("<html>not found</html>\n", "page.html")


@pytest.fixture
def nab_mirror(tmp_path: Path, fetcher: ModuleType) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server holding every file the script fetches, in NAB's layout."""
    root = tmp_path / "mirror"
    for index, path in enumerate(fetcher.NAB_FILES):
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        body = dst_glitch() if index == 0 else "timestamp,value\n" + "\n".join(series("2015-02-26 21:42:53", 40)) + "\n"
        target.write_text(body)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


def test_every_file_is_fetched_and_reads_as_a_trace(
    fetcher: ModuleType, nab_mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = nab_mirror
    out = tmp_path / "traces"
    assert fetcher.main(["--out", str(out), "--base-url", url]) == 0
    files = sorted(out.glob("*.csv"))
    assert [f.name for f in files] == sorted(Path(p).name for p in fetcher.NAB_FILES)
    assert all(read_trace(f, "counts").times.size >= 40 for f in files)
    printed = capsys.readouterr().out
    assert "Twitter_volume_AAPL.csv: 55 samples (12 repeated timestamps spread over the gap before them)" in printed
    assert f"--traces {out} --no-synthetic" in printed


def test_a_missing_file_is_named_and_fails_the_run(
    fetcher: ModuleType, nab_mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, root = nab_mirror
    (root / fetcher.NAB_FILES[-1]).unlink()
    assert fetcher.main(["--out", str(tmp_path / "traces"), "--base-url", url]) == 1
    errors = capsys.readouterr().err
    assert f"{url}{fetcher.NAB_FILES[-1]}: HTTP Error 404" in errors
    assert "1 of 17 files failed" in errors
