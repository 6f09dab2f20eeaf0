"""Running the kernel's make: the argv and environment (out of tree, ``ARCH=arm64``, the toolchain's variables,
ccache with ``CCACHE_SLOPPINESS=include_file_mtime,include_file_ctime,time_macros``), every byte of its output
to the build log, and live progress on the terminal (a one-line counter, a line every 15 s without a
terminal, or make's own lines with ``-v``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import paths
from ..errors import HarnessError
from .toolchain import CROSS, Toolchain

CCACHE_SLOPPINESS = "include_file_mtime,include_file_ctime,time_macros"
PROGRESS_EVERY_S = 15.0  # not a terminal: one progress line this often


class KernelBuildError(HarnessError):
    """``make`` failed (the message carries the tail of the build log); ``git bisect run`` maps it to 125."""


def make_env(ccache_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ARCH="arm64", CCACHE_SLOPPINESS=CCACHE_SLOPPINESS,
               CCACHE_DIR=str(ccache_dir or (paths.cache_dir() / "ccache")), CCACHE_MAXSIZE="5G",
               KBUILD_BUILD_USER="smccc-harness", KBUILD_BUILD_HOST="kbuild", LC_ALL="C")
    for k in ("KCONFIG_ALLCONFIG", "KBUILD_OUTPUT", "LLVM", "CROSS_COMPILE", "CC"):   # argv says what we use
        env.pop(k, None)
    return env


def make_argv(src: Path, out: Path, target: str, jobs: int, ccache: bool = True,
              toolchain: Toolchain | None = None) -> list[str]:
    tc = toolchain or Toolchain("", CROSS, CROSS + "gcc", "", "default")
    return ["make", "-C", str(src), f"O={out}", "ARCH=arm64", *tc.make_vars(ccache), f"-j{jobs}", target]


# ---- running make with progress ---------------------------------------------------------------------------
_STEP = re.compile(r"^\s{2}([A-Z][A-Z0-9_]{1,9})\s+(?:\[M\]\s+)?(\S+)")


class Progress:
    """make's output -> the build log (every byte) and the terminal: make's lines (``verbose``), a one-line
    counter redrawn in place (a terminal), or one line every PROGRESS_EVERY_S seconds (CI logs)."""

    def __init__(self, say, *, verbose: bool = False, tty: bool | None = None, stream=None, clock=time.monotonic):
        self.say, self.verbose, self.clock = say, verbose, clock
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.files = 0
        self.current = ""
        self.t0 = clock()
        self.last = self.t0
        self.drawn = False

    def line(self, text: str) -> None:
        m = _STEP.match(text)
        if m:
            self.files += 1
            self.current = f"{m.group(1)} {m.group(2)}"
        if self.verbose:
            self.stream.write(text + "\n")
            self.stream.flush()
            return
        now = self.clock()
        if self.tty:
            if m and now - self.last >= 0.1:
                self.last = now
                width = shutil.get_terminal_size((100, 20)).columns - 1
                self.stream.write("\r\x1b[K" + self.status(now)[:width])
                self.stream.flush()
                self.drawn = True
        elif now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.say(self.status(now))

    def status(self, now: float | None = None) -> str:
        dt = (self.clock() if now is None else now) - self.t0
        return f"[{int(dt // 60)}m{int(dt % 60):02d}s] {self.files} built, now {self.current or '...'}"

    def done(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


def run_make(argv: list[str], env: dict, log: Path, what: str, progress, verbose: bool = False) -> int:
    progress("$ " + shlex.join(argv))
    shown = Progress(progress, verbose=verbose)
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(argv)}\n".encode())
        f.flush()
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            for raw in p.stdout:
                f.write(raw)
                shown.line(raw.decode(errors="replace").rstrip("\n"))
            rc = p.wait()
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            shown.done()
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise KernelBuildError(f"kernel {what} failed (make exit {rc}); last lines of {log}:\n{tail}",
                               hint="fix the tree, or (in git bisect run) this commit is skipped with 125")
    return shown.files
