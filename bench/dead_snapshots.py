"""Dead-of-N: fresh snapshots of a booted guest, each restored once; how many restore without a timer tick.

    python3 -m bench.dead_snapshots --n 30                                 # the installed QEMU
    python3 -m bench.dead_snapshots --n 30 --qemu-bin "$(./smccc-harness qemu build | tail -n 1)"
    python3 -m bench.dead_snapshots --n 10 --reproducer spin:500          # arm a timer on every vCPU first
    python3 -m bench.dead_snapshots --n 2 --destroy-nested                # then destroy a nested VM in it

Each round: cold-boot a guest (no snapshot cache involved), save it with harness/machine/snapshot.py ``save``
(QMP ``stop``, ``migrate`` to a file with mapped-ram, ``quit``), restore that state once in a new QEMU with
``restore`` (``migrate-incoming``, ``cont``, ping, then the agent's timer probe) and count the round dead when
the restored guest's timer interrupt is dead (``DeadTimerSnapshot``).  This is the QEMU EL2-timer migration
bug of docs/upstream/qemu-el2-timer-migration.md: with the stock QEMU 10.0 most rounds are dead, with a QEMU
built by ``smccc-harness qemu build`` (``--version`` shows ``smccc-fix:el2-timers``) none should be.

``--reproducer spin:MS|sleep:MS``: right before each save, the agent's ``arm_timers`` request leaves a timer
deadline armed on every vCPU (harness/guest/timers.py), when this checkout's agent and snapshot.save have it.

``--destroy-nested``: after each restore, live or dead (the round's own restore: load, ping, the agent's timer
probe, the guest kept either way), a process in the guest runs a nested (HAS_EL2) scenario and then closes the
VM (the agent itself never does: harness/guest/runner.py GRAVEYARD) and says how long the close took, or the
round records that the guest stopped answering (the lockup docs/platform.md describes).
``--destroy-nested-cold``: the same once in a cold-booted guest first, for comparison.

Results are printed and written to ``runs/bench-dead-*/dead_snapshots.json``.  Nothing here asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.run import loadavg, out
from harness import paths
from harness import protocol as P
from harness.errors import HarnessError
from harness.machine import snapshot
from harness.machine.channel import Channel
from harness.machine.config import sock_dir
from harness.machine.guests import GuestOptions, guest_assets, new_session
from harness.machine.process import Machine
from harness.machine.snapshot_store import MAPPED_RAM, META_FILE, Snapshot, qemu_version

# A process of its own in the guest: run one nested scenario (its VM is left open by the runner, as always),
# then close that VM and time the close.  argv[1] is the validated scenario as JSON.
DESTROY_NESTED = """\
import json, os, sys, time
from harness.guest.runner import GRAVEYARD, run_scenario
from harness.guest.vm import install_kick_handler
install_kick_handler()
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
r = run_scenario(json.loads(sys.argv[1]), fd)
n = len(GRAVEYARD)
t = time.monotonic()
while GRAVEYARD:
    GRAVEYARD.pop().close()
