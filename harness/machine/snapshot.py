"""Warm start: a snapshot of a booted, idle guest, restored in a fraction of a second (docs/platform.md, last sections).

Save (once per key, on a cache miss): cold-boot the session's own guest, wait for the agent's hello (agent
idle in ``recv``, host channel connected), then over QMP ``stop`` -> ``migrate-set-capabilities mapped-ram``
-> ``migrate file:<state>`` -> ``cont``: the guest that was saved goes on serving the session (QEMU resumes
from "postmigrate").  Every save is checked before it is kept (:func:`check_save`): restored once in a
second QEMU and its timer probed on every vCPU; a save that restores with a dead tick is taken again, at
most :data:`SAVE_TRIES` times (:func:`save_until_live`; then no snapshot, the cold-booted guest goes on).
meta.json records the tries.  A miss costs the cold boot + one save (~1.4 s) + one check restore (~0.6 s on
a quiet host, ~4 s at load 16; bench/README.md).

Restore: the same QEMU command line plus ``-incoming defer``; connect the control channel (a new host
socket: the socket paths are host-side chardev config, not in the migration stream) *before* the load, so
virtio-serial sees the host connected as it was at the save and sends the guest no port event; then
``migrate-set-capabilities`` -> ``migrate-incoming file:<state>`` -> wait for ``query-migrate``
"completed"; send ``ping`` and only then ``cont``: the restored guest's first event is that request, at
once.  The guest's virtio-serial port still believes the host is connected (that state is migrated), so the
agent, blocked in ``read``, simply gets it.  The agent's hello was consumed before the save; a restored guest
never greets again.  Then the timer probe on every vCPU (DeadTimerSnapshot: the snapshot is discarded).
Restores that connected and pinged only after ``cont`` came back with a dead tick for 21 of 30 fresh
snapshots (2026-11-25); in this order, 0 of 10 fresh validated snapshots (and 0 of their 10 checks) did on
2026-12-03 (bench/README.md, "Dead-timer snapshots").

Cache layout (``cache_dir()/snapshots``)::

    snapshots/<key>/state.ram          the migration stream (sparse: ~1.2 GB apparent, ~100 MB on disk)
    snapshots/<key>/meta.json          the key inputs, the agent's caps, when/how long the save took
    snapshots/<key>/boot-console.log   the console of the cold boot that was saved
    snapshots/<key>/last-used          touched on every restore (pruning keeps recently used snapshots)
    snapshots/<key>/stub-kernel        the kernel's first 4 KiB, and an empty stub-initrd: see below
    snapshots/digests.json             sha256 memo of big files, by (path, size, mtime_ns, inode)
    locks/snapshot-<key>.lock          one builder per key (pytest-xdist workers wait, then restore)

``key`` = sha256 over everything that determines the saved state (:func:`key_inputs`): the kernel's and the
initramfs's sha256, the QEMU version string, the rendered command line without the per-run socket paths
(and with the kernel/initrd paths replaced by their hashes), the kernel command line and
:data:`SNAPSHOT_FORMAT`.  Any change gives a new key, i.e. a rebuild on the next start.  Built in a temp dir
and renamed into place (atomic); readers never see a half-written snapshot.

Stub boot files: QEMU reads and copies ``-kernel``/``-initrd`` at start-up (~0.2 s for the 40 MB Debian
Image under TCG, most of a restore) although it never uses them on an incoming migration: ``rom_reset``
skips every ROM blob in RUN_STATE_INMIGRATE (QEMU commit 355477f8 and its fix-up, hw/core/loader.c) and
the guest RAM that holds the kernel comes from the stream.  So a restore passes a 4 KiB stub kernel (the
real Image header) and an empty initrd instead (:data:`STUB_BOOT_FILES`); the key still covers the real
files.  The RAM-block layout does not depend on them (the virt board loads both into system RAM); if a
QEMU ever disagreed, the restore would fail and the session would cold-boot, with the reason logged.
``SMCCC_SNAPSHOT_FULL_ARGV=1`` restores with the real files (the bench compares both).

Restored guests are thrown away, never torn down: destroying a nested VM after a restore locks the guest
up (docs/platform.md), and the agent never destroys nested VMs (``GRAVEYARD``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BootError, HarnessError
from .channel import Channel
from .config import MachineConfig, sock_dir
from .process import Machine
from .snapshot_store import (
    BOOT_LOG,
    EL2_TIMER_FIX,
    LAST_USED,
    MAPPED_RAM,
    META_FILE,
    QEMU_FIXES,
    STATE_FILE,
    STUB_INITRD,
    STUB_KERNEL,
    STUB_KERNEL_BYTES,
    Snapshot,
    SnapshotError,
    SnapshotStore,
    key_inputs,
    qemu_fixes,
    snapshot_key,
    stub_boot_files,
)

log = logging.getLogger(__name__)
SAVE_DEADLINE_S = 60.0
RESTORE_DEADLINE_S = 30.0
PING_DEADLINE_S = 10.0
TIMER_PROBE_DEADLINE_S = 3.0      # a restore's probe: the answer to a 20 ms sleep per vCPU
CHECK_PROBE_DEADLINE_S = 2.0      # the same probe in a save's check restore (a false "dead" costs one more try)
PROBE_SLEEP_S, PROBE_WAIT_S = 0.02, 1.0
SAVE_TRIES = 10                   # saves per snapshot build before giving up (DeadSaves): see save_until_live


# ==== QMP steps =====================================================================================
def _wait_migration(qmp, deadline_s: float, what: str) -> dict:
    stop = time.monotonic() + deadline_s
    while True:
        st = qmp.cmd("query-migrate")
        status = st.get("status")
        if status == "completed":
            return st
        if status in ("failed", "cancelled"):
            raise SnapshotError(f"{what} {status}: {st.get('error-desc', 'no error description')}")
        if time.monotonic() > stop:
            raise SnapshotError(f"{what} did not complete within {deadline_s:g} s (status {status!r})")
        time.sleep(0.005)


def save(session, dest: Path, *, keep_running: bool = False, prepare=None) -> dict:
    """Save ``session`` (a started GuestSession, agent idle) into ``dest``/STATE_FILE.

    ``keep_running``: ``cont`` afterwards (QEMU allows it from "postmigrate") and ping the agent: the session
    goes on serving scenarios; else ``quit`` and close the session.  ``prepare(session)``, if given, runs
    right before the guest is stopped (the QMP connection is already up), e.g. the reproducer's
    ``arm_timers`` request.  Returns figures for meta.json.  On a failure with ``keep_running``, the guest is
    resumed if it can be, and the error raised.
    """
    t0 = time.monotonic()
    q = None
    try:
        q = session.machine.qmp()
        (Path(dest) / STATE_FILE).unlink(missing_ok=True)       # a retake writes a new stream, not over one
        if prepare is not None:
            prepare(session)
        t0 = time.monotonic()
        q.cmd("stop")
        q.cmd("migrate-set-capabilities", capabilities=MAPPED_RAM)
        q.cmd("migrate", uri=f"file:{Path(dest) / STATE_FILE}")
        st = _wait_migration(q, SAVE_DEADLINE_S, "saving the guest (migrate to file)")
        t1 = time.monotonic()
        if keep_running:
            q.cmd("cont")
            session.channel.request("ping", None, PING_DEADLINE_S)
        else:
            with contextlib.suppress(Exception):     # QEMU exits while answering: the socket may just close
                q.cmd("quit")
            session.close()
    except Exception as e:   # QMP errors of every kind mean "no snapshot"
        if keep_running and q is not None:
            with contextlib.suppress(Exception):
                q.cmd("migrate_cancel")
                q.cmd("cont")
        else:
            session.close()
        if isinstance(e, SnapshotError):
            raise
        raise SnapshotError(f"saving the guest failed: {type(e).__name__}: {e}") from e
    st_ram = (Path(dest) / STATE_FILE).stat()
    return {"save_s": round(t1 - t0, 3), "resume_s": round(time.monotonic() - t1, 3),
            "migrate_total_ms": st.get("total-time"), "state_bytes": st_ram.st_size,
            "state_disk_bytes": st_ram.st_blocks * 512}


def _note(run_dir: Path, text: str) -> None:
    """A line in the session's console.log (the Console appends to the same file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "console.log", "a", encoding="utf-8") as f:
        f.write(f"[smccc-harness] {text}\n")


