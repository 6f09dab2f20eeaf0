"""Bad input: each gives an error that says what is wrong and what to do, a non-zero exit of the
``smccc-harness`` command line, and nothing lost or left behind (no QEMU, no half-written cache entry).

Most of these are refused before QEMU starts.  The payload rules are harness.protocol.validate_scenario's
memory map (docs/design.md); the filter rules are docs/kvm-smccc-abi.md §1.1 (harness.model.filter_model).  The cache
tests use a private cache (SMCCC_HARNESS_CACHE) and fetch small Debian packages from the mirror.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import paths
from harness import protocol as P
from harness.images import assets
from harness.images import lock as locks
from harness.images import store as stores
from harness.images.payloads import build_payloads, get_payload
from harness.machine import leftovers
from harness.model.scenarios import scenario

pytestmark = [pytest.mark.bad_input, pytest.mark.infra]
CLI_TIMEOUT_S = 300


def cli(*args: str, env: dict | None = None, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=paths.REPO_ROOT, env=e, text=True,
                          capture_output=True, timeout=timeout, check=False)


def assert_refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, ``error: ...`` naming the problem, a ``hint:`` saying what to do, and no traceback."""
    assert r.returncode == 2, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "error: " in r.stderr and "hint: " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    for n in needles:
        assert n in r.stderr, f"{n!r} not in:\n{r.stderr}"


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "runs"
    yield d
    assert leftovers.problems([x for x in d.iterdir() if x.is_dir()] if d.is_dir() else [], settle_s=0) == []


@pytest.fixture(scope="module")
def default_image() -> Path:
    from harness.images.kernel import resolve_kernel
    return Path(resolve_kernel("default").image)


# ---- kernels ---------------------------------------------------------------------------------------
def test_truncated_kernel_is_refused_before_qemu_starts(tmp_path, results, default_image):
    k = tmp_path / "Image"
    k.write_bytes(default_image.read_bytes()[: default_image.stat().st_size // 2])
    r = cli("boot", "--kernel", str(k), "--results-dir", str(results))
    assert_refused(r, f"kernel {k} is truncated", "PE section", "rebuild")


@pytest.mark.parametrize("what", ["x86_elf", "x86_bzimage", "random"])
def test_wrong_architecture_or_non_kernel_file_is_refused(tmp_path, results, what):
    if what == "x86_elf":
        k, needle = Path("/bin/true"), "EM_X86_64"
    else:
        k = tmp_path / what
        data = bytearray(os.urandom(1 << 20))
        if what == "x86_bzimage":      # the x86 boot protocol header: 0x55AA at 0x1FE, "HdrS" at 0x202
            data[0:2] = b"\xeb\x3c"
            data[0x1FE:0x200] = b"\x55\xaa"
            data[0x202:0x206] = b"HdrS"
        k.write_bytes(bytes(data))
        needle = "x86 bzImage" if what == "x86_bzimage" else "not an arm64 Image"
    r = cli("boot", "--kernel", str(k), "--results-dir", str(results))
    assert_refused(r, needle, "arm64")


def test_corrupt_kernel_that_prints_nothing_is_named_as_the_likely_culprit(tmp_path, results, default_image):
    """Header intact, 4 MiB of its text overwritten: QEMU runs it and the kernel dies before the console."""
    k = tmp_path / "Image"
    data = bytearray(default_image.read_bytes())
    data[0x10_0000:0x50_0000] = b"\xff" * 0x40_0000
    k.write_bytes(bytes(data))
    r = cli("boot", "--kernel", str(k), "--boot-timeout", "4", "--results-dir", str(results), timeout=240)
    assert_refused(r, "printed nothing on the serial console", "corrupt, truncated", "console log:")
    assert not leftovers.qemu_processes(results)


# ---- QEMU -------------------------------------------------------------------------------------------
def test_too_old_qemu_is_refused_with_the_upgrade_command(tmp_path, results):
    fake = tmp_path / "bin" / "qemu-system-aarch64"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2)'\n"
                    "echo 'Copyright (c) 2003-2021 Fabrice Bellard and the QEMU Project developers'\n")
    fake.chmod(0o755)
    r = cli("boot", "--results-dir", str(results), env={"PATH": f"{fake.parent}:{os.environ['PATH']}"})
    assert_refused(r, "6.2.0 is too old: need >= 9.0", "apt-get install")


