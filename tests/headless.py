"""Load a run report in real headless Chromium and read back what the page says about itself.

Chromium's own command line, no driver: ``--dump-dom`` prints the page once its scripts have run
(``--virtual-time-budget`` lets their timers and promises finish) and ``--screenshot`` in the same
launch keeps a picture. Every host name is left unresolvable, so the page loads as offline as
it will on a user's machine. The page records its JavaScript errors (``window.onerror`` and unhandled
promise rejections, caught from before plotly.js loads) and the marks each plot drew in
``<pre id="report-status">``, which is what :func:`load` returns. Debian's ``chromium`` package
is what CI installs (``.ci/run``); no browser is downloaded.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
STATUS = re.compile(r'<pre id="report-status"[^>]*>(.*?)</pre>', re.S)


def chromium() -> str | None:
    """The browser binary: ``$CHROMIUM`` where set, else the first of ``NAMES`` on PATH."""
    named = os.environ.get("CHROMIUM")
    return named if named and shutil.which(named) else next(filter(None, map(shutil.which, NAMES)), None)


def load(page: Path, screenshot: Path | None = None, size: tuple[int, int] = (1200, 1600),
         timeout: float = 90) -> dict[str, Any]:
    """The page's status after loading ``page``: ``errors`` (JavaScript errors), ``plots`` (marks
    drawn per plot id), ``render_ms`` and ``done``; a screenshot to ``screenshot`` if given."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium binary on PATH (tried {', '.join(NAMES)})")
    with tempfile.TemporaryDirectory(prefix="evomerge-chromium-") as profile:
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
                "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: a page that needs a CDN fails here
                "--virtual-time-budget=20000", f"--window-size={size[0]},{size[1]}", "--dump-dom"]
        if screenshot is not None:
            args.append(f"--screenshot={screenshot}")
        done = subprocess.run([*args, Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=timeout)
    found = STATUS.search(done.stdout)
    if done.returncode != 0 or found is None or not found.group(1).strip():
        raise AssertionError(f"the page never reported its status (chromium exit {done.returncode}): "
                             f"{done.stderr[-2000:]}")
    return json.loads(html.unescape(found.group(1)))
