"""One incident from start to end, and what the timeline of alerts and causes says about it.

The stage runs steady load until the triage table is ``ok`` everywhere; then
the fault is injected and held until what it must show has shown (or a time
limit), and removed; then the lab waits until nothing fires, every partition
is ``ok`` again and every event is applied. The checks read the observer's
timeline: the right alerts with the right labels, within their scaled
``for:`` plus two evaluation intervals of turning pending; no other alert;
the cause named; no wrong cause anywhere; and, as the chaos suite does, no
event lost or applied twice.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from chaos.report import Check

from incidents.catalog import ExpectedAlert, Fault, Incident, expected_alerts
from incidents.lab import FACTOR, INTERVAL, PARTITIONS, PROJECTION, Lab, Profile, Stage
from incidents.observe import AlertHistory, AlertKey, Observer, Snapshot
from incidents.render import render_incident
from incidents.report import IncidentResult
from incidents.scaling import for_of

#: Causes any affected partition may pass through on its way to the expected one and back.
TRANSITIONAL = {"ok", "lagging", "catching_up"}
#: Our polling adds up to this much to a measured firing time.
POLL_SLACK = 1.5


def run_incident(
    lab: Lab, incident: Incident, profile: Profile, log_root: Path, png_dir: Path
) -> IncidentResult:
    """Run one incident on a fresh stage; never raises for a failed check or a crash of the run."""
    started = time.monotonic()
    result = IncidentResult(incident.slug, incident.title, incident.cause)
    stage = Stage(lab, incident.slug, profile, log_root / incident.slug)
    fault = incident.make_fault()
    try:
        stage.start()
        _run(stage, incident, fault, result, png_dir)
    except Exception:
        result.error = traceback.format_exc(limit=8)
    finally:
        stage.close()
        result.duration_seconds = time.monotonic() - started
    result.fault = fault.describe()
    if not result.ok:
        result.logs = stage.fleet.logs()
    return result


def _check(result: IncidentResult, ok: bool, what: str, detail: str = "") -> bool:
    result.checks.append(Check(what, bool(ok), detail))
    return bool(ok)


def _run(stage: Stage, incident: Incident, fault: Fault, result: IncidentResult, png_dir: Path) -> None:
    assert stage.observer is not None and stage.prometheus is not None
    observer = stage.observer
    time.sleep(stage.profile.warmup)
    # Every look of the warm-up, from the first that has every partition: steady load names nothing.
    settled = [s for s in observer.timeline(stage.ready_at) if len(s.causes) == PARTITIONS]
    not_ok = [s for s in settled if set(s.causes.values()) != {"ok"}]
    _check(
        result,
        bool(settled) and not not_ok,
        "every partition is ok under steady load before the fault",
        f"{len(settled)} looks"
        + (f"; {not_ok[0].at - stage.ready_at:.0f} s in: {_causes(not_ok[0])}" if not_ok else ""),
    )
    fault_at = time.time()
    fault.inject(stage)
    affected = incident.affected(fault.victim)
    expected = expected_alerts(incident, fault)
    during = [(e, labels) for e, labels in expected if not e.after_removal]

    def shown() -> bool:
        elapsed = time.time() - fault_at
        fixed = fault.done(stage, elapsed)
        if fixed is not None:
            return fixed
        if elapsed > stage.profile.hold_limit:
            return True
        named = _named_at(observer.timeline(fault_at), affected, incident.cause) is not None
        histories = observer.histories(fault_at)
        fired = all(_find(histories, e.name, labels, fired=True) for e, labels in during)
        return named and fired

    stage.wait(shown, stage.profile.hold_limit + stage.profile.steady + 60, 1.0)
    for ok, what, detail in fault.checks(stage):
        _check(result, ok, what, detail)
    removed_at = time.time()
    fault.remove(stage)

    head: list[int] = []

    def resolved() -> bool:
        latest = observer.latest()
        if latest is None or latest.at < removed_at + 2 * INTERVAL:
            return False
        if not head:
            # Every event appended before the fault was removed (the load goes on appending).
            try:
                head.append(stage.db.head())
            except Exception:  # the database may still be starting
                return False
        return (
            not latest.firing()
            and len(latest.causes) == PARTITIONS
            and set(latest.causes.values()) == {"ok"}
            and stage.db.unapplied(PROJECTION, up_to_position=head[0]) == 0
        )

    done = stage.wait(resolved, stage.profile.resolve_limit, 1.0)
    resolved_at = time.time()
    if done is not None:
        result.resolved_after = resolved_at - removed_at
    _check(
        result,
        done is not None,
        "after the fault is removed nothing fires, every partition is ok and every event appended "
        "until then is applied",
        "" if done is not None else _state(observer.latest()),
    )
    time.sleep(2 * INTERVAL)  # a last look: nothing may fire again
    end = time.time()
    _judge(stage, incident, fault, result, observer, (stage.ready_at, fault_at, removed_at, end), expected)
    try:
        times = (stage.ready_at, fault_at, removed_at, end)
        # The table as it stood at the fault's last look: what it shows at its worst.
        at = max(fault_at + INTERVAL, removed_at - 1.0)
        result.png = str(render_incident(stage.prometheus, incident, png_dir, times, table_at=at))
    except Exception as e:
        _check(result, False, "the incident's PNG is drawn", repr(e))
    fold, problems = stage.finish()
    result.fold = fold
    for problem in problems:
        _check(result, False, problem)


def _judge(
    stage: Stage,
    incident: Incident,
    fault: Fault,
    result: IncidentResult,
    observer: Observer,
    times: tuple[float, float, float, float],
    expected: list[tuple[ExpectedAlert, dict[str, str]]],
) -> None:
    ready_at, fault_at, removed_at, end = times
    affected = incident.affected(fault.victim)
    timeline = observer.timeline(fault_at, end)
    # -- the cause ---------------------------------------------------------------
    if incident.cause != "ok":
        named = _named_at(observer.timeline(fault_at, removed_at + 2 * INTERVAL), affected, incident.cause)
        result.named_after = None if named is None else named - fault_at
        _check(
            result,
            named is not None,
            f"the triage table names {incident.cause} on partition(s) {_parts(affected)}",
            "" if named is None else f"after {named - fault_at:.0f} s",
        )
    allowed_affected = TRANSITIONAL | {incident.cause, *incident.also_causes}
    wrong: dict[tuple[int, str], float] = {}
    for snapshot in timeline:
        for k, cause in snapshot.causes.items():
            allowed = allowed_affected if (k in affected or snapshot.at > removed_at) else {"ok"}
            if cause not in allowed:
                wrong.setdefault((k, cause), snapshot.at - fault_at)
    for (k, cause), at in sorted(wrong.items(), key=lambda item: item[1]):
        result.wrong_causes.append(f"partition {k} showed {cause} {at:.0f} s after the fault")
    _check(
        result,
        not wrong,
        "no partition shows a cause it should not (the others stay ok)",
        "; ".join(result.wrong_causes),
    )
    # -- the alerts ----------------------------------------------------------------
    histories = observer.histories(ready_at, end)
    matched: set[int] = set()
    for e, labels in expected:
        name = e.name
        found = _find(histories, name, labels, fired=True)
        shown_labels = ", ".join(f'{k}="{v}"' for k, v in labels.items())
        if not _check(result, bool(found), f"{name}{{{shown_labels}}} fires"):
            continue
        matched.update(id(h) for h in found)
        # Every rule of that name that fired (the burn-rate alert has two tiers) must be on time.
        timings = []
        on_time = True
        for history in sorted(found, key=lambda h: h.first_firing or 0.0):
            assert history.first_firing is not None
            took = history.first_firing - history.active_at
            limit = for_of(name, history.labels) / FACTOR + 2 * INTERVAL + POLL_SLACK
            on_time = on_time and took <= limit
            timings.append(
                f"{_tier(history)}{took:.1f} s (limit {limit:.1f} s), "
                f"{history.first_firing - fault_at:.0f} s after the fault"
            )
        _check(
            result,
            on_time,
            f"{name} fires within its scaled for: plus two evaluation intervals of turning pending",
            "; ".join(timings),
        )
    fired = sorted(
        (h for h in histories.values() if h.first_firing is not None), key=lambda h: h.first_firing or 0.0
    )
    for h in fired:
        assert h.first_firing is not None
        label = f"{h.name}" + (f" {h.labels['worker']}/{PARTITIONS}" if "worker" in h.labels else "")
        entry = f"{label} {_tier(h)}({h.first_firing - fault_at:.0f} s)".replace("  ", " ")
        if id(h) in matched or any(_matches(h, e.name, labels) for e, labels in expected):
            result.fired.append(entry)
        elif h.name in incident.allowed:
            result.fired.append(entry + " (may)")
        else:
            result.false_alerts.append(entry)
    _check(
        result,
        not result.false_alerts,
        "no alert fires that the incident does not list",
        ", ".join(result.false_alerts),
    )


def _tier(history: AlertHistory) -> str:
    """The burn-rate alerts' windows, as their labels name them: ``1h/5m ``."""
    long, short = history.labels.get("long"), history.labels.get("short")
    return f"{long}/{short} " if long and short else ""


def _matches(history: AlertHistory, name: str, labels: dict[str, str]) -> bool:
    return history.name == name and all(history.labels.get(k) == v for k, v in labels.items())


def _find(
    histories: dict[AlertKey, AlertHistory], name: str, labels: dict[str, str], *, fired: bool
) -> list[AlertHistory]:
    return [
        h
        for h in histories.values()
        if _matches(h, name, labels) and (h.first_firing is not None or not fired)
    ]


def _named_at(timeline: list[Snapshot], affected: set[int], cause: str) -> float | None:
    for snapshot in timeline:
        if affected and all(snapshot.causes.get(k) == cause for k in affected):
            return snapshot.at
    return None


def _parts(partitions: set[int]) -> str:
    return ", ".join(f"{k}/{PARTITIONS}" for k in sorted(partitions)) or "none"


def _causes(snapshot: Snapshot) -> str:
    return ", ".join(f"{k}: {c}" for k, c in sorted(snapshot.causes.items()))


def _state(snapshot: Snapshot | None) -> str:
    if snapshot is None:
        return "nothing observed"
    firing = ", ".join(sorted({a.name for a in snapshot.firing()})) or "none"
    return f"causes {_causes(snapshot)}; firing: {firing}"
