"""Open an HTML report in headless Chromium and check that it rendered and fits a laptop and a phone
screen (used by every report test).

Needs Debian's ``chromium`` (``.ci/run`` installs it) and the ``playwright`` package (dev extra), which
drives that browser: no browser is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    """The Chromium executable, or skip the calling test with the reason."""
    path = chromium_path()
    if path is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    return path


# A laptop screen and a phone (iPhone 12-15: 390 CSS px): every report must fit both.
WIDTHS = (1280, 390)

# Where the page is wider than the window: the document's widths and the elements sticking out furthest.
FIT_SCRIPT = """() => {
  const client = document.documentElement.clientWidth;
  const outside = [];
  for (const el of document.body.querySelectorAll("*")) {
    const box = el.getBoundingClientRect();
    if (box.right > client + 0.5 && box.width > 0) {
      let inScroller = false;  // inside a box that scrolls sideways on its own: fine
      for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
        const overflow = getComputedStyle(p).overflowX;
        if (overflow === "auto" || overflow === "scroll") { inScroller = true; break; }
      }
      if (!inScroller) outside.push(`${el.tagName.toLowerCase()} right edge at ${Math.round(box.right)} px`);
    }
  }
  const scrollWidth = document.documentElement.scrollWidth;
  return {scrollWidth: scrollWidth, clientWidth: client, outside: outside.slice(0, 5)};
}"""


def render_report(html_path: Path, screenshot_path: Path, widths: tuple[int, ...] = WIDTHS) -> dict:
    """Load ``html_path`` in headless Chromium at each window width, check that it fits, screenshot it.

    At every width the page must not scroll sideways (``scrollWidth <= clientWidth``: wide tables scroll
    inside their own box, figures scale) and every image must have loaded (complete, naturalWidth > 0);
    otherwise an AssertionError names the width and what sticks out or failed. A full-page screenshot is
    saved per width: ``screenshot_path`` for the first width, ``<stem>-<width>px.png`` beside it for the
    others.

    Returns:
        for the first width: {"images": n, "images_loaded": n_loaded, "title": str, "text": visible text};
        plus "widths": {width: {"scrollWidth", "clientWidth", "images", "images_loaded", "screenshot"}}.
    """
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    screenshot_path = Path(screenshot_path)
    seen: dict = {"widths": {}}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            for index, width in enumerate(widths):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(Path(html_path).resolve().as_uri(), wait_until="load")
                images = page.evaluate(
                    "() => Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
                )
                fit = page.evaluate(FIT_SCRIPT)
                shot = screenshot_path
                if index > 0:
                    shot = shot.with_name(f"{shot.stem}-{width}px{shot.suffix}")
                page.screenshot(path=str(shot), full_page=True)
                seen["widths"][width] = {
                    "scrollWidth": fit["scrollWidth"],
                    "clientWidth": fit["clientWidth"],
                    "images": len(images),
                    "images_loaded": int(sum(images)),
                    "screenshot": shot,
                    "outside": fit["outside"],
                }
                if index == 0:
                    seen.update(
                        images=len(images),
                        images_loaded=int(sum(images)),
                        title=page.title(),
                        text=page.inner_text("body"),
                    )
                page.close()
        finally:
            browser.close()
    for width, at in seen["widths"].items():
        assert at["scrollWidth"] <= at["clientWidth"], (
            f"{html_path} at {width} px: the page scrolls sideways ({at['scrollWidth']} px wide); "
            f"sticking out: {'; '.join(at['outside']) or 'nothing found'}"
        )
        missing = at["images"] - at["images_loaded"]
        assert missing == 0, f"{html_path} at {width} px: {missing} of {at['images']} images did not load"
    return seen
