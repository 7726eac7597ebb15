"""The ``distac`` command line: one click group whose subcommands live with the code they drive.

Subcommands are imported lazily, so ``distac methods`` does not pay for importing transformers.

Errors: a :class:`~distac.errors.DistacError` becomes one line on stderr and exit code 2. So do
the other *expected* failures that reach this boundary unconverted (the code that knows the file
converts them first where it can): an ``OSError`` (permission denied, read-only or full disk, a
missing file), text that is not UTF-8, malformed YAML, JSON or pickle, a file that ends early.
Anything else is a bug in distac and keeps its traceback. SIGTERM raises ``SystemExit(143)`` so
that temporary outputs are removed as on Ctrl-C.
"""

from __future__ import annotations

import importlib
import json
import pickle
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click
import yaml

from .errors import DistacError

# name -> "module:attribute" of a click.Command. Owners add their commands in their own modules.
COMMANDS: dict[str, str] = {
    "merge": "distac.merging.cli:merge_command",
    "methods": "distac.merging.cli:methods_command",
    "export-tasks": "distac.merging.cli:export_tasks_command",
    "stats": "distac.stats.cli:stats_command",
    "diagnose": "distac.conditioning.cli:diagnose_command",
    "condition": "distac.conditioning.cli:condition_command",
    "calibrate": "distac.conditioning.cli:calibrate_command",
    "tune": "distac.tuning.cli:tune_command",
    "reproduce": "distac.reproduce.cli:reproduce_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distac")
def cli() -> None:
    """distac: robust model merging (task vectors, merge methods, curvature, DisTaC)."""


def expected_error(e: BaseException) -> str | None:
    """The one-line message for an expected failure that reached the CLI unconverted, else None (a bug).

    Example:
        >>> expected_error(PermissionError(13, "Permission denied", "/out"))
        '/out: Permission denied'
    """
    if isinstance(e, OSError):
        what = e.strerror or str(e) or type(e).__name__
        return f"{e.filename}: {what}" if e.filename is not None else what
    if isinstance(e, UnicodeDecodeError):
        return f"a text input is not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8"
    if isinstance(e, yaml.YAMLError | json.JSONDecodeError | pickle.UnpicklingError | EOFError):
        kind = {yaml.YAMLError: "YAML", json.JSONDecodeError: "JSON", pickle.UnpicklingError: "pickled data"}
        name = next((v for k, v in kind.items() if isinstance(e, k)), "input")
        detail = " ".join(str(e).split()) or "the file ends early"
        return f"malformed {name}: {detail}"
    return None


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit in the main thread, so ``finally`` blocks and temp-output cleanup run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str) -> None:
    click.echo(f"distac: error: {message}", err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """The ``distac`` entry point: run a subcommand; user errors are one line and exit code 2."""
    try:
        with _sigterm_exits():
            cli.main(args=argv, prog_name="distac", standalone_mode=False)
    except DistacError as e:
        _fail(str(e))
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, EOFError):  # click turns EOFError into Abort, like Ctrl-C
            _fail(expected_error(e.__cause__) or "unexpected end of input")
        click.echo("distac: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError, pickle.UnpicklingError, EOFError) as e:
        _fail(expected_error(e) or str(e))
