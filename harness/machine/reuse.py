"""The reusable VM (``pytest --reuse-vm``, ``smccc-harness vm start|status|stop``; docs/reuse-vm.md).

A guest that outlives one pytest run, for the kernel developer's edit-test loop: the first run boots it
detached (harness.machine.detached.DetachedMachine: its own session, no PDEATHSIG, console on a unix socket that QEMU
logs itself), later runs attach to it in a fraction of a second, push the guest code that changed since it
booted (the agent's ``put`` into /opt/smccc/harness, then ``reload``) and run their tests.

Everything about one VM lives in ``<results root>/reuse-vm-<name>/`` (name: ``default``, or the pytest-xdist
worker id): ``state.json`` (written atomically: pid + its start time, argv, sockets, what it was booted
with, the agent's caps), ``console.log`` (QEMU's own log of the serial console, kept after a stop),
``qemu.out``, ``qemu-cmd.sh``, ``lock`` (held by the process attached to it), ``ssh/`` (keys, with --ssh).
The sockets sit there too unless that path is too long for a unix socket; then in a private 0700
``$TMPDIR/smccc-vm-<uid>-<hash>/``.

The VM is replaced (killed, then a new one started; the reason said in one line) when its QEMU is gone or
is not that QEMU any more (pid reuse: start time and cmdline are checked), when what this run asks for
differs (kernel sha256, rootfs packages, /init, kernel command line, accel, smp, memory, QEMU binary and
version, SSH), when the agent does not answer, and when changed guest code cannot be loaded because the agent
keeps nested VMs alive (a reload would destroy them; that is never done).  A session that broke (agent
timeout, QEMU died, a kernel splat) kills it on close (harness.machine.session.GuestSession.close).  A VM nobody uses
powers itself off after ``idle_s`` (the agent, ``smccc.idle=`` on the kernel command line; default 30 min).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import shutil
import time
from pathlib import Path

from .. import protocol as P
from ..errors import HarnessError
from .channel import Channel, ChannelError
from .config import MachineConfig
from .detached import DetachedMachine, kill_detached
from .reuse_state import (
    DEFAULT_IDLE_S,
    DIR_PREFIX,
    LOCK_FILE,
    STATE_FILE,
    ReuseError,
    VmState,
    Wanted,
    idle_default,
    mismatches,
    process_problem,
    quiet,
    read_state,
    socket_dir,
    vm_dir,
    vm_name,
    wanted,
    with_idle,
    write_state,
)

ATTACH_DEADLINE_S = 10.0           # the agent's first answer after attaching (a scenario of a killed run may finish)


class ReuseBusy(ReuseError):
    """Another live process is attached to this reusable VM."""


# ==== locking =======================================================================================
_LOCKS: dict[str, int] = {}


def _lock(vmdir: Path) -> None:
    """Hold ``vmdir/lock`` (flock) while this process uses the VM; ReuseBusy if another process does."""
    key = str(Path(vmdir).absolute())
    if key in _LOCKS:
        return
    Path(vmdir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(vmdir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        raise ReuseBusy(f"the reusable VM in {vmdir} is in use by another process ({holder or 'pid unknown'})",
                        hint="wait for that run, or give this one another --results-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def _unlock(vmdir: Path) -> None:
    fd = _LOCKS.pop(str(Path(vmdir).absolute()), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _released(vmdir: Path, pid: int):
    """on_release hook of the DetachedMachine: a stop removes the state file (if still this VM's) and the
    private socket dir; detach and stop both release the lock."""
    def hook(m: DetachedMachine) -> None:
        try:
            if not m.detached:
                _forget(vmdir, pid)
        finally:
            _unlock(vmdir)
    return hook


def _forget(vmdir: Path, pid: int | None) -> None:
    with contextlib.suppress(ReuseError):
        st = read_state(vmdir)
        if st is not None and (pid is None or st.pid == pid):
            with contextlib.suppress(OSError):
                (Path(vmdir) / STATE_FILE).unlink()
            _remove_sockets(vmdir, st)
    sd = socket_dir(vmdir, create=False)
    if sd != Path(vmdir).absolute() and sd.is_dir():
        shutil.rmtree(sd, ignore_errors=True)


def _remove_sockets(vmdir: Path, st: VmState | None) -> None:
    socks = [Path(vmdir) / n for n in ("ctl.sock", "qmp.sock", "console.sock")]
    if st is not None:
        socks += [Path(st.control_socket), Path(st.qmp_socket), Path(st.console_socket)]
    for s in socks:
        with contextlib.suppress(OSError):
            if s.is_socket():
                s.unlink()


# ==== start / attach / stop =========================================================================
def _link_console(run_dir: Path, log: Path) -> None:
    """``<run_dir>/console.log`` -> the VM's console.log (the per-test slices and traces stay per run)."""
    link = Path(run_dir) / "console.log"
    with contextlib.suppress(OSError):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(log)


def _ssh_files(d: Path, keys, port: int) -> None:
    keys.save(d.parent)                      # ssh/id_ed25519 (0600) + .pub
    (d / "host_key.pub").write_text(keys.host_public + "\n")
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(keys.host_public.split()[:2])}\n")


