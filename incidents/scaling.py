"""The shipped rules, with their time scaled down, so that an incident takes minutes rather than hours.

Every ``for:`` and every group's ``interval`` is divided by the factor; so
are the range windows of the alerting rules' files, which are part of each
alert's own timing (the freshness objective's only work in proportion to
each other, a 1 h window beside a 5 min one; "more than 3 errors in 5
minutes" would keep an alert firing for 5 real minutes). Everything else
stays as shipped: the thresholds (a lag of 60 s, a transaction of 300 s, 5 s
for an event to be late) and the triage rules' one-minute windows, which
measure what the workers did (how busy they were, what woke them), a
process the lab does not speed up.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from dashboards.rules import load_rule_file, rule_files

#: Each of these files has its range windows scaled too.
WINDOWED_FILES = ("projectionist-alerts.yml", "projectionist-database.yml", "projectionist-slo.yml")

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_WINDOW = re.compile(r"\[(\w+)\]")


def seconds(duration: str) -> float:
    """A Prometheus duration (``1h30m``, ``15s``) in seconds."""
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def duration(value: float) -> str:
    """Seconds as a Prometheus duration, in whole milliseconds when they are not whole seconds."""
    if value == int(value):
        return f"{int(value)}s"
    return f"{round(value * 1000)}ms"


def scale(text: str, factor: float) -> str:
    return duration(seconds(text) / factor)


def scale_rule_file(doc: dict[str, Any], factor: float, *, windows: bool) -> dict[str, Any]:
    """A copy of a rule file's content with its time divided by ``factor``."""
    groups = []
    for group in doc["groups"]:
        group = dict(group)
        if "interval" in group:
            group["interval"] = scale(group["interval"], factor)
        scaled_rules = []
        for rule in group["rules"]:
            rule = dict(rule)
            if "for" in rule:
                rule["for"] = scale(rule["for"], factor)
            if windows:
                rule["expr"] = _WINDOW.sub(lambda m: f"[{scale(m.group(1), factor)}]", rule["expr"])
            scaled_rules.append(rule)
        group["rules"] = scaled_rules
        groups.append(group)
    return {"groups": groups}


def write_scaled_rules(target: Path, factor: float, rules_dir: Path | None = None) -> list[Path]:
    """Every shipped rule file, scaled, written into ``target``; the copies' paths."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for path in rule_files(rules_dir) if rules_dir is not None else rule_files():
        doc = scale_rule_file(load_rule_file(path), factor, windows=path.name in WINDOWED_FILES)
        copy = target / path.name
        copy.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
        written.append(copy)
    return written


def for_durations(rules_dir: Path | None = None) -> list[tuple[str, dict[str, str], float]]:
    """Each alerting rule's name, static labels and shipped ``for:`` in seconds."""
    out: list[tuple[str, dict[str, str], float]] = []
    for path in rule_files(rules_dir) if rules_dir is not None else rule_files():
        for group in load_rule_file(path)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    labels = {k: str(v) for k, v in (rule.get("labels") or {}).items()}
                    out.append((rule["alert"], labels, seconds(rule.get("for", "0s"))))
    return out


def for_of(name: str, labels: dict[str, str], rules_dir: Path | None = None) -> float:
    """The shipped ``for:`` of the rule that raised an alert with ``labels`` (the longest of several)."""
    matches = [
        value
        for alert, static, value in for_durations(rules_dir)
        if alert == name and all(labels.get(k) == v for k, v in static.items())
    ]
    if not matches:
        raise ValueError(f"no alerting rule {name} with labels {labels}")
    return max(matches)
