"""Headless Chromium (Debian's ``chromium`` package) for report.html: a screenshot, or the DOM it renders.

    smccc-harness matrix --report-only DIR --baseline NIGHT... --screenshot docs/report.png

* ``screenshot(page, png, (w, h))`` — ``chromium --headless --screenshot=PNG --window-size=W,H file://PAGE``;
* ``dump_dom(page)`` — ``chromium --headless --dump-dom file://PAGE``: the page as the browser parsed it
  (tests/unit/test_history.py checks the sections there, not in the text the harness wrote).

Chromium runs with a throwaway profile (``--user-data-dir`` in a temporary directory, removed after), no
network services (the report is self-contained), ``--no-sandbox`` as root (its sandbox refuses root), in its
own process group, killed whole when it is done or over its time.  It is installed through
harness/images/sysdeps.py (``REPORT_REQUIREMENTS``) by ``ensure_chromium()`` and by ``./smccc-harness test``'s
setup, never assumed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from ..errors import HarnessError
from ..images import sysdeps

BINARY = "chromium"
TIMEOUT_S = 120.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INSTALL_HINT = "run ./smccc-harness test once (its setup installs it), or as root: apt-get install chromium"


def ensure_chromium(progress=print) -> str:
    """Install Debian's Chromium when it is missing; its path."""
    sysdeps.ensure_report_packages(progress=progress)
    return binary()


def binary() -> str:
    path = shutil.which(BINARY)
    if not path:
        raise HarnessError(f"{BINARY} is not installed (the headless browser that renders report.html)", INSTALL_HINT)
    return path


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x1600"`` -> (1280, 1600); anything else a HarnessError."""
    m = re.fullmatch(r"\s*(\d{2,5})\s*[xX,]\s*(\d{2,5})\s*", str(text))
    if not m:
        raise HarnessError(f"bad window size {text!r}", "write it as WIDTHxHEIGHT in pixels, e.g. 1280x1600")
    return int(m.group(1)), int(m.group(2))


def check_png_path(png: Path) -> None:
    """Before any run: the screenshot's file name ends in .png and its directory exists."""
    if Path(png).suffix.lower() != ".png":
        raise HarnessError(f"--screenshot {png}: Chromium writes PNG; name the file *.png", "e.g. docs/report.png")
    if not Path(png).resolve().parent.is_dir():
        raise HarnessError(f"--screenshot {png}: no directory {Path(png).resolve().parent}",
                           "create it first, or name a file in an existing directory")


def argv(page: Path, profile: Path, *extra: str) -> list[str]:
    """The command line for ``page`` (an HTML file) with the throwaway ``profile`` directory."""
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-sync", "--disable-background-networking", "--disable-component-update",
             "--disable-dev-shm-usage", "--force-device-scale-factor=1", f"--user-data-dir={profile}"]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")
    return [binary(), *flags, *extra, Path(page).resolve().as_uri()]


def _run(page: Path, *extra: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="smccc-chromium-") as profile:
        cmd = argv(page, Path(profile), *extra)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True, env=dict(os.environ, HOME=profile))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise HarnessError(f"{BINARY} did not finish rendering {page} in {timeout:.0f} s",
                               f"run it by hand to see why: {' '.join(cmd)}") from None
        finally:
            try:     # its helpers (zygote, crashpad) are in the group it leads: none outlives it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tail(text: str, n: int = 6) -> str:
    return " | ".join(ln for ln in text.strip().splitlines()[-n:])


def screenshot(page: Path, png: Path, size: tuple[int, int] = (1280, 1600), timeout: float = TIMEOUT_S) -> Path:
    """``png``: the top ``size`` (width, height) of ``page`` as Chromium draws it."""
    png = Path(png).resolve()
    tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp.png")
    try:
        r = _run(page, f"--screenshot={tmp}", f"--window-size={size[0]},{size[1]}", timeout=timeout)
        if r.returncode != 0 or not tmp.is_file() or tmp.read_bytes()[:8] != PNG_MAGIC:
            raise HarnessError(f"{BINARY} wrote no screenshot of {page} (exit {r.returncode}): {_tail(r.stderr)}",
                               f"run it by hand to see why: {' '.join(r.args)}")
        tmp.replace(png)     # a failed run leaves the previous PNG as it was
    finally:
        tmp.unlink(missing_ok=True)
    return png


def dump_dom(page: Path, timeout: float = TIMEOUT_S) -> str:
    """The DOM Chromium built from ``page``, serialised (``--dump-dom``)."""
    r = _run(page, "--dump-dom", timeout=timeout)
    if r.returncode != 0 or "<html" not in r.stdout:
        raise HarnessError(f"{BINARY} --dump-dom of {page} failed (exit {r.returncode}): {_tail(r.stderr)}",
                           f"run it by hand to see why: {' '.join(r.args)}")
    return r.stdout
