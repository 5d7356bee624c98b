"""The ``protomem`` command: one typer app, one subcommand group per package.

Every package contributes its commands from ``protomem/<package>/commands.py`` (imports of torch and
other heavy modules happen inside the command functions, so ``protomem --help`` stays fast).
A :class:`~protomem.errors.ProtomemError` (and any other user error: a bad flag, a file the system
refuses) becomes a one-line message and exit code 2; :func:`run` runs a command line in-process.
"""

from __future__ import annotations

import atexit
import errno
import gc
import sys

import typer
import typer.main

try:  # typer >= 0.22 ships its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

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


def run(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]) in this process; returns the exit code.

    User errors — a :class:`ProtomemError`, a bad flag, a file the system refuses to read or write — are
    one line on stderr and exit code 2; Ctrl-C is exit code 130. Anything else is a bug and keeps its
    traceback.
    """
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="protomem", standalone_mode=False)
    except ProtomemError as exc:
        return _fail(exc.one_line())
    except click_errors.NoArgsIsHelpError as exc:
        exc.show()
        return exc.exit_code
    except click_errors.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        return _fail(f"{where}{exc.format_message()} (see --help)", exc.exit_code)
    except click_errors.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        return _fail("aborted", 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # refused by the system: permissions, a full or read-only disk, ...
        if exc.errno == errno.EPIPE:  # the reader of our output went away (e.g. `| head`)
            return 1
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    if code == 130:
        print("interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main() -> None:
    """Entry point of the ``protomem`` script."""
    # At exit, freeze every object out of the garbage collector: the interpreter's final collections then
    # skip them, which saves about 0.2 s once pandas and matplotlib are loaded. Exit handlers registered
    # later (Ray's shutdown, ...) run first, and files are flushed and closed as usual. Frozen in an exit
    # handler, not here, so a process that calls main() several times (the tests) keeps collecting.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    sys.exit(run())


if __name__ == "__main__":
    main()
