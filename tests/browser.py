"""Open an HTML report in headless Chromium and check that it rendered (used by report tests).

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


def render_report(html_path: Path, screenshot_path: Path) -> dict:
    """Load ``html_path`` in headless Chromium, take a full-page screenshot, and report what loaded.

    Returns:
        {"images": n, "images_loaded": n_loaded, "title": str, "text": visible text}; an image counts as
        loaded when the browser decoded it (complete and naturalWidth > 0).
    """
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(Path(html_path).resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "() => Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(screenshot_path), full_page=True)
            return {
                "images": len(images),
                "images_loaded": int(sum(images)),
                "title": page.title(),
                "text": page.inner_text("body"),
            }
        finally:
            browser.close()
