"""The guest's timer interrupt, per vCPU: the agent's snapshot-related requests (harness/machine/snapshot.py).

QEMU (up to at least 10.0, target/arm/machine.c ``vmstate_arm_cpu``) migrates the QEMUTimers of the EL1
physical and virtual generic timers only; the EL2 ones (CNTHP, CNTHV: a VHE kernel ticks on CNTHV) come back
unarmed.  A vCPU whose EL2 timer held a future deadline when the guest was saved gets no timer interrupt after
the restore, and its kernel, which believes that deadline is still programmed, never reprograms the device:
no tick, no preemption, no timed sleep on that vCPU, for ever.

``timer_probe`` (:func:`probe`): a short timed sleep on every online vCPU, each in a thread pinned to it; the
answer names the vCPUs whose sleep did not end.  When the agent's own vCPU is dead the answer never comes
(its wait is timed too) and the host's deadline says so.

``arm_timers`` (:func:`arm_timers`): the deterministic reproducer.  It leaves a timer deadline programmed on
every vCPU at the moment it answers: a thread pinned to each vCPU that spins (the vCPU stays busy, so its
periodic tick stays armed one tick ahead) or sleeps for ``ms`` milliseconds.  A save taken right after it has
the EL2 timer of every vCPU armed into the future (tests/system/test_snapshot_timers.py).

``timer_list`` (:func:`timer_list`): the text of /proc/timer_list (each CPU's ``expires_next``, whether its
tick is stopped, the clockevent's ``next_event``), kept by the host next to a dead restore's console.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from .. import protocol as P

PROBE_SLEEP_S = 0.02
PROBE_WAIT_S = 1.0            # how long the agent waits for the other vCPUs' sleeps (its own wait is timed too)
ARM_MODES = ("spin", "sleep")
ARM_MAX_MS = 10_000


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> list[int]:
    """The online CPUs (``0-1,3`` style list), else the ones this process may run on."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return sorted(os.sched_getaffinity(0))
    return parse_cpu_list(text)


def parse_cpu_list(text: str) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]`` (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(cpus))


def _pinned(cpu: int, body, started: threading.Event, out: dict) -> threading.Thread:
    """A daemon thread that pins itself to ``cpu`` (sched_setaffinity of the calling thread), sets ``started``
    and runs ``body()``; ``out[cpu]`` is what ``body`` returned (absent while it runs)."""
    def run() -> None:
        os.sched_setaffinity(0, {cpu})
        started.set()
        out[cpu] = body()
    t = threading.Thread(target=run, name=f"smccc-timer-cpu{cpu}", daemon=True)
    t.start()
    return t


def probe(args: dict) -> dict:
    """``{"sleep_s": 0.02, "wait_s": 1.0}``: sleep ``sleep_s`` on every online vCPU at once; answer each vCPU's
    slept time (``cpus``), the ones that had not woken after ``wait_s`` (``dead``) and the largest sleep."""
    sleep_s = float(args.get("sleep_s", PROBE_SLEEP_S))
    wait_s = float(args.get("wait_s", PROBE_WAIT_S))
    if not (0 < sleep_s < wait_s <= 30):
        raise P.ProtocolError(f"timer_probe needs 0 < sleep_s < wait_s <= 30, got {sleep_s!r}, {wait_s!r}")
    cpus, slept = online_cpus(), {}

    def nap() -> float:
        t = time.monotonic()
        time.sleep(sleep_s)
        return round(time.monotonic() - t, 6)
    threads = [_pinned(c, nap, threading.Event(), slept) for c in cpus]
    stop = time.monotonic() + wait_s
    for t in threads:
        t.join(max(0.0, stop - time.monotonic()))
    dead = [c for c in cpus if c not in slept]
    return {"cpus": {str(c): slept.get(c) for c in cpus}, "dead": dead,
            "slept_s": max((v for v in slept.values()), default=None)}


SPIN_CODE = (
    "import json, os, sys, time\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "os.write(1, b'ready\\n')\n"
    "until = float(os.read(0, 64))\n"
    "gap, last = 0.0, time.monotonic()\n"
    "while last < until:\n"
    "    now = time.monotonic()\n"
    "    gap, last = max(gap, now - last), now\n"
    "os.write(1, json.dumps({'cpu': int(sys.argv[1]), 'max_gap_s': round(gap, 6)}).encode() + b'\\n')\n")
SPINNERS_PER_CPU = 2


