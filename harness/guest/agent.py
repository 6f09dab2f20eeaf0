"""The in-guest agent: a persistent process that serves scenarios over the control channel.

Started once per boot by /init (``python3 -S -m harness.guest.agent``).  It opens the virtio-serial port
named :data:`harness.protocol.PORT_NAME`, probes KVM's capabilities, prints the ready banner on the console
(the host's boot detection), greets the host on the port and then answers requests, one at a time, until
told to shut down.  No Python start-up per scenario: a scenario costs only its own VM.

A reusable VM (``pytest --reuse-vm``, harness/machine/reuse.py) gets ``smccc.idle=SECONDS`` on the kernel command line
(the host may change it with the ``idle`` op): after that long without a request the agent powers the guest
off, so a forgotten VM does not run forever.  ``code`` reports the sha256 of the guest code this agent
started with; ``put`` also writes ``.py`` files under the guest code directory (then ``reload``).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import sys
import time

from .. import protocol as P
from . import kvm, smccc
from .runner import GRAVEYARD, run_scenario
from .vm import Vm, install_kick_handler


def find_port(name: str = P.PORT_NAME, wait_s: float = 10.0) -> str:
    deadline = time.monotonic() + wait_s
    base = "/sys/class/virtio-ports"
    while True:
        for port in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            with open(f"{base}/{port}/name") as f:
                if f.read().strip() == name:
                    return "/dev/" + port
        if time.monotonic() > deadline:
            raise RuntimeError(f"no virtio-serial port named {name!r} (is QEMU started with the control channel?)")
        time.sleep(0.05)


def poweroff() -> None:
    """``busybox poweroff -f`` in the background (PSCI SYSTEM_OFF: QEMU exits), without importing subprocess."""
    os.posix_spawn("/bin/busybox", ["/bin/busybox", "poweroff", "-f"], dict(os.environ))


def kernel_log() -> list[str]:
    """The kernel log's messages, read from /dev/kmsg (no ``dmesg`` process: the agent's start-up, paid by
    every cold boot and every reload, imports no subprocess).  Records are ``prio,seq,usec,flags;text``."""
    out = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return out
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # EPIPE: a record was overwritten while reading; go on with the next
                continue
            except OSError:          # anything else would repeat on every read: stop, never spin
                break
            if not rec:
                break
            out.append(rec.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0])
    finally:
        os.close(fd)
    return out


def kvm_mode_from_dmesg(lines: list[str] | None = None) -> str | None:
    for line in kernel_log() if lines is None else lines:
        if "kvm [" in line and "mode initialized" in line:
            return line.split("]: ", 1)[-1].strip()
    return None


def probe_caps() -> dict:
    """What this kernel's KVM offers, probed once per boot (api.rst KVM_CHECK_EXTENSION; vm.rst §6)."""
    caps: dict = {"uname": os.uname().release, "kvm": False, "kvm_mode": kvm_mode_from_dmesg()}
    if not os.path.exists("/dev/kvm"):
        caps["reason"] = "/dev/kvm is absent: this kernel has no KVM, or KVM did not initialise (see dmesg)"
        return caps
    fd = kvm.open_kvm()
    caps["kvm"] = True
    caps["api_version"] = kvm.ioctl(fd, kvm.KVM_GET_API_VERSION)
    for name in ("KVM_CAP_ARM_EL2", "KVM_CAP_ARM_EL2_E2H0", "KVM_CAP_ARM_PSCI_0_2", "KVM_CAP_ARM_SYSTEM_SUSPEND",
                 "KVM_CAP_ARM_VM_IPA_SIZE", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_SYSTEM_EVENT_DATA",
                 "KVM_CAP_ARM_EL1_32BIT"):
        caps[name] = kvm.check_extension(fd, getattr(kvm, name))
    vm = Vm(fd)
    try:
        try:
            smccc.has_filter(vm.fd)
            caps["smccc_filter"] = True
        except kvm.KvmError as e:
            caps["smccc_filter"] = False
            caps["smccc_filter_errno"] = e.errname
        v = vm.add_vcpu((kvm.KVM_ARM_VCPU_PSCI_0_2,))
        ver = v.get_reg(kvm.REG_PSCI_VERSION)
        caps["psci_version"] = f"{ver >> 16}.{ver & 0xFFFF}"
        caps["psci_version_raw"] = ver
    finally:
        vm.close()
    caps["sys_fd"] = fd
    return caps


FAULT_KINDS = ("raise", "exit", "hang", "kill")


def inject_fault(args: dict) -> dict:
    """The ``fault`` op: make the agent itself fail, so the host's recovery can be tested.

    ``raise``: the op raises (the agent survives and answers with the traceback); ``exit``: the agent exits
    with ``code`` (default 3), /init then powers the guest off; ``kill``: SIGKILL to itself; ``hang``: the
    agent never answers (sleeps ``seconds``, default 3600).
    """
    kind = args.get("kind")
    if kind == "raise":
        raise RuntimeError("injected fault: the handler raised (op 'fault', kind 'raise')")
    if kind == "exit":
        sys.stdout.flush()
        os._exit(int(args.get("code", 3)))
    if kind == "kill":
        os.kill(os.getpid(), 9)
    if kind == "hang":
        time.sleep(float(args.get("seconds", 3600)))
        return {"woke": True}
    raise P.ProtocolError(f"fault kind must be one of {FAULT_KINDS}, got {kind!r}")