def _load_ssh_keys(d: Path):
    from .ssh import SshKeys
    return SshKeys(client_private=(d / "id_ed25519").read_bytes(),
                   client_public=(d / "id_ed25519.pub").read_text().strip(), host_private=b"",
                   host_public=(d / "host_key.pub").read_text().strip())


def ssh_command(st: VmState) -> str | None:
    if st.ssh_port is None or st.ssh_dir is None:
        return None
    d = Path(st.ssh_dir)
    return (f"ssh -i {d / 'id_ed25519'} -p {st.ssh_port} -o UserKnownHostsFile={d / 'known_hosts'} "
            "-o IdentitiesOnly=yes root@127.0.0.1")


def kill(vmdir: Path, st: VmState | None = None) -> bool:
    """Kill the VM of ``vmdir`` if its QEMU still runs (pid + start time checked); remove its state and
    sockets; console.log and qemu.out stay.  True if a QEMU was killed."""
    if st is None:
        with contextlib.suppress(ReuseError):
            st = read_state(vmdir)
    killed = False
    if st is not None and process_problem(st) is None:
        killed = kill_detached(st.pid, st.pid_start)
    _forget(vmdir, None)
    _remove_sockets(vmdir, st)
    return killed


def start(want: Wanted, vmdir: Path, run_dir: Path, *, idle_s: float = DEFAULT_IDLE_S,
          boot_deadline_s: float = 120.0, initrd: Path | None = None, progress=quiet):
    """Boot a new reusable VM in ``vmdir`` (killing whatever VM was there) and return its GuestSession."""
    from ..images import initramfs
    from .session import GuestSession
    vmdir = Path(vmdir).absolute()
    _lock(vmdir)
    try:
        kill(vmdir)
        if initrd is None:
            from ..images import assets
            initrd = initramfs.build_initramfs(assets.ensure_rootfs(progress=quiet), progress=progress)
        keys = port = None
        cmdline = want.cmdline
        if want.ssh:
            from ..images import sshimage
            from .ssh import SshKeys, free_port
            keys, port = SshKeys.generate(), free_port()
            (vmdir / "ssh").mkdir(mode=0o700, exist_ok=True)
            initrd = sshimage.build_ssh_initrd(Path(initrd), want.kernel, vmdir / "initrd-ssh.cpio",
                                               keys.authorized_keys(), keys.host_private, progress=progress)
        sd = socket_dir(vmdir)
        cfg = MachineConfig(kernel=want.kernel, initrd=Path(initrd), cmdline=with_idle(cmdline, idle_s),
                            accel=want.accel, smp=want.smp, memory_mb=want.memory_mb, qemu_bin=want.qemu_bin,
                            control_socket=sd / "ctl.sock", qmp_socket=sd / "qmp.sock",
                            console_socket=sd / "console.sock", console_logfile=vmdir / "console.log",
                            ssh_port=port)
        _link_console(run_dir, cfg.console_logfile)
        s = GuestSession(config=cfg, run_dir=Path(run_dir), boot_deadline_s=boot_deadline_s, ssh_keys=keys,
                         detached=vmdir)
        created = time.time()
        s.boot()                 # on failure it kills the QEMU (keep_vm is still False)
    except BaseException:
        _unlock(vmdir)
        raise
    m: DetachedMachine = s.machine
    if keys is not None:
        _ssh_files(vmdir / "ssh", keys, s.config.ssh_port)
    st = VmState(name=vmdir.name[len(DIR_PREFIX):], pid=m.pid, pid_start=m.pid_start, argv=s.config.argv(),
                 qemu_version=want.qemu_version, kernel=str(want.kernel), kernel_sha256=want.kernel_sha256,
                 initrd=str(cfg.initrd), rootfs_key=want.rootfs_key, init_sha256=want.init_sha256,
                 cmdline=want.cmdline, idle_s=float(idle_s), accel=want.accel, smp=want.smp,
                 memory_mb=want.memory_mb, control_socket=str(cfg.control_socket), qmp_socket=str(cfg.qmp_socket),
                 console_socket=str(cfg.console_socket), console_log=str(cfg.console_logfile),
                 ssh_port=s.config.ssh_port, ssh_dir=str(vmdir / "ssh") if keys is not None else None,
                 caps=s.caps, created=created, boot_s=s.timings.get("ready_s", 0.0))
    write_state(vmdir, st)
    m.on_release.append(_released(vmdir, m.pid))
    return s.keep_running({"how": "started", "name": st.name, "vm_dir": str(vmdir), "pid": m.pid,
                           "boot_s": st.boot_s, "uptime_s": 0.0, "pushed": [], "idle_s": float(idle_s)})


