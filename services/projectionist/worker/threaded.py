"""Running a worker runtime on a background thread, its fatal error re-raised by :meth:`join`."""

from __future__ import annotations

import threading


class Threaded:
    """What ``Worker`` and ``ElasticWorker`` share: a stop flag, and :meth:`run` on a thread of its own.

    A subclass sets ``thread_name`` and implements :meth:`run`, which returns
    once :attr:`stopping` is true.
    """

    thread_name = "projectionist-worker"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the worker to finish its current batch, let go of what it owns and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_capturing, name=self.thread_name, daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run_capturing(self) -> None:
        try:
            self.run()
        except BaseException as e:  # re-raised by join()
            self._error = e
