"""Structural checks of the Prometheus Operator objects we ship, which Kubernetes' own schemas do not cover.

kubernetes-validate knows only the built-in kinds; PodMonitor and
PrometheusRule come from the Operator's CustomResourceDefinitions. These checks
follow those definitions (monitoring.coreos.com/v1) for the fields we use:
known keys only, the required ones present, durations in Prometheus' syntax,
string-valued labels and annotations. The PromQL itself is promtool's job.
"""

from __future__ import annotations

import re
from typing import Any

API_VERSION = "monitoring.coreos.com/v1"
KINDS = {"PodMonitor", "PrometheusRule"}

# The CRDs' pattern for a Prometheus duration.
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

OBJECT_KEYS = {"apiVersion", "kind", "metadata", "spec"}
METADATA_KEYS = {"name", "namespace", "labels", "annotations"}
# PrometheusRule: spec.groups[], groups[].rules[].
RULE_SPEC_KEYS = {"groups"}
GROUP_KEYS = {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset", "labels"}
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
# PodMonitor: a subset of the CRD's fields (extend it from the CRD when a new one is used).
POD_MONITOR_SPEC_KEYS = {
    "selector",
    "namespaceSelector",
    "podMetricsEndpoints",
    "jobLabel",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
}
ENDPOINT_KEYS = {
    "port",
    "portNumber",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}


def _string_map(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return [f"{where} must map strings to strings: {value!r}"]
    return []


def _unknown(keys: Any, allowed: set[str], where: str) -> list[str]:
    extra = sorted(set(keys) - allowed)
    return [f"{where}: unknown fields {extra}"] if extra else []


def _duration(value: Any, where: str) -> list[str]:
    return [] if isinstance(value, str) and DURATION.match(value) else [f"{where}: not a duration: {value!r}"]


def _metadata(obj: dict[str, Any]) -> list[str]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return ["metadata is missing"]
    problems = _unknown(metadata, METADATA_KEYS, "metadata")
    name = metadata.get("name")
    if not isinstance(name, str) or not NAME.match(name) or len(name) > 253:
        problems.append(f"metadata.name is not a Kubernetes name: {name!r}")
    for key in ("labels", "annotations"):
        if key in metadata:
            problems += _string_map(metadata[key], f"metadata.{key}")
    return problems


def _rule_problems(spec: Any) -> list[str]:
    if not isinstance(spec, dict) or not isinstance(spec.get("groups"), list):
        return ["spec.groups must be a list"]
    problems = _unknown(spec, RULE_SPEC_KEYS, "spec")
    names = [g.get("name") for g in spec["groups"] if isinstance(g, dict)]
    if len(names) != len(set(names)):
        problems.append(f"group names repeat: {names}")
    for i, group in enumerate(spec["groups"]):
        where = f"spec.groups[{i}]"
        if not isinstance(group, dict) or not isinstance(group.get("name"), str) or not group["name"]:
            problems.append(f"{where} needs a name")
            continue
        problems += _unknown(group, GROUP_KEYS, where)
        for key in ("interval", "query_offset"):
            if key in group:
                problems += _duration(group[key], f"{where}.{key}")
        if not isinstance(group.get("rules"), list):
            problems.append(f"{where}.rules must be a list")
            continue
        for j, rule in enumerate(group["rules"]):
            at = f"{where}.rules[{j}]"
            if not isinstance(rule, dict):
                problems.append(f"{at} is not a mapping")
                continue
            problems += _unknown(rule, RULE_KEYS, at)
            if ("alert" in rule) == ("record" in rule):
                problems.append(f"{at} needs exactly one of alert and record")
            if not isinstance(rule.get("expr"), (str, int)) or rule.get("expr") == "":
                problems.append(f"{at}.expr is missing")
            for key in ("for", "keep_firing_for"):
                if key in rule:
                    problems += _duration(rule[key], f"{at}.{key}")
            for key in ("labels", "annotations"):
                if key in rule:
                    problems += _string_map(rule[key], f"{at}.{key}")
            if "record" in rule and ({"for", "annotations", "keep_firing_for"} & set(rule)):
                problems.append(f"{at}: a recording rule takes no for, keep_firing_for or annotations")
    return problems


def _pod_monitor_problems(spec: Any) -> list[str]:
    if not isinstance(spec, dict):
        return ["spec is missing"]
    problems = _unknown(spec, POD_MONITOR_SPEC_KEYS, "spec")
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (
        selector.get("matchLabels") or selector.get("matchExpressions")
    ):
        problems.append("spec.selector must select pods (an empty selector matches every pod)")
    elif "matchLabels" in selector:
        problems += _string_map(selector["matchLabels"], "spec.selector.matchLabels")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return [*problems, "spec.podMetricsEndpoints must list at least one endpoint"]
    for i, endpoint in enumerate(endpoints):
        at = f"spec.podMetricsEndpoints[{i}]"
        if not isinstance(endpoint, dict):
            problems.append(f"{at} is not a mapping")
            continue
        problems += _unknown(endpoint, ENDPOINT_KEYS, at)
        if "port" in endpoint and not isinstance(endpoint["port"], str):
            problems.append(f"{at}.port is a port name (a string); use portNumber for a number")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                problems += _duration(endpoint[key], f"{at}.{key}")
    return problems


def problems(obj: dict[str, Any]) -> list[str]:
    """What is wrong with a PodMonitor or PrometheusRule object; an empty list if nothing is."""
    kind = obj.get("kind")
    if kind not in KINDS:
        return [f"not a Prometheus Operator kind: {kind!r}"]
    found = _unknown(obj, OBJECT_KEYS, kind)
    if obj.get("apiVersion") != API_VERSION:
        found.append(f"apiVersion must be {API_VERSION}, not {obj.get('apiVersion')!r}")
    found += _metadata(obj)
    if kind == "PrometheusRule":
        found += _rule_problems(obj.get("spec"))
    else:
        found += _pod_monitor_problems(obj.get("spec"))
    return [f"{kind} {obj.get('metadata', {}).get('name')}: {p}" for p in found]
