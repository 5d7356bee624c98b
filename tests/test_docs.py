"""The documentation against the program: ``--version``, a CLI reference page that holds every command
and flag (docs/cli.md, filled at site build time by docs/hooks/cli_reference.py), an API page per module."""

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


# Modules with no API page of their own, and why; every other module needs a `::: module` line in
# docs/api/*.md or a documented package that re-exports it.
NOT_API = {
    "protomem": "the package: version only",
    "protomem.cli": "the command line (docs/cli.md)",
    "protomem.audit": "an empty package; its modules have pages",
    "protomem.audit.report": "renders the audit's HTML report",
    "protomem.study.report": "renders the study's HTML reports",
    "protomem.study.figures": "draws the study report's figures",
}


def test_every_module_is_on_an_api_page():
    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), flags=re.MULTILINE))
    source = ROOT / "src"
    missing = []
    for path in sorted(source.rglob("*.py")):
        module = ".".join(path.relative_to(source).with_suffix("").parts).removesuffix(".__init__")
        package, _, _ = module.rpartition(".")
        init = source / package.replace(".", "/") / "__init__.py"
        re_exported = package in documented and f"{module}" in init.read_text(encoding="utf-8")
        if module in documented or re_exported or module in NOT_API or module.endswith(".commands"):
            continue
        missing.append(module)
    assert not missing, f"no API page documents {missing}: add `::: module` to a page of docs/api/"