def _spawn_spinner(cpu: int) -> tuple[int, int, int]:
    """A ``python3 -S`` child pinned to ``cpu``, ready to spin: (pid, its stdin, its stdout)."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    try:
        pid = os.posix_spawn(sys.executable, [sys.executable, "-S", "-c", SPIN_CODE, str(cpu)], dict(os.environ),
                             file_actions=[(os.POSIX_SPAWN_DUP2, to_child, 0), (os.POSIX_SPAWN_DUP2, from_child, 1),
                                           (os.POSIX_SPAWN_CLOSE, from_parent), (os.POSIX_SPAWN_CLOSE, to_parent)])
    finally:
        os.close(to_child)
        os.close(from_child)
    line = os.read(to_parent, 64)
    if line != b"ready\n":
        raise RuntimeError(f"the spinner for vCPU {cpu} did not start (it wrote {line!r})")
    return pid, from_parent, to_parent


def _collect(pid: int, fd: int, key: str) -> None:
    try:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
        if data:
            SPINNERS["results"][key] = json.loads(data)
    finally:
        os.close(fd)
        os.waitpid(pid, 0)


def arm_timers(args: dict) -> dict:
    """``{"mode": "spin"|"sleep", "ms": 500}``: leave a timer deadline programmed on every online vCPU.

    ``spin``: a process pinned to each vCPU spins (reads the clock) for ``ms`` ms: the vCPU is busy, never
    idle, so its periodic tick stays armed one tick ahead and nothing else reprograms the device (an idle
    vCPU that stops its tick does).  ``sleep``: a thread pinned to each vCPU sleeps ``ms`` ms.  Answers once
    every vCPU spins or sleeps.  Both end by themselves (a spin reads the counter, so it ends even on a vCPU
    whose timer interrupt is dead).
    """
    mode, ms = args.get("mode", "spin"), args.get("ms", 500)
    if mode not in ARM_MODES:
        raise P.ProtocolError(f"arm_timers mode must be one of {ARM_MODES}, got {mode!r}")
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 < ms <= ARM_MAX_MS:
        raise P.ProtocolError(f"arm_timers ms must be an integer in 1..{ARM_MAX_MS}, got {ms!r}")
    cpus = online_cpus()
    if mode == "spin":
        children = [(c, k, *_spawn_spinner(c)) for c in cpus for k in range(SPINNERS_PER_CPU)]
        until = time.monotonic() + ms / 1000
        SPINNERS.clear()
        SPINNERS.update({"until": until, "results": {}, "keys": [f"{c}.{k}" for c, k, *_ in children]})
        for c, k, pid, stdin, stdout in children:
            os.write(stdin, f"{until!r}\n".encode())
            os.close(stdin)
            threading.Thread(target=_collect, args=(pid, stdout, f"{c}.{k}"), daemon=True).start()
        return {"cpus": cpus, "mode": mode, "ms": ms, "ready": True, "until": until}
    events, until = [], time.monotonic() + ms / 1000
    SLEEPERS.clear()
    SLEEPERS.update({"until": until, "woke": {}})

    def sleep() -> float:
        time.sleep(max(0.0, until - time.monotonic()))
        woke = time.monotonic()
        SLEEPERS["woke"][threading.current_thread().name] = woke
        return woke
    for c in cpus:
        events.append(threading.Event())
        _pinned(c, sleep, events[-1], {})
    ready = all(e.wait(2.0) for e in events)
    return {"cpus": cpus, "mode": mode, "ms": ms, "ready": ready, "until": until}


SLEEPERS: dict = {}     # the last arm_timers sleep: its deadline and when each vCPU's sleeper woke
SPINNERS: dict = {}     # the last arm_timers spin: its end and each spinner's longest time off its vCPU


def timer_report(args: dict) -> dict:
    """What the last ``arm_timers`` saw.  ``sleep``: how late each vCPU's sleeper woke (``late_s``; None: still
    asleep).  ``spin``: each spinner's longest gap between two clock reads (``max_gap_s``, per ``CPU.N``; None:
    still spinning): two spinners share each vCPU, so with a live tick each gets the vCPU every few ms; with a
    dead one, the first keeps it to the end and the other's gap is the whole time."""
    if not SLEEPERS and not SPINNERS:
        raise P.ProtocolError("timer_report: no arm_timers since this agent started")
    out: dict = {"now": time.monotonic()}
    if SLEEPERS:
        late = {n.rsplit("cpu", 1)[-1]: round(w - SLEEPERS["until"], 6) for n, w in SLEEPERS["woke"].items()}
        out["late_s"] = {str(c): late.get(str(c)) for c in online_cpus()}
    if SPINNERS:
        res = SPINNERS["results"]
        out["spin_until"] = SPINNERS["until"]
        out["max_gap_s"] = {k: (res[k]["max_gap_s"] if k in res else None) for k in SPINNERS["keys"]}
    return out


def timer_list(path: str = "/proc/timer_list") -> dict:
    """The text of /proc/timer_list (or why it could not be read)."""
    try:
        with open(path) as f:
            return {"text": f.read()}
    except OSError as e:
        return {"text": "", "error": f"{path}: {e}"}
