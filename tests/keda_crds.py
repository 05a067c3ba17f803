"""Structural checks of the KEDA objects we ship (keda.sh/v1alpha1), outside Kubernetes' own schemas.

KEDA's ScaledObject and TriggerAuthentication are CustomResourceDefinitions,
so kubernetes-validate cannot check them. These checks follow KEDA's CRDs
(v2.12 and later) for the fields we use: known keys only, the required ones
present, integers where integers go, a postgresql trigger's metadata. The
HPA ``behavior`` a ScaledObject passes on is validated with Kubernetes' own
schema for a HorizontalPodAutoscaler (autoscaling/v2), which it becomes.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate

API_VERSION = "keda.sh/v1alpha1"
KINDS = {"ScaledObject", "TriggerAuthentication"}

OBJECT_KEYS = {"apiVersion", "kind", "metadata", "spec"}
SCALED_OBJECT_SPEC_KEYS = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
SCALE_TARGET_KEYS = {"apiVersion", "kind", "name", "envSourceContainerName"}
FALLBACK_KEYS = {"failureThreshold", "replicas", "behavior"}
ADVANCED_KEYS = {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig", "scalingModifiers"}
HPA_CONFIG_KEYS = {"name", "behavior"}
TRIGGER_KEYS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
METRIC_TYPES = {"AverageValue", "Value", "Utilization"}
AUTH_REF_KEYS = {"name", "kind"}
# The postgresql scaler's metadata (pkg/scalers/postgresql_scaler.go).
POSTGRESQL_METADATA = {
    "query",
    "targetQueryValue",
    "activationTargetQueryValue",
    "connectionFromEnv",
    "host",
    "port",
    "userName",
    "dbName",
    "sslmode",
    "passwordFromEnv",
}
TRIGGER_AUTH_SPEC_KEYS = {"secretTargetRef", "env", "configMapTargetRef", "podIdentity"}
SECRET_TARGET_KEYS = {"parameter", "name", "key"}
# What a postgresql trigger takes from a TriggerAuthentication.
POSTGRESQL_AUTH_PARAMETERS = {"connection", "password", "host", "port", "userName", "dbName", "sslmode"}


def _unknown(keys: Any, allowed: set[str], where: str) -> list[str]:
    extra = sorted(set(keys) - allowed)
    return [f"{where}: unknown fields {extra}"] if extra else []


def _non_negative_int(value: Any, where: str) -> list[str]:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return [] if ok else [f"{where} must be a non-negative integer: {value!r}"]


def _number_text(value: Any, where: str) -> list[str]:
    try:
        float(value)
    except (TypeError, ValueError):
        return [f"{where} must be a number in a string: {value!r}"]
    return (
        [] if isinstance(value, str) else [f"{where} must be a string (trigger metadata is text): {value!r}"]
    )


def _behavior_problems(behavior: Any, version: str) -> list[str]:
    """The behavior KEDA hands to the HPA it creates, checked as that HPA's."""
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": 1,
            "behavior": behavior,
        },
    }
    try:
        kubernetes_validate.validate(hpa, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"advanced.horizontalPodAutoscalerConfig.behavior: {'.'.join(map(str, e.path))}: {e.message}"]
    return []


def _trigger_problems(trigger: Any, where: str) -> list[str]:
    if not isinstance(trigger, dict):
        return [f"{where} is not a mapping"]
    problems = _unknown(trigger, TRIGGER_KEYS, where)
    if not isinstance(trigger.get("type"), str):
        problems.append(f"{where}.type is missing")
    if "metricType" in trigger and trigger["metricType"] not in METRIC_TYPES:
        problems.append(f"{where}.metricType must be one of {sorted(METRIC_TYPES)}")
    metadata = trigger.get("metadata")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return [*problems, f"{where}.metadata must map strings to strings"]
    if trigger.get("type") == "postgresql":
        problems += _unknown(metadata, POSTGRESQL_METADATA, f"{where}.metadata")
        if not metadata.get("query"):
            problems.append(f"{where}.metadata.query is missing")
        if "targetQueryValue" not in metadata:
            problems.append(f"{where}.metadata.targetQueryValue is missing")
        for key in ("targetQueryValue", "activationTargetQueryValue"):
            if key in metadata:
                problems += _number_text(metadata[key], f"{where}.metadata.{key}")
        if (
            "connectionFromEnv" not in metadata
            and "authenticationRef" not in trigger
            and "host" not in metadata
        ):
            problems.append(f"{where}: no connection (connectionFromEnv, host, or an authenticationRef)")
    if "authenticationRef" in trigger:
        ref = trigger["authenticationRef"]
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
            problems.append(f"{where}.authenticationRef needs a name")
        else:
            problems += _unknown(ref, AUTH_REF_KEYS, f"{where}.authenticationRef")
    return problems


