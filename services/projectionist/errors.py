"""The exception tree. Everything projectionist raises derives from ``ProjectionistError``."""

from __future__ import annotations


class ProjectionistError(Exception):
    """Base class of every error raised by projectionist."""


class ConfigError(ProjectionistError, ValueError):
    """A setting is invalid. The message is one line and names the setting."""


class MigrationError(ProjectionistError):
    """A migration cannot be applied to this database; nothing of it was applied."""


class NotMigratedError(MigrationError):
    """The database lacks migrations this version needs; ``projectionist migrate`` applies them."""


class ConcurrencyError(ProjectionistError):
    """An append's expected version did not match the stream's current version."""

    def __init__(self, aggregate_id: str, expected: object, actual: int | None, detail: str = "") -> None:
        self.aggregate_id = aggregate_id
        self.expected = expected
        self.actual = actual
        msg = f"stream {aggregate_id!r}: expected version {expected}, current version {actual}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class ProjectionError(ProjectionistError):
    """A projection's handler raised while applying an event."""


class FencedError(ProjectionistError):
    """Another process moved this worker's checkpoint: this process no longer owns the partition."""


class PoisonEventError(ProjectionError):
    """An event kept failing and the ``stop`` policy holds the worker in front of it."""

    def __init__(self, event: object, cause: BaseException, *, applied_before: int) -> None:
        self.event = event
        self.applied_before = applied_before
        position = getattr(event, "global_position", "?")
        aggregate = getattr(event, "aggregate_id", "?")
        super().__init__(
            f"poison event at global position {position} (aggregate {aggregate!r}): {cause!r}; "
            "the worker will not move past it (POISON_POLICY=stop)"
        )


def one_line(error: BaseException) -> str:
    """An error's message on one line (server errors span several), or its type when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error: BaseException) -> str:
    """An error's first line: a server error's message, without its DETAIL and HINT lines."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
