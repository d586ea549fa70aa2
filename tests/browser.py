"""Headless Debian chromium driven by playwright, for the tests of pages the workbench serves (`workbench view`).

Playwright's python package drives the system browser (/usr/bin/chromium, Debian's `chromium` package, which
.ci/run installs); no browser is downloaded. Flags: headless, no sandbox (root in CI), no GPU, and nothing that
reaches the network (QUIC, background networking, component updates, sync), with a fresh profile folder.
Tests that need it skip, saying why, where the browser or playwright is missing.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def chromium(viewport=(1280, 860)):
    """A fresh browser context; pytest.skip where chromium or playwright is missing."""
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): apt-get install -y chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[browser]'")
    profile = tempfile.mkdtemp(prefix="workbench-chromium-")
    try:
        with sync_api.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=FLAGS,
                viewport={"width": viewport[0], "height": viewport[1]})
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def png_pixels(png: bytes):
    """A screenshot's pixels as uint8 [H, W, 3]."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
