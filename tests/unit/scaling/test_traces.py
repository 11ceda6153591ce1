"""Trace files: the simulator's rate CSV and the converters from public formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_operator.scaling.traces import (
    TraceError,
    format_rate_csv,
    from_request_times,
    main,
    parse_timestamp,
    parse_trace,
    read_trace,
)


def test_rate_csv_holds_each_rate_until_the_next_sample() -> None:
    trace = parse_trace("timestamp,value\n2024-01-01 00:00:00,2\n2024-01-01 00:01:00,5\n")
    assert trace.rate_at(np.array([0.0, 59.9, 60.0, 119.0])).tolist() == [2.0, 2.0, 5.0, 5.0]


def test_counts_per_step_become_rates_over_the_step() -> None:
    text = "timestamp,value\n2014-04-10 00:00:00,600\n2014-04-10 00:05:00,300\n2014-04-10 00:10:00,0\n"
    trace = parse_trace(text, trace_format="counts")
    assert trace.rates.tolist() == [2.0, 1.0, 0.0]
    assert trace.sample_seconds == 300.0


def test_request_log_is_binned_into_rates() -> None:
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
        "2023-11-16 18:17:04.0319600,3180,8\n"
        "2023-11-16 18:18:10.0000000,10,1\n"
    )
    trace = parse_trace(text, trace_format="requests", bin_seconds=60.0)
    assert trace.rates.tolist() == [2 / 60, 1 / 60]


def test_seven_digit_fractions_and_epoch_seconds_parse() -> None:
    assert parse_timestamp("1970-01-01 00:00:01.9799600") == pytest.approx(1.97996)
    assert parse_timestamp("1700000000") == 1_700_000_000.0


def test_mean_rates_integrate_the_step_function() -> None:
    trace = parse_trace("timestamp,value\n0,1\n30,3\n60,3\n")
    assert trace.mean_rates(60.0).tolist() == [2.0]


def test_a_count_file_with_a_wrong_header_is_refused_with_the_file_name() -> None:
    with pytest.raises(TraceError, match=r"x\.csv: header \['time', 'count'\] is not timestamp,value"):
        parse_trace("time,count\n1,2\n", "x.csv", "counts")


def test_an_unparsable_value_names_the_line() -> None:
    with pytest.raises(TraceError, match=r"t\.csv:3: cannot parse"):
        parse_trace("timestamp,value\n0,1\n60,abc\n", "t.csv")


@pytest.mark.parametrize(("value", "shown"), [("-3", "'-3'"), ("nan", "'nan'"), (" inf", "'inf'")])
def test_a_negative_or_non_finite_value_names_the_line_and_the_value(value: str, shown: str) -> None:
    with pytest.raises(TraceError, match=rf"n\.csv:3: value {shown} must be finite and >= 0"):
        parse_trace(f"timestamp,value\n0,1\n60,{value}\n", "n.csv", "counts")


def test_duplicate_timestamps_are_refused() -> None:
    with pytest.raises(TraceError, match=r"duplicate timestamps in a rate trace: 1970-01-01T00:00:00\+00:00;"):
        parse_trace("timestamp,value\n0,1\n0,2\n")


def test_a_daylight_saving_repeat_in_a_count_trace_names_the_first_repeated_time() -> None:
    # NAB's CloudWatch files stamp the hour skipped on 2014-03-09 all at 03:00.
    rows = ["2014-03-09 01:55:00,1", *["2014-03-09 03:00:00,2"] * 3, "2014-03-09 03:05:00,3"]
    with pytest.raises(TraceError, match=r"d\.csv: duplicate timestamps in a count-per-step trace: "
                                         r"2014-03-09T03:00:00\+00:00 and 1 more; .*write them in UTC"):
        parse_trace("timestamp,value\n" + "\n".join(rows) + "\n", "d.csv", "counts")


def test_an_empty_request_log_is_refused() -> None:
    with pytest.raises(TraceError, match="at least one request"):
        from_request_times([])


def test_converter_writes_a_rate_csv_that_reads_back_the_same(tmp_path: Path) -> None:
    source = tmp_path / "nab.csv"
    source.write_text("timestamp,value\n2014-04-10 00:00:00,600\n2014-04-10 00:05:00,300\n")
    target = tmp_path / "rate.csv"
    assert main(["--format", "counts", str(source), str(target)]) == 0
    back = read_trace(target)
    assert back.rates.tolist() == [2.0, 1.0]
    assert format_rate_csv(back) == target.read_text()