def test_missing_qemu_is_refused_with_the_install_command(results):
    r = cli("boot", "--qemu-bin", "/nonexistent/qemu-system-aarch64", "--results-dir", str(results))
    assert_refused(r, "not found", "apt-get install")


# ---- payloads ---------------------------------------------------------------------------------------
def _link(tmp_path: Path, name: str, text_addr: int) -> Path:
    """A one-instruction aarch64 ELF with its text at ``text_addr``."""
    src, obj, elf = tmp_path / f"{name}.S", tmp_path / f"{name}.o", tmp_path / f"{name}.elf"
    src.write_text(".global _start\n_start:\n    b .\n")
    subprocess.run(["aarch64-linux-gnu-as", "-o", str(obj), str(src)], check=True)
    subprocess.run(["aarch64-linux-gnu-ld", "-static", "--build-id=none", "-Ttext", hex(text_addr),
                    "-o", str(elf), str(obj)], check=True)
    return elf


@pytest.mark.parametrize("kind,needles", [
    ("text", ["is not an ELF file", "aarch64-linux-gnu-as"]),
    ("x86_elf", ["EM_X86_64", "EM_AARCH64"]),
    ("outside_ram", ["lies outside guest RAM [0x40000000, 0x40200000)", "payload.ld"]),
    ("param_pages", ["overlaps the parameter/result pages", "PARAM_BASE"]),
    ("stacks", ["overlaps the handler's vCPU stacks", "payload.ld"]),
])
def test_bad_payload_is_refused_before_boot(tmp_path, results, kind, needles):
    if kind == "text":
        elf = tmp_path / "notes.txt"
        elf.write_text("this is not a payload\n")
    elif kind == "x86_elf":
        elf = Path("/bin/true")
    else:
        addr = {"outside_ram": 0x8000_0000, "param_pages": P.PARAM_BASE,
                "stacks": P.RAM_BASE + P.RAM_SIZE_DEFAULT - 0x800}[kind]
        elf = _link(tmp_path, kind, addr)
    r = cli("run-payload", str(elf), "--forward", "psci", "--results-dir", str(results))
    assert_refused(r, *needles)
    assert not results.exists() or not any(results.iterdir()), "a run directory was created: QEMU was started"


# ---- scenario and filter specs ------------------------------------------------------------------------
@pytest.mark.parametrize("forward,needles", [
    ("0x80000000+4", ["[0x80000000, 0x80000003]", "EEXIST", "reserved Arm Architecture Calls range"]),
    ("0x84000000+0", ["nr 0", "EINVAL"]),
    ("0xfffffff0+0x20", ["EINVAL", "wraps"]),
    ("psci,0x84000010", ["--forward range #2", "overlaps range #0 [0x84000000, 0x8400001f]"]),
    ("banana", ["'banana': not a range"]),
    ("0x84000000+1:allow", ["filter action must be one of", "fwd"]),
])
def test_bad_forward_range_is_refused_before_boot(results, forward, needles):
    args = []
    for f in forward.split(","):
        args += ["--forward", f]
    elf = build_payloads()["psci_version"]
    r = cli("run-payload", str(elf), *args, "--results-dir", str(results))
    assert_refused(r, *needles)
    assert not results.exists() or not any(results.iterdir())


@pytest.mark.parametrize("change,needle", [
    ({"vcpus": 9}, "'vcpus' must be an integer in [0x1, 0x8]"),
    ({"ram_size": 0x12345}, "ram_size must be a multiple of 64 KiB"),
    ({"handler": "bogus"}, "handler must be 'psci' or 'record'"),
    ({"deadline_s": 0}, "deadline_s must be in (0, 600]"),
    ({"filters": [{"base": -1, "nr": 1}]}, "'base' must be an integer"),
    ({"filters": [{"base": 0x84000000, "nr": 1, "action": "allow"}]}, "filter action must be one of"),
    ({"filters": [{"base": 0x84000000, "nr": 1, "pad": [0] * 14}]}, "pad must be a list of 15 bytes"),
    ({"replies": {"PSCI": [0]}}, "is not a function id"),
    ({"name": ""}, "non-empty 'name'"),
])
def test_malformed_scenario_is_refused_by_the_host_before_it_is_sent(change, needle):
    spec = dict(scenario("ok", get_payload("psci_version")))
    spec.update(change)
    with pytest.raises(P.ProtocolError) as ei:
        P.validate_scenario(spec)
    assert needle in str(ei.value)


