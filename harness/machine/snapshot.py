"""Warm start: a snapshot of a booted, idle guest, restored in a fraction of a second (docs/platform.md, last sections).

Save (once per key, on a cache miss): cold-boot the session's own guest, wait for the agent's hello (agent
idle in ``recv``, host channel connected), then over QMP ``stop`` -> ``migrate-set-capabilities mapped-ram``
-> ``migrate file:<state>`` -> ``cont``: the guest that was saved goes on serving the session (QEMU resumes
from "postmigrate"), so a miss costs a cold boot + ~1 s of save, not a restore on top.  Restore: the same QEMU command line plus ``-incoming defer`` -> ``migrate-set-capabilities`` ->
``migrate-incoming file:<state>`` -> wait for ``query-migrate`` "completed" -> ``cont``; then connect the
control channel (a new host socket: the socket paths are host-side chardev config, not in the migration
stream) and ``ping`` the agent.  The guest's virtio-serial port still believes the host is connected (that
state is migrated), so the agent, blocked in ``read``, simply gets the next request.  The agent's hello was
consumed before the save; a restored guest never greets again.

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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BootError, HarnessError
from .channel import Channel
from .config import MachineConfig
from .process import Machine
from .snapshot_store import (
    BOOT_LOG,
    MAPPED_RAM,
    META_FILE,
    STATE_FILE,
    STUB_INITRD,
    STUB_KERNEL,
    STUB_KERNEL_BYTES,
    Snapshot,
    SnapshotError,
    SnapshotStore,
    key_inputs,
    snapshot_key,
    stub_boot_files,
)

log = logging.getLogger(__name__)
SAVE_DEADLINE_S = 60.0
RESTORE_DEADLINE_S = 30.0
PING_DEADLINE_S = 10.0
TIMER_PROBE_DEADLINE_S = 3.0


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


def save(session, dest: Path, *, keep_running: bool = False) -> dict:
    """Save ``session`` (a started GuestSession, agent idle) into ``dest``/STATE_FILE.

    ``keep_running``: ``cont`` afterwards (QEMU allows it from "postmigrate") and ping the agent: the session
    goes on serving scenarios; else ``quit`` and close the session.  Returns figures for meta.json.  On a
    failure with ``keep_running``, the guest is resumed if it can be, and the error raised.
    """
    t0 = time.monotonic()
    q = None
    try:
        q = session.machine.qmp()
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
    """A snapshot whose restores come up without a working timer interrupt: deterministic, so discard it.

    Seen on QEMU 10.0.2 TCG: whether a saved state restores with a live tick depends on the moment it was
    saved; a bad one is bad on every restore (sleeps never end, a spinning vCPU thread is never preempted).
    Measured on 2026-11-25: 21 of 30 fresh snapshots were dead, each dead on 3 of 3 restores; a good one
    restored 8 of 8 times.  Likely cause: QEMU's ``vmstate_arm_cpu`` migrates the QEMUTimers of
    ``gt_timer[GTIMER_PHYS]`` and ``[GTIMER_VIRT]`` only; the EL2 timers (CNTHP, CNTHV: a VHE kernel ticks on
    CNTHV) come back unarmed, and a kernel whose next event was due before the save never reprograms them.
    Forcing a reprogram from the guest (clock_settime: clock_was_set() IPIs only the *other* CPUs) did not
    help on this 1-vCPU guest.
    """


@dataclass
class Started:
    """A guest a boot strategy brought up: its running machine and connected control channel, what it reported
    and how long it took.  The session adopts it (:meth:`GuestSession.start`); nothing else sets its fields."""
    machine: object
    channel: Channel
    caps: dict
    timings: dict


def restore(config: MachineConfig, run_dir: Path, snap: Snapshot, *, stubs: bool | None = None) -> Started:
    """A guest of ``config`` started from ``snap``: QEMU with ``-incoming defer``, load, cont, ping, timer probe.

    ``stubs`` (default :func:`stub_boot_files`): pass the snapshot's stub kernel/initrd to QEMU instead of
    the real ones (they are never used on an incoming migration; see the module docstring).  Any failure stops
    what was started and raises SnapshotError (DeadTimerSnapshot when the restored tick is dead).
    """
    t0 = time.monotonic()
    snap.touch()            # before the state file is opened: prune() leaves recently used snapshots alone
    meta = snap.meta()
    cfg = restore_config(config, snap, stub_boot_files() if stubs is None else stubs)
    if cfg.qmp_socket is None or cfg.control_socket is None:
        raise SnapshotError("a restore needs both the QMP and the control socket in the machine config")
    _note(run_dir, f"restored from snapshot {snap.key} ({snap.path}); the serial console of a restored "
                   f"guest starts here; the boot console is {snap.path / BOOT_LOG}")
    machine, channel = Machine(cfg, run_dir), None
    try:
        machine.start(startup_check_s=0.0)
        q = machine.qmp(timeout_s=RESTORE_DEADLINE_S)
        t1 = time.monotonic()
        q.cmd("migrate-set-capabilities", capabilities=MAPPED_RAM)
        q.cmd("migrate-incoming", uri=f"file:{snap.state}")
        _wait_migration(q, RESTORE_DEADLINE_S, f"restoring snapshot {snap.key} (migrate-incoming)")
        t2 = time.monotonic()
        q.cmd("cont")
        channel = Channel(cfg.control_socket)
        channel.connect(PING_DEADLINE_S)
        pong = channel.request("ping", None, PING_DEADLINE_S)
        if not pong.get("pong"):
            raise SnapshotError(f"the restored agent answered ping with {pong!r}")
        try:
            channel.request("timer_probe", None, TIMER_PROBE_DEADLINE_S)
        except HarnessError as e:
            raise DeadTimerSnapshot(
                f"snapshot {snap.key}: the restored guest's timer interrupt is dead (a 20 ms sleep did not end "
                f"in {TIMER_PROBE_DEADLINE_S:.0f} s); QEMU did not re-arm the guest's EL2 timer on this "
                f"restore, the snapshot is discarded") from e
    except BaseException as e:
        if channel is not None:
            channel.close()
        machine.stop()
        if isinstance(e, SnapshotError) or not isinstance(e, Exception):
            raise
        raise SnapshotError(f"restoring snapshot {snap.key} failed: {type(e).__name__}: {e}") from e
    t3 = time.monotonic()
    return Started(machine=machine, channel=channel, caps=dict(meta.get("caps") or {}),
                   timings={"snapshot": snap.key, "qemu_to_qmp_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3),
                            "cont_to_ping_s": round(t3 - t2, 3), "boot_s": round(t3 - t0, 3),
                            "ready_s": round(t3 - t0, 3)})


# ==== warm start ====================================================================================
def _build(session, tmp: Path, inputs: dict) -> None:
    """Cold-boot ``session`` itself, save it into ``tmp`` and let it run on (no restore on a cache miss).

    A BootError propagates (the guest does not boot: a second cold boot would only repeat it).  A failed
    save raises SnapshotError with the session still running if QEMU could resume it.
    """
    session.boot()
    caps, boot_timings = dict(session.caps), dict(session.timings)
    figures = save(session, tmp, keep_running=True)
    with contextlib.suppress(OSError):
        shutil.copyfile(session.run_dir / "console.log", tmp / BOOT_LOG)
    with open(session.config.kernel, "rb") as f:
        (tmp / STUB_KERNEL).write_bytes(f.read(STUB_KERNEL_BYTES))
    (tmp / STUB_INITRD).write_bytes(b"")
    meta = {"key_inputs": inputs, "caps": caps, "boot": boot_timings, "save": figures,
            "boot_run_dir": str(session.run_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


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
            built: list[bool] = []
            snap = store.create(key, lambda tmp: built.append(True) or _build(session, tmp, inputs))
            if built:       # this session was cold-booted and saved, and runs on
                _note(session.run_dir, f"this boot was saved as snapshot {key} ({snap.path})")
                dt = round(time.monotonic() - t0, 3)
                return WarmStart(booted=True, timings={"snapshot": key, "snapshot_created": True, "ready_s": dt,
                                                       "warm_start_s": dt})
        started = restore(session.config, session.run_dir, snap)
        started.timings.update(snapshot_created=False, warm_start_s=round(time.monotonic() - t0, 3))
        return WarmStart(started=started, timings=started.timings)
    except BootError:
        raise
    except (SnapshotError, HarnessError, OSError) as e:
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, DeadTimerSnapshot):
            store.discard(key)
    if session.channel is not None and session.alive():
        try:        # the save failed but the cold-booted guest was resumed: use it
            session.channel.request("ping", None, PING_DEADLINE_S)
            log.warning("saving the snapshot failed; the cold-booted guest goes on: %s", reason)
            _note(session.run_dir, f"saving the snapshot failed ({reason}); the cold-booted guest goes on")
            return WarmStart(booted=True, timings={"snapshot_fallback": reason})
        except HarnessError:
            pass
    log.warning("snapshot restore failed, cold boot instead: %s", reason)
    _note(session.run_dir, f"snapshot restore failed ({reason}); cold boot")
    return WarmStart(cold_boot=True, timings={"snapshot_fallback": reason})