def write_kmsg(args: dict) -> dict:
    """The ``kmsg`` op: ``{"lines": ["<4>WARNING: ...", ...], "delay_s": 0}``: write each line as one kernel log
    record through /dev/kmsg (``<N>`` sets its level), so real kernel log lines reach the serial console.
    With ``delay_s`` > 0 the records are written by a thread that many seconds after the answer."""
    lines, delay = args.get("lines"), args.get("delay_s", 0)
    if not (isinstance(lines, list) and lines and all(isinstance(x, str) and "\n" not in x for x in lines)):
        raise P.ProtocolError("kmsg needs lines: a non-empty list of one-line strings")
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
        raise P.ProtocolError(f"kmsg delay_s must be a number >= 0, got {delay!r}")

    def write() -> None:
        if delay:
            time.sleep(delay)
        fd = os.open("/dev/kmsg", os.O_WRONLY)
        try:
            for line in lines:     # one write = one record; without its newline a record stays pending as a
                os.write(fd, (line + "\n").encode())   # continuation (LOG_CONT) until the next one arrives
        finally:
            os.close(fd)

    if delay:
        import threading
        threading.Thread(target=write, daemon=True).start()
    else:
        write()
    return {"written": len(lines), "delay_s": delay}


CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))    # /opt/smccc/harness
IDLE_PARAM = "smccc.idle"


def _is_code_path(path: str) -> bool:
    """A guest-code module: ``CODE_ROOT/**/NAME.py`` (no ``__pycache__``, no hidden or odd names)."""
    rel = path[len(CODE_ROOT) + 1:].split("/") if path.startswith(CODE_ROOT + "/") else []
    return bool(rel) and path.endswith(".py") and all(
        part and not part.startswith(".") and part != "__pycache__" and part.replace("_", "a").replace(".", "a")
        .isalnum() for part in rel)