# ---- the cache ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str, ro: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"{'ro,' if ro else ''}size={size}"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _mirror_reachable() -> None:
    import urllib.request
    mirror = locks.load_manifest().mirror
    try:
        urllib.request.urlopen(urllib.request.Request(mirror + "/", method="HEAD"), timeout=10).close()
    except OSError as e:
        pytest.skip(f"the Debian mirror {mirror} is not reachable ({e}): this cache test downloads a package")


def _private_apt(dest: Path) -> None:
    """The private apt state of the user's cache (lists: no 'apt update' needed), copied."""
    _mirror_reachable()
    src = paths.cache_dir() / "apt"
    if not (src / "lists").is_dir():
        pytest.skip(f"no private apt lists in {src}: run 'smccc-harness setup' first")
    shutil.copytree(src, dest, symlinks=True)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_unwritable_cache_is_refused_with_what_to_do(tmp_path):
    with tmpfs(tmp_path / "ro-cache", "1m", ro=True) as ro:
        for args in (("cache", "verify"), ("assets", "fetch")):
            r = cli(*args, env={"SMCCC_HARNESS_CACHE": str(ro)})
            assert_refused(r, f"the cache directory {ro} is not writable", "SMCCC_HARNESS_CACHE")


def test_full_disk_during_download_is_refused_and_nothing_cached_is_lost(tmp_path):
    lock = stores.Store(lambda *_: None).read_lock()
    keep = lock.packages["libffi8"]
    src = paths.cache_dir() / "debs" / f"{keep.sha256}.deb"
    if not src.is_file():
        pytest.skip(f"{src} is not cached: run 'smccc-harness setup' first")
    _private_apt(tmp_path / "apt")
    with tmpfs(tmp_path / "small-cache", "512k") as cache:
        (cache / "apt").symlink_to(tmp_path / "apt")
        (cache / "debs").mkdir()
        shutil.copy(src, cache / "debs" / src.name)          # an entry that must survive
        r = cli("assets", "fetch", env={"SMCCC_HARNESS_CACHE": str(cache)})
        assert_refused(r, "no space left in", "while downloading", "SMCCC_HARNESS_CACHE")
        assert _sha(cache / "debs" / src.name) == keep.sha256, "a cached entry was damaged"
        left = sorted(p.name for p in (cache / "debs").iterdir())
        assert left == [src.name], f"half-written download left behind: {left}"
        assert r.stderr.count("hint:") == 1


