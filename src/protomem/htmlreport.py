"""Self-contained HTML reports: matplotlib figures inlined as base64 PNG, pages rendered with jinja2.

Every report (study, audit, sweep) extends ``templates/base.html.j2`` so they look alike and open in a
browser with no server and no network.
"""

from __future__ import annotations

import base64
import io
import math
import os
from typing import Any

import jinja2
from markupsafe import Markup
from matplotlib.figure import Figure

from protomem.io import write_text_atomic

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("protomem", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


def subplots(*grid: int, figsize: tuple[float, float] | None = None, **options: Any) -> tuple[Figure, Any]:
    """A new figure and its axes, like ``matplotlib.pyplot.subplots(*grid, figsize=..., **options)``.

    The figure is made without pyplot (matplotlib's advice for code that only writes files): no GUI
    backend, no global registry of open figures to close, and a shorter import.
    """
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **options)


def figure_data_uri(fig: Figure, dpi: int = 110) -> str:
    """A ``data:image/png;base64,...`` URI of the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_img(fig: Figure, alt: str, dpi: int = 110) -> Markup:
    """An ``<img>`` element with the figure inlined, ready to drop into a template."""
    alt_text = jinja2.utils.markupsafe.escape(alt)
    return Markup(f'<img class="figure" alt="{alt_text}" src="{figure_data_uri(fig, dpi)}">')


def format_number(value: Any, digits: int = 3) -> str:
    """A table cell: ``digits`` significant digits for floats, an en dash for None or NaN."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}"
    return str(value)


def render_page(template: str, out_path: str | os.PathLike, **context: Any) -> None:
    """Render ``templates/<template>`` with ``context`` and write it atomically to ``out_path``."""
    html = _ENV.get_template(template).render(**context)
    write_text_atomic(out_path, html)