def _scaled_object_problems(spec: Any, version: str) -> list[str]:
    if not isinstance(spec, dict):
        return ["spec is missing"]
    problems = _unknown(spec, SCALED_OBJECT_SPEC_KEYS, "spec")
    target = spec.get("scaleTargetRef")
    if not isinstance(target, dict) or not isinstance(target.get("name"), str):
        problems.append("spec.scaleTargetRef.name is missing")
    else:
        problems += _unknown(target, SCALE_TARGET_KEYS, "spec.scaleTargetRef")
    for key in ("pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount"):
        if key in spec:
            problems += _non_negative_int(spec[key], f"spec.{key}")
    for key in ("minReplicaCount", "maxReplicaCount"):
        if key in spec:
            problems += _non_negative_int(spec[key], f"spec.{key}")
    low, high = spec.get("minReplicaCount"), spec.get("maxReplicaCount")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        problems.append("spec.minReplicaCount is above spec.maxReplicaCount")
    if "fallback" in spec:
        fallback = spec["fallback"]
        problems += _unknown(fallback, FALLBACK_KEYS, "spec.fallback")
        for key in ("failureThreshold", "replicas"):
            problems += _non_negative_int(fallback.get(key), f"spec.fallback.{key}")
    advanced = spec.get("advanced", {})
    if advanced:
        problems += _unknown(advanced, ADVANCED_KEYS, "spec.advanced")
        config = advanced.get("horizontalPodAutoscalerConfig", {})
        problems += _unknown(config, HPA_CONFIG_KEYS, "spec.advanced.horizontalPodAutoscalerConfig")
        if "behavior" in config:
            problems += _behavior_problems(config["behavior"], version)
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        return [*problems, "spec.triggers must list at least one trigger"]
    names = [t.get("name") for t in triggers if isinstance(t, dict) and "name" in t]
    if len(names) != len(set(names)):
        problems.append(f"trigger names repeat: {names}")
    for i, trigger in enumerate(triggers):
        problems += _trigger_problems(trigger, f"spec.triggers[{i}]")
    return problems


def _trigger_authentication_problems(spec: Any) -> list[str]:
    if not isinstance(spec, dict) or not spec:
        return ["spec is missing"]
    problems = _unknown(spec, TRIGGER_AUTH_SPEC_KEYS, "spec")
    for i, ref in enumerate(spec.get("secretTargetRef", [])):
        where = f"spec.secretTargetRef[{i}]"
        problems += _unknown(ref, SECRET_TARGET_KEYS, where)
        if not all(isinstance(ref.get(k), str) and ref.get(k) for k in SECRET_TARGET_KEYS):
            problems.append(f"{where} needs parameter, name and key")
    return problems


def problems(obj: dict[str, Any], version: str) -> list[str]:
    """What is wrong with a ScaledObject or TriggerAuthentication; an empty list if nothing is."""
    kind = obj.get("kind")
    if kind not in KINDS:
        return [f"not a KEDA kind we ship: {kind!r}"]
    found = _unknown(obj, OBJECT_KEYS, kind)
    if obj.get("apiVersion") != API_VERSION:
        found.append(f"apiVersion must be {API_VERSION}, not {obj.get('apiVersion')!r}")
    name = obj.get("metadata", {}).get("name")
    if not isinstance(name, str) or not name:
        found.append("metadata.name is missing")
    if kind == "ScaledObject":
        found += _scaled_object_problems(obj.get("spec"), version)
    else:
        found += _trigger_authentication_problems(obj.get("spec"))
    return [f"{kind} {name}: {p}" for p in found]
