"""A QEMU that outlives this process (``pytest --reuse-vm``, harness/machine/reuse.py): :class:`DetachedMachine`
runs in its own session (no PDEATHSIG, stdin /dev/null, output to ``qemu.out``), its serial console on a unix
socket (``MachineConfig.console_socket``) that QEMU itself logs to ``console.log``; a later process attaches
to it by pid.  ``detach()`` lets go of it, ``stop()`` kills it.  Also the /proc helpers that identify a pid
(start time, argv) so a reused pid is never taken for our QEMU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Self

from pexpect.fdpexpect import fdspawn

from ..errors import BootError, SetupError
from .config import MachineConfig
from .console import Console
from .process import STARTUP_CHECK_S, Machine

log = logging.getLogger(__name__)


# ---- a QEMU that outlives this process (--reuse-vm) ------------------------------------------------
def proc_identity(pid: int) -> tuple[int, str] | None:
    """``(start time in clock ticks since boot, state letter)`` of ``pid`` from /proc/PID/stat, or None if
    there is no such process.  The start time tells a pid that was reused by another process apart."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    try:
        return int(rest[19]), rest[0]       # fields 22 (starttime) and 3 (state) of proc_pid_stat(5)
    except (IndexError, ValueError):
        return None


def proc_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]] if raw else []


class _SocketChild(fdspawn):
    """The console socket as a pexpect child for :class:`harness.machine.console.Console`; "alive" is the QEMU's.

    A thread pumps the socket into a pipe that the Console reads (buffering in memory while the pipe is full):
    QEMU's PL011 writes the console byte by byte, every byte is an skb on the unix socket, and the socket's
    send buffer fills after a few hundred bytes: a host that is attached but busy on the control channel would
    stall the guest's console output, and the guest with it (seen: the agent's hello after a reload).
    """

    MAX_PENDING = 64 << 20

    def __init__(self, sock: socket.socket, machine: DetachedMachine) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        super().__init__(r, encoding="utf-8", codec_errors="replace", timeout=None, maxread=65536, use_poll=True)
        self._sock, self._pipe_w, self._machine = sock, w, machine
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._pump, name="console-pump", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        pending = bytearray()
        sock, w = self._sock, self._pipe_w
        eof = False
        try:
            while True:
                rd = [self._stop_r] + ([] if eof else [sock])
                r, wr, _ = select.select(rd, [w] if pending else [], [])
                if self._stop_r in r:
                    return
                if sock in r:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        eof = True
                    elif len(pending) < self.MAX_PENDING:
                        pending += data
                if w in wr or (pending and not wr):
                    with contextlib.suppress(BlockingIOError):
                        del pending[:os.write(w, pending)]
                if eof and not pending:
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                os.close(w)

    def isalive(self) -> bool:
        return self._machine.alive()

    def send(self, s) -> int:
        data = s.encode() if isinstance(s, str) else bytes(s)
        self._sock.sendall(data)
        return len(data)

    def close(self, force: bool = True) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(2.0)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(Exception):
            super().close()


# Detached QEMUs this process started: kept referenced (a Popen that is garbage-collected while its process
# runs warns "subprocess N is still running") and polled now and then, so that one that exited while this
# process lives is reaped instead of staying a zombie.
_DETACHED_CHILDREN: list[subprocess.Popen] = []


def reap_detached_children() -> None:
    _DETACHED_CHILDREN[:] = [p for p in _DETACHED_CHILDREN if p.poll() is None]