def restore_config(config: MachineConfig, snap: Snapshot, stubs: bool = True) -> MachineConfig:
    """``config`` + ``-incoming defer``; with ``stubs``, the snapshot's stub kernel/initrd (if it has them)."""
    cfg = dataclasses.replace(config, incoming="defer")
    if stubs and (snap.path / STUB_KERNEL).is_file() and (snap.path / STUB_INITRD).is_file():
        cfg = dataclasses.replace(cfg, kernel=snap.path / STUB_KERNEL,
                                  initrd=snap.path / STUB_INITRD if cfg.initrd is not None else None)
    return cfg


class DeadTimerSnapshot(SnapshotError):
    """A restored guest without a working timer interrupt on some vCPU (the probe's sleep never ends): the
    snapshot is never kept (a save's check) or is discarded (a restore).

    Likely cause (QEMU up to at least 10.0, target/arm/machine.c): ``vmstate_arm_cpu`` carries the QEMUTimers
    of ``gt_timer[GTIMER_PHYS]`` and ``[GTIMER_VIRT]`` only, and ``cpu_post_load`` does not re-arm the
    others.  The EL2 timers (CNTHP; CNTHV, which this VHE kernel ticks on: arch_timer_set_next_event_virt)
    come back unarmed although their CVAL/CTL registers are restored, until the guest writes them again.
    A guest whose programmed deadline passes before it reprograms its timer waits for an interrupt that never
    comes; its kernel only reprograms the device for an earlier event, so nothing timed fires again (no tick,
    no preemption, no sleep).  Whether that happens depends on what wakes the restored guest, and when: a
    guest woken at once (the ping before ``cont``) reprograms in time.  Arming a timer on every vCPU right
    before the save is not enough to kill the tick every time (``timer_gap_round``, which also stalls QEMU
    past the deadline: dead 2 of 10 rounds on stock 10.0.2, bench/README.md).  A QEMU with the fix is named in snapshot_store.QEMU_FIXES.
    """