def put_file(args: dict) -> dict:
    """``{"path": "/tmp/...", "data": base64, "mode": 0o755}``: write atomically (temp file + rename) under /tmp,
    or a ``.py`` module of the guest code (``/opt/smccc/harness/...``, --reuse-vm code push): its stale
    ``__pycache__`` entries are removed (the initramfs's .pyc are unchecked-hash: Python would keep them)."""
    path, data, mode = args.get("path"), args.get("data"), args.get("mode", 0o644)
    ok_tmp = isinstance(path, str) and path.startswith("/tmp/") and ".." not in path.split("/")
    ok_code = isinstance(path, str) and _is_code_path(path)
    if not (ok_tmp or ok_code):
        raise P.ProtocolError(f"put needs an absolute path under /tmp (the guest's tmpfs) or a .py module under "
                              f"{CODE_ROOT}, got {path!r}")
    if not isinstance(data, str) or not isinstance(mode, int):
        raise P.ProtocolError("put needs data (base64 text) and an integer mode")
    blob = P.unb64(data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.chmod(tmp, (mode & 0o7777) if ok_tmp else 0o644)
    os.replace(tmp, path)
    if ok_code:
        d, name = os.path.split(path)
        import glob
        for pyc in glob.glob(os.path.join(d, "__pycache__", name[:-3] + ".*.pyc")):
            os.unlink(pyc)
    return {"path": path, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def code_hashes(root: str = CODE_ROOT) -> dict[str, str]:
    """sha256 of every guest-code module on disk (path -> hex digest)."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(d, name), "rb") as f:
                    out[os.path.join(d, name)] = hashlib.sha256(f.read()).hexdigest()
    return out


def idle_from_cmdline(path: str = "/proc/cmdline") -> float | None:
    """``smccc.idle=SECONDS`` on the kernel command line (reusable VMs only), else None (never idle out)."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    for w in words:
        if w.startswith(IDLE_PARAM + "="):
            try:
                v = float(w.split("=", 1)[1])
            except ValueError:
                return None
            return v if v > 0 else None
    return None


class Agent:
    def __init__(self, port_path: str):
        self.fd = os.open(port_path, os.O_RDWR)
        self.buf = b""
        self.caps = probe_caps()
        self.sys_fd = self.caps.pop("sys_fd", None)
        self.code = code_hashes()           # the code this agent runs (a push changes the disk, not this)
        self.idle_s = idle_from_cmdline()
        self.last_request = time.monotonic()

    def idle_left(self) -> float | None:
        return None if self.idle_s is None else self.idle_s - (time.monotonic() - self.last_request)

    def idle_poweroff(self) -> None:
        """No request for ``idle_s``: power the guest off (PSCI SYSTEM_OFF; QEMU exits).  Nested VMs are not
        destroyed first (never done): ``poweroff -f`` does not wait for this process."""
        print(f"smccc-agent: no request for {self.idle_s:g} s ({IDLE_PARAM}): powering the guest off", flush=True)
        poweroff()
        time.sleep(60)
        os._exit(0)

    def send(self, msg: dict) -> None:
        data = P.encode(msg)
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            left = self.idle_left()
            if left is not None:
                if left <= 0:
                    self.idle_poweroff()
                if not select.select([self.fd], [], [], min(left, 60.0))[0]:
                    continue
            chunk = os.read(self.fd, 65536)
            if not chunk:       # host not connected (yet, or any more): wait for it
                time.sleep(0.05)
                continue
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return P.decode(line)

    def handle(self, req: dict) -> dict:
        op, args = req.get("op"), req.get("args") or {}
        if op == "ping":
            return {"pong": True, "t": time.monotonic()}
        if op in ("timer_probe", "arm_timers", "timer_report", "timer_list"):
            # the timer interrupt of every vCPU after a snapshot restore (harness/guest/timers.py)
            from . import timers
            return {"timer_probe": timers.probe, "arm_timers": timers.arm_timers, "timer_report": timers.timer_report,
                    "timer_list": lambda a: timers.timer_list()}[op](args)
        if op == "caps":
            return dict(self.caps)
        if op == "run":
            if self.sys_fd is None:
                raise RuntimeError(self.caps.get("reason", "no /dev/kvm"))
            return run_scenario(args, self.sys_fd)
        if op == "linux":   # boot a Linux guest on the userspace PSCI emulator (harness.guest.linux)
            if self.sys_fd is None:
                raise RuntimeError(self.caps.get("reason", "no /dev/kvm"))
            from .linux import run_linux
            return run_linux(args, self.sys_fd)
        if op == "exec":
            argv = args.get("argv")
            if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
                raise P.ProtocolError("exec needs argv: a non-empty list of strings")
            import subprocess  # only here: the agent's start-up imports as little as it can
            p = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=float(args.get("timeout_s", 30)))
            return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
        if op == "kmsg":       # write kernel log records (tests/system/test_console_scanning.py)
            return write_kmsg(args)
        if op == "fault":      # test-only fault injection (tests/system/test_faults.py)
            return inject_fault(args)
        if op == "put":        # receive a file into the guest's tmpfs (upstream selftests: harness/kdev/selftests.py)
            return put_file(args)
        if op == "stats":
            return {"graveyard_vms": len(GRAVEYARD), "pid": os.getpid()}
        if op == "code":       # what this agent runs (--reuse-vm pushes the modules that differ, then reloads)
            return {"hashes": dict(self.code), "graveyard_vms": len(GRAVEYARD), "pid": os.getpid(),
                    "idle_s": self.idle_s}
        if op == "idle":       # {"seconds": N}: power off after N s without a request; 0 = never
            sec = args.get("seconds")
            if not isinstance(sec, (int, float)) or isinstance(sec, bool) or sec < 0:
                raise P.ProtocolError(f"idle needs seconds >= 0, got {sec!r}")
            self.idle_s = float(sec) or None
            return {"idle_s": self.idle_s}
        if op == "reload":     # re-exec after new guest code was pushed (--reuse-vm, docs/reuse-vm.md, docs/ssh.md)
            if GRAVEYARD:      # exec would close their fds, i.e. destroy nested VMs (never done, platform.md)
                raise RuntimeError(f"{len(GRAVEYARD)} nested VM(s) are kept alive in this agent; a reload "
                                   "would destroy them: boot a new guest instead")
            self.reexec = True
            return {"pid": os.getpid()}
        if op == "shutdown":
            poweroff()
            return {"bye": True}
        raise P.ProtocolError(f"unknown op {op!r}")

    def serve(self) -> None:
        self.send({"type": "hello", "agent": P.AGENT_VERSION, "caps": self.caps})
        while True:
            req = self.recv()
            rid = req.get("id")
            try:
                resp = {"type": "response", "id": rid, "ok": True, "result": self.handle(req)}
            except Exception as e:  # noqa: BLE001 - every failure goes back to the host with its traceback
                import traceback
                resp = {"type": "response", "id": rid, "ok": False,
                        "error": {"kind": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}}
            self.send(resp)
            self.last_request = time.monotonic()
            if getattr(self, "reexec", False):    # same pid (/init still waits for it), new code, new hello
                os.execv(sys.executable, [sys.executable, "-S", "-m", "harness.guest.agent"])


def main() -> int:
    install_kick_handler()
    t0 = time.monotonic()
    port = find_port()
    agent = Agent(port)
    caps = dict(agent.caps)
    caps["agent_start_s"] = round(time.monotonic() - t0, 3)
    print(f"{P.READY_BANNER} {json.dumps(caps, sort_keys=True)}", flush=True)
    agent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
