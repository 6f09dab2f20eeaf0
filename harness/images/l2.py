"""Host side of the Linux-in-the-handler guest: the L2 kernel choice, its tiny initramfs, and how
both reach the L1 guest.

Transport: the Linux kernel unpacks *concatenated* cpio archives into its rootfs
(Documentation/driver-api/early-userspace/buffer-format.rst), so the L1 guest gets the usual harness
initramfs with a second archive appended that holds ``/l2/Image`` and ``/l2/initrd.cpio``.  Only sessions
that boot a Linux guest use that file; the default L1 boot is unchanged.  The L2 kernel defaults to the
L1 kernel under test (``--kernel``); ``SMCCC_L2_KERNEL`` (a path or a Debian spec) overrides it.

The L2 initramfs is busybox-static (from the rootfs packages) and :data:`L2_INIT`, which drives the scenario
from the kernel command line: it echoes the kernel's psci/smp boot messages (``L2: dmesg ...``, they are
below ``loglevel=5``), ``l2.hotplug=1,2`` offlines and onlines those CPUs through sysfs,
``l2.action=poweroff|reboot|none`` ends the boot.  It prints ``L2: ...`` lines on the console.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..paths import cache_dir, prune_newest
from . import cpio

L2_INIT = r"""#!/bin/busybox sh
# /init of the L2 guest (harness/images/l2.py): report the CPUs, hotplug what l2.hotplug names, then l2.action.
/bin/busybox mkdir -p /proc /sys /dev /tmp /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
if (: >/dev/console) 2>/dev/null; then exec </dev/null >/dev/console 2>&1; else exec </dev/null >/dev/kmsg 2>&1; fi
action=poweroff
hotplug=
for w in $(cat /proc/cmdline); do
  case "$w" in
    l2.action=*) action="${w#l2.action=}" ;;
    l2.hotplug=*) hotplug="${w#l2.hotplug=}" ;;
  esac
done
up() { cut -d' ' -f1 /proc/uptime; }
echo "L2: init uptime=$(up) processors=$(grep -c ^processor /proc/cpuinfo) online=$(cat /sys/devices/system/cpu/online) psci=$(cat /sys/firmware/devicetree/base/psci/method 2>/dev/null)"
echo "L2: cpuidle driver=$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null) usage=$(cat /sys/devices/system/cpu/cpu0/cpuidle/state1/usage 2>/dev/null)"
dmesg | grep -E 'psci:|sdei:|smp:|CPU[0-9]+: Booted|SMP: Total' | sed -e 's/^\[[^]]*\] */L2: dmesg /'
for c in $(echo "$hotplug" | tr , ' '); do
  f=/sys/devices/system/cpu/cpu$c/online
  echo 0 > "$f"; rc=$?
  echo "L2: hotplug cpu$c off rc=$rc online=$(cat /sys/devices/system/cpu/online) processors=$(grep -c ^processor /proc/cpuinfo)"
  echo 1 > "$f"; rc=$?
  echo "L2: hotplug cpu$c on rc=$rc online=$(cat /sys/devices/system/cpu/online) processors=$(grep -c ^processor /proc/cpuinfo)"
done
echo "L2: end action=$action uptime=$(up)"
case "$action" in
  poweroff) poweroff -f ;;
  reboot) reboot -f ;;
