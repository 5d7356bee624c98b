"""MkDocs hook: the Sphinx roles of protomem's docstrings (``:class:`~protomem.errors.ProtomemError```)
become links on the API pages.

mkdocstrings renders a role as the text ``:class:`` followed by a code span; :func:`on_page_content`
turns that pair into an autorefs cross-reference (resolved by the autorefs plugin once every page is
built; ``optional``: a target outside the documented API stays plain code, with no warning). A leading
``~`` shows only the last component, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([A-Za-z_][\w.]*)</code>")


def _link(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2)
    title = target.rsplit(".", 1)[-1] if short else target
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: replace every role + code span pair by a cross-reference."""
    return ROLE.sub(_link, html)
