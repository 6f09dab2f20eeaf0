"""A booted guest, ready for scenarios: QEMU machine + serial console + control channel.

``GuestSession`` is what the pytest plugin and the CLI hold.  It boots once, then serves many scenarios;
everything it produces (console.log, qemu-cmd.sh, scenario traces) lands in its run directory, which is kept.
A guest is thrown away, not torn down: ``close()`` kills QEMU (nested VMs inside it are never destroyed,
docs/platform.md).  A reusable VM (``detached``, ``keep_vm``: ``pytest --reuse-vm``, harness/machine/reuse.py) is only
detached by ``close()`` while it is healthy, and killed like any other guest once it is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import protocol as P
from ..errors import BootError, GuestError
from ..model.results import ScenarioResult
from ..model.scenarios import watchdog_from_env
from ..model.splats import scan_failures
from .channel import Channel, ChannelError
from .config import GDB_CMDLINE, SOCK_PREFIX, MachineConfig, default_cmdline, sock_dir
from .console import ConsoleFailure, silent_kernel
from .detached import DetachedMachine
from .process import Machine

READY_RE = re.compile(re.escape(P.READY_BANNER) + r" (\{.*\})")


def _file_name(name: str) -> str:
    """A scenario name as a file name inside the run directory: no '/', no '..', nothing but [\\w.-]."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80].lstrip(".")
    return safe or "scenario"