class DeadSaves(SnapshotError):
    """Every save of a snapshot build restored with a dead timer (``tries`` of them): nothing is kept."""

    def __init__(self, message: str, hint: str | None = None, tries: list | None = None) -> None:
        super().__init__(message, hint)
        self.tries = list(tries or [])


@dataclass
class Started:
    """A guest a boot strategy brought up: its running machine and connected control channel, what it reported
    and how long it took.  The session adopts it (:meth:`GuestSession.start`); nothing else sets its fields."""
    machine: object
    channel: Channel
    caps: dict
    timings: dict


def probe_timers(channel: Channel, deadline_s: float, what: str) -> dict:
    """The agent's ``timer_probe``: a short sleep on every online vCPU at once (harness/guest/timers.py).

    Returns the agent's answer; raises DeadTimerSnapshot naming the vCPUs whose sleep did not end, or, when no
    answer comes within ``deadline_s`` (the agent's own vCPU is dead too), saying so.
    """
    try:
        r = channel.request("timer_probe", {"sleep_s": PROBE_SLEEP_S, "wait_s": PROBE_WAIT_S}, deadline_s)
    except HarnessError as e:
        raise DeadTimerSnapshot(
            f"{what}: the restored guest's timer interrupt is dead (a {PROBE_SLEEP_S * 1000:.0f} ms sleep on each "
            f"vCPU got no answer in {deadline_s:g} s: the agent's own vCPU is dead); QEMU did not re-arm the "
            f"guest's EL2 timer on this restore") from e
    if r.get("dead"):
        raise DeadTimerSnapshot(
            f"{what}: the timer interrupt of vCPU {', '.join(map(str, r['dead']))} of "
            f"{len(r.get('cpus') or {})} is dead (a {PROBE_SLEEP_S * 1000:.0f} ms sleep did not end in "
            f"{PROBE_WAIT_S:g} s); QEMU did not re-arm the guest's EL2 timer on this restore")
    return r


