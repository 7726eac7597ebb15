"""The ``distac`` command line: one click group whose subcommands live with the code they drive.

Subcommands are imported lazily, so ``distac methods`` does not pay for importing transformers.
A :class:`~distac.errors.DistacError` becomes one line on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from .errors import DistacError

# name -> "module:attribute" of a click.Command. Owners add their commands in their own modules.
COMMANDS: dict[str, str] = {
    "merge": "distac.merging.cli:merge_command",
    "methods": "distac.merging.cli:methods_command",
    "stats": "distac.stats.cli:stats_command",
    "diagnose": "distac.conditioning.cli:diagnose_command",
    "condition": "distac.conditioning.cli:condition_command",
    "calibrate": "distac.conditioning.cli:calibrate_command",
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


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="distac", standalone_mode=False)
    except DistacError as e:
        click.echo(f"distac: error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("distac: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
