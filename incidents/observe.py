"""What Prometheus said during an incident: the active alerts and each partition's cause, once a second.

An :class:`Observer` thread asks Prometheus's HTTP API and keeps every
answer; the checks read the timeline afterwards, so that what they judge is
exactly what an on-call engineer would have seen.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from projectionist.testing.prometheus import Alert, Prometheus

#: The label set of an alert: its name and labels, sorted.
AlertKey = tuple[tuple[str, str], ...]


def alert_key(alert: Alert) -> AlertKey:
    return tuple(sorted(alert.labels.items()))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One look: unix time, each partition's cause (by worker id), and the active alerts."""

    at: float
    causes: dict[int, str]
    alerts: tuple[Alert, ...]

    def firing(self) -> list[Alert]:
        return [a for a in self.alerts if a.firing]


@dataclass
class AlertHistory:
    """One alert label set across the incident."""

    name: str
    labels: dict[str, str]
    active_at: float
    first_firing: float | None = None
    last_firing: float | None = None
    states: list[str] = field(default_factory=list)


class Observer:
    """Polls ``prometheus`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, prometheus: Prometheus, projection: str, *, interval: float = 1.0) -> None:
        self.prometheus = prometheus
        self.projection = projection
        self.interval = interval
        self.snapshots: list[Snapshot] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="incident-observer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=30)

    def look(self) -> Snapshot:
        causes = {
            int(s.labels["worker"]): s.labels["cause"]
            for s in self.prometheus.query(f'projectionist:partition_cause{{projection="{self.projection}"}}')
        }
        return Snapshot(time.time(), causes, tuple(self.prometheus.alerts()))

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                snapshot = self.look()
            except Exception:  # Prometheus busy or restarting: a gap, not the end
                self.errors += 1
            else:
                with self._lock:
                    self.snapshots.append(snapshot)
            self._halt.wait(self.interval)

    def timeline(self, since: float = 0.0, until: float = float("inf")) -> list[Snapshot]:
        with self._lock:
            return [s for s in self.snapshots if since <= s.at <= until]

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self.snapshots[-1] if self.snapshots else None

    def histories(self, since: float = 0.0, until: float = float("inf")) -> dict[AlertKey, AlertHistory]:
        """Every alert label set seen in [since, until], with when it first and last fired."""
        out: dict[AlertKey, AlertHistory] = {}
        for snapshot in self.timeline(since, until):
            for alert in snapshot.alerts:
                key = alert_key(alert)
                history = out.get(key)
                if history is None or (history.active_at != alert.active_at and history.first_firing is None):
                    history = out[key] = AlertHistory(alert.name, alert.labels, alert.active_at)
                history.states.append(alert.state)
                if alert.firing:
                    if history.first_firing is None:
                        history.first_firing = snapshot.at
                        history.active_at = alert.active_at
                    history.last_firing = snapshot.at
        return out