def _stall(pid: int | None, seconds: float) -> None:
    """SIGSTOP QEMU ``pid`` for ``seconds``, then SIGCONT: its virtual clock (host time) runs on meanwhile, the
    guest does not: what a busy host does to a TCG guest."""
    if pid is None:
        return
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def _load(config: MachineConfig, run_dir: Path, snap: Snapshot, stubs: bool, probe_deadline_s: float,
          what: str, quiet_s: float = 0.0, probe: bool = True, stall_s: float = 0.0,
          legacy: bool = False) -> tuple[Machine, Channel, dict]:
    """QEMU with ``-incoming defer`` on ``snap``'s state: load, connect, ping, cont, probe every vCPU's timer.
    ``quiet_s`` > 0: the ping only ``quiet_s`` after cont (nothing wakes the guest meanwhile but its own
    timers: the reproducer's order; ``stall_s``: QEMU is stopped by SIGSTOP that long right after cont, as a
    busy host stalls it; ``legacy``: the channel is connected only then, after cont, as restores did before).
    ``probe=False``: no timer probe.  Any failure stops what was started and
    raises SnapshotError (DeadTimerSnapshot: a dead tick)."""
    t0 = time.monotonic()
    cfg = restore_config(config, snap, stubs)
    if cfg.qmp_socket is None or cfg.control_socket is None:
        raise SnapshotError("a restore needs both the QMP and the control socket in the machine config")
    machine, channel = Machine(cfg, run_dir), None
    try:
        machine.start(startup_check_s=0.0)
        q = machine.qmp(timeout_s=RESTORE_DEADLINE_S)
        # The control channel is connected before the state is loaded: the saved guest had its host connected,
        # so virtio-serial sees no change and sends the guest no port event after cont.
        channel = Channel(cfg.control_socket)
        if not legacy:
            channel.connect(PING_DEADLINE_S)
        t1 = time.monotonic()
        q.cmd("migrate-set-capabilities", capabilities=MAPPED_RAM)
        q.cmd("migrate-incoming", uri=f"file:{snap.state}")
        _wait_migration(q, RESTORE_DEADLINE_S, f"{what} (migrate-incoming)")
        t2 = time.monotonic()
        # The ping goes out before cont: the restored guest's first event is that interrupt, at once, before a
        # timer deadline it had programmed can pass unseen (see DeadTimerSnapshot: a vCPU woken in time
        # reprograms its timer; measured in bench/README.md).
        if quiet_s:
            q.cmd("cont")
            if stall_s:
                _stall(machine.pid, stall_s)
            time.sleep(quiet_s)
            if legacy:
                channel.connect(PING_DEADLINE_S)
            rid = channel.send("ping")
        else:
            rid = channel.send("ping")
            q.cmd("cont")
        pong = channel.response(rid, "ping", PING_DEADLINE_S)
        if not pong.get("pong"):
            raise SnapshotError(f"the restored agent answered ping with {pong!r}")
        t3 = time.monotonic()
        answer = probe_timers(channel, probe_deadline_s, what) if probe else {}
    except BaseException as e:
        if channel is not None:
            channel.close()
        machine.stop()
        if isinstance(e, SnapshotError) or not isinstance(e, Exception):
            raise
        raise SnapshotError(f"{what} failed: {type(e).__name__}: {e}") from e
    t4 = time.monotonic()
    return machine, channel, {"qemu_to_qmp_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3),
                              "cont_to_ping_s": round(t3 - t2, 3), "probe_s": round(t4 - t3, 3),
                              "probe_cpus": len(answer.get("cpus") or {}), "boot_s": round(t4 - t0, 3),
                              "ready_s": round(t4 - t0, 3)}


