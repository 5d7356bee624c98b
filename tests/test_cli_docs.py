"""The command line as documented: ``--version``, and a CLI reference page that holds every command and
flag (docs/cli.md is filled at site build time by docs/hooks/cli_reference.py from the typer app)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import typer.main

from protomem.cli import app

ROOT = Path(__file__).resolve().parents[1]


def load_hook():
    path = ROOT / "docs" / "hooks" / "cli_reference.py"
    spec = importlib.util.spec_from_file_location("cli_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def every_command(command, path=()):
    yield path, command
    for name, sub in (getattr(command, "commands", None) or {}).items():
        yield from every_command(sub, (*path, name))


def test_version_is_the_package_metadata():
    done = subprocess.run(
        [sys.executable, "-m", "protomem.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"protomem {version('protomem')}"


def test_cli_reference_documents_every_command_and_flag():
    hook = load_hook()
    assert hook.MARKER in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    markdown = hook.on_page_markdown(f"intro\n\n{hook.MARKER}\n", None, None, None)
    sections = dict(
        re.findall(r"^## (protomem(?: [\w-]+)*)\n(.*?)(?=^## |\Z)", markdown, flags=re.MULTILINE | re.DOTALL)
    )
    commands = list(every_command(typer.main.get_command(app)))
    assert len(commands) >= 13 and ("sweep", "run") in [path for path, _ in commands]  # nested groups too
    for path, command in commands:
        section = sections.pop(" ".join(("protomem", *path)))
        for param in command.params:
            if param.param_type_name == "argument":
                assert f"`{param.name.upper()}`" in section, (path, param.name)
            else:
                for flag in [*param.opts, *param.secondary_opts]:
                    assert f"`{flag}`" in section, (path, flag)
            if param.help:
                assert hook.table_cell(param.help) in section, (path, param.name)
        for name in getattr(command, "commands", None) or {}:
            assert f"(#protomem-{'-'.join((*path, name))})" in section, (path, name)
    assert not sections  # no section for a command that does not exist