def _sync(ch: Channel, deadline_s: float) -> dict:
    """First request on a new connection, with a random id: answers to requests of an earlier process (a
    killed run's scenario that finished meanwhile, a hello) are skipped until its own answer comes."""
    rid = random.getrandbits(62) | (1 << 62)
    ch.sock.sendall(P.encode({"type": "request", "id": rid, "op": "code", "args": {}}))
    stop = time.monotonic() + deadline_s
    while True:
        msg = ch.read_message(stop)
        if msg.get("type") == "response" and msg.get("id") == rid:
            if not msg.get("ok"):
                err = msg.get("error") or {}
                raise ChannelError(f"guest agent failed 'code': {err.get('kind')}: {err.get('message')}",
                                   kind="remote")
            return msg["result"]


def host_code() -> dict[str, Path]:
    """Guest path (absolute) -> host file of the guest code (harness/initramfs.guest_sources)."""
    from ..images.initramfs import guest_sources
    return {"/" + g: p for g, p in guest_sources().items()}


def stale_code(loaded: dict[str, str], host: dict[str, Path] | None = None) -> dict[str, bytes]:
    """Host guest-code files whose sha256 differs from what the agent runs: guest path -> contents."""
    out = {}
    for gpath, hp in sorted((host or host_code()).items()):
        data = hp.read_bytes()
        if loaded.get(gpath) != hashlib.sha256(data).hexdigest():
            out[gpath] = data
    return out


class _Replace(Exception):
    """The attached VM cannot serve this run: replace it (the message says why, in one line)."""


def attach(want: Wanted, vmdir: Path, run_dir: Path, *, idle_s: float = DEFAULT_IDLE_S,
           boot_deadline_s: float = 120.0, push: bool = True, progress=quiet):
    """The GuestSession of the running reusable VM in ``vmdir``, its guest code brought up to date; a new VM
    (started here) if there is none or it cannot serve this run (``session.reuse["replaced"]`` says why)."""
    t0 = time.monotonic()
    vmdir = Path(vmdir).absolute()
    _lock(vmdir)
    try:
        try:
            st = read_state(vmdir)
        except ReuseError as e:
            st, reason = None, str(e)
        else:
            reason = "no reusable VM was running" if st is None else (
                process_problem(st) or "; ".join(mismatches(st, want)) or None)
        s = None
        if reason is None:
            try:
                s = _attach(st, want, vmdir, run_dir, idle_s, push, t0)
            except _Replace as e:
                reason = str(e)
            except HarnessError as e:
                reason = f"attaching failed: {str(e).splitlines()[0]}"
        if s is not None:
            return s
        if st is not None:
            kill(vmdir, st)
        progress(f"reusable VM: starting a new one ({reason})")
        s = start(want, vmdir, run_dir, idle_s=idle_s, boot_deadline_s=boot_deadline_s, progress=progress)
        s.reuse["replaced"] = reason
        return s
    except BaseException:
        _unlock(vmdir)
        raise


