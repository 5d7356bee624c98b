"""The ``protomem`` command: one typer app, one subcommand group per package.

Every package contributes its commands from ``protomem/<package>/commands.py`` (imports of torch and
other heavy modules happen inside the command functions, so ``protomem --help`` stays fast).
A :class:`~protomem.errors.ProtomemError` becomes a one-line message and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from protomem.audit import commands as audit_commands
from protomem.diffusion import commands as diffusion_commands
from protomem.errors import ProtomemError
from protomem.grammar.commands import app as grammar_app
from protomem.study import commands as study_commands
from protomem.sweep.commands import app as sweep_app

app = typer.Typer(
    name="protomem",
    help="Which training examples does a generative model copy, when does it start, and why those?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from protomem import __version__

        typer.echo(f"protomem {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the installed protomem version (from the package metadata) and exit.",
    ),
) -> None:
    """Which training examples does a generative model copy, when does it start, and why those?"""


app.add_typer(grammar_app, name="grammar")
# Each package registers its commands below, one line each (keep this list in package order).
diffusion_commands.register(app)
study_commands.register(app)
audit_commands.register(app)
app.add_typer(sweep_app, name="sweep")


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    try:
        app()
    except ProtomemError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
