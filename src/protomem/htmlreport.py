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

import matplotlib

matplotlib.use("Agg")  # no display on the machines this runs on

import jinja2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from markupsafe import Markup  # noqa: E402

from protomem.io import write_text_atomic  # noqa: E402

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("protomem", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


def figure_data_uri(fig: plt.Figure, dpi: int = 110) -> str:
    """A ``data:image/png;base64,...`` URI of the figure; closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_img(fig: plt.Figure, alt: str, dpi: int = 110) -> Markup:
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
