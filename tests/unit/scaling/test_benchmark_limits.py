"""The scaling benchmark's limits: the pre-floor share and the (non-causal) oracle escalation bound."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from moe_operator.scaling.simulate import ForecastSchedule, SimulationConfig, simulate
from moe_operator.scaling.traces import Trace, from_rate_samples
from tests.support.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("scaling.py", "scaling_benchmark")


def minutes_trace(rates: list[float]) -> Trace:
    return from_rate_samples(np.arange(len(rates), dtype=np.float64) * 60.0, np.asarray(rates, dtype=np.float64))


def config() -> SimulationConfig:
    # Default horizon 420 s at 60 s steps: no learner has a floor before 14 minutes of history.
    return SimulationConfig(capacity_per_replica=1.0, startup_delay=300, target_utilization=0.5,
                            min_replicas=1, max_replicas=1000)


def test_misses_before_the_first_possible_floor_are_all_pre_floor(bench: ModuleType) -> None:
    trace = minutes_trace([10.0] * 10 + [40.0] * 110)
    result = simulate(trace, config(), "reactive")
    assert result.summary.unserved_fraction > 0
    assert bench.pre_floor_share(result, config()) == pytest.approx(1.0)


def test_misses_after_a_floor_could_be_ready_are_not_pre_floor(bench: ModuleType) -> None:
    trace = minutes_trace([10.0] * 120 + [40.0] * 60)
    result = simulate(trace, config(), "reactive")
    assert result.summary.unserved_fraction > 0
    assert bench.pre_floor_share(result, config()) == 0.0


def test_a_miss_is_split_where_a_first_floor_could_be_ready(bench: ModuleType) -> None:
    # Step at 16 min (960 s): reactive misses 20 requests/s on the 15 s syncs 960..1275 s (ready at
    # 1290 s). A floor asked for at the first possible forecast (14 min of history + 30 s lag = 870 s)
    # is ready at 1170 s, so 14 of those 22 syncs come before it.
    trace = minutes_trace([10.0] * 16 + [40.0] * 60)
    result = simulate(trace, config(), "reactive")
    assert bench.pre_floor_share(result, config()) == pytest.approx(14 / 22)


def burst_schedule(trace: Trace, floor: bool = True) -> ForecastSchedule:
    ticks = np.arange(0.0, trace.duration, 60.0)
    return ForecastSchedule(ticks, np.full(ticks.size, 1.0), np.full(ticks.size, floor), ("x",) * ticks.size,
                            float("nan"), float("nan"))


def rising_burst() -> Trace:
    """10 requests/s; from minute 120: 30 for three minutes, 50 for three, 20 for four, then 10 again."""
    return minutes_trace([10.0] * 120 + [30.0] * 3 + [50.0] * 3 + [20.0] * 4 + [10.0] * 110)


def test_oracle_escalation_raises_a_visible_burst_to_its_actual_reachable_peak(bench: ModuleType) -> None:
    trace = rising_burst()
    raised = bench.escalation_oracle(trace, config(), burst_schedule(trace))
    # Tick at 124 min sees minutes up to 122 (30 against an hour's mean of 11). The horizon's peak is
    # 50 (minutes 123-125), but capacity ordered now is ready only for minutes 128-129 (startup 5 min,
    # horizon 7 min), both at 20: that is what even a perfect escalation can serve.
    assert raised.predicted_load[124] == 20.0


def test_oracle_escalation_leaves_calm_ticks_alone(bench: ModuleType) -> None:
    trace = rising_burst()
    raised = bench.escalation_oracle(trace, config(), burst_schedule(trace))
    calm = np.r_[0:121, 140:240]
    assert np.all(raised.predicted_load[calm] == 1.0)
    assert np.all(raised.predicted_load >= 1.0)


def test_oracle_escalation_raises_a_visible_burst_where_the_controller_held_no_floor(bench: ModuleType) -> None:
    trace = rising_burst()
    raised = bench.escalation_oracle(trace, config(), burst_schedule(trace, floor=False))
    assert raised.uses_floor[124] and raised.predicted_load[124] == 20.0
    assert not raised.uses_floor[np.r_[0:121, 140:240]].any()


def test_runs_beyond_the_whole_reactive_curve_are_reported_with_their_cost(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    # No ratio exists for a run costlier than the HPA at every target; the report must still name it.
    curve = [(100.0, 0.2, 50.0, 0.2), (400.0, 0.05, 200.0, 0.05)]
    infos = [{"trace": "spiky", "delay": 600.0, "reactive_curve": curve}]

    def run(replica_hours: float, target: float) -> object:
        return bench.Comparison("spiky", 600.0, target, replica_hours, 0.1, None, 0.2, 1, 1, 0.1, None)

    bench.print_outside([run(2000.0, 0.5), run(800.0, 0.7)], infos)
    assert ("runs costlier than the reactive HPA at every target down to U=0.1: 2, at most 5.00x its "
            "replica-hours (spiky, 600s, U=0.5)") in capsys.readouterr().out
    bench.print_outside([run(90.0, 0.9)], infos)
    assert "runs outside the reactive curve: 1, all cheaper than its cheapest target (U=0.9)" in capsys.readouterr().out
    bench.print_outside([], infos)
    assert "runs outside the reactive curve: none" in capsys.readouterr().out


def test_an_unreadable_trace_file_is_named_and_skipped(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dst.csv").write_text("timestamp,value\n2014-03-09 03:00:00,1\n2014-03-09 03:00:00,2\n")
    assert bench.main(["--traces", str(tmp_path), "--no-synthetic"]) == 2
    err = capsys.readouterr().err
    assert f"skipped: {tmp_path / 'dst.csv'}: duplicate timestamps in a count-per-step trace" in err
    assert f"no readable trace in {tmp_path}" in err


def test_perfect_forecast_is_the_actual_peak_of_the_reachable_horizon(bench: ModuleType) -> None:
    trace = rising_burst()
    told = bench.perfect_forecast_oracle(trace, config(), burst_schedule(trace, floor=False))
    # The tick at minute k sees minutes up to k - 2 (30 s lag); capacity it orders is ready for minutes
    # k + 4 and k + 5 (startup 5 min, horizon 7 min), so the burst at minutes 120-125 shows from tick 115.
    assert told.uses_floor[114] and told.predicted_load[114] == 10.0
    assert told.predicted_load[115] == 30.0
    assert told.predicted_load[118] == 50.0
    assert told.predicted_load[124] == 20.0


def test_perfect_forecast_needs_no_history_but_stops_where_the_horizon_leaves_the_trace(bench: ModuleType) -> None:
    trace = minutes_trace([3.0] * 5 + [9.0] + [3.0] * 14)
    told = bench.perfect_forecast_oracle(trace, config(), burst_schedule(trace, floor=False))
    # The first tick (t = 0) already orders for minutes 4-5, where the 9 is.
    assert told.uses_floor[0] and told.predicted_load[0] == 9.0
    assert told.uses_floor.tolist() == [True] * 15 + [False] * 5
