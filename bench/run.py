"""smccc-harness benchmark: where the time of an edit-test loop goes, cold and warm.

    python3 -m bench.run                 # everything (~10-15 min on a 2-core TCG host)
    python3 -m bench.run --quick         # fewer repetitions, no suite runs (~2 min)
    python3 -m bench.run --only cold,warm,latency,naive,suite,process,experiments

Prints, for a cold boot and a warm start (snapshot restore): QEMU start -> first console byte -> kernel ready
(/init's "smccc-init:" line) -> agent ready (banner) -> channel hello -> first scenario result; per-scenario
latency (min/median/max) of EL1 and nested-EL2 scenarios in one guest; the naive way (one fresh cold boot
per scenario) with the ratio; the whole default suite (a bare ``pytest``, harness/plugin/tiers.py) with ``-n 1`` and
``-n 2`` (``--suite-ci``: also the CI suite, ``-m 'not slow'``); the initramfs size; a few
experiments (-smp 2, restore with the real -kernel/-initrd).  Results also go to ``runs/bench-*/bench.json``.
Timing lives here, never in asserting tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import paths
from harness import protocol as P
from harness.machine.channel import Channel
from harness.machine.process import Machine
from harness.machine.session import READY_RE, GuestSession
from harness.model.results import ScenarioResult

INIT_RE = re.compile(r"smccc-init: /init started at uptime ([0-9.]+) s")
SECTIONS = ("cold", "warm", "process", "latency", "naive", "suite", "experiments")


# ---- helpers -------------------------------------------------------------------------------------------
def out(line: str = "") -> None:
    print(line, flush=True)


def stats(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"min {min(xs) * 1000:7.1f}  median {statistics.median(xs) * 1000:7.1f}  max {max(xs) * 1000:7.1f} ms"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


class Assets:
    def __init__(self, kernel_spec: str):
        from harness.machine.guests import GuestOptions, guest_assets
        self.opts = GuestOptions(kernel=kernel_spec, accel="tcg")
        self.assets = guest_assets(self.opts, progress=lambda m: None)
        self.kernel, self.initrd = self.assets.kernel, self.assets.initrd

    def session(self, prefix: str, *, snapshots: bool, smp: int = 1) -> GuestSession:
        from harness.machine.guests import new_session
        return new_session(dataclasses.replace(self.opts, snapshots=snapshots, smp=smp), paths.new_run_dir(prefix),
                           assets=self.assets)


_SCENARIOS: list = []


def scenarios():
    """(label, el, spec, payload): the EL1 and nested-EL2 scenarios timed by this bench (built once)."""
    if not _SCENARIOS:
        _SCENARIOS.extend(_build_scenarios())
    return _SCENARIOS


def _build_scenarios():
    from harness.images.payloads import get_payload
    from harness.model import payload_abi as abi
    from harness.model.scenarios import PSCI_FWD, scenario
    pv, calls, hello = get_payload("psci_version"), get_payload("smccc_calls"), get_payload("el2_hello")
    smc = abi.encode_call_table([("smc", [0x8400_0000, 1, 2, 3])])
    hvc = abi.encode_call_table([("hvc", [0x8400_0000, 1, 2, 3])])
    return [
        ("el1 psci_version fwd (hvc+smc)", "EL1", scenario("b_el1_psci", pv, filters=PSCI_FWD), pv),
        ("el1 smccc_calls hvc fwd", "EL1", scenario("b_el1_calls", calls, filters=PSCI_FWD, params=hvc), calls),
        ("el2 el2_hello (nested)", "EL2", scenario("b_el2_hello", hello, el2=True), hello),
        ("el2 smccc_calls smc fwd (nested)", "EL2",
         scenario("b_el2_calls", calls, filters=PSCI_FWD, el2=True, params=smc), calls),
    ]


# ---- cold boot, phase by phase ------------------------------------------------------------------------
def cold_phases(a: Assets, smp: int = 1) -> dict:
    """One cold boot with host timestamps of every phase: GuestSession.boot's steps, done here with a Machine and
    a Channel of our own (the session only lends its config and run directory; nothing of it is set)."""
    s = a.session("bench-cold", snapshots=False, smp=smp)
    _, _, spec, payload = scenarios()[0]
    t0 = time.monotonic()
    m, ch = Machine(s.config, s.run_dir), None
    try:
        m.start(startup_check_s=0.0)
        stop = t0 + 60
        while not m.console.text and time.monotonic() < stop:
            m.console.drain(timeout=0.002, max_s=0.0)
        t_byte = time.monotonic()
        mi = m.console.expect(INIT_RE, s.boot_deadline_s)
        t_init = time.monotonic()
        mr = m.console.expect(READY_RE, s.boot_deadline_s)
        t_ready = time.monotonic()
        caps = json.loads(mr.group(1))
        ch = Channel(s.config.control_socket)
        ch.connect(10.0)
        ch.wait_hello(15.0)
        t_hello = time.monotonic()
        spec = P.validate_scenario(spec)
        r = ScenarioResult(raw=ch.request("run", spec, spec["deadline_s"] + 30.0), payload=payload)
        t_result = time.monotonic()
        assert r.outcome == "done", r.describe()
    finally:
        if ch is not None:
            ch.close()
        m.stop()
        s.close()
    return {"first_byte": t_byte - t0, "kernel_ready": t_init - t0, "guest_uptime_at_init": float(mi.group(1)),
            "agent_ready": t_ready - t0, "hello": t_hello - t0, "first_result": t_result - t0,
            "agent_start_s": caps.get("agent_start_s")}


def section_cold(a: Assets, n: int, results: dict) -> None:
    out(f"== cold boot (no snapshot), {n} runs; seconds from QEMU start ==")
    runs = [cold_phases(a) for _ in range(n)]
    results["cold"] = runs
    keys = ("first_byte", "kernel_ready", "agent_ready", "hello", "first_result")
    out("  run  " + "  ".join(f"{k:>13}" for k in keys) + "   guest uptime at /init")
    for i, r in enumerate(runs):
        out(f"  {i:>3}  " + "  ".join(f"{r[k]:13.3f}" for k in keys) + f"   {r['guest_uptime_at_init']:.2f}")
    out("  median " + "  ".join(f"{statistics.median(r[k] for r in runs):12.3f}" for k in keys))


# ---- warm start ----------------------------------------------------------------------------------------
def warm_figures(t: dict, agent_ready: float, first_result: float) -> dict:
    """One warm start's figures from its session timings.  ``qmp``/``loaded`` are None when nothing was
    restored: the snapshot was built by this start (``created``: a cold boot + save, as on a new machine), or
    the restore failed and the session booted cold (``fallback``: the reason, from ``snapshot_fallback``)."""
    restored = "qemu_to_qmp_s" in t and "load_s" in t and not t.get("snapshot_fallback")
    fallback = t.get("snapshot_fallback") or None
    return {"qmp": t["qemu_to_qmp_s"] if restored else None,
            "loaded": t["qemu_to_qmp_s"] + t["load_s"] if restored else None,
            "agent_ready": agent_ready, "first_result": first_result,
            "created": bool(t.get("snapshot_created")) and not fallback, "fallback": fallback}


def warm_phases(a: Assets) -> dict:
    s = a.session("bench-warm", snapshots=True)
    _, _, spec, payload = scenarios()[0]
    t0 = time.monotonic()
    try:
        s.start()
        t_ready = time.monotonic()
        r = s.run(spec, payload=payload)
        t_result = time.monotonic()
        assert r.outcome == "done", r.describe()
    finally:
        s.close()
    return warm_figures(s.timings, t_ready - t0, t_result - t0)


def not_restored(r: dict) -> str:
    """Why a warm start restored nothing ('' when it did)."""
    if r["qmp"] is not None:
        return ""
    if r["created"]:
        return "no snapshot yet: cold boot + save"
    return f"no snapshot, fell back to cold boot ({r['fallback'] or 'no reason given'})"


def section_warm(a: Assets, n: int, results: dict) -> None:
    out(f"== warm start (snapshot restore), {n} runs; seconds from QEMU start ==")
    first = warm_phases(a)            # builds the snapshot if this initramfs/kernel has none yet
    if first["created"]:
        out(f"  (snapshot built first: cold boot + save; that start took {first['agent_ready']:.2f} s)")
    elif first["qmp"] is None:
        out(f"  warm: {not_restored(first)}; that start took {first['agent_ready']:.2f} s")
    runs = [warm_phases(a) for _ in range(n)]
    results["warm"] = runs
    keys = ("qmp", "loaded", "agent_ready", "first_result")
    out("  run  " + "  ".join(f"{k:>13}" for k in keys))
    for i, r in enumerate(runs):
        why = not_restored(r)
        out(f"  {i:>3}  " + ("  ".join(f"{r[k]:13.3f}" for k in keys) if not why else
                             f"warm: {why}; agent ready {r['agent_ready']:.3f}, first result {r['first_result']:.3f}"))
    restored = [r for r in runs if r["qmp"] is not None]
    if not restored:
        out(f"  warm: no snapshot restored in {n} runs (each fell back to a cold boot); no warm figures")
        return
    out("  median " + "  ".join(f"{statistics.median(r[k] for r in restored):12.3f}" for k in keys)
        + (f"   ({len(restored)} of {n} runs restored)" if len(restored) < n else ""))
    out("  (qmp = QEMU up, QMP answering; loaded = migrate-incoming completed; agent_ready = cont + new "
        "control socket + ping answered)")


PROBE = r"""
import json, sys, time
from harness import paths
from harness.machine.guests import GuestOptions, guest_assets, new_session
t_imports = time.monotonic()
opts = GuestOptions(kernel=sys.argv[1], accel="tcg", snapshots=sys.argv[2] == "warm")
a = guest_assets(opts, progress=lambda m: None)
t_assets = time.monotonic()
s = new_session(opts, paths.new_run_dir("bench-proc"), assets=a)
s.start()
t_ready = time.monotonic()
s.close()
print(json.dumps({"imports": t_imports, "assets": t_assets, "ready": t_ready, "timings": s.timings}))
"""


def section_process(a: Assets, n: int, kernel_spec: str, results: dict) -> None:
    out(f"== process start -> guest ready for scenarios (python3 -c: import harness, resolve assets, start), "
        f"{n} runs ==")
    rows = []
    for _ in range(n):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-c", PROBE, kernel_spec, "warm"], capture_output=True, text=True,
                           cwd=paths.REPO_ROOT, timeout=300, check=False)
        if p.returncode != 0:
            out(f"  probe failed: {p.stderr.strip()[-800:]}")
            return
        d = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append({"imports": d["imports"] - t0, "assets": d["assets"] - t0, "ready": d["ready"] - t0,
                     "fallback": d["timings"].get("snapshot_fallback")})
    results["process"] = rows
    for r in rows:
        out(f"  python+imports {r['imports']:.3f}  +assets {r['assets']:.3f}  guest ready {r['ready']:.3f} s"
            + (f"  FALLBACK {r['fallback']}" if r["fallback"] else ""))
    out(f"  median guest ready: {statistics.median(r['ready'] for r in rows):.3f} s after process start")
    for label, extra in (("", []), (" with -p no:hypothesispytest", ["-p", "no:hypothesispytest"]),
                         (" --no-snapshot (cold)", ["--no-snapshot"])):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "pytest", "tests/system/test_forwarding_el1.py", "-q", "-p",
                            "no:cacheprovider", "-k", "stays_in_kernel", "--kernel", kernel_spec, *extra],
                           capture_output=True, text=True, cwd=paths.REPO_ROOT, timeout=600, check=False)
        wall = time.monotonic() - t0
        results[f"process_pytest_one_test{label.replace(' ', '_')}_s"] = wall
        out(f"  pytest, one system test{label}: {wall:.2f} s wall "
            f"({(p.stdout.strip().splitlines() or ['?'])[-1]})")


# ---- per-scenario latency ------------------------------------------------------------------------------
def section_latency(a: Assets, n: int, results: dict) -> None:
    out(f"== per-scenario latency in one ready (restored) guest, {n} runs each; host round trip ==")
    s = a.session("bench-lat", snapshots=True)
    res = {}
    try:
        s.start()
        for label, el, spec, payload in scenarios():
            xs, inside = [], []
            for _ in range(n):
                t = time.monotonic()
                r = s.run(spec, payload=payload)
                xs.append(time.monotonic() - t)
                assert r.outcome == "done", r.describe()
                inside.append(r.raw.get("timing", {}).get("total_s", 0.0))
            res[label] = {"el": el, "host": xs, "agent": inside}
            out(f"  {el} {label:<34} {stats(xs)}   (in the agent: median {statistics.median(inside) * 1000:.1f} ms)")
        st = s.request("stats")
        out(f"  agent stats after the runs: {st}")
    finally:
        s.close()
    results["latency"] = res


# ---- the naive way: one fresh cold boot per scenario ----------------------------------------------------
def section_naive(a: Assets, results: dict) -> None:
    sc = scenarios()
    out(f"== naive: one fresh cold boot per scenario ({len(sc)} scenarios) vs one warm guest ==")
    t0 = time.monotonic()
    per = []
    for label, _, spec, payload in sc:
        t = time.monotonic()
        s = a.session("bench-naive", snapshots=False)
        try:
            s.start()
            r = s.run(spec, payload=payload)
            assert r.outcome == "done", r.describe()
        finally:
            s.close()
        per.append(time.monotonic() - t)
        out(f"  cold boot + {label}: {per[-1]:.2f} s")
    naive = time.monotonic() - t0
    t0 = time.monotonic()
    s = a.session("bench-naive-warm", snapshots=True)
    try:
        s.start()
        for _, _, spec, payload in sc:
            assert s.run(spec, payload=payload).outcome == "done"
    finally:
        s.close()
    warm = time.monotonic() - t0
    results["naive"] = {"naive_s": naive, "per_scenario_s": per, "warm_s": warm, "ratio": naive / warm}
    out(f"  naive total {naive:.2f} s; warm (one restore + the same {len(sc)} scenarios) {warm:.2f} s; "
        f"ratio {naive / warm:.1f}x")


# ---- the whole default suite --------------------------------------------------------------------------
# harness/plugin/tiers.py: a bare `pytest` is the kernel developer's suite (unit + KVM behaviour); CI adds the
# harness's own plumbing (infra) and upstream's selftests: `-m "not slow"`.
SUITES = {"default": [], "ci": ["tests/unit", "tests/system", "-m", "not slow"]}


def run_suite(workers: int, kernel_spec: str, extra: list[str], suite: str = "default") -> dict:
    argv = [sys.executable, "-m", "pytest", *SUITES[suite], "-q", "-p", "no:cacheprovider", "-n", str(workers),
            "--kernel", kernel_spec, "--durations=5", *extra]
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=paths.REPO_ROOT, timeout=1800, check=False)
    wall = time.monotonic() - t0
    lines = p.stdout.strip().splitlines()
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed)", ln)), "?")
    slow = []
    if "slowest 5 durations" in p.stdout:
        block = p.stdout.split("slowest 5 durations", 1)[1].splitlines()[1:6]
        slow = [ln.strip() for ln in block if ln.strip()]
    failed = [ln.split(" - ")[0] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return {"suite": suite, "workers": workers, "wall_s": wall, "rc": p.returncode, "summary": summary.strip("= "),
            "slowest": slow, "failed": failed, "extra": extra}


def section_suite(kernel_spec: str, results: dict, cold_too: bool, ci_too: bool) -> None:
    runs = []
    for suite in ("default", "ci") if ci_too else ("default",):
        what = "bare `pytest` (unit + KVM behaviour)" if suite == "default" else \
            "CI: pytest tests/unit tests/system -m 'not slow' (+ infra, upstream)"
        out(f"== whole {suite} suite: {what} ==")
        variants = [(1, []), (2, [])] + ([(1, ["--no-snapshot"]), (2, ["--no-snapshot"])] if cold_too else [])
        for w, extra in variants:
            r = run_suite(w, kernel_spec, extra, suite)
            runs.append(r)
            out(f"  -n {w} {'cold (--no-snapshot)' if extra else 'warm'}: {r['wall_s']:.1f} s wall, rc {r['rc']}: "
                f"{r['summary']}")
            for ln in r["slowest"]:
                out(f"      {ln}")
            for ln in r["failed"]:
                out(f"      {ln}")
    results["suite"] = runs


# ---- experiments ---------------------------------------------------------------------------------------
def section_experiments(a: Assets, n: int, results: dict) -> None:
    from harness.machine import snapshot_store
    out("== experiments ==")
    smp2 = [cold_phases(a, smp=2) for _ in range(n)]
    out(f"  cold boot -smp 2: agent ready median {statistics.median(r['agent_ready'] for r in smp2):.3f} s, "
        f"first result {statistics.median(r['first_result'] for r in smp2):.3f} s ({n} runs)")
    full = []
    os.environ[snapshot_store.FULL_ARGV_ENV] = "1"
    try:
        full = [warm_phases(a) for _ in range(n)]
    finally:
        del os.environ[snapshot_store.FULL_ARGV_ENV]
    restored = [r for r in full if r["qmp"] is not None]
    if restored:
        out(f"  restore with the real -kernel/-initrd (SMCCC_SNAPSHOT_FULL_ARGV=1): QMP up median "
            f"{statistics.median(r['qmp'] for r in restored):.3f} s, agent ready "
            f"{statistics.median(r['agent_ready'] for r in restored):.3f} s ({len(restored)} of {n} restored)")
    else:
        out(f"  restore with the real -kernel/-initrd: warm: {not_restored(full[0]) if full else 'no runs'}")
    results["experiments"] = {"smp2_cold": smp2, "warm_full_argv": full}


# ---- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default=os.environ.get("SMCCC_KERNEL", "default"))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no suite runs")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--suite-cold", action="store_true", help="also run the suite with --no-snapshot")
    ap.add_argument("--suite-ci", action="store_true", help="also time the CI suite (-m 'not slow': + infra, upstream)")
    ap.add_argument("-n", "--repeat", type=int, default=None, help="repetitions of boots (default 3, quick 2)")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if args.quick and "--only" not in (argv or sys.argv):
        only.discard("suite")
    reps = args.repeat or (2 if args.quick else 3)
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t_all = time.monotonic()
    a = Assets(args.kernel)
    from harness.machine import snapshot_store
    qv = snapshot_store.qemu_version("qemu-system-aarch64")
    size = a.initrd.stat().st_size
    out(f"host: {os.cpu_count()} CPUs, load average {loadavg()}; {qv}")
    out(f"kernel: {a.kernel.version} ({a.kernel.image.stat().st_size / 1e6:.1f} MB Image)")
    out(f"initramfs: {a.initrd.name} {size / 1e6:.1f} MB uncompressed newc")
    results.update({"qemu": qv, "kernel": a.kernel.version, "initramfs_bytes": size, "load_before": loadavg(),
                    "agent_version": P.AGENT_VERSION})
    if "cold" in only:
        section_cold(a, reps, results)
    if "warm" in only:
        section_warm(a, reps + 2, results)
    if "process" in only:
        section_process(a, reps, args.kernel, results)
    if "latency" in only:
        section_latency(a, 10 if args.quick else 20, results)
    if "naive" in only:
        section_naive(a, results)
    if "experiments" in only:
        section_experiments(a, reps, results)
    if "suite" in only:
        section_suite(args.kernel, results, args.suite_cold, args.suite_ci)
    results["load_after"] = loadavg()
    results["total_s"] = time.monotonic() - t_all
    d = paths.new_run_dir("bench")
    (d / "bench.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    out(f"load average after: {loadavg()}; bench took {results['total_s']:.0f} s; results: {d / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