def _attach(st: VmState, want: Wanted, vmdir: Path, run_dir: Path, idle_s: float, push: bool, t0: float):
    from .session import GuestSession
    try:
        cfg = st.config()
    except HarnessError as e:
        raise _Replace(f"its configuration is no longer valid: {str(e).splitlines()[0]}") from None
    if cfg.argv() != st.argv:
        raise _Replace("the state file does not match its own command line")
    m = DetachedMachine(cfg, vmdir, pid=st.pid, pid_start=st.pid_start)
    ch, ssh_keys, ssh_chan, caps = None, None, None, dict(st.caps)
    try:                    # everything over the channel first; the session is made once, whole, at the end
        _link_console(run_dir, Path(st.console_log))
        m.attach()
        ch = Channel(cfg.control_socket)
        ch.connect(2.0)
        try:
            code = _sync(ch, ATTACH_DEADLINE_S)
        except ChannelError as e:
            raise _Replace(f"its agent did not answer ({e})") from None
        t_sync = time.monotonic()
        pushed, t_push, t_reload = [], 0.0, 0.0
        if push:
            stale = stale_code(code.get("hashes") or {})
            if stale and code.get("graveyard_vms"):
                raise _Replace(f"{len(stale)} guest module(s) changed but the agent keeps "
                               f"{code['graveyard_vms']} nested VM(s) alive (a reload would destroy them)")
            for gpath, data in stale.items():
                ch.request("put", {"path": gpath, "data": P.b64(data), "mode": 0o644}, 30.0)
                pushed.append(gpath)
            t_push = time.monotonic() - t_sync
            if stale:
                try:        # the agent re-execs with the code now on disk; its new hello has the caps
                    ch.request("reload", {}, 10.0)
                    caps = ch.wait_hello(60.0).get("caps", caps)
                except HarnessError as e:
                    raise _Replace(f"the agent did not come back after a reload ({str(e).splitlines()[0]})") from None
                t_reload = time.monotonic() - t_sync - t_push
                st.caps = dict(caps)
        ch.request("idle", {"seconds": float(idle_s)}, 10.0)
        if st.idle_s != float(idle_s) or pushed:
            st.idle_s = float(idle_s)
            write_state(vmdir, st)
        if st.ssh_port is not None and st.ssh_dir is not None:
            from .ssh import SshChannel
            ssh_keys = _load_ssh_keys(Path(st.ssh_dir))
            ssh_chan = SshChannel(st.ssh_port, ssh_keys).connect(10.0, alive=m.alive)
    except BaseException:
        if ch is not None:
            ch.close()
        m.detach()
        raise
    m.on_release.append(_released(vmdir, m.pid))
    ready = round(time.monotonic() - t0, 3)
    return GuestSession(config=cfg, run_dir=Path(run_dir), machine=m, channel=ch, caps=caps, detached=vmdir,
                        ssh_keys=ssh_keys, ssh=ssh_chan, keep_vm=True, timings={"ready_s": ready},
                        reuse={"how": "attached", "name": st.name, "vm_dir": str(vmdir), "pid": st.pid,
                               "attach_s": ready, "uptime_s": round(time.time() - st.created, 1),
                               "boot_s": st.boot_s, "pushed": pushed, "push_s": round(t_push, 3),
                               "reload_s": round(t_reload, 3), "idle_s": float(idle_s)})


def open_vm(kernel: Path, run_dir: Path, *, name: str | None = None, root: Path | None = None,
            append: str = "", accel: str = "tcg", smp: int = 1, memory_mb: int = 1024,
            qemu_bin: str = "qemu-system-aarch64", ssh: bool = False, idle_s: float | None = None,
            boot_deadline_s: float = 120.0, fresh: bool = False, progress=quiet):
    """Attach to (or start) the reusable VM ``name`` under ``root``; ``fresh``: always a new one."""
    vmdir = vm_dir(name or vm_name(), root)
    idle = idle_default() if idle_s is None else float(idle_s)
    want = wanted(kernel, append=append, accel=accel, smp=smp, memory_mb=memory_mb, qemu_bin=qemu_bin, ssh=ssh)
    if fresh:
        s = start(want, vmdir, run_dir, idle_s=idle, boot_deadline_s=boot_deadline_s, progress=progress)
        s.reuse["replaced"] = "a guest without earlier state was asked for (fresh)"
        return s
    return attach(want, vmdir, run_dir, idle_s=idle, boot_deadline_s=boot_deadline_s, progress=progress)


def status(vmdir: Path) -> dict:
    """What ``smccc-harness vm status`` prints about one VM dir."""
    vmdir = Path(vmdir)
    out: dict = {"vm_dir": str(vmdir), "name": vmdir.name[len(DIR_PREFIX):], "running": False,
                 "console_log": str(vmdir / "console.log")}
    try:
        st = read_state(vmdir)
    except ReuseError as e:
        out["problem"] = str(e)
        return out
    if st is None:
        out["problem"] = "no reusable VM (no state file)"
        return out
    problem = process_problem(st)
    out.update(pid=st.pid, running=problem is None, uptime_s=round(time.time() - st.created, 1),
               kernel=st.kernel, release=st.caps.get("uname"), kvm_mode=st.caps.get("kvm_mode"),
               control_socket=st.control_socket, console_socket=st.console_socket, console_log=st.console_log,
               qmp_socket=st.qmp_socket, idle_s=st.idle_s, boot_s=st.boot_s, ssh=ssh_command(st))
    if problem:
        out["problem"] = problem
    return out