def restore(config: MachineConfig, run_dir: Path, snap: Snapshot, *, stubs: bool | None = None,
            quiet_s: float = 0.0, probe: bool = True) -> Started:
    """A guest of ``config`` started from ``snap``: QEMU with ``-incoming defer``, load, cont, ping, timer probe.

    ``stubs`` (default :func:`stub_boot_files`): pass the snapshot's stub kernel/initrd to QEMU instead of
    the real ones (they are never used on an incoming migration; see the module docstring).  The ping is
    sent before ``cont`` (``quiet_s`` > 0: that long after it); ``probe=False`` skips the timer probe (the
    reproducer, tests/system/test_snapshot_timers.py, asks its own questions).  Any failure stops
    what was started and raises SnapshotError (DeadTimerSnapshot when the restored tick is dead: every kept
    snapshot restored live once when it was saved, so this is rare, e.g. a snapshot made on another host).
    """
    snap.touch()            # before the state file is opened: prune() leaves recently used snapshots alone
    meta = snap.meta()
    _note(run_dir, f"restored from snapshot {snap.key} ({snap.path}); the serial console of a restored "
                   f"guest starts here; the boot console is {snap.path / BOOT_LOG}")
    machine, channel, timings = _load(config, run_dir, snap, stub_boot_files() if stubs is None else stubs,
                                      TIMER_PROBE_DEADLINE_S, f"restoring snapshot {snap.key}", quiet_s, probe)
    return Started(machine=machine, channel=channel, caps=dict(meta.get("caps") or {}),
                   timings={"snapshot": snap.key, **timings})


# ==== validated saves ===============================================================================
def check_save(config: MachineConfig, run_dir: Path, saved: Snapshot) -> dict:
    """Restore what was just saved into ``saved`` (its state and stub files; no meta yet) once, in a QEMU of its
    own (console log and sockets in ``run_dir``), probe every vCPU's timer and stop that QEMU.  Returns the
    restore's figures; raises DeadTimerSnapshot when a tick is dead, SnapshotError on any other failure."""
    sockets = sock_dir(run_dir)
    cfg = dataclasses.replace(config, incoming=None, control_socket=sockets / "ctl.sock",
                              qmp_socket=sockets / "qmp.sock")
    _note(run_dir, f"checking the state just saved in {saved.path}: one restore, then a timer probe on every "
                   "vCPU; this QEMU is stopped afterwards")
    try:
        machine, channel, timings = _load(cfg, run_dir, saved, stub_boot_files(), CHECK_PROBE_DEADLINE_S,
                                          "checking a new save")
        channel.close()
        machine.stop()
    finally:
        if sockets != Path(run_dir):
            shutil.rmtree(sockets, ignore_errors=True)
    return timings


# ==== the reproducer ================================================================================
GAP_SPIN_MS = 4000        # two spinners per vCPU, started GAP_SETTLE_S before the save
GAP_SETTLE_S = 0.5        # from the spinners' start to the save: the start's own I/O and wake-ups are over
GAP_STALL_S = 0.3         # QEMU stopped (SIGSTOP) right after cont: the armed tick's deadline passes meanwhile
GAP_QUIET_S = 4.0         # the restored guest runs this long with nothing from the host (longer than the spin)
GAP_LATE_S = 2.0          # a spinner kept off its vCPU longer than this (the stall and a busy host's slices
                          # stay under it): the other one was never preempted


def _with_stubs(config: MachineConfig, dest: Path) -> None:
    with open(config.kernel, "rb") as f:
        (Path(dest) / STUB_KERNEL).write_bytes(f.read(STUB_KERNEL_BYTES))
    (Path(dest) / STUB_INITRD).write_bytes(b"")


