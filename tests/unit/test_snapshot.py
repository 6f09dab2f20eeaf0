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
