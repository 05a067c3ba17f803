"""The Horizontal Pod Autoscaler's algorithm, as Kubernetes computes it, for the autoscaling experiment.

What kube-controller-manager does with the metrics of an HPA (or of the HPA
KEDA creates for a ScaledObject) at each sync:

1. per metric, a replica count: for a ``Value`` target,
   ``ceil(current x value / target)``; for an ``AverageValue`` target,
   ``ceil(value / target)``; none when the ratio is within the 10 % tolerance
   (then the current count);
2. the largest of them, clamped to the minimum and maximum;
3. stabilisation: up only to the *lowest* recommendation of the scale-up
   window, down only to the *highest* of the scale-down window;
4. the behavior's policies: at most so many pods, or so many percent, per
   period, counted from the replicas at the start of the period
   (``selectPolicy`` Max takes the policy that allows the most change, Min the least).

Every duration can be divided by a time scale, so that an experiment of a
few minutes shows what the real windows do over half an hour.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: kube-controller-manager's --horizontal-pod-autoscaler-tolerance.
TOLERANCE = 0.1


@dataclass(frozen=True, slots=True)
class MetricTarget:
    """One metric of the autoscaler: its name, its type (``Value`` or ``AverageValue``) and its target."""

    name: str
    metric_type: str
    target: float
    #: KEDA's activation threshold (used only at 0 replicas); 0 means any value above 0.
    activation: float = 0.0

    def __post_init__(self) -> None:
        if self.metric_type not in ("Value", "AverageValue"):
            raise ValueError(f"metric type {self.metric_type!r}: only Value and AverageValue are modelled")
        if not self.target > 0:
            raise ValueError(f"metric {self.name}: the target must be above 0")

    def replicas(self, value: float, current: int, tolerance: float = TOLERANCE) -> int:
        """The replica count this metric alone asks for (step 1)."""
        if current == 0:
            return 1 if value > self.activation else 0
        if self.metric_type == "Value":
            ratio = value / self.target
            return current if abs(ratio - 1.0) <= tolerance else math.ceil(current * ratio)
        ratio = value / (self.target * current)
        return current if abs(ratio - 1.0) <= tolerance else math.ceil(value / self.target)


@dataclass(frozen=True, slots=True)
class Policy:
    kind: str  # "Pods" or "Percent"
    value: int
    period: float  # seconds (already scaled)


@dataclass(frozen=True, slots=True)
class Rules:
    """One direction of an HPA ``behavior``: its stabilisation window and policies."""

    window: float
    policies: tuple[Policy, ...]
    select: str = "Max"


@dataclass
class Autoscaler:
    """The HPA's decision for one target, fed a metric reading at each sync."""

    metrics: tuple[MetricTarget, ...]
    minimum: int
    maximum: int
    up: Rules
    down: Rules
    tolerance: float = TOLERANCE
    #: (time, recommendation) of every sync, for the stabilisation windows.
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    #: (time, change) of every scaling, for the policies' periods.
    events: list[tuple[float, int]] = field(default_factory=list)

    def desired(self, values: dict[str, float], current: int, now: float) -> int:
        """The replica count to scale to now, given each metric's value (steps 1 to 4)."""
        wanted = max(m.replicas(values[m.name], current, self.tolerance) for m in self.metrics)
        wanted = min(max(wanted, self.minimum), self.maximum)
        self.recommendations.append((now, wanted))
        horizon = max(self.up.window, self.down.window)
        self.recommendations = [(t, r) for t, r in self.recommendations if t >= now - horizon]
        up = min([r for t, r in self.recommendations if t >= now - self.up.window] or [wanted])
        down = max([r for t, r in self.recommendations if t >= now - self.down.window] or [wanted])
        target = current
        if target < up:
            target = up
        if target > down:
            target = down
        target = self._limit(target, current, now)
        return min(max(target, self.minimum), self.maximum)

    def _limit(self, target: int, current: int, now: float) -> int:
        if target > current:
            limits = []
            for p in self.up.policies:
                added = sum(c for t, c in self.events if t >= now - p.period and c > 0)
                start = current - added
                limits.append(start + p.value if p.kind == "Pods" else math.ceil(start * (1 + p.value / 100)))
            if not limits:
                return target
            limit = max(limits) if self.up.select == "Max" else min(limits)
            return min(target, max(limit, current))
        if target < current:
            limits = []
            for p in self.down.policies:
                removed = -sum(c for t, c in self.events if t >= now - p.period and c < 0)
                start = current + removed
                limits.append(start - p.value if p.kind == "Pods" else math.ceil(start * (1 - p.value / 100)))
            if not limits:
                return target
            # Down, Max allows the most change (the lowest count), Min the least (the highest).
            limit = min(limits) if self.down.select == "Max" else max(limits)
            return max(target, min(limit, current))
        return target

    def scaled(self, change: int, now: float) -> None:
        """Record a scaling that happened, for the policies' periods."""
        if change:
            self.events.append((now, change))


def _policies(rules: dict[str, Any], scale: float) -> Rules:
    return Rules(
        window=float(rules.get("stabilizationWindowSeconds", 0)) / scale,
        policies=tuple(
            Policy(p["type"], int(p["value"]), float(p["periodSeconds"]) / scale) for p in rules["policies"]
        ),
        select=str(rules.get("selectPolicy", "Max")),
    )


@dataclass(frozen=True, slots=True)
class ScaledObjectModel:
    """What the experiment takes from a KEDA ScaledObject: the queries, the autoscaler, the polling."""

    queries: dict[str, str]
    autoscaler: Autoscaler
    polling_interval: float


def from_scaled_object(spec: dict[str, Any], scale: float) -> ScaledObjectModel:
    """The autoscaler a ScaledObject's spec describes, with every duration divided by ``scale``."""
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    metrics: list[MetricTarget] = []
    queries: dict[str, str] = {}
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        name = trigger["name"]
        queries[name] = meta["query"]
        metrics.append(
            MetricTarget(
                name,
                trigger.get("metricType", "AverageValue"),
                float(meta["targetQueryValue"]),
                float(meta.get("activationTargetQueryValue", 0)),
            )
        )
    autoscaler = Autoscaler(
        tuple(metrics),
        int(spec.get("minReplicaCount", 0)),
        int(spec["maxReplicaCount"]),
        _policies(behavior["scaleUp"], scale),
        _policies(behavior["scaleDown"], scale),
    )
    return ScaledObjectModel(queries, autoscaler, float(spec.get("pollingInterval", 30)) / scale)


def direction_changes(replicas: Sequence[tuple[float, int]]) -> list[float]:
    """The times at which the fleet turned from growing to shrinking or back."""
    turns: list[float] = []
    last = 0
    for (_, a), (t, b) in itertools.pairwise(replicas):
        if b == a:
            continue
        sign = 1 if b > a else -1
        if last and sign != last:
            turns.append(t)
        last = sign
    return turns