def timer_gap_round(session, dest: Path, run_dir: Path) -> dict:
    """One round of the reproducer of QEMU's EL2-timer migration gap (tests/system/test_snapshot_timers.py).

    ``session`` (started, not restored) gets two spinners on every vCPU (``arm_timers`` spin,
    harness/guest/timers.py: busy for :data:`GAP_SPIN_MS`, so every vCPU's tick is armed one tick ahead) and
    is saved at once into ``dest`` (it runs on).  The state is restored in a QEMU of its own (``run_dir``),
    with the control channel connected before the load and nothing sent for :data:`GAP_QUIET_S` after cont:
    only the timer interrupt can make a vCPU switch between its two spinners, and a busy vCPU never
    reprograms its timer by itself.  Then ``timer_report``: each spinner's longest time off its vCPU.  With
    the EL2 timers re-armed by QEMU, every gap is a time slice; without, one spinner per vCPU waited the
    whole spin.  Returns ``fired`` (every gap under :data:`GAP_LATE_S`), the gaps and what the timer probe
    found afterwards (``probe``: "live", or why it was dead).
    """
    armed: dict = {}
    def arm(s) -> None:
        armed.update(s.request("arm_timers", {"mode": "spin", "ms": GAP_SPIN_MS}, 60.0))
        time.sleep(GAP_SETTLE_S)
    save(session, dest, keep_running=True, prepare=arm)
    if not armed.get("ready"):
        raise SnapshotError(f"arm_timers did not start the spinners on every vCPU: {armed}")
    _with_stubs(session.config, dest)
    (Path(dest) / META_FILE).write_text(json.dumps({"caps": session.caps}) + "\n")
    sockets = sock_dir(run_dir)
    cfg = dataclasses.replace(session.config, incoming=None, control_socket=sockets / "ctl.sock",
                              qmp_socket=sockets / "qmp.sock")
    _note(run_dir, f"reproducer: a restore of {dest}, saved with two spinners on every vCPU; nothing is sent to "
                   f"the guest for {GAP_QUIET_S:g} s after cont")
    try:
        machine, channel, _ = _load(cfg, run_dir, Snapshot("reproducer", Path(dest)), True, TIMER_PROBE_DEADLINE_S,
                                    "the reproducer's restore", quiet_s=GAP_QUIET_S, probe=False, stall_s=GAP_STALL_S)
        try:
            report = channel.request("timer_report", None, PING_DEADLINE_S + GAP_SPIN_MS / 1000)
            try:
                probe_timers(channel, TIMER_PROBE_DEADLINE_S, "the reproducer's restore")
                probe = "live"
            except DeadTimerSnapshot as e:
                probe = str(e)
        finally:
            channel.close()
            machine.stop()
    finally:
        if sockets != Path(run_dir):
            shutil.rmtree(sockets, ignore_errors=True)
    gaps = report["max_gap_s"]
    return {"cpus": armed["cpus"], "max_gap_s": gaps, "probe": probe,
            "fired": all(v is not None and v < GAP_LATE_S for v in gaps.values())}


@dataclass(frozen=True)
class SaveTry:
    """One save of a snapshot build and its check: the save's figures, the check restore's (or why it was
    dead), whether it restored live."""
    n: int
    live: bool
    save: dict
    check: dict

    def record(self) -> dict:
        return {"n": self.n, "live": self.live, "save": self.save, "check": self.check}


def save_until_live(take, check, tries: int = SAVE_TRIES) -> list[SaveTry]:
    """Save with ``take(n)`` (-> the save's figures) and check with ``check(n)`` (-> the check restore's figures;
    raises DeadTimerSnapshot when the saved state restores dead), until a save restores live.

    Returns every try, the last one live.  After ``tries`` dead saves raises DeadSaves (with the tries).  Any
    other error of ``take`` or ``check`` is not the timer gap and propagates at once.
    """
    done: list[SaveTry] = []
    for n in range(1, tries + 1):
        figures = take(n)
        try:
            result, live = check(n), True
        except DeadTimerSnapshot as e:
            result, live = {"dead": str(e)}, False
        done.append(SaveTry(n, live, figures, result))
        if live:
            if n > 1:
                log.info("save %d of at most %d restored live (the %d before it were dead)", n, tries, n - 1)
            return done
        log.info("save %d of at most %d restored with a dead timer; saving again: %s", n, tries, result["dead"])
    raise DeadSaves(f"all {tries} saves restored with a dead timer interrupt (QEMU does not migrate the EL2 "
                    f"timers: harness/machine/snapshot.py DeadTimerSnapshot); no snapshot is kept",
                    hint="the cold-booted guest goes on; the next warm start tries again. A QEMU with the fix "
                         f"(its --version names {QEMU_FIXES[EL2_TIMER_FIX]!r}) restores every save live",
                    tries=done)