def test_corrupted_cache_entry_is_detected_and_fetched_again(tmp_path, monkeypatch):
    _private_apt(tmp_path / "cache" / "apt")
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(tmp_path / "cache"))
    msgs: list[str] = []
    store = stores.Store(msgs.append)
    e = store.fetch("libffi8", store.m.rootfs_suite)
    deb = store.deb_path(e.sha256)
    assert _sha(deb) == e.sha256
    deb.write_bytes(b"garbage" * 100)                          # corrupt the cached copy
    r = cli("cache", "verify", env={"SMCCC_HARNESS_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and f"libffi8 {e.version}" in r.stdout and "corrupt" in r.stdout, r.stdout
    msgs.clear()
    again = stores.Store(msgs.append).fetch("libffi8", store.m.rootfs_suite)
    assert again.sha256 == e.sha256 and _sha(deb) == e.sha256, "the corrupt entry was not fetched again"
    assert any("corrupt" in m for m in msgs) and any(m.startswith("downloading libffi8") for m in msgs), msgs


FETCH_ONE = """
import sys
from harness.images import store as stores
s = stores.Store(lambda m: print(m, flush=True))
e = s.fetch("libexpat1", s.m.rootfs_suite)
s.extract(e)
print("sha", e.sha256)
"""


def test_parallel_fetches_download_and_extract_once(tmp_path):
    _private_apt(tmp_path / "cache" / "apt")
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT), SMCCC_HARNESS_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", FETCH_ONE], env=env, cwd=paths.REPO_ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(3)]
    outs = [p.communicate(timeout=CLI_TIMEOUT_S)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = "\n".join(outs)
    assert text.count("downloading libexpat1") == 1, text
    assert text.count("extracted libexpat1") == 1, text
    assert len({ln for ln in text.splitlines() if ln.startswith("sha ")}) == 1, text


def test_cache_clean_removes_only_what_the_lock_does_not_name(tmp_path):
    lock = stores.Store(lambda *_: None).read_lock()
    keep = lock.packages["libffi8"]
    src = paths.cache_dir() / "debs" / f"{keep.sha256}.deb"
    if not src.is_file():
        pytest.skip(f"{src} is not cached: run 'smccc-harness setup' first")
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    (cache / "extract" / ("0" * 64)).mkdir(parents=True)
    shutil.copy(src, cache / "debs" / src.name)
    stray = cache / "debs" / f"{'f' * 64}.deb"
    stray.write_bytes(b"stale")
    r = cli("cache", "clean", env={"SMCCC_HARNESS_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert not stray.exists() and not (cache / "extract" / ("0" * 64)).exists(), r.stdout
    assert _sha(cache / "debs" / src.name) == keep.sha256


def test_cache_clean_all_removes_the_cache(tmp_path):
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    (cache / "debs" / "x.deb").write_bytes(b"x")
    r = cli("cache", "clean", "--all", env={"SMCCC_HARNESS_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert not cache.exists()


# ---- security -------------------------------------------------------------------------------------------
def test_qmp_console_and_control_sockets_live_in_a_private_run_directory(guest):
    sockets = [guest.config.control_socket, guest.config.qmp_socket]
    for s in sockets:
        if s is None:
            continue
        assert s.parent == guest.run_dir, s
    assert (guest.run_dir.stat().st_mode & 0o777) == 0o700, oct(guest.run_dir.stat().st_mode)
    assert guest.config.control_socket.is_socket()
    assert guest.console_log.parent == guest.run_dir


def test_scenario_name_cannot_put_a_trace_outside_the_run_directory(guest):
    p = get_payload("psci_version")
    r = guest.run(scenario("../../../escape/../x", p), payload=p)
    assert r.outcome == "done", r.describe()
    assert r.trace_path.parent == guest.run_dir / "traces", r.trace_path
    assert "/" not in r.trace_path.name and r.trace_path.is_file()


def test_no_user_supplied_string_reaches_a_shell():
    """No shell=True / os.system / os.popen in the harness: argv lists only (the QEMU command line is
    written to qemu-cmd.sh with shlex.join for humans, never run through a shell by the harness)."""
    bad = []
    for f in sorted((paths.REPO_ROOT / "harness").rglob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "shell=True" in code or "os.system(" in code or "os.popen(" in code:
                bad.append(f"{f.relative_to(paths.REPO_ROOT)}:{i}: {line.strip()}")
    assert bad == []


def test_cache_verify_counts_only_real_problems(tmp_path):
    """An empty cache is not broken: pins that were never downloaded are fetched on first use."""
    r = cli("cache", "verify", env={"SMCCC_HARNESS_CACHE": str(tmp_path / "empty")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cache OK" in r.stdout and "not downloaded (fetched on first use)" in r.stdout
    assert "problem:" not in r.stdout


def test_corrupted_extracted_kernel_is_detected_and_extracted_again(tmp_path, monkeypatch):
    lock = stores.Store(lambda *_: None).read_lock()
    names = lock.kernels["default"]
    debs = [paths.cache_dir() / "debs" / f"{lock.packages[n].sha256}.deb" for n in names]
    if not all(d.is_file() for d in debs):
        pytest.skip("the default kernel is not cached: run 'smccc-harness setup' first")
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    for d in debs:
        shutil.copy(d, cache / "debs" / d.name)
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(cache))
    msgs: list[str] = []
    k = assets.ensure_kernel("default", progress=msgs.append)
    good = k.sha256
    with open(k.image, "r+b") as f:                # corrupt the extracted Image in place
        f.seek(0x20_0000)
        f.write(b"\xde\xad" * 512)
    msgs.clear()
    k2 = assets.ensure_kernel("default", progress=msgs.append)
    assert any("corrupt" in m for m in msgs), msgs
    assert k2.sha256 == good and _sha(k2.image) == good, "the corrupted Image was not replaced"
