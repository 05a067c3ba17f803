"""The autoscaling experiment: its HPA model, its targets, and one short run of real workers.

The model (experiments/hpa.py) must decide as Kubernetes' HPA does, so the
experiment shows what the shipped ScaledObject would do; the targets must be
able to fail; and the machinery (a step load, the ScaledObject's own queries,
elastic workers started and stopped, the verification, the PNG) must run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from experiments import autoscale
from experiments.autoscale_report import Tick, targets
from experiments.hpa import Autoscaler, MetricTarget, Policy, Rules, direction_changes, from_scaled_object

LAG = MetricTarget("lag", "Value", 5.0, activation=1.0)
BUSY = MetricTarget("busy", "AverageValue", 1.0)


def test_value_and_average_value_targets_within_the_tolerance() -> None:
    assert LAG.replicas(10.0, 3) == 6  # ceil(3 x 10 / 5)
    assert LAG.replicas(5.4, 3) == 3  # within 10 %: no change
    assert LAG.replicas(0.0, 4) == 0  # the minimum clamps it later
    assert BUSY.replicas(2.5, 4) == 3  # ceil(2.5 / 1)
    assert BUSY.replicas(3.9, 4) == 4  # 3.9 / 4 is within 10 % of 1
    # From zero replicas, only activation counts (KEDA).
    assert (LAG.replicas(0.5, 0), LAG.replicas(1.5, 0)) == (0, 1)
    with pytest.raises(ValueError, match="Utilization"):
        MetricTarget("cpu", "Utilization", 80)


def _scaler(**kwargs: float) -> Autoscaler:
    return Autoscaler(
        (LAG, BUSY),
        minimum=1,
        maximum=16,
        up=Rules(kwargs.get("up_window", 0.0), (Policy("Percent", 100, 60), Policy("Pods", 4, 60)), "Max"),
        down=Rules(kwargs.get("down_window", 300.0), (Policy("Pods", 1, 60),), "Min"),
    )


def test_scale_up_is_limited_by_the_policies_and_down_waits_for_its_window() -> None:
    scaler = _scaler()
    # Lag 50 s with 2 pods asks for 20: +4 (Pods) beats +100 % (Percent), and 16 is the maximum.
    assert scaler.desired({"lag": 50.0, "busy": 2.0}, 2, now=0.0) == 6
    scaler.scaled(4, 0.0)
    assert scaler.desired({"lag": 50.0, "busy": 6.0}, 6, now=10.0) == 6  # the period's 4 are used up
    assert scaler.desired({"lag": 50.0, "busy": 6.0}, 6, now=61.0) == 12  # a new period: doubling
    scaler.scaled(6, 61.0)
    # Caught up and idle: the scale-down window still remembers the 16 asked for.
    assert scaler.desired({"lag": 0.0, "busy": 0.0}, 12, now=100.0) == 12
    assert scaler.desired({"lag": 0.0, "busy": 0.0}, 12, now=400.0) == 11  # then one pod a minute
    scaler.scaled(-1, 400.0)
    assert scaler.desired({"lag": 0.0, "busy": 0.0}, 11, now=420.0) == 11
    assert scaler.desired({"lag": 0.0, "busy": 0.0}, 11, now=461.0) == 10


def test_busy_members_hold_a_fleet_that_works_and_never_add_pods() -> None:
    scaler = _scaler(down_window=0.0)
    assert scaler.desired({"lag": 0.2, "busy": 4.0}, 4, now=0.0) == 4  # keeping up, busy: stay
    assert scaler.desired({"lag": 0.2, "busy": 4.0}, 6, now=100.0) == 5  # 4 busy of 6: down, one a minute


def test_an_up_window_takes_the_lowest_recommendation() -> None:
    scaler = _scaler(up_window=30.0)
    assert scaler.desired({"lag": 10.0, "busy": 2.0}, 2, now=0.0) == 4
    scaler.scaled(2, 0.0)
    assert scaler.desired({"lag": 0.0, "busy": 4.0}, 4, now=10.0) == 4
    assert scaler.desired({"lag": 30.0, "busy": 4.0}, 4, now=20.0) == 4  # 4 asked 10 s ago: no higher


def test_the_model_is_the_shipped_scaled_object_scaled_down_in_time() -> None:
    model, spec = autoscale.load_model(5.0)
    docs = list(yaml.safe_load_all(autoscale.SCALED_OBJECT.read_text()))
    (scaled,) = [d for d in docs if d and d["kind"] == "ScaledObject"]
    assert model.queries == {t["name"]: t["metadata"]["query"] for t in scaled["spec"]["triggers"]}
    assert model.polling_interval == scaled["spec"]["pollingInterval"] / 5
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert model.autoscaler.down.window == behavior["scaleDown"]["stabilizationWindowSeconds"] / 5
    assert model.autoscaler.maximum == scaled["spec"]["maxReplicaCount"]
    assert (
        from_scaled_object(spec, 1.0).autoscaler.down.window
        == behavior["scaleDown"]["stabilizationWindowSeconds"]
    )


def test_direction_changes_count_turns_only() -> None:
    replicas = [(0.0, 1), (1.0, 2), (2.0, 4), (3.0, 4), (4.0, 3), (5.0, 5), (6.0, 1)]
    assert direction_changes(replicas) == [4.0, 5.0, 6.0]
    assert direction_changes([(0.0, 1), (1.0, 3), (2.0, 0)]) == [2.0]


def _ticks(lag_after_step: list[float], replicas_after_step: list[int], after: list[int]) -> list[Tick]:
    ticks = [Tick(float(t), "base", 25, 25, 1, {"lag": 0.1, "busy": 0.5}, (16,)) for t in range(24)]
    start = len(ticks)
    for i, (lag, n) in enumerate(zip(lag_after_step, replicas_after_step, strict=True)):
        ticks.append(
            Tick(float(start + i * 2), "step", 200, 200, n, {"lag": lag, "busy": float(n)}, (16 // n,) * n)
        )
    start = int(ticks[-1].t) + 2
    ticks += [
        Tick(float(start + i * 2), "after", 0, 0, n, {"lag": 0.0, "busy": 0.0}, (16 // max(n, 1),) * n)
        for i, n in enumerate(after)
    ]
    return ticks


def test_the_targets_pass_a_good_run_and_fail_a_bad_one() -> None:
    options = autoscale.Options()
    model, _ = autoscale.load_model(options.scale)
    good = _ticks(
        [1, 3, 5.5, 7, 6, 3, 1, 0.2] + [0.2] * 20, [1, 1, 2, 4, 6, 6, 6, 6] + [6] * 20, [6] * 30 + [0] * 5
    )
    assert [t.ok for t in targets(good, options, model)] == [True, True, True, True]
    bad = _ticks(
        [1, 3, 5.5, 7, 9] + [12.0] * 23,  # lag never recovers
        [1, 1, 1, 1, 2] + [2, 3, 2, 3] * 5 + [3, 3, 3],  # up and down, up and down
        [3] * 35,  # never back to zero
    )
    results = targets(bad, options, model)
    assert [t.ok for t in results] == [False, False, False, False], results


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_short_run_scales_real_workers_and_verifies_the_read_model(tmp_path: Path) -> None:
    options = autoscale.Options(
        scale=30.0,
        base_minutes=1.0,
        step_minutes=3.0,
        after_minutes=4.0,
        step_rate=150.0,
        database="projectionist_autoscale_test",
        out=tmp_path,
    )
    experiment = autoscale.Experiment(options, tmp_path)
    verification = experiment.run()
    assert verification.ok, verification
    ticks = experiment.ticks
    assert {t.phase for t in ticks} == {"base", "step", "after"}
    assert max(t.replicas for t in ticks) > 1, "the step added workers"
    assert any(t.owned and len(t.owned) > 1 for t in ticks), "members shared the partitions"
    files = autoscale.report.write(
        ticks, options, experiment.model, experiment.cooldown, verification, (0, 0, 0)
    )
    assert files["png"].stat().st_size > 10_000
    text = files["md"].read_text()
    assert "## Targets" in text and "PASS: all 5 checks passed" in text and "slow service" in text
