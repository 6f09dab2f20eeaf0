"""One QEMU process: :class:`Machine` runs a :class:`~harness.machine.config.MachineConfig` under a pty
(pexpect), the serial console on QEMU's stdio, and owns the process group: ``stop()`` always kills and reaps
it, and QEMU gets ``PR_SET_PDEATHSIG=SIGKILL`` so it dies with the host process even if the harness is killed
with SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import time
from pathlib import Path
from typing import Self

import pexpect

from ..errors import BootError, SetupError
from .config import MachineConfig
from .console import Console

log = logging.getLogger(__name__)
STARTUP_CHECK_S = 1.0         # QEMU exiting this early is a command-line / host problem: BootError


# ---- the process -----------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1
_libc = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _pdeathsig_preexec(parent: int, libc: ctypes.CDLL | None):
    """preexec_fn for the child: SIGKILL when the parent dies (and die now if it already has)."""
    def preexec() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(127)
    return preexec


def _gone(pid: int) -> bool:
    """True if ``pid`` (our child) has exited; does not reap it (WNOWAIT), so its pgid stays reserved."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class Machine:
    """A running QEMU for ``config``, its artifacts in ``run_dir`` (console.log, qemu-cmd.sh).

    Use as a context manager, or call :meth:`start` / :meth:`stop`.  After :meth:`start`: ``pid``,
    ``console`` (a :class:`harness.machine.console.Console`), :meth:`alive`, :meth:`qmp`.
    """

    TERM_GRACE_S = 2.0   # SIGTERM -> SIGKILL
    KILL_WAIT_S = 5.0

    def __init__(self, config: MachineConfig, run_dir: Path) -> None:
        if not isinstance(config, MachineConfig):
            raise TypeError(f"config must be a MachineConfig, got {type(config).__name__}")
        self.config = config
        self.run_dir = Path(run_dir)
        self.console: Console | None = None
        self._child: pexpect.spawn | None = None
        self._qmp = None
        self._stopped = False
        self.exit_status: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def log_path(self) -> Path:
        return self.run_dir / "console.log"

    def alive(self) -> bool:
        if self._child is None or self._stopped:
            return False
        try:
            return bool(self._child.isalive())
        except (OSError, pexpect.ExceptionPexpect):
            return False

    def start(self, startup_check_s: float = STARTUP_CHECK_S) -> Self:
        """Spawn QEMU; raise ``BootError`` (with QEMU's output) if it exits within ``startup_check_s``.

        Returns early, before ``startup_check_s``, once the guest has printed something on the console.
        """
        if self._child is not None:
            raise RuntimeError("Machine.start() called twice")
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for sock in (cfg.control_socket, cfg.qmp_socket):
            if sock is not None and sock.is_socket():
                sock.unlink()     # stale, from an earlier run in the same directory
        argv = cfg.argv()
        script = self.run_dir / "qemu-cmd.sh"
        script.write_text("#!/bin/sh\n# The QEMU command line of this run; the serial console is on stdio.\n"
                          f"exec {cfg.shell_command()} \"$@\"\n")
        script.chmod(0o755)
        t0 = time.monotonic()
        try:
            child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace", timeout=None,
                                  maxread=65536, echo=False, use_poll=True,
                                  preexec_fn=_pdeathsig_preexec(os.getpid(), _load_libc()))
        except pexpect.ExceptionPexpect as e:
            raise SetupError(f"cannot run {argv[0]}: {e}",
                             hint="install QEMU (smccc-harness setup) or pass --qemu-bin") from None
        self._child = child
        self.console = Console(child, self.log_path, name="QEMU", started=t0)
        self._startup_check(startup_check_s)
        return self

    def _startup_check(self, startup_check_s: float) -> None:
        assert self.console is not None and self._child is not None
        stop = time.monotonic() + startup_check_s
        while time.monotonic() < stop:
            self.console.drain(timeout=0.05, max_s=0.0)
            if self.console.eof or not self.alive():
                self.console.drain(timeout=0.2, max_s=1.0)    # whatever QEMU printed before it died
                output = self.console.text.strip()
                status = self._reap()
                self.stop()
                st = "unknown status" if status is None else (
                    f"signal {-status}" if status < 0 else f"status {status}")
                raise BootError(f"QEMU exited with {st} right after starting: "
                                f"{output[-2000:] or '(no output)'}",
                                hint=f"the command line is in {self.run_dir / 'qemu-cmd.sh'}")
            if self._guest_talking():
                return    # QEMU got past its command line and machine setup

    def _guest_talking(self) -> bool:
        """A complete console line that is not one of QEMU's own messages ("qemu-system-aarch64: ...")."""
        assert self.console is not None
        prefix = os.path.basename(self.config.qemu_bin) + ":"
        lines = self.console.text.split("\n")[:-1]
        return any(ln.strip() and not ln.startswith(prefix) for ln in lines)

    def wait_status(self) -> int | None:
        """QEMU's exit status once it has exited (negative: the signal), None while it runs."""
        return self._reap()

    def _reap(self) -> int | None:
        """Reap QEMU if it has exited; its exit status (negative = signal), else None."""
        child = self._child
        if child is None:
            return self.exit_status
        with contextlib.suppress(OSError, pexpect.ExceptionPexpect):
            if not child.isalive():
                self.exit_status = -child.signalstatus if child.signalstatus is not None else child.exitstatus
        return self.exit_status

    def stop(self) -> int | None:
        """Kill QEMU's whole process group (SIGTERM, then SIGKILL), reap it, close the pty, remove sockets.

        Idempotent, never raises.  Returns QEMU's exit status (negative = signal), if known.
        """
        if self._stopped:
            return self.exit_status
        self._stopped = True
        child = self._child
        try:
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    self._qmp.close()
                self._qmp = None
            if child is not None:
                self._kill_group(child.pid)
                if self.console is not None:
                    with contextlib.suppress(Exception):
                        self.console.drain(timeout=0.0, max_s=1.0)
                self._reap()
                with contextlib.suppress(Exception):
                    child.close(force=True)
                if self.exit_status is None and child.signalstatus is not None:
                    self.exit_status = -child.signalstatus
                elif self.exit_status is None:
                    self.exit_status = child.exitstatus
        except Exception:   # stop() runs in finally/__exit__ paths and must not mask errors
            log.warning("error while stopping QEMU (pid %s)", child.pid if child else None, exc_info=True)
        finally:
            if self.console is not None:
                with contextlib.suppress(Exception):
                    self.console.close()
            for sock in (self.config.control_socket, self.config.qmp_socket):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        if sock.is_socket():
                            sock.unlink()
        return self.exit_status

    def _kill_group(self, pid: int) -> None:
        """SIGTERM the process group, wait, SIGKILL it; QEMU's pgid is its pid (pexpect's pty: setsid)."""
        if self._child is not None and self._child.terminated:
            return     # already reaped: its pgid may be someone else's by now
        for sig, wait_s in ((signal.SIGTERM, self.TERM_GRACE_S), (signal.SIGKILL, self.KILL_WAIT_S)):
            if _gone(pid):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            stop = time.monotonic() + wait_s
            while time.monotonic() < stop and not _gone(pid):
                time.sleep(0.01)
        # The leader is a zombie (not reaped), so the pgid is still ours: kill any stragglers in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        if self._child is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- QMP ------------------------------------------------------------------------------------------
    def qmp(self, timeout_s: float = 10.0):
        """A connected, negotiated ``qemu.qmp.legacy.QEMUMonitorProtocol`` (sync) on ``qmp_socket``.

        Command timeout ``timeout_s``; e.g. ``m.qmp().cmd("query-status")``.  Closed by :meth:`stop`.
        """
        if self.config.qmp_socket is None:
            raise SetupError("this machine has no QMP socket (MachineConfig.qmp_socket)")
        if self._qmp is not None:
            return self._qmp
        from qemu.qmp.legacy import QEMUMonitorProtocol

        sock = self.config.qmp_socket
        stop = time.monotonic() + timeout_s
        while not sock.is_socket():
            if not self.alive():
                raise BootError("QEMU exited before its QMP socket appeared",
                                hint=f"console log: {self.log_path}")
            if time.monotonic() > stop:
                raise BootError(f"QMP socket {sock} did not appear within {timeout_s:g} s")
            time.sleep(0.02)
        q = QEMUMonitorProtocol(str(sock))
        try:
            q.connect(negotiate=True)
        except Exception as e:
            q.close()
            raise BootError(f"cannot connect to QMP at {sock}: {e}") from e
        q.settimeout(timeout_s)
        self._qmp = q
        return q
