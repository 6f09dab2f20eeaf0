"""harness.machine.snapshot without QEMU: the snapshot key (changes with every input that determines the saved
guest, and only with those) and the cache layout (atomic creation, one builder per key, pruning)."""

import json
import multiprocessing
import os
import shutil
import time

import pytest

from harness.machine import snapshot, snapshot_store
from harness.machine.config import MachineConfig

QEMU_V = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    (d / "Image").write_bytes(b"\0" * 0x38 + b"ARM\x64" + b"kernel one")
    (d / "abc.cpio").write_bytes(b"070701 initramfs one")
    return d


def config(files, run="run1", **kw):
    base = {"kernel": files / "Image", "initrd": files / "abc.cpio", "control_socket": files / run / "ctl.sock",
                "qmp_socket": files / run / "qmp.sock"}
    base.update(kw)
    return MachineConfig(**base)


def key(cfg, qemu=QEMU_V):
    return snapshot_store.snapshot_key(snapshot_store.key_inputs(cfg, qemu_version_string=qemu))


# ---- the key ---------------------------------------------------------------------------------------
def test_key_is_deterministic(files):
    assert key(config(files)) == key(config(files))
    assert len(key(config(files))) == 32


def test_key_ignores_per_run_socket_paths_and_incoming(files):
    assert key(config(files, "run1")) == key(config(files, "run2", incoming="defer"))


