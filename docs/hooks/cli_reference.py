"""MkDocs hook: the CLI reference page is generated from the typer app at build time, so it cannot drift.

``docs/cli.md`` holds the marker ``<!-- protomem-cli-reference -->``; :func:`on_page_markdown` replaces it
with :func:`cli_reference_markdown`: one section per command and group (nested ones too), its help text,
its usage line and a table of every argument and option with its type, default and help. The test suite
(tests/test_cli_docs.py) checks that every flag of every command is in that markdown.
"""

from __future__ import annotations

import enum
import inspect
from typing import Any

MARKER = "<!-- protomem-cli-reference -->"


def command_tree() -> list[tuple[tuple[str, ...], Any]]:
    """Every (path, command) of the ``protomem`` app, depth first, the root first, names sorted."""
    import typer.main

    from protomem.cli import app

    found: list[tuple[tuple[str, ...], Any]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        found.append((path, command))
        subcommands = getattr(command, "commands", None) or {}
        for name in sorted(subcommands):
            if not getattr(subcommands[name], "hidden", False):
                walk(subcommands[name], (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def _value_type(param: Any) -> str:
    """The value a parameter takes ('' for a flag): its choices, or the annotated type's name."""
    if getattr(param, "is_flag", False):
        return "flag"
    choices = getattr(getattr(param, "type", None), "choices", None)
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if choices is None and inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        choices = [member.value for member in annotation]
    if choices:
        return " \\| ".join(f"`{c}`" for c in choices)
    name = getattr(getattr(param, "type", None), "name", None) or getattr(annotation, "__name__", "")
    return {"PosixPath": "path", "Path": "path", "str": "text", "int": "integer", "float": "number"}.get(
        str(name), str(name)
    )


def _default(param: Any) -> str:
    if getattr(param, "required", False):
        return "required"
    default = param.default
    if callable(default) or default is None or (getattr(param, "is_flag", False) and default is False):
        return ""
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, float):
        return f"`{default:.6g}`"
    if isinstance(default, bool):
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`" if param.secondary_opts else ""
    return f"`{default}`"


def _escape(text: str) -> str:
    """Markdown-safe text: outside code spans ``<``, ``>`` become entities (not HTML tags) and square
    brackets are escaped (not links)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        for char, escaped in (("<", "&lt;"), (">", "&gt;"), ("[", "\\["), ("]", "\\]")):
            parts[i] = parts[i].replace(char, escaped)
    return "`".join(parts)


def table_cell(text: str | None) -> str:
    return _escape(" ".join((text or "").split()).replace("|", "\\|"))


def _usage(path: tuple[str, ...], command: Any) -> str:
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    pieces = ["protomem", *path]
    if any(p.param_type_name == "option" for p in command.params) or not arguments:
        pieces.append("[OPTIONS]")
    pieces += [p.name.upper() if p.required else f"[{p.name.upper()}]" for p in arguments]
    if getattr(command, "commands", None):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _help_text(command: Any) -> str:
    """The command's help as markdown paragraphs (typer's \\b markers dropped, lines kept)."""
    paragraphs = [p.replace("\b\n", "").strip() for p in inspect.cleandoc(command.help or "").split("\n\n")]
    return "\n\n".join(_escape(p) for p in paragraphs if p)


def cli_reference_markdown() -> str:
    """The reference of every command: ``## protomem ...`` sections with usage and a parameter table."""
    lines: list[str] = []
    for path, command in command_tree():
        lines += [f"## protomem {' '.join(path)}".rstrip(), "", _help_text(command), ""]
        lines += ["```", _usage(path, command), "```", ""]
        subcommands = getattr(command, "commands", None) or {}
        if subcommands:
            lines += ["| command | what it does |", "|---|---|"]
            for name in sorted(subcommands):
                anchor = "protomem-" + "-".join((*path, name))
                summary = table_cell(_help_text(subcommands[name]).split("\n\n")[0])
                lines.append(f"| [`{name}`](#{anchor}) | {summary} |")
            lines.append("")
        params = [p for p in command.params if not getattr(p, "hidden", False)]
        if params:
            lines += ["| argument / option | takes | default | what it does |", "|---|---|---|---|"]
            for param in params:
                if param.param_type_name == "argument":
                    name = f"`{param.name.upper()}`"
                else:
                    name = " / ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
                row = [name, _value_type(param), _default(param), table_cell(param.help)]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: fill the marker of the CLI reference page."""
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference_markdown())
    return markdown