print(json.dumps({"outcome": r.get("outcome"), "vms": n, "close_s": round(time.monotonic() - t, 3)}))
"""
DESTROY_DEADLINE_S = 120.0
PROBE_DEADLINE_S = 3.0


def restore_any(cfg, run_dir: Path, state: Path, probe_sleep_s: float | None = None):
    """Load ``state`` into a new QEMU and ping the agent, like snapshot.restore, but keep the guest whether its
    tick is alive or not: (machine, channel, alive).  ``--destroy-nested`` also tries a dead-tick restore.
    ``probe_sleep_s``: the agent's timer probe sleeps this long (default: the agent's 20 ms)."""
    m = Machine(dataclasses.replace(cfg, incoming="defer"), run_dir)
    ch = None
    try:
        m.start(startup_check_s=0.0)
        q = m.qmp(timeout_s=30.0)
        q.cmd("migrate-set-capabilities", capabilities=MAPPED_RAM)
        q.cmd("migrate-incoming", uri=f"file:{state / 'state.ram'}")
        stop = time.monotonic() + 30.0
        while (st := q.cmd("query-migrate").get("status")) != "completed":
            if st in ("failed", "cancelled") or time.monotonic() > stop:
                raise HarnessError(f"migrate-incoming {st}")
            time.sleep(0.01)
        q.cmd("cont")
        ch = Channel(cfg.control_socket)
        ch.connect(10.0)
        ch.request("ping", None, 10.0)
        args = None if probe_sleep_s is None else {"sleep_s": probe_sleep_s, "wait_s": probe_sleep_s + 2.0}
        try:
            r = ch.request("timer_probe", args, PROBE_DEADLINE_S + (probe_sleep_s or 0.0) + 2.0)
            alive = not r.get("dead")
        except HarnessError:
            alive = False
        return m, ch, alive
    except BaseException:
        if ch is not None:
            ch.close()
        m.stop()
        raise


def reproducer(text: str | None, settle_s: float = 0.0):
    """``spin:MS`` / ``sleep:MS`` -> ``prepare(session)`` for snapshot.save (then ``settle_s`` of waiting, so
    that the guest is idle with its tick stopped when it is saved); None -> None."""
    if not text:
        return None
    kind, _, ms = text.partition(":")
    if kind not in ("spin", "sleep") or not ms.isdigit():
        raise SystemExit(f"--reproducer {text!r}: spin:MS or sleep:MS")
    if "prepare" not in inspect.signature(snapshot.save).parameters:
        raise SystemExit("--reproducer: this checkout's snapshot.save has no prepare hook (no arm_timers reproducer)")
    def prepare(session) -> None:
        session.request("arm_timers", {"mode": kind, "ms": int(ms)}, 10.0)
        time.sleep(settle_s)
    return prepare


def nested_spec() -> dict:
    from harness.images.payloads import get_payload
    from harness.model.scenarios import scenario
    hello = get_payload("el2_hello")
    return P.validate_scenario(scenario("dead_bench_el2_hello", hello, el2=True))


def destroy_nested(request, spec: dict) -> dict:
    """Run DESTROY_NESTED in the guest through the agent's ``exec``; what it printed, or why there is nothing."""
    t0 = time.monotonic()
    try:
        r = request("exec", {"argv": ["/usr/bin/python3", "-S", "-c", DESTROY_NESTED, json.dumps(spec)],
                             "timeout_s": DESTROY_DEADLINE_S - 10}, DESTROY_DEADLINE_S)
    except HarnessError as e:
        return {"answered": False, "error": f"{type(e).__name__}: {str(e)[:300]}",
                "waited_s": round(time.monotonic() - t0, 1)}
    res = {"answered": True, "rc": r.get("rc", r.get("returncode")), "wall_s": round(time.monotonic() - t0, 2)}
    try:
        res.update(json.loads((r.get("stdout") or "").strip().splitlines()[-1]))
    except (ValueError, IndexError):
        res["stdout"], res["stderr"] = (r.get("stdout") or "")[-300:], (r.get("stderr") or "")[-300:]
    return res


def one_round(i: int, opts: GuestOptions, assets, prepare, spec: dict | None,
              probe_sleep_s: float | None = None, own_restore: bool = False) -> dict:
    """Cold boot, save, restore once: {"dead": bool, ...}."""
    t0 = time.monotonic()
    s = new_session(opts, paths.new_run_dir("bench-dead"), assets=assets, progress=lambda m: None)
    state = Path(tempfile.mkdtemp(prefix=".bench-dead-", dir=paths.cache_dir()))
    rec: dict = {"round": i, "boot_run_dir": str(s.run_dir)}
    started = None
    try:
        s.start()
        t1 = time.monotonic()
        kw = {"prepare": prepare} if prepare is not None else {}
        rec["save"] = snapshot.save(s, state, keep_running=False, **kw)
        (state / META_FILE).write_text("{}\n")
        run_dir = paths.new_run_dir("bench-dead-restore")
        socks = sock_dir(run_dir)
        cfg = dataclasses.replace(s.config, control_socket=socks / "ctl.sock", qmp_socket=socks / "qmp.sock")
        rec["restore_run_dir"] = str(run_dir)
        t2 = time.monotonic()
        if own_restore or spec is not None or probe_sleep_s is not None:   # our own restore: keeps a dead guest
            m, ch, alive = restore_any(cfg, run_dir, state, probe_sleep_s)
            started = snapshot.Started(machine=m, channel=ch, caps={}, timings={})
            rec["dead"] = not alive
            if spec is not None:
                rec["destroy_nested"] = destroy_nested(ch.request, spec)
        else:
            try:
                started = snapshot.restore(cfg, run_dir, Snapshot(f"bench-{i}", state), stubs=False)
                rec["dead"] = False
                rec["restore"] = started.timings
            except snapshot.DeadTimerSnapshot as e:
                rec["dead"] = True
                rec["why"] = str(e).splitlines()[0][:200]
        rec.update(boot_s=round(t1 - t0, 2), save_s=round(t2 - t1, 2), restore_s=round(time.monotonic() - t2, 2))
    finally:
        if started is not None:
            started.channel.close()
            started.machine.stop()
        s.close()
        shutil.rmtree(state, ignore_errors=True)
    return rec


