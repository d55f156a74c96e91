"""The command-line convention every gptexp command shares, and the one place where commands
exit.

Arguments are ``key=value`` (``--key=value`` is the same, a bare ``--flag`` is ``flag=true``),
checked against the command's options dataclass through OmegaConf: an unknown key, a value of
the wrong type or an impossible value is the same kind of ``error: ...`` in every command.
Commands that take several run directories take them as positional paths; the commands that
continue a stored config (resume, fork) also take its ``key.path=value`` overrides. ``--help``
lists the keys. Exit codes (gptexp.core.errors): 0 done, 1 failed, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from gptexp.core.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    USER_ERRORS,
    ConfigError,
    JobFailed,
    RunFailed,
    TrainingInterrupted,
    describe_os_error,
)

log = logging.getLogger("gptexp")

T = TypeVar("T")
Options = TypeVar("Options")

POSITIONAL = "paths"  # the options field that collects positional arguments, where there is one
# The options field that collects config overrides, where there is one: an argument whose key
# has a dot, or is one of the schema's CONFIG_KEYS (the config's top-level keys: model=small
# is an override, refused by the command with its reason), with Hydra's +/~ prefixes. They
# are passed on as written; the command checks them against the config.
OVERRIDES = "overrides"

# A log record with this attribute set (``extra={FILE_ONLY: True}``) goes to train.log only.
FILE_ONLY = "file_only"


class ConsoleHandler(logging.StreamHandler):
    """What a person sees on stderr while a command runs: the bare messages."""

    def __init__(self, level: int) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))
        self.setLevel(level)
        self.addFilter(lambda record: not getattr(record, FILE_ONLY, False))


class RunLogHandler(logging.FileHandler):
    """A run's ``train.log`` (appending).

    Its records are held back until the run starts writing its directory
    (:func:`run_log_starts`): a command refused on bad input writes nothing, train.log
    included (its lines were on the console). A line it cannot write (a full disk, a
    read-only file) stops it with one warning on the console, instead of a traceback for every
    record: train.log is a copy of what the console shows, and the console goes on."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.held: list[logging.LogRecord] | None = []  # None once the run writes

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            self.held.append(record)
        else:
            super().emit(record)

    def start(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self.setLevel(logging.CRITICAL + 1)  # nothing more goes to the file
        print(
            f"warning: {self.baseFilename}: {error.strerror or error}; "
            "train.log stops here, the console goes on",
            file=sys.stderr,
        )

    def close(self) -> None:
        # Closing flushes what is buffered, which fails again the same way: said once above,
        # and the file is closed all the same.
        with contextlib.suppress(OSError):
            super().close()


@contextmanager
def command_logging(log_file: Path | None, console_level: int = logging.INFO):
    """Send gptexp's log records to stderr and, for a run, to its ``train.log`` (appending).

    Handlers are removed on exit, so the jobs of a multirun each log to their own file. Under
    torchrun only rank 0 reports on the console (other ranks print errors only).
    """
    root = logging.getLogger()
    handlers: list[logging.Handler] = []
    if log_file is not None and not log_file.is_symlink():
        # (a linked train.log is never written through: the run's lock refuses it,
        # gptexp.observe.rundir)
        file_handler = RunLogHandler(log_file)
        file_handler.setFormatter(
            logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
        )
        file_handler.setLevel(logging.INFO)
        handlers.append(file_handler)
    if int(os.environ.get("RANK", "0")) > 0:  # the other ranks say only what rank 0 cannot
        console_level = max(console_level, logging.ERROR)
    handlers.append(ConsoleHandler(console_level))
    # Hydra's own console handler sits on the root logger; set it aside meanwhile so that
    # each line is printed once, without Hydra's prefix.
    previous_level, previous_handlers = root.level, root.handlers[:]
    root.handlers = handlers
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in handlers:
            handler.close()
        root.handlers = previous_handlers
        root.setLevel(previous_level)


def run_log_starts() -> None:
    """The run now writes its directory: train.log gets the lines held back so far, and the
    ones that follow (see RunLogHandler)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogHandler):
            handler.start()


def report(level: int, message: str) -> None:
    """One line for the person at the terminal (and the run's log where there is one)."""
    if any(isinstance(h, ConsoleHandler) for h in logging.getLogger().handlers):
        log.log(level, message)
    else:  # outside command_logging (e.g. a Hydra callback): plain, without Hydra's prefix
        print(message, file=sys.stderr)


def run_command(body: Callable[[], T], *, raise_instead: bool = False) -> T:
    """Run ``body``; bad input exits 2 with one ``error:`` line, a clean stop on a signal 130,
    a failed run 1. ``raise_instead`` (a job of a multirun) re-raises after the message so the
    sweep records the job and goes on."""
    try:
        return body()
    except USER_ERRORS as error:
        # Bad input is the same on every rank of a machine under torchrun (the same config, the
        # same files): its first rank says it (once on one machine), every rank exits 2.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            report(logging.ERROR, f"error: {error}")
        if raise_instead:
            raise
        sys.exit(EXIT_USER_ERROR)
    except TrainingInterrupted as stop:
        report(logging.WARNING, str(stop))
        if raise_instead:
            raise
        sys.exit(EXIT_INTERRUPTED)
    except (FloatingPointError, JobFailed) as error:
        report(logging.ERROR, f"failed: {error}")
        if raise_instead:
            raise
        sys.exit(EXIT_FAILURE)
    except (RunFailed, OSError) as error:  # a full disk, a read-only directory (gptexp.core.errors)
        what = describe_os_error(error) if isinstance(error, OSError) else str(error)
        report(logging.ERROR, f"error: {what}")
        if raise_instead:
            raise
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        report(logging.WARNING, "interrupted")
        sys.exit(EXIT_INTERRUPTED)


def describe_options(schema: type, usage: str) -> str:
    """``usage`` and one line per key: its type, its default and its comment."""
    hints = typing.get_type_hints(schema)
    aliases = {name: alias for alias, name in getattr(schema, "ALIASES", {}).items()}
    lines = [usage, "", "keys:"]
    for f in dataclasses.fields(schema):
        if f.name == POSITIONAL:
            continue
        if f.name == OVERRIDES:
            lines.append(f"  {'<key>=<value>':<16} {'':<12} {f.metadata.get('help', '')}")
            continue
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = "repeatable"
        kind = getattr(hints[f.name], "__name__", str(hints[f.name])).replace("typing.", "")
        note = f.metadata.get("help", "")
        lines.append(f"  {aliases.get(f.name, f.name):<16} {kind:<12} {default}  {note}".rstrip())
    return "\n".join(lines)


def parse_options(argv: list[str], schema: type[Options], usage: str) -> Options:
    """``argv`` as an instance of ``schema`` (a dataclass validated in ``__post_init__``)."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(describe_options(schema, usage))
        sys.exit(0)
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(schema)
    aliases: dict[str, str] = getattr(schema, "ALIASES", {})
    values: dict[str, Any] = {}
    overrides = [arg for arg in argv if OVERRIDES in fields and _is_override(arg, schema)]
    for arg in argv:
        if arg in overrides:
            continue
        key, value = _split(arg)
        if arg[:1] == "-" and arg[1:] in aliases:  # a short flag: -m
            key, value = arg[1:], "true"
        if key is None:
            if POSITIONAL not in fields:
                raise ConfigError(f"unexpected argument {arg!r} (arguments are key=value)\n{usage}")
            values.setdefault(POSITIONAL, []).append(arg)
            continue
        name = aliases.get(key, key)
        if name not in fields or name in (POSITIONAL, OVERRIDES):
            own = {n: n for n in fields if n not in (POSITIONAL, OVERRIDES)}
            known = ", ".join(sorted({**own, **aliases}))
            raise ConfigError(f"unknown key {key!r} (known keys: {known})")
        if typing.get_origin(hints[name]) is list:
            values.setdefault(name, []).append(value)
        elif value.lower() in ("none", "null") and type(None) in typing.get_args(hints[name]):
            values[name] = None
        else:
            values[name] = value
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        options = OmegaConf.to_object(merged)
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", "") or "an argument"
        raise ConfigError(f"{key}=... is required\n{usage}") from None
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "argument"
        cli_key = {v: k for k, v in aliases.items()}.get(key, key)
        message = str(error).splitlines()[0]
        if "could not be converted" in message and key in hints:
            kinds = [k for k in typing.get_args(hints[key]) or (hints[key],) if k is not type(None)]
            message = f"must be {kinds[0].__name__}"
        raise ConfigError(f"{cli_key}={values.get(key)!r}: {message}") from None
    if OVERRIDES in fields:  # (as written: OmegaConf would read ${...} in them)
        setattr(options, OVERRIDES, overrides)
    return options  # type: ignore[return-value]


def _is_override(arg: str, schema: type) -> bool:
    """Whether ``arg`` is a config override (see OVERRIDES), not one of the command's keys."""
    key = arg.partition("=")[0]
    if arg.startswith("-"):
        return False
    return "." in key or key.lstrip("+~") in getattr(schema, "CONFIG_KEYS", ())


def _split(arg: str) -> tuple[str | None, str]:
    """``key=value`` / ``--key=value`` -> (key, value); ``--flag`` -> (flag, "true");
    anything else is positional -> (None, arg)."""
    if arg.startswith("--"):
        key, sep, value = arg[2:].partition("=")
        return key.replace("-", "_"), (value if sep else "true")
    key, sep, value = arg.partition("=")
    if sep and key and key.replace(".", "").replace("_", "").isalnum():
        return key, value
    return None, arg
