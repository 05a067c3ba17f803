"""How every command declares its flags, so each help text reads "(env X, default Y)"."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

from projectionist.errors import ConfigError
from projectionist.settings import Variable, default_of, parse_positive_int, variable

#: ``--no-migrate`` once turned off migrating at start-up; that is the default now.
NO_MIGRATE = "--no-migrate"


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _converter(parse: Callable[[str, str], Any], name: str) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        try:
            return parse(raw, name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name  # argparse names it in "invalid <name> value"
    return convert


def setting(parser: argparse.ArgumentParser, *names: str, env: str, text: str, **kwargs: Any) -> None:
    """A flag that overrides the environment variable ``env``; flag wins, and both are validated alike."""
    v = variable(env)
    kwargs.setdefault("type", _converter(v.parse, names[0]))
    kwargs.setdefault("default", None)
    parser.add_argument(*names, dest=v.flag, help=_help(text, v), **kwargs)


def setting_switch(parser: argparse.ArgumentParser, name: str, *, env: str, text: str) -> None:
    """An on/off flag for the boolean variable ``env`` (the flag only turns it on)."""
    v = variable(env)
    parser.add_argument(name, dest=v.flag, action="store_true", default=None, help=_help(text, v))


def setting_const(parser: argparse.ArgumentParser, name: str, *, env: str, value: Any, text: str) -> None:
    """A flag that sets the variable ``env`` to ``value`` (``--elastic`` for ``WORKER_MODE=elastic``)."""
    v = variable(env)
    parser.add_argument(
        name, dest=v.flag, action="store_const", const=value, default=None, help=_help(text, v)
    )


def _help(text: str, v: Variable) -> str:
    names = " or ".join((v.name, *v.aliases))
    return f"{text} (env {names}, default {_shown(default_of(v))})"


def option(
    parser: argparse.ArgumentParser, *names: str, text: str, default: Any = None, **kwargs: Any
) -> None:
    """A flag with no environment variable."""
    shown = "" if kwargs.get("required") else f" (default {_shown(default)})"
    parser.add_argument(*names, default=default, help=f"{text}{shown}", **kwargs)


def positive_int(name: str) -> Callable[[str], int]:
    return _converter(parse_positive_int, name)


def positive_float(name: str) -> Callable[[str], float]:
    from projectionist.settings import parse_positive_float

    return _converter(parse_positive_float, name)


def no_migrate(parser: argparse.ArgumentParser) -> None:
    """Accept and ignore ``--no-migrate``: scripts written when migrating at start-up was the default."""
    parser.add_argument(NO_MIGRATE, action="store_true", help=argparse.SUPPRESS)


def migrate_switch(parser: argparse.ArgumentParser) -> None:
    setting_switch(
        parser,
        "--migrate",
        env="MIGRATE",
        text="apply pending migrations at start-up; without it, migrating is the separate step "
        "`projectionist migrate`",
    )
    no_migrate(parser)
