"""Serving the API with uvicorn: what ``projectionist api`` runs."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

from opentelemetry import trace

from projectionist.api.app import create_app
from projectionist.settings import ApiSettings
from projectionist.worker.gc_tuning import tune_for_throughput

log = logging.getLogger(__name__)

#: ``service.name`` of the API's spans unless OTEL_SERVICE_NAME says otherwise.
SERVICE_NAME = "projectionist-api"


def _server(config: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, with the CLI's signal convention.

        First SIGTERM or SIGINT: stop accepting, finish in-flight requests, exit 0.
        Second: exit at once. (uvicorn itself re-raises the signal after a
        graceful shutdown, so the process would report death by SIGTERM.)
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            def handle(signum: int, frame: FrameType | None) -> None:
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True

            original = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server(config)


def serve(
    database_url: str, settings: ApiSettings, *, log_level: str = "INFO", tracing: bool = False
) -> None:
    """Run until SIGINT or SIGTERM; uvicorn finishes in-flight requests before exiting.

    With ``tracing`` (an OTLP endpoint is configured: :attr:`TelemetryOptions.tracing`)
    spans are exported over OTLP/HTTP; without, the API still continues an
    incoming ``traceparent`` into event metadata, it just records no spans.
    """
    import uvicorn

    from projectionist.telemetry.tracing import configure_tracing

    provider = configure_tracing(default_service_name=SERVICE_NAME) if tracing else None
    if provider is not None:
        trace.set_tracer_provider(provider)
    config = uvicorn.Config(
        create_app(database_url, settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        # One line per request costs a noticeable share of a small machine's
        # CPU under load; the metrics already count every request.
        access_log=log_level.upper() == "DEBUG",
        lifespan="on",
        server_header=False,
    )
    server = _server(config)
    # The app is built and uvicorn imported: what is on the heap now lives
    # as long as the process (docs/design/gc-tuning.md).
    tune_for_throughput()
    try:
        server.run()
    finally:
        if provider is not None:
            provider.shutdown()  # flushes the spans still queued