esac
echo "L2: idle"
while :; do sleep 3600; done
"""

INIT_LINE_RE = re.compile(r"L2: init uptime=(?P<uptime>[\d.]+) processors=(?P<processors>\d+) online=(?P<online>\S*)"
                          r" psci=(?P<psci>\S*)")
CPUIDLE_RE = re.compile(r"L2: cpuidle driver=(?P<driver>\S*) usage=(?P<usage>\d*)")
DMESG_RE = re.compile(r"^L2: dmesg (?P<text>.*?)\r?$", re.MULTILINE)
HOTPLUG_RE = re.compile(r"L2: hotplug cpu(?P<cpu>\d+) (?P<dir>on|off) rc=(?P<rc>\d+) online=(?P<online>\S*) "
                        r"processors=(?P<processors>\d+)")


def busybox_path(rootfs: dict[str, Path]) -> Path:
    root = rootfs["busybox-static"]
    for rel in ("bin/busybox", "usr/bin/busybox"):
        if (root / rel).is_file():
            return root / rel
    raise FileNotFoundError(f"busybox-static has no bin/busybox under {root}")


def _key(*parts: bytes) -> str:
    h = hashlib.sha256(b"smccc-l2 v1\n")
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:24]


def build_l2_initrd(busybox: Path) -> Path:
    """The L2 guest's initramfs: /bin/busybox + /init (+ /dev/console); cached by content."""
    bb = busybox.read_bytes()
    out = cache_dir() / "l2" / f"initrd-{_key(bb, L2_INIT.encode())}.cpio"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cpio.build(out, [cpio.file("bin/busybox", bb, 0o755), cpio.file("init", L2_INIT.encode(), 0o755),
                     cpio.directory("dev"), cpio.chardev("dev/console", 5, 1, 0o600), cpio.directory("proc"),
                     cpio.directory("sys")])
    return out


def build_l1_initrd(base: Path, l2_kernel: Path, l2_initrd: Path) -> Path:
    """``base`` with a second cpio appended: /l2/Image and /l2/initrd.cpio (cached by the three inputs)."""
    st = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode() for p in (base, l2_kernel, l2_initrd)]
    out = cache_dir() / "l2" / f"l1-initrd-{_key(*st)}.cpio"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(base.read_bytes())
            cpio.write(f, [cpio.directory("l2"), cpio.file("l2/Image", source=l2_kernel),
                           cpio.file("l2/initrd.cpio", source=l2_initrd)])
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    _prune(out.parent, keep=out)
    return out


def _prune(d: Path, keep: Path, max_keep: int = 3) -> None:
    prune_newest(d, "l1-initrd-*.cpio", keep, max_keep)


def l2_kernel_spec(l1_spec: str) -> str:
    return os.environ.get("SMCCC_L2_KERNEL") or l1_spec


def linux_request(name: str, *, vcpus: int = 2, method: str = "hvc", psci: str = "fwd", action: str = "poweroff",
                  hotplug: tuple[int, ...] = (), ram_mb: int = 256, cmdline: str = "", deadline_s: float = 300.0,
                  psci_minor: int = 3, on_reset: str = "stop", max_boots: int = 1, idle_state: str | None = None,
                  sdei: str | None = None) -> dict:
    """The ``linux`` request for the agent (validated again in the guest by harness.guest.linux.validate)."""
    args = f"l2.action={action}"
    if hotplug:
        args += " l2.hotplug=" + ",".join(str(c) for c in hotplug)
    return {"name": name, "vcpus": vcpus, "method": method, "psci": psci, "ram_mb": ram_mb,
            "cmdline": f"{args} {cmdline}".strip(), "deadline_s": deadline_s, "psci_minor": psci_minor,
            "on_reset": on_reset, "max_boots": max_boots, "idle_state": idle_state, "sdei": sdei}


def run_linux(session, request: dict):
    """Send a ``linux`` request; returns a :class:`harness.model.results.ScenarioResult` (trace saved in the run dir)."""
    from ..model.results import ScenarioResult

    mark = session.machine.console.mark()
    raw = session.request("linux", request, request["deadline_s"] * request.get("max_boots", 1) + 60.0)
    path = session.save_trace(request["name"], raw, leave_out=("console", "previous_boots"))
    consoles = [b.get("console", "") for b in raw.get("previous_boots", [])] + [raw.get("console", "")]
    path.with_suffix(".console.log").write_text(
        "".join(f"=== L2 boot {i + 1} ===\n{c}" for i, c in enumerate(consoles)))
    return ScenarioResult(raw=raw, console=session.machine.console.since(mark), trace_path=path)