@dataclass
class GuestSession:
    config: MachineConfig
    run_dir: Path
    boot_deadline_s: float = 120.0
    machine: Machine | None = None
    channel: Channel | None = None
    caps: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    scenario_count: int = 0
    broken: str | None = None       # why this guest can no longer serve requests (the pool boots a new one)
    snapshots: bool = False         # start() restores a cached snapshot (harness.machine.snapshot); cold boot as fallback
    ssh_keys: object = None         # harness.machine.ssh.SshKeys when booted with ssh=True (opt-in, docs/ssh.md)
    ssh: object = None              # harness.machine.ssh.SshChannel, connected by boot() when ssh_keys is set
    detached: Path | None = None    # boot() starts a DetachedMachine there (the reusable VM's dir, harness/machine/reuse.py)
    keep_vm: bool = False           # close() detaches from a healthy detached VM instead of killing it
    reuse: dict | None = None       # how the reusable VM was got: started / attached / replaced (harness/machine/reuse.py)

    @classmethod
    def create(cls, kernel: Path, initrd: Path, run_dir: Path, *, accel: str = "tcg", smp: int = 1,
               memory_mb: int = 1024, append: str = "", boot_deadline_s: float = 120.0,
               qemu_bin: str = "qemu-system-aarch64", incoming: str | None = None,
               snapshots: bool = False, ssh: bool = False, gdb_port: int | None = None,
               gdb_wait: bool = False) -> GuestSession:
        keys = port = None
        if gdb_port is not None:   # --gdb (docs/debug-kernels.md): a cold boot (no snapshot), KASLR off
            append, snapshots = f"{append} {GDB_CMDLINE}".strip(), False
        if ssh:     # opt-in (docs/ssh.md): a per-run initrd with dropbear + keys, a NIC, a cold boot
            from ..images import sshimage
            from . import ssh as sshmod
            keys = sshmod.SshKeys.generate()
            keys.save(run_dir)
            initrd = sshimage.build_ssh_initrd(Path(initrd), Path(kernel), Path(run_dir) / "initrd-ssh.cpio",
                                               keys.authorized_keys(), keys.host_private)
            append = f"{append} {sshimage.SSH_CMDLINE}".strip()
            port, snapshots = sshmod.free_port(), False
        sockets = sock_dir(run_dir)
        cfg = MachineConfig(kernel=Path(kernel), initrd=Path(initrd), cmdline=default_cmdline(append),
                            accel=accel, smp=smp, memory_mb=memory_mb, qemu_bin=qemu_bin,
                            control_socket=sockets / "ctl.sock", qmp_socket=sockets / "qmp.sock",
                            incoming=incoming, ssh_port=port, gdb_port=gdb_port, gdb_wait=gdb_wait)
        return cls(config=cfg, run_dir=run_dir, boot_deadline_s=boot_deadline_s, snapshots=snapshots,
                   ssh_keys=keys)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self, store=None) -> GuestSession:
        """Warm start from a snapshot (``snapshots``; ``store``: a SnapshotStore, default the cache's):
        harness/machine/snapshot.py decides, this session adopts what it started or boots itself; else
        :meth:`boot`."""
        try:
            if not self.snapshots:
                return self.boot()
            from .snapshot import warm_start
            w = warm_start(self, store)
            if w.started is not None:
                self.machine, self.channel, self.caps = w.started.machine, w.started.channel, w.started.caps
            elif w.cold_boot:          # the restore failed: throw away what it left and boot cold
                self.close()
                self.machine, self.channel = None, None
                self.config = dataclasses.replace(self.config, incoming=None)
                self.boot()
            self.timings.update(w.timings)
            return self
        except ConsoleFailure as e:
            raise silent_kernel(e, self.config.kernel) or e from e

    def keep_running(self, reuse: dict) -> GuestSession:
        """Make this the session of a reusable VM (harness/machine/reuse.py): :meth:`close` detaches from it while
        it is healthy; ``reuse`` records how it was got (started / attached / replaced)."""
        self.keep_vm, self.reuse = True, reuse
        return self

    def reload_agent(self, deadline_s: float = 60.0) -> dict:
        """Ask the agent to re-exec itself (the ``reload`` op: same pid under /init, the code now on disk) and
        wait for its new hello on the same control channel; returns the new capabilities."""
        self.request("reload", {}, 10.0)
        hello = self.channel.wait_hello(deadline_s)
        self.caps = hello.get("caps", self.caps)
        return self.caps

    def boot(self) -> GuestSession:
        """Cold boot: QEMU start -> the agent's ready banner -> the control channel's hello."""
        t0 = time.monotonic()
        self.machine = self._new_machine()
        try:
            for attempt in range(3 if self.config.ssh_port else 1):
                try:
                    self.machine.start()
                    break
                except BootError as e:   # another process took the free port first: pick another one
                    if "host forwarding rule" not in str(e) or attempt == 2:
                        raise
                    from .ssh import free_port
                    self.config = dataclasses.replace(self.config, ssh_port=free_port())
                    self.machine = self._new_machine()
            m = self.machine.console.expect_ready(READY_RE, self.boot_deadline_s)
            self.timings["boot_s"] = round(time.monotonic() - t0, 3)
            self.caps = json.loads(m.group(1))
            self.channel = Channel(self.config.control_socket)
            self.channel.connect(10.0)
            hello = self.channel.wait_hello(15.0)
            self.caps = hello.get("caps", self.caps)
            self.timings["ready_s"] = round(time.monotonic() - t0, 3)
            if self.ssh_keys is not None:
                from ..images.sshimage import FAILED_LINE
                from .ssh import SshChannel

                def up() -> bool:   # QEMU alive and the guest's setup script did not give up
                    self.machine.console.drain(timeout=0.0, max_s=0.05)
                    return self.machine.alive() and FAILED_LINE not in self.machine.console.text
                try:
                    self.ssh = SshChannel(self.config.ssh_port, self.ssh_keys).connect(
                        max(30.0, self.boot_deadline_s - (time.monotonic() - t0)), alive=up)
                except GuestError as e:
                    lines = [ln for ln in self.machine.console.text.splitlines() if "smccc-ssh" in ln]
                    raise GuestError(f"{e}\nguest SSH setup said: {' | '.join(lines) or '(nothing)'}\n"
                                     f"console log: {self.console_log}") from e
                self.timings["ssh_s"] = round(time.monotonic() - t0, 3)
        except BaseException:
            self.close()
            raise
        return self

    def _new_machine(self) -> Machine:
        if self.detached is not None:
            return DetachedMachine(self.config, self.detached)
        return Machine(self.config, self.run_dir)

    def __enter__(self) -> GuestSession:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def alive(self) -> bool:
        return self.machine is not None and self.machine.alive() and self.broken is None

    def unusable(self) -> str | None:
        """Why this guest must not be handed to anyone else (None: healthy): broken, QEMU gone, or the kernel
        printed an Oops/WARNING/BUG/panic/lockdep (or the agent died) since this process got the guest."""
        if self.broken is not None:
            return f"broken: {self.broken}"
        if self.machine is None or not self.machine.alive():
            return "QEMU is not running"
        if self.machine.console is not None:
            with contextlib.suppress(Exception):
                found = scan_failures(self.machine.console.since(0))
                if found:
                    return f"the guest kernel printed {found[0].name!r}: {found[0].line.strip()}"
        return None

    def close_links(self) -> None:
        """Close the SSH and control-channel connections (the machine itself is left as it is)."""
        if self.ssh is not None:
            self.ssh.close()
            self.ssh = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def close(self) -> None:
        self.close_links()
        if self.machine is not None and self.keep_vm and isinstance(self.machine, DetachedMachine):
            why = self.unusable()
            if why is None:
                self.machine.detach()       # the reusable VM lives on for the next run
                return
            if self.reuse is not None:
                self.reuse["killed"] = why
            self.machine.stop()
            return
        if self.machine is not None:
            self.machine.stop()
        sockets = self.config.control_socket.parent if self.config.control_socket else None
        if sockets is not None and sockets != self.run_dir and sockets.name.startswith(SOCK_PREFIX):
            shutil.rmtree(sockets, ignore_errors=True)

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    # ---- requests -----------------------------------------------------------------------------------
    def request(self, op: str, args: dict | None = None, deadline_s: float = 30.0) -> dict:
        if self.channel is None:
            raise GuestError("the guest is not running", hint="start the session first")
        mark = self.machine.console.mark()
        try:
            return self.channel.request(op, args, deadline_s)
        except ChannelError as e:
            if e.kind != "remote":      # timeout / EOF: the agent is stuck or gone; never reuse this guest
                self.broken = str(e)
            raise self._explain(e, mark, op) from e

    def reconnect(self, deadline_s: float = 10.0) -> dict:
        """After the host end of the control channel dropped: connect again to the same QEMU and ping.

        Answers to requests sent over the old connection are skipped (request ids are unique per process).
        Raises GuestError if QEMU is gone or the agent does not answer; on success the guest is usable again.
        """
        if self.machine is None or not self.machine.alive():
            raise GuestError("cannot reconnect: QEMU is not running", hint=f"console log: {self.console_log}")
        if self.channel is not None:
            self.channel.close()
        self.channel = Channel(self.config.control_socket)
        self.channel.connect(deadline_s)
        self.broken = None
        return self.request("ping", {}, deadline_s)

    def _explain(self, err: ChannelError, mark: int, op: str = "?") -> GuestError:
        """Turn a broken channel into a failure that names the cause (panic, QEMU gone, timeout)."""
        if err.kind == "eof":       # the socket closes a moment before QEMU is reapable: let it finish dying
            stop = time.monotonic() + 1.0
            while self.machine.alive() and time.monotonic() < stop:
                time.sleep(0.02)
        text = self.machine.console.since(mark)
        findings = scan_failures(text)
        where = f"console log: {self.console_log}"
        agent_exit = re.search(r"SMCCC-AGENT EXITED rc=(-?\d+)", text)
        if agent_exit:
            rc = int(agent_exit.group(1))
            how = f"killed by signal {rc - 128}" if rc > 128 else f"exit status {rc}"
            return GuestError(f"the guest agent died ({how}) while serving the {op!r} request ({err}); /init "
                              f"powered the guest off\n{where}")
        if findings:
            f = findings[0]
            e = GuestError(f"guest kernel failure while running {err}: {f.name}\n{f.excerpt}\n{where}")
            e.finding = f       # a kernel crash, not infrastructure: harness/plugin/scanning.py _error_kind, bisect "crash"
            return e
        if not self.machine.alive():
            st = self.machine.wait_status()
            how = "" if st is None else (f" (killed by signal {-st})" if st < 0 else f" (exit status {st})")
            return GuestError(f"QEMU exited{how} while the agent was busy with the {op!r} request ({err})\n{where}")
        if err.kind == "timeout":
            return GuestError(f"the guest agent did not answer the {op!r} request before the deadline: it is stuck "
                              f"(the guest is thrown away)\nlast console lines:\n"
                              + "\n".join(text.splitlines()[-20:]) + f"\n{where}")
        if err.kind == "remote":
            return GuestError(f"{err}\n--- agent traceback ---\n{err.remote_traceback}")
        return GuestError(f"{err}\nlast console lines:\n" + "\n".join(text.splitlines()[-20:]) + f"\n{where}")

    def run(self, scenario: dict, payload=None, deadline_s: float | None = None) -> ScenarioResult:
        """Run one scenario in the guest; the trace is saved as ``<run_dir>/traces/NNN-<name>.jsonl``."""
        spec = watchdog_from_env(P.validate_scenario(scenario))
        mark = self.machine.console.mark()
        try:
            raw = self.request("run", spec, deadline_s or spec["deadline_s"] + 30.0)
        except GuestError as e:     # keep a trace file that names the failure (the guest's own trace is lost)
            e.trace_path = self.save_trace(spec["name"], {"name": spec["name"], "outcome": "harness_error",
                                                          "error": str(e), "console_log": str(self.console_log)})
            raise
        path = self.save_trace(spec["name"], raw, leave_out=("result_block",))
        return ScenarioResult(raw=raw, payload=payload, console=self.machine.console.since(mark), trace_path=path)

    def save_trace(self, name: str, raw: dict, leave_out: tuple[str, ...] = ()) -> Path:
        """Write ``<run_dir>/traces/NNN-<name>.jsonl``: one line per event, then a ``summary`` line with the rest
        of ``raw`` (minus ``leave_out``); numbered in the order the scenarios ran."""
        self.scenario_count += 1
        tdir = self.run_dir / "traces"
        tdir.mkdir(exist_ok=True)
        path = tdir / f"{self.scenario_count:03d}-{_file_name(name)}.jsonl"
        with open(path, "w") as f:
            f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in raw.get("events", []))
            summary = {k: v for k, v in raw.items() if k != "events" and k not in leave_out}
            f.write(json.dumps({"kind": "summary", **summary}, sort_keys=True) + "\n")
        return path