def test_key_ignores_where_the_same_kernel_lives(files, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(files / "Image", other / "Image")
    assert key(config(files)) == key(config(files, kernel=other / "Image"))


def test_key_changes_with_the_kernel_contents(files):
    before = key(config(files))
    time.sleep(0.01)
    (files / "Image").write_bytes(b"\0" * 0x38 + b"ARM\x64" + b"kernel two")
    assert key(config(files)) != before


def test_key_changes_with_the_initramfs_contents(files):
    before = key(config(files))
    time.sleep(0.01)
    (files / "abc.cpio").write_bytes(b"070701 initramfs two")
    assert key(config(files)) != before


def test_key_changes_with_the_initramfs_name(files):
    shutil.copy(files / "abc.cpio", files / "def.cpio")
    assert key(config(files)) != key(config(files, initrd=files / "def.cpio"))


def test_key_changes_with_the_qemu_version(files):
    assert key(config(files)) != key(config(files), qemu=QEMU_V.replace("10.0.2", "10.1.0"))


def test_key_changes_with_the_kernel_cmdline(files):
    assert key(config(files)) != key(config(files, cmdline=config(files).cmdline + " smccc.debug"))


@pytest.mark.parametrize("change", [{"smp": 2}, {"memory_mb": 512}, {"cpu": "max,pauth-impdef=on"},
                                    {"gic_version": 4}, {"virtualization": False},
                                    {"extra_args": ("-rtc", "clock=vm")}])
def test_key_changes_with_the_machine_config(files, change):
    assert key(config(files)) != key(config(files, **change))


def test_normalized_argv_has_no_per_run_paths(files):
    cfg = config(files, incoming="defer")
    argv = " ".join(snapshot_store.normalized_argv(cfg))
    for p in (cfg.control_socket, cfg.qmp_socket, cfg.kernel, cfg.initrd):
        assert str(p) not in argv
    assert "-incoming" not in argv
    assert "<kernel>" in argv and "<control-socket>" in argv


def test_file_digest_is_recomputed_after_a_change(files, cache):
    p = files / "Image"
    first = snapshot_store.file_sha256(p)
    assert (cache / "snapshots" / snapshot_store.DIGESTS).is_file()
    assert snapshot_store.file_sha256(p) == first
    time.sleep(0.01)
    p.write_bytes(b"different")
    assert snapshot_store.file_sha256(p) != first


def test_qemu_version_is_the_first_line_of_qemu_version():
    if not shutil.which("qemu-system-aarch64"):
        pytest.skip("qemu-system-aarch64 is not installed (smccc-harness setup installs it)")
    assert snapshot_store.qemu_version("qemu-system-aarch64").startswith("QEMU emulator version ")


def test_snapshot_disabled_by_env(monkeypatch):
    monkeypatch.setenv("SMCCC_NO_SNAPSHOT", "1")
    assert snapshot_store.disabled_by_env()
    monkeypatch.setenv("SMCCC_NO_SNAPSHOT", "0")
    assert not snapshot_store.disabled_by_env()


# ---- the cache layout ------------------------------------------------------------------------------
def fake_build(tmp):
    (tmp / snapshot_store.STATE_FILE).write_bytes(b"state")
    (tmp / snapshot_store.META_FILE).write_text(json.dumps({"caps": {"kvm": True}}))


def test_create_puts_a_complete_snapshot_under_its_key(cache):
    store = snapshot_store.SnapshotStore()
    snap = store.create("k1", fake_build)
    assert snap.path == cache / "snapshots" / "k1"
    assert (snap.path / snapshot_store.STATE_FILE).read_bytes() == b"state"
    assert snap.meta() == {"caps": {"kvm": True}}
    assert store.lookup("k1") == snap
    assert [p.name for p in (cache / "snapshots").iterdir() if p.name.startswith(".build-")] == []


def test_create_reuses_an_existing_snapshot(cache):
    store = snapshot_store.SnapshotStore()
    store.create("k1", fake_build)

    def must_not_build(tmp):
        raise AssertionError("built twice")
    assert store.create("k1", must_not_build).key == "k1"


def test_a_failed_build_leaves_nothing_behind(cache):
    store = snapshot_store.SnapshotStore()

    def broken(tmp):
        (tmp / snapshot_store.STATE_FILE).write_bytes(b"half")
        raise snapshot_store.SnapshotError("migration failed")
    with pytest.raises(snapshot_store.SnapshotError):
        store.create("k1", broken)
    assert store.lookup("k1") is None
    assert list((cache / "snapshots").iterdir()) == []


def test_an_incomplete_build_is_refused(cache):
    store = snapshot_store.SnapshotStore()
    with pytest.raises(snapshot_store.SnapshotError, match="no state.ram"):
        store.create("k1", lambda tmp: (tmp / snapshot_store.META_FILE).write_text("{}"))
    assert store.lookup("k1") is None


def test_lookup_ignores_a_directory_without_state(cache):
    (cache / "snapshots" / "k1").mkdir(parents=True)
    (cache / "snapshots" / "k1" / snapshot_store.META_FILE).write_text("{}")
    assert snapshot_store.SnapshotStore().lookup("k1") is None


def _slow_build_in_process(cache_dir, counter):
    os.environ["SMCCC_HARNESS_CACHE"] = cache_dir

    def build(tmp):
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        fake_build(tmp)
    snapshot_store.SnapshotStore().create("shared", build)


def test_concurrent_creators_build_once(cache, tmp_path):
    counter = tmp_path / "builds"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_slow_build_in_process, args=(str(cache), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "built\n"
    assert snapshot_store.SnapshotStore().lookup("shared") is not None


def test_prune_keeps_the_most_recently_used(cache):
    store = snapshot_store.SnapshotStore()
    old = time.time() - 3600
    for i in range(5):
        s = store.create(f"k{i}", fake_build)
        os.utime(s.path / snapshot_store.LAST_USED, (old + i, old + i))
    store.prune(max_keep=2)
    assert sorted(s.key for s in store.entries()) == ["k3", "k4"]


def test_create_prunes_down_to_keep(cache):
    store = snapshot_store.SnapshotStore()
    old = time.time() - 3600
    for i in range(snapshot_store.KEEP + 2):
        s = store.create(f"k{i}", fake_build)
        os.utime(s.path / snapshot_store.LAST_USED, (old + i, old + i))
    assert len(store.entries()) == snapshot_store.KEEP
    assert store.lookup(f"k{snapshot_store.KEEP + 1}") is not None


def test_prune_spares_recently_used_snapshots(cache):
    store = snapshot_store.SnapshotStore()
    for i in range(3):
        store.create(f"k{i}", fake_build)
    assert store.prune(max_keep=1) == []
    assert len(store.entries()) == 3


def test_restore_config_swaps_in_the_stub_boot_files(files, cache):
    snap = snapshot_store.SnapshotStore().create("k1", fake_build)
    (snap.path / snapshot_store.STUB_KERNEL).write_bytes((files / "Image").read_bytes()[:64])
    (snap.path / snapshot_store.STUB_INITRD).write_bytes(b"")
    cfg = snapshot.restore_config(config(files), snap, stubs=True)
    assert cfg.argv()[-2:] == ["-incoming", "defer"]
    assert (cfg.kernel, cfg.initrd) == (snap.path / snapshot_store.STUB_KERNEL, snap.path / snapshot_store.STUB_INITRD)
    assert cfg.control_socket == config(files).control_socket


def test_restore_config_keeps_the_real_files_without_stubs(files, cache):
    snap = snapshot_store.SnapshotStore().create("k1", fake_build)
    cfg = snapshot.restore_config(config(files), snap, stubs=True)     # this snapshot has no stub files
    assert (cfg.kernel, cfg.initrd) == (files / "Image", files / "abc.cpio")
    assert snapshot.restore_config(config(files), snap, stubs=False).kernel == files / "Image"


# ---- which QEMU has the EL2-timer fix ------------------------------------------------------------------
PATCHED_V = "QEMU emulator version 10.0.13 (smccc-fix:el2-timers patches=1394ab4c2d56)"


@pytest.mark.parametrize(("version", "fixes"), [(QEMU_V, set()), (PATCHED_V, {snapshot_store.EL2_TIMER_FIX}),
                                                ("QEMU emulator version 9.2.0", set())])
def test_qemu_fixes_are_read_from_the_version_line(version, fixes):
    assert snapshot_store.qemu_fixes(version) == fixes


def test_qemu_has_fix_refuses_an_unknown_fix_name():
    with pytest.raises(ValueError, match="unknown QEMU fix 'el3-timers'"):
        snapshot_store.qemu_has_fix("qemu-system-aarch64", "el3-timers")


def test_a_fix_changes_the_snapshot_key(files):
    assert key(config(files)) != key(config(files), qemu=PATCHED_V)


# ---- the timer probe's verdict -------------------------------------------------------------------------
class FakeChannel:
    def __init__(self, answer):
        self.answer, self.sent = answer, []

    def request(self, op, args=None, deadline_s=30.0):
        self.sent.append((op, args, deadline_s))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_the_probe_passes_when_every_vcpu_woke():
    ch = FakeChannel({"cpus": {"0": 0.021, "1": 0.024}, "dead": [], "slept_s": 0.024})
    assert snapshot.probe_timers(ch, 3.0, "restoring snapshot k")["slept_s"] == 0.024
    assert ch.sent == [("timer_probe", {"sleep_s": snapshot.PROBE_SLEEP_S, "wait_s": snapshot.PROBE_WAIT_S}, 3.0)]


def test_the_probe_names_the_dead_vcpus():
    ch = FakeChannel({"cpus": {"0": 0.021, "1": None}, "dead": [1], "slept_s": 0.021})
    with pytest.raises(snapshot.DeadTimerSnapshot, match=r"restoring snapshot k: the timer interrupt of vCPU 1 of 2"):
        snapshot.probe_timers(ch, 3.0, "restoring snapshot k")


def test_no_answer_to_the_probe_is_a_dead_tick():
    from harness.machine.channel import ChannelError
    ch = FakeChannel(ChannelError("no answer from the guest agent before the deadline", kind="timeout"))
    with pytest.raises(snapshot.DeadTimerSnapshot, match="no answer in 2 s: the agent's own vCPU is dead"):
        snapshot.probe_timers(ch, 2.0, "checking a new save")


# ---- validated saves: the retry policy, on recorded outcomes -------------------------------------------
# Per snapshot build, whether each save's check restore was live (L) or dead (D), in order: recorded by
# `python3 -m bench.snapshot_tries --builds 4` on 2026-12-03 (stock QEMU 10.0.2, load ~15, the restore then
# connected and pinged after cont): tries 1, 1, 3, 1.
RECORDED_BUILDS = ["L", "L", "DDL", "L"]


class Replay:
    """A fake saver and checker replaying one build's recorded outcomes."""

    def __init__(self, outcomes: str):
        self.outcomes, self.saves, self.checks = outcomes, [], []

    def take(self, n):
        self.saves.append(n)
        return {"save_s": 1.0 + n / 10, "resume_s": 0.01}

    def check(self, n):
        self.checks.append(n)
        if self.outcomes[n - 1] == "D":
            raise snapshot.DeadTimerSnapshot(f"checking a new save: save {n} restored dead")
        return {"ready_s": 0.4}


@pytest.mark.parametrize("outcomes", RECORDED_BUILDS)
def test_saves_are_retaken_until_one_restores_live(outcomes):
    r = Replay(outcomes)
    tries = snapshot.save_until_live(r.take, r.check, tries=10)
    assert [t.live for t in tries] == [c == "L" for c in outcomes]
    assert r.saves == r.checks == list(range(1, len(outcomes) + 1))
    assert tries[-1].save == {"save_s": 1.0 + len(outcomes) / 10, "resume_s": 0.01}
    assert all("restored dead" in t.check["dead"] for t in tries[:-1])


def test_all_dead_saves_give_up_after_the_bound_with_the_tries():
    r = Replay("D" * 12)
    with pytest.raises(snapshot.DeadSaves, match="all 3 saves restored with a dead timer") as ei:
        snapshot.save_until_live(r.take, r.check, tries=3)
    assert r.saves == [1, 2, 3] and len(ei.value.tries) == 3 and not any(t.live for t in ei.value.tries)
    assert "smccc-fix:el2-timers" in ei.value.hint


def test_a_check_that_fails_otherwise_is_not_retried():
    def broken(n):
        raise snapshot_store.SnapshotError("checking a new save (migrate-incoming) failed: no such file")
    r = Replay("LLL")
    with pytest.raises(snapshot_store.SnapshotError, match="no such file"):
        snapshot.save_until_live(r.take, broken, tries=10)
    assert r.saves == [1]


class FakeSession:
    """Enough of a GuestSession for snapshot._build and warm_start: boot() 'boots', the guest keeps running."""

    def __init__(self, files, run_dir):
        self.config, self.run_dir = config(files), run_dir
        self.caps, self.timings, self.channel, self.booted = {"kvm": True}, {"boot_s": 4.2, "ready_s": 4.4}, None, 0

    def boot(self):
        self.booted += 1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "console.log").write_text("boot console\n")
        self.channel = FakeChannel({"pong": True})
        return self

    def alive(self):
        return self.channel is not None


@pytest.fixture
def replayed(monkeypatch):
    """snapshot.save and snapshot.check_save replaced by a replay of recorded outcomes (set .outcomes)."""
    r = Replay("")

    def save(session, dest, *, keep_running=False, prepare=None):
        assert keep_running, "a snapshot build keeps the cold-booted guest running"
        (dest / snapshot_store.STATE_FILE).write_bytes(b"state %d" % (len(r.saves) + 1))
        return r.take(len(r.saves) + 1)

    def check_save(cfg, run_dir, saved):
        assert (saved.path / snapshot_store.STUB_KERNEL).is_file(), "the check restores with the stub kernel"
        return r.check(len(r.checks) + 1)
    monkeypatch.setattr(snapshot, "save", save)
    monkeypatch.setattr(snapshot, "check_save", check_save)
    return r


def test_a_build_records_its_tries_in_meta(files, tmp_path, replayed, cache):
    replayed.outcomes = "DDL"
    store = snapshot_store.SnapshotStore()
    session = FakeSession(files, tmp_path / "run")
    w = snapshot.warm_start(session, store)
    assert w.booted and not w.cold_boot and w.timings["snapshot_save_tries"] == 3, w.timings
    snap = store.lookup(w.timings["snapshot"])
    meta = snap.meta()
    assert meta["save_tries"] == 3 and [t["live"] for t in meta["tries"]] == [False, False, True]
    assert meta["save"] == {"save_s": 1.3, "resume_s": 0.01} and meta["qemu_fixes"] == []
    assert snap.state.read_bytes() == b"state 3", "the kept state is the save that restored live"
    assert (snap.path / snapshot_store.BOOT_LOG).read_text() == "boot console\n"
    assert "save 3 restored live" in (session.run_dir / "console.log").read_text()


def test_a_build_whose_saves_are_all_dead_keeps_nothing_and_the_guest_goes_on(files, tmp_path, replayed, cache):
    replayed.outcomes = "D" * snapshot.SAVE_TRIES
    store = snapshot_store.SnapshotStore()
    session = FakeSession(files, tmp_path / "run")
    w = snapshot.warm_start(session, store)
    assert w.booted and w.started is None and not w.cold_boot, w
    assert w.timings["snapshot_fallback"].startswith(f"DeadSaves: all {snapshot.SAVE_TRIES} saves restored with a "
                                                     "dead timer")
    assert w.timings["snapshot_save_tries"] == snapshot.SAVE_TRIES and session.booted == 1
    assert store.entries() == [] and list(store.root.glob(".build-*")) == []
    assert "the cold-booted guest goes on" in (session.run_dir / "console.log").read_text()


# ---- the guest side (harness/guest/timers.py runs on any Linux) ----------------------------------------
def test_cpu_lists_are_parsed_like_the_kernel_prints_them():
    from harness.guest import timers
    assert timers.parse_cpu_list("0-2,5\n") == [0, 1, 2, 5]
    assert timers.parse_cpu_list("0") == [0]


def test_the_probe_sleeps_on_every_cpu():
    from harness.guest import timers
    r = timers.probe({"sleep_s": 0.01, "wait_s": 5.0})
    assert r["dead"] == [] and set(r["cpus"]) == {str(c) for c in timers.online_cpus()}
    assert all(v >= 0.01 for v in r["cpus"].values()), r


@pytest.mark.parametrize(("args", "error"), [({"mode": "nap"}, "mode must be one of"), ({"ms": 0}, "ms must be"),
                                             ({"ms": 10**6}, "ms must be"), ({"ms": True}, "ms must be")])
def test_arm_timers_refuses_bad_arguments(args, error):
    from harness import protocol as P
    from harness.guest import timers
    with pytest.raises(P.ProtocolError, match=error):
        timers.arm_timers(args)


def test_arm_timers_spin_reports_each_spinners_longest_gap():
    from harness.guest import timers
    armed = timers.arm_timers({"mode": "spin", "ms": 200})
    assert armed["ready"] and armed["cpus"] == timers.online_cpus()
    keys = {f"{c}.{k}" for c in armed["cpus"] for k in range(timers.SPINNERS_PER_CPU)}
    stop = time.monotonic() + 30
    while True:
        gaps = timers.timer_report({})["max_gap_s"]
        if all(v is not None for v in gaps.values()) or time.monotonic() > stop:
            break
        time.sleep(0.05)
    assert set(gaps) == keys and all(v is not None and 0 <= v < 5 for v in gaps.values()), gaps