# ==== warm start ====================================================================================
def _build(session, tmp: Path, inputs: dict, *, tries: int = SAVE_TRIES, prepare=None) -> list[SaveTry]:
    """Cold-boot ``session`` itself, save it into ``tmp`` and let it run on (no restore on a cache miss).

    Every save is checked before it is kept (:func:`check_save`: one restore in a second QEMU, a timer probe
    on every vCPU) and taken again while it restores dead, at most ``tries`` times (:func:`save_until_live`);
    meta.json records the tries.  ``prepare`` goes to :func:`save`.  A BootError propagates (the guest does
    not boot: a second cold boot would only repeat it).  A failed save raises SnapshotError (DeadSaves when
    every try was dead) with the session still running if QEMU could resume it.
    """
    session.boot()
    caps, boot_timings = dict(session.caps), dict(session.timings)
    _with_stubs(session.config, tmp)
    saved = Snapshot(tmp.name, tmp)
    t0 = time.monotonic()
    done = save_until_live(lambda n: save(session, tmp, keep_running=True, prepare=prepare),
                           lambda n: check_save(session.config, session.run_dir / f"save-check-{n}", saved), tries)
    total = round(time.monotonic() - t0, 3)
    with contextlib.suppress(OSError):
        shutil.copyfile(session.run_dir / "console.log", tmp / BOOT_LOG)
    (tmp / LAST_USED).unlink(missing_ok=True)
    meta = {"key_inputs": inputs, "caps": caps, "boot": boot_timings, "save": done[-1].save,
            "save_tries": len(done), "save_total_s": total, "tries": [t.record() for t in done],
            "qemu_fixes": sorted(qemu_fixes(inputs.get("qemu_version", ""))),
            "boot_run_dir": str(session.run_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return done


@dataclass
class WarmStart:
    """What :func:`warm_start` decided: ``started`` to adopt (a restore), or ``booted`` (the session cold-booted
    itself to build the snapshot and runs on), or ``cold_boot`` (fall back: the session boots cold); plus the
    timings and notes for the session's record."""
    started: Started | None = None
    booted: bool = False
    cold_boot: bool = False
    timings: dict = field(default_factory=dict)


def warm_start(session, store: SnapshotStore | None = None) -> WarmStart:
    """How ``session`` (not started) comes up from its snapshot: restore it (built by a cold boot of the session
    itself on a cache miss), or fall back to a cold boot.

    A boot failure of the cold boot that would have been saved is raised as is (the guest does not boot:
    a second cold boot would only repeat it).  Any other failure (QMP, migration, channel) is logged, noted
    in the console log and in the timings (``snapshot_fallback``), and the answer is a cold boot.
    """
    store = store or SnapshotStore()
    t0 = time.monotonic()
    try:
        inputs = key_inputs(session.config)
        key = snapshot_key(inputs)
        snap = store.lookup(key)
        if snap is None:
            built: list[list[SaveTry]] = []
            snap = store.create(key, lambda tmp: built.append(_build(session, tmp, inputs)))
            if built:       # this session was cold-booted and saved, and runs on
                tries = built[0]
                _note(session.run_dir, f"this boot was saved as snapshot {key} ({snap.path}); save {len(tries)} "
                                       "restored live (the ones before it had a dead timer and were not kept)"
                      if len(tries) > 1 else f"this boot was saved as snapshot {key} ({snap.path})")
                dt = round(time.monotonic() - t0, 3)
                return WarmStart(booted=True, timings={"snapshot": key, "snapshot_created": True, "ready_s": dt,
                                                       "warm_start_s": dt, "snapshot_save_tries": len(tries)})
        started = restore(session.config, session.run_dir, snap)
        started.timings.update(snapshot_created=False, warm_start_s=round(time.monotonic() - t0, 3))
        return WarmStart(started=started, timings=started.timings)
    except BootError:
        raise
    except (SnapshotError, HarnessError, OSError) as e:
        reason = f"{type(e).__name__}: {e}"
        extra = {"snapshot_save_tries": len(e.tries)} if isinstance(e, DeadSaves) else {}
        if isinstance(e, DeadTimerSnapshot):
            store.discard(key)
    if session.channel is not None and session.alive():
        try:        # the save failed but the cold-booted guest was resumed: use it
            session.channel.request("ping", None, PING_DEADLINE_S)
            log.warning("saving the snapshot failed; the cold-booted guest goes on: %s", reason)
            _note(session.run_dir, f"saving the snapshot failed ({reason}); the cold-booted guest goes on")
            return WarmStart(booted=True, timings={"snapshot_fallback": reason, **extra})
        except HarnessError:
            pass
    log.warning("snapshot restore failed, cold boot instead: %s", reason)
    _note(session.run_dir, f"snapshot restore failed ({reason}); cold boot")
    return WarmStart(cold_boot=True, timings={"snapshot_fallback": reason})
