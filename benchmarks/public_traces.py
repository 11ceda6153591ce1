"""Download the public traces the scaling docs quote beyond ../shared/traces, ready for ``scaling.py``.

docs/predictive-scaling.md reports the benchmark on seventeen more series from the Numenta Anomaly
Benchmark (github.com/numenta/NAB, MIT licence): every Twitter volume but the shared AMZN one, and
the load-like AWS CloudWatch series. They are not in the repository; this fetches them (the machine
needs to reach raw.githubusercontent.com), keeps the ``timestamp,value`` columns (some NAB versions
add ``label`` and ``notes``), and repairs the one defect the trace reader rightly refuses: NAB's
CloudWatch files stamp the hour skipped at the 2014-03-09 daylight-saving change all at 03:00. A run
of repeated timestamps is spread over the gap before it at the file's usual step, when the gap holds
it (there, 02:01 to 02:56); anything else is left for the reader to refuse, naming the time.

    .venv/bin/python benchmarks/public_traces.py --out out/public-traces
    .venv/bin/python benchmarks/scaling.py --traces out/public-traces --no-synthetic
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import sys
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

NAB_BASE_URL = "https://raw.githubusercontent.com/numenta/NAB/master/"
TWITTER = ("AAPL", "CRM", "CVS", "FB", "GOOG", "IBM", "KO", "PFE", "UPS")
NAB_FILES = (
    *(f"data/realTweets/Twitter_volume_{name}.csv" for name in TWITTER),
    "data/realAWSCloudwatch/ec2_cpu_utilization_825cc2.csv",
    "data/realAWSCloudwatch/ec2_disk_write_bytes_1ef3de.csv",
    "data/realAWSCloudwatch/ec2_network_in_257a54.csv",
    "data/realAWSCloudwatch/ec2_network_in_5abac7.csv",
    "data/realAWSCloudwatch/grok_asg_anomaly.csv",
    "data/realAWSCloudwatch/iio_us-east-1_i-a2eb1cd9_NetworkIn.csv",
    "data/realAWSCloudwatch/rds_cpu_utilization_cc0c53.csv",
    "data/realKnownCause/cpu_utilization_asg_misconfiguration.csv",
)
_FORMAT = "%Y-%m-%d %H:%M:%S"


class FetchError(Exception):
    """A file could not be downloaded or does not look like a NAB series."""


def normalise(text: str, source: str) -> tuple[str, int]:
    """``timestamp,value`` CSV text, and how many repeated timestamps were spread over the gap before them."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [name.strip().lower() for name in rows[0][:2]] != ["timestamp", "value"]:
        raise FetchError(f"{source}: not a NAB series (header {rows[0] if rows else 'missing'})")
    try:
        times = [datetime.strptime(row[0], _FORMAT) for row in rows[1:] if row]
    except ValueError as exc:
        raise FetchError(f"{source}: {exc}") from None
    values = [row[1] for row in rows[1:] if row]
    steps = Counter(later - earlier for earlier, later in itertools.pairwise(times) if later > earlier)
    step = steps.most_common(1)[0][0] if steps else timedelta(0)
    repaired = 0
    i = 1
    while i < len(times):
        if times[i] != times[i - 1]:
            i += 1
            continue
        start = i - 1  # times[start:end] all repeat one timestamp
        end = i + 1
        while end < len(times) and times[end] == times[start]:
            end += 1
        count = end - start
        before = times[start - 1] if start > 0 else None
        # Spread the run over the gap before it, one step apart, when the gap holds it.
        if before is not None and step and before + step * count <= times[start]:
            for k in range(count):
                times[start + k] = before + step * (k + 1)
            repaired += count
        i = end
    out = io.StringIO()
    out.write("timestamp,value\n")
    for moment, value in zip(times, values, strict=True):
        out.write(f"{moment.strftime(_FORMAT)},{value}\n")
    return out.getvalue(), repaired


def fetch(base_url: str, path: str, timeout: float) -> str:
    url = base_url.rstrip("/") + "/" + path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return str(answer.read().decode("utf-8"))
    except (urllib.error.URLError, TimeoutError, UnicodeDecodeError) as exc:
        raise FetchError(f"{url}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/public-traces"), help="folder for the CSV files")
    parser.add_argument("--base-url", default=NAB_BASE_URL, help="where NAB's data/ folder is served")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per download")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in NAB_FILES:
        name = Path(path).name
        try:
            text, repaired = normalise(fetch(args.base_url, path, args.timeout), name)
        except FetchError as exc:
            print(f"public_traces: {exc}", file=sys.stderr)
            failed += 1
            continue
        (args.out / name).write_text(text)
        note = f" ({repaired} repeated timestamps spread over the gap before them)" if repaired else ""
        print(f"{args.out / name}: {text.count(chr(10)) - 1} samples{note}")
    if failed:
        print(f"public_traces: {failed} of {len(NAB_FILES)} files failed", file=sys.stderr)
        return 1
    print(f"next: .venv/bin/python benchmarks/scaling.py --traces {args.out} --no-synthetic")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