class DetachedMachine(Machine):
    """A QEMU in its own session that this process may not outlive (``pytest --reuse-vm``, harness/machine/reuse.py).

    :meth:`start` spawns it: ``start_new_session``, no PDEATHSIG, stdin /dev/null, stdout+stderr appended to
    ``<run_dir>/qemu.out``, the serial console on ``config.console_socket`` (QEMU logs it to
    ``config.console_logfile`` itself, attached or not).  Built with ``pid``/``pid_start`` (from a state file),
    :meth:`attach` connects the console of a QEMU that an earlier process started.  ``console`` is a
    :class:`harness.machine.console.Console` over the socket; output printed while nobody was attached is only in the
    log.  :meth:`detach` closes the console and QMP and leaves QEMU running; :meth:`stop` kills its process
    group (after checking that ``pid`` is still that QEMU) and removes its sockets.  ``on_release``: callables
    run once by whichever of the two comes first.
    """

    CONSOLE_CONNECT_S = 5.0

    def __init__(self, config: MachineConfig, run_dir: Path, *, pid: int | None = None,
                 pid_start: int | None = None) -> None:
        super().__init__(config, run_dir)
        if config.console_socket is None:
            raise SetupError("a detached machine needs MachineConfig.console_socket (its serial console)")
        self._proc: subprocess.Popen | None = None
        self._pid, self.pid_start = pid, pid_start
        self.detached = False
        self.on_release: list = []

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def log_path(self) -> Path:
        return self.config.console_logfile or self.run_dir / "console.log"

    @property
    def out_path(self) -> Path:
        return self.run_dir / "qemu.out"

    def alive(self) -> bool:
        if self._pid is None or self._stopped:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return not detached_gone(self._pid, self.pid_start)

    def start(self, startup_check_s: float = STARTUP_CHECK_S) -> Self:
        if self._pid is not None:
            raise RuntimeError("DetachedMachine.start() on a machine that already has a QEMU")
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for sock in (cfg.control_socket, cfg.qmp_socket, cfg.console_socket):
            if sock is not None and sock.is_socket():
                sock.unlink()
        argv = cfg.argv()
        script = self.run_dir / "qemu-cmd.sh"
        script.write_text("#!/bin/sh\n# The QEMU command line of the reusable VM (harness/machine/reuse.py): detached, the\n"
                          f"# serial console on {cfg.console_socket} (logged by QEMU to {self.log_path}).\n"
                          f"exec {cfg.shell_command()} \"$@\"\n")
        script.chmod(0o755)
        t0 = time.monotonic()
        with open(self.out_path, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} QEMU started by pid {os.getpid()}\n".encode())
            out.flush()
            try:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True, close_fds=True)
            except OSError as e:
                raise SetupError(f"cannot run {argv[0]}: {e}",
                                 hint="install QEMU (smccc-harness setup) or pass --qemu-bin") from None
        reap_detached_children()
        _DETACHED_CHILDREN.append(self._proc)
        self._pid = self._proc.pid
        ident = proc_identity(self._pid)
        self.pid_start = ident[0] if ident else None
        try:
            self._connect_console(self.CONSOLE_CONNECT_S, started=t0)
        except BootError:
            self.stop()
            raise
        self._startup_check(startup_check_s)
        return self

    def attach(self) -> Self:
        """Connect the console of the QEMU ``pid`` (started by an earlier process)."""
        if not self.alive():
            raise BootError(f"QEMU pid {self._pid} is not running any more", hint=f"console log: {self.log_path}")
        self._connect_console(self.CONSOLE_CONNECT_S)
        return self

    def _connect_console(self, deadline_s: float, started: float | None = None) -> None:
        path = str(self.config.console_socket)
        stop = time.monotonic() + deadline_s
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError as e:
                s.close()
                if not self.alive() or time.monotonic() > stop:
                    self._reap()
                    out = ""
                    with contextlib.suppress(OSError):
                        out = self.out_path.read_text(errors="replace")[-2000:].strip()
                    what = "exited" if not self.alive() else f"did not open it within {deadline_s:g} s"
                    raise BootError(f"no console socket {path}: QEMU {what} ({e}); QEMU said: {out or '(nothing)'}",
                                    hint=f"the command line is in {self.run_dir / 'qemu-cmd.sh'}") from None
                time.sleep(0.01)
        self._child = _SocketChild(s, self)
        self.console = Console(self._child, None, name="QEMU", started=started)

    def wait_status(self) -> int | None:
        """QEMU's exit status once it has exited (negative: the signal), None while it runs."""
        return self._reap()

    def _reap(self) -> int | None:
        if self._proc is not None and self.exit_status is None:
            rc = self._proc.poll()
            if rc is not None:
                self.exit_status = rc       # negative = signal, as Machine reports it
        return self.exit_status

    def _release(self) -> None:
        hooks, self.on_release = self.on_release, []
        for fn in hooks:
            try:
                fn(self)
            except Exception:   # release runs in close paths and must not mask errors
                log.warning("release hook failed", exc_info=True)

    def _close_host_ends(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self.console is not None:
            with contextlib.suppress(Exception):
                self.console.close()
        if self._child is not None:
            with contextlib.suppress(Exception):
                self._child.close()

    def detach(self) -> None:
        """Close the console and QMP connections; QEMU keeps running for the next process."""
        if self._stopped or self.detached:
            return
        self.detached = True
        self._close_host_ends()
        self._release()

    def stop(self) -> int | None:
        """Kill the QEMU (its process group), remove its sockets.  Idempotent, never raises."""
        if self._stopped:
            return self.exit_status
        was_ours = self.alive() or (self._proc is not None)
        self._stopped = True
        try:
            if self._pid is not None and was_ours:
                self._kill_group(self._pid)
                self._reap()
        except Exception:   # stop() runs in finally/close paths and must not mask errors
            log.warning("error while stopping QEMU (pid %s)", self._pid, exc_info=True)
        finally:
            self._close_host_ends()
            for sock in (self.config.control_socket, self.config.qmp_socket, self.config.console_socket):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        if sock.is_socket():
                            sock.unlink()
            self._release()
        return self.exit_status

    def _gone(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is not None
        return detached_gone(self._pid, self.pid_start)

    def _kill_group(self, pid: int) -> None:
        kill_detached(pid, self.pid_start, gone=self._gone, term_s=self.TERM_GRACE_S, kill_s=self.KILL_WAIT_S)


def detached_gone(pid: int, pid_start: int | None) -> bool:
    """``pid`` exited (or is a zombie, or is now another process than the one that started at ``pid_start``)."""
    ident = proc_identity(pid)
    return ident is None or ident[1] in "ZX" or (pid_start is not None and ident[0] != pid_start)


def kill_detached(pid: int, pid_start: int | None, *, gone=None, term_s: float = 2.0, kill_s: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL, a detached QEMU's process group (its pgid is its pid: start_new_session), never a
    pid that is no longer that process (its start time is checked before each signal).  True once it is gone."""
    gone = gone or (lambda: detached_gone(pid, pid_start))
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, kill_s)):
        if gone():
            return True
        ident = proc_identity(pid)
        if ident is None or (pid_start is not None and ident[0] != pid_start):
            return True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        stop = time.monotonic() + wait_s
        while time.monotonic() < stop and not gone():
            time.sleep(0.01)
    return gone()