def cold_destroy(opts: GuestOptions, assets, spec: dict) -> dict:
    """The same nested destroy in a cold-booted guest (no restore): the comparison figure."""
    s = new_session(opts, paths.new_run_dir("bench-dead-cold"), assets=assets, progress=lambda m: None)
    try:
        s.start()
        return {"run_dir": str(s.run_dir), **destroy_nested(s.request, spec)}
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="fresh snapshots (rounds)")
    ap.add_argument("--qemu-bin", default="qemu-system-aarch64")
    ap.add_argument("--kernel", default="default")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--reproducer", default=None, metavar="spin:MS|sleep:MS")
    ap.add_argument("--settle", type=float, default=0.0, metavar="S",
                    help="with --reproducer: wait S s between arm_timers and the save")
    ap.add_argument("--probe-sleep", type=float, default=None, metavar="S",
                    help="the restored guest's timer probe sleeps S s (default 0.02); with --reproducer sleep:MS "
                         "and S > MS/1000 the probe itself cannot reprogram the timer earlier than the saved deadline")
    ap.add_argument("--own-restore", action="store_true",
                    help="restore in the order the harness used until 2026-12-03 (cont, then connect and ping: "
                         "the guest's first wake-up can come after its timer deadline) instead of snapshot.restore")
    ap.add_argument("--destroy-nested", action="store_true", help="destroy a nested VM in each restore")
    ap.add_argument("--destroy-nested-cold", action="store_true", help="and once in a cold-booted guest")
    args = ap.parse_args(argv)
    opts = GuestOptions(kernel=args.kernel, accel="tcg", qemu_bin=args.qemu_bin, smp=args.smp, snapshots=False)
    assets = guest_assets(opts, progress=lambda m: None)
    prepare = reproducer(args.reproducer, args.settle)
    spec = nested_spec() if (args.destroy_nested or args.destroy_nested_cold) else None
    version = qemu_version(args.qemu_bin)
    own = args.own_restore or args.destroy_nested or args.probe_sleep is not None
    out(f"dead snapshots: {args.n} rounds, {version} ({args.qemu_bin}), kernel {assets.kernel.version}, "
        f"smp {args.smp}, restore {'cont-then-connect' if own else 'snapshot.restore'}, "
        f"reproducer {args.reproducer or 'none'} (settle {args.settle} s), probe sleep {args.probe_sleep or 0.02} s; "
        f"load {loadavg()}")
    rounds, t0 = [], time.monotonic()
    cold = cold_destroy(opts, assets, spec) if args.destroy_nested_cold else None
    if cold is not None:
        out(f"  cold-booted guest, nested VM destroy: {json.dumps(cold)}")
    for i in range(args.n):
        try:
            rec = one_round(i, opts, assets, prepare, spec if args.destroy_nested else None, args.probe_sleep,
                            args.own_restore)
        except HarnessError as e:
            rec = {"round": i, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        rounds.append(rec)
        state = "error" if "error" in rec else ("DEAD" if rec["dead"] else "live")
        extra = f"  destroy {json.dumps(rec['destroy_nested'])}" if "destroy_nested" in rec else ""
        out(f"  {i + 1:3d}/{args.n}: {state:5s} boot {rec.get('boot_s', '-')} s, save {rec.get('save_s', '-')} s, "
            f"restore {rec.get('restore_s', '-')} s{extra}")
    done = [r for r in rounds if "error" not in r]
    dead = sum(r["dead"] for r in done)
    out(f"dead: {dead} of {len(done)} fresh snapshots ({len(rounds) - len(done)} rounds failed otherwise) with "
        f"{version}; {time.monotonic() - t0:.0f} s; load {loadavg()}")
    result = {"qemu_bin": args.qemu_bin, "qemu_version": version, "kernel": assets.kernel.version, "smp": args.smp,
              "reproducer": args.reproducer, "settle_s": args.settle, "own_restore": own,
              "probe_sleep_s": args.probe_sleep, "n": args.n, "dead": dead, "measured": len(done), "rounds": rounds,
              "cold_destroy": cold, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    d = paths.new_run_dir("bench-dead")
    (d / "dead_snapshots.json").write_text(json.dumps(result, indent=1) + "\n")
    out(f"results: {d / 'dead_snapshots.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
