"""``incseg train --config FILE``: the options of a TOML file, overridden by the command line.

Every key is the name of an option of ``incseg train``, with ``-`` or ``_`` (``batch-size = 24`` or
``batch_size = 24``); a flag takes ``true`` or ``false``. The file's values become command-line arguments placed
before the real ones, so argparse checks them exactly as typed options and a flag given on the command line wins.
No torch import here (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["config_arguments", "copy_config", "expand_config", "load_toml"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_NOT_IN_FILE = frozenset({"help", "config"})


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid TOML (the message has the line and column).
    """
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}") from err


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's optional arguments by destination (``batch_size``), without ``--help`` and ``--config``."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _NOT_IN_FILE}


def config_arguments(parser: argparse.ArgumentParser, settings: dict[str, Any], path: Path) -> list[str]:
    """The command-line arguments equivalent to ``settings`` (the TOML file's table), checked by ``parser``.

    Args:
        parser: the ``incseg train`` sub-parser.
        settings: ``{option name: value}``; names with ``-`` or ``_``.
        path: the file (for messages).

    Returns:
        Arguments such as ``["--epochs", "30", "--sync-bn"]``.

    Raises:
        ValueError: an unknown key (the message lists the known ones), a table or list value, a flag that is not
            ``true``/``false``, or a value the option refuses (as argparse would say it).
    """
    options = _options(parser)
    tokens: list[str] = []
    for key, value in settings.items():
        dest = key.replace("-", "_")
        action = options.get(dest)
        if action is None:
            known = ", ".join(sorted(d.replace("_", "-") for d in options))
            raise ValueError(
                f"config file {path}: unknown setting {key!r}; the settings are the options of incseg train: {known}"
            )
        flag = action.option_strings[-1]
        switch = isinstance(action, argparse.BooleanOptionalAction)  # --sync-bn / --no-sync-bn
        if switch or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ValueError(f"config file {path}: {key} is a flag and takes true or false, got {value!r}")
            if switch:
                tokens.append(action.option_strings[0] if value else action.option_strings[1])
            elif value == isinstance(action, argparse._StoreTrueAction):
                tokens.append(flag)
            continue
        if isinstance(value, (bool, dict, list)):
            raise ValueError(f"config file {path}: {key} takes one value, as {flag} does, got {value!r}")
        tokens += [flag, repr(value) if isinstance(value, float) else str(value)]
    _check(parser, tokens, path)
    return tokens


def _check(parser: argparse.ArgumentParser, tokens: list[str], path: Path) -> None:
    """Parse ``tokens`` alone, turning argparse's exit into a ValueError that names the file."""

    def error(message: str) -> NoReturn:
        raise ValueError(f"config file {path}: {message}")

    original = parser.error
    parser.error = error  # type: ignore[method-assign]
    try:
        parser.parse_args(tokens)
    finally:
        parser.error = original  # type: ignore[method-assign]


def expand_config(parser: argparse.ArgumentParser, argv: Sequence[str], path: Path) -> list[str]:
    """``argv`` with the file's settings inserted right after ``train``, so that the command line overrides them.

    Args:
        parser: the ``incseg train`` sub-parser.
        argv: the command line (``["train", "--config", "f.toml", ...]``).
        path: the TOML file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid TOML or settings (see :func:`config_arguments`).
    """
    tokens = config_arguments(parser, load_toml(path), path)
    argv = list(argv)
    at = argv.index("train") + 1
    return [*argv[:at], *tokens, *argv[at:]]


def copy_config(path: Path, out: Path) -> Path | None:
    """Copy the config file into the run folder as ``config.toml``, once (a resumed run keeps its first copy).

    Returns:
        The copy, or ``None`` when the run folder already holds one.
    """
    target = out / "config.toml"
    if target.exists():
        return None
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target
