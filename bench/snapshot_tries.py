"""smccc-harness benchmark: how many saves a good (live-restoring) snapshot takes, and what a save costs.

    python3 -m bench.snapshot_tries                      # both sections below, defaults
    python3 -m bench.snapshot_tries --builds 10          # 10 fresh snapshot builds (cold boot + validated save)
    python3 -m bench.snapshot_tries --builds 0 --moments none,spin:500,sleep:500,idle:2 --saves 10

``moments``: one cold-booted guest, saved ``--saves`` times per save moment, each save restored once in a
second QEMU and its timer probed on every vCPU (harness/machine/snapshot.py check_save): dead-of-N per moment.
A moment is ``none`` (save at once), ``idle:S`` (the host waits S seconds first), ``spin:MS`` / ``sleep:MS``
(the agent's ``arm_timers`` request first: a thread per vCPU spinning or sleeping MS ms; ``spin`` is the
reproducer of the QEMU EL2-timer migration gap, tests/system/test_snapshot_timers.py).

``builds``: fresh snapshot builds through the harness's own warm start (harness/machine/snapshot.py
warm_start into an empty store): the tries each build took (meta.json ``save_tries``), the time of the first
save alone (what a save cost before the check) and of the whole validated save, and a restore of each built
snapshot (the first rerun: warm or not).

Results are printed and written to ``runs/bench-snapshot-*/snapshot_tries.json``.  Timing lives here, never
in an asserting test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.run import loadavg, out
from harness import paths
from harness.machine import snapshot, snapshot_store


def parse_moment(text: str):
    """``none`` | ``idle:S`` | ``spin:MS`` | ``sleep:MS`` -> ``prepare(session)`` for snapshot.save (or None)."""
    kind, _, arg = text.partition(":")
    if kind == "none" and not arg:
        return None
    if kind == "idle" and arg:
        seconds = float(arg)
        return lambda s: time.sleep(seconds)
    if kind in ("spin", "sleep") and arg.isdigit():
        ms = int(arg)
        return lambda s: s.request("arm_timers", {"mode": kind, "ms": ms}, 10.0)
    raise SystemExit(f"bad save moment {text!r}: none, idle:SECONDS, spin:MS or sleep:MS")


def summary(tries: list[int]) -> dict:
    return {"n": len(tries), "mean": round(statistics.mean(tries), 2) if tries else None,
            "max": max(tries, default=None), "tries": tries}


# ---- moments: one guest, many checked saves --------------------------------------------------------------
def section_moments(a, moments: list[str], saves: int, smp: int, results: dict) -> None:
    out(f"== save moments: {saves} saves each of one cold-booted guest (-smp {smp}), each restored once in a "
        "second QEMU and probed on every vCPU ==")
    s = a.session("bench-snapmoments", snapshots=False, smp=smp)
    rows = {}
    tmp = Path(tempfile.mkdtemp(prefix="smccc-snapmoments-"))
    try:
        s.boot()
        with open(s.config.kernel, "rb") as f:
            (tmp / snapshot_store.STUB_KERNEL).write_bytes(f.read(snapshot_store.STUB_KERNEL_BYTES))
        (tmp / snapshot_store.STUB_INITRD).write_bytes(b"")
        saved = snapshot_store.Snapshot("bench", tmp)
        for m in moments:
            prepare, dead, failed, save_s, check_s, reasons = parse_moment(m), 0, 0, [], [], []
            for i in range(saves):
                if m.startswith(("spin", "sleep")):     # the previous moment's threads are done
                    time.sleep(int(m.split(":")[1]) / 1000 + 0.2)
                fig = snapshot.save(s, tmp, keep_running=True, prepare=prepare)
                save_s.append(fig["save_s"])
                t0 = time.monotonic()
                try:
                    snapshot.check_save(s.config, s.run_dir / f"check-{m.replace(':', '-')}-{i}", saved)
                except snapshot.DeadTimerSnapshot as e:
                    dead += 1
                    reasons.append(str(e).split(": ", 1)[-1][:80])
                except snapshot_store.SnapshotError as e:      # not the timer: counted apart, named
                    failed += 1
                    reasons.append(f"failed: {e}"[:160])
                check_s.append(time.monotonic() - t0)
            rows[m] = {"saves": saves, "dead": dead, "failed": failed, "save_s_median": round(statistics.median(save_s), 3),
                       "check_s_median": round(statistics.median(check_s), 3), "reasons": sorted(set(reasons))}
            out(f"  {m:>12}: dead {dead} of {saves}" + (f", {failed} failed otherwise" if failed else "") + f"; save {rows[m]['save_s_median']:.2f} s, check "
                f"{rows[m]['check_s_median']:.2f} s (medians)" + "".join(f"\n      {r}" for r in rows[m]["reasons"]))
    finally:
        s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["moments"] = {"smp": smp, "run_dir": str(s.run_dir), "rows": rows}


# ---- the reproducer: dead-of-N --------------------------------------------------------------------------
def section_reproducer(a, rounds: int, smp: int, results: dict) -> None:
    out(f"== reproducer (harness/machine/snapshot.py timer_gap_round): {rounds} saves of one guest (-smp {smp}) "
        f"with two spinners on every vCPU ({snapshot.GAP_SPIN_MS} ms), each restored and left quiet "
        f"{snapshot.GAP_QUIET_S:g} s ==")
    s = a.session("bench-reproducer", snapshots=False, smp=smp)
    tmp = Path(tempfile.mkdtemp(prefix="smccc-reproducer-"))
    rows = []
    try:
        s.boot()
        for i in range(rounds):
            time.sleep(snapshot.GAP_SPIN_MS / 1000 + 0.2)         # the previous round's spinners are done
            r = snapshot.timer_gap_round(s, tmp, s.run_dir / f"round-{i}")
            rows.append(r)
            out(f"  round {i}: {'fired' if r['fired'] else 'DEAD'}; longest gap per spinner {r['max_gap_s']}; probe "
                f"{'live' if r['probe'] == 'live' else 'dead'}")
    finally:
        s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    dead = sum(not r["fired"] for r in rows)
    results["reproducer"] = {"smp": smp, "rounds": rows, "dead": dead, "of": len(rows), "run_dir": str(s.run_dir)}
    out(f"  dead: {dead} of {len(rows)} (a dead round: a spinner never got its vCPU back while the other spun: no tick); tick dead "
        f"afterwards (probe): {sum(r['probe'] != 'live' for r in rows)} of {len(rows)}")


# ---- builds: fresh snapshots through warm_start ----------------------------------------------------------
def section_builds(a, n: int, smp: int, results: dict) -> None:
    out(f"== {n} fresh snapshot builds (warm_start into an empty store: cold boot + validated save), -smp {smp}, "
        "then one restore of each ==")
    rows = []
    for i in range(n):
        root = Path(tempfile.mkdtemp(prefix="smccc-snapbuild-"))
        store = snapshot_store.SnapshotStore(root)
        try:
            s = a.session("bench-snapbuild", snapshots=True, smp=smp)
            t0 = time.monotonic()
            try:
                s.start(store)
                t_start = time.monotonic() - t0
                timings = dict(s.timings)
            finally:
                s.close()
            snap = store.lookup(timings.get("snapshot", "")) if timings.get("snapshot") else None
            meta = snap.meta() if snap is not None else {}
            row = {"tries": meta.get("save_tries", timings.get("snapshot_save_tries")),
                   "kept": snap is not None, "first_save_s": None, "save_total_s": meta.get("save_total_s"),
                   "start_s": round(t_start, 3), "boot_s": (meta.get("boot") or timings).get("ready_s"),
                   "fallback": timings.get("snapshot_fallback"), "rerun": None}
            if meta.get("tries"):
                first = meta["tries"][0]
                row["first_save_s"] = round(first["save"]["save_s"] + first["save"]["resume_s"], 3)
                row["check_s"] = [t["check"].get("ready_s") for t in meta["tries"] if t["live"]]
            if snap is not None:            # the first rerun: a restore of what was just built
                r = a.session("bench-snaprerun", snapshots=True, smp=smp)
                try:
                    r.start(store)
                    row["rerun"] = "warm" if r.timings.get("snapshot_created") is False and not \
                        r.timings.get("snapshot_fallback") else f"cold ({r.timings.get('snapshot_fallback')})"
                    row["rerun_ready_s"] = r.timings.get("ready_s")
                finally:
                    r.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows.append(row)
        out(f"  build {i}: tries {row['tries']}, kept {row['kept']}, first save {row['first_save_s']} s, "
            f"validated save total {row['save_total_s']} s, start {row['start_s']} s, rerun {row['rerun']}"
            + (f", fallback {row['fallback']}" if row["fallback"] else ""))
    tries = [r["tries"] for r in rows if r["kept"] and r["tries"]]
    firsts = [r["first_save_s"] for r in rows if r["first_save_s"]]
    totals = [r["save_total_s"] for r in rows if r["save_total_s"]]
    agg = {"builds": n, "kept": sum(r["kept"] for r in rows), "tries": summary(tries),
           "first_save_s_median": round(statistics.median(firsts), 3) if firsts else None,
           "save_total_s_median": round(statistics.median(totals), 3) if totals else None,
           "save_total_s_max": max(totals, default=None),
           "reruns_warm": sum(r["rerun"] == "warm" for r in rows)}
    results["builds"] = {"rows": rows, **agg}
    out(f"  kept {agg['kept']} of {n}; tries per kept snapshot: mean {agg['tries']['mean']}, max "
        f"{agg['tries']['max']}; one save {agg['first_save_s_median']} s, validated save {agg['save_total_s_median']}"
        f" s (medians; max {agg['save_total_s_max']} s); first rerun warm {agg['reruns_warm']} of {agg['kept']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.snapshot_tries", description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="default")
    ap.add_argument("--qemu-bin", default="qemu-system-aarch64")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--builds", type=int, default=10, help="fresh snapshot builds (0: none)")
    ap.add_argument("--moments", default="", help="comma-separated save moments (none, idle:S, spin:MS, sleep:MS)")
    ap.add_argument("--saves", type=int, default=10, help="saves per moment")
    ap.add_argument("--reproducer", type=int, default=0, help="rounds of the reproducer (dead-of-N; 0: none)")
    args = ap.parse_args(argv)
    moments = [m for m in args.moments.split(",") if m]
    for m in moments:
        parse_moment(m)
    import dataclasses

    from bench.run import Assets
    a = Assets(args.kernel)
    a.opts = dataclasses.replace(a.opts, qemu_bin=args.qemu_bin)
    qv = snapshot_store.qemu_version(args.qemu_bin)
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "qemu": qv,
                     "qemu_fixes": sorted(snapshot_store.qemu_fixes(qv)), "kernel": a.kernel.version,
                     "load_before": loadavg()}
    out(f"{qv}; fixes {results['qemu_fixes'] or 'none'}; kernel {a.kernel.version}; load {loadavg()}")
    t0 = time.monotonic()
    if moments:
        section_moments(a, moments, args.saves, args.smp, results)
    if args.reproducer:
        section_reproducer(a, args.reproducer, args.smp, results)
    if args.builds:
        section_builds(a, args.builds, args.smp, results)
    results["load_after"], results["total_s"] = loadavg(), round(time.monotonic() - t0, 1)
    d = paths.new_run_dir("bench-snapshot")
    (d / "snapshot_tries.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    out(f"load after {loadavg()}; took {results['total_s']:.0f} s; results: {d / 'snapshot_tries.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
