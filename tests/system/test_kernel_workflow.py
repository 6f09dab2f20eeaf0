"""The kernel developer's commands against real kernels: one ``git bisect run`` step, the matrix report,
parallel workers, and (slow) a kernel built from Debian's source with its vmlinux.

Each test runs the real command in a subprocess (its own pytest, its own QEMU) on the default Debian kernel
(docs/kvm-smccc-abi.md, "KVM_EXIT_HYPERCALL": the selection checks the SMC flag of a forwarded PSCI_VERSION).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import paths
from harness.images.kernel import resolve_kernel
from harness.kdev import bisect as B
from harness.kdev import kbuild, kconfig, make, toolchain

pytestmark = pytest.mark.infra  # the harness's own plumbing (harness/plugin/tiers.py)

SELECTION = ["tests/system/test_forwarding_el1.py", "-k", "test_hypercall_flags_name_the_conduit and smc"]


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=paths.REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def default_image(request) -> str:
    return str(resolve_kernel(request.config.getoption("--kernel")).image)


def test_bisect_step_on_a_good_kernel_exits_0(default_image, tmp_path):
    r = _cli("bisect", "--no-build", "--image", default_image, "--src", str(tmp_path), "--", *SELECTION)
    assert r.returncode == B.GOOD, r.stdout[-3000:] + r.stderr[-2000:]
    assert re.search(r": good -> exit 0 \(pytest exit 0: 1 passed, 0 failed", r.stdout), r.stdout[-2000:]


def test_bisect_step_whose_guest_cannot_boot_exits_125(default_image, tmp_path):
    """A kernel that panics at boot (here: no init) is 'skip', never 'bad'."""
    r = _cli("bisect", "--no-build", "--image", default_image, "--src", str(tmp_path), "--",
             *SELECTION, "--append", "rdinit=/no/such/init", "--boot-timeout", "60")
    assert r.returncode == B.SKIP, r.stdout[-3000:] + r.stderr[-2000:]
    assert ": boot -> exit 125" in r.stdout, r.stdout[-2000:]


@pytest.fixture
def short_tmp():
    """A short directory: QEMU's unix sockets live under it and must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="smx-", dir="/tmp") as d:
        yield Path(d)


def test_matrix_writes_junit_with_properties_and_a_report(default_image, short_tmp):
    tmp_path = short_tmp
    r = _cli("matrix", "--kernels", default_image, "--out", str(tmp_path), "-k", "test_hypercall_flags_name_the_conduit")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("test_forwarding_el1::")]
    assert [row[-1] for row in rows] == ["PASS", "PASS"], r.stdout
    junit = next(tmp_path.glob("*/junit.xml"))
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot()
             .find("testsuite/properties").iter("property")}
    assert props["kernel_version"].startswith("7.") and props["accel"] in ("tcg", "kvm")
    assert re.fullmatch(r"\d+\.\d+\.\d+", props["qemu_version"]) and len(props["kernel_sha256"]) == 64
    html = (tmp_path / "report.html").read_text()
    assert html.count("<td class=passed") == 2


def test_matrix_in_two_shards_merges_to_what_one_unsharded_run_gives(default_image, short_tmp):
    """One kernel, fewer kernels than shards: each shard runs the tests whose node id hashes to it (the two
    conduits' test split 1 and 1), and the merge has the unsharded run's outcomes, KCIDB tests and table."""
    from harness.kdev import shards
    sel = ("--kernels", default_image, "-k", "test_hypercall_flags_name_the_conduit")
    whole, merged = short_tmp / "w", short_tmp / "m"
    r = _cli("matrix", *sel, "--out", str(whole), "--kcidb", str(whole / "k.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for i in (1, 2):
        r = _cli("matrix", *sel, "--shard", f"{i}/2", "--out", str(short_tmp / f"s{i}"))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        ran = [tc.get("name") for tc in ET.parse(next((short_tmp / f"s{i}").glob("*/junit.xml"))).iter("testcase")]
        assert ran == [["test_hypercall_flags_name_the_conduit[hvc-0]"],
                       ["test_hypercall_flags_name_the_conduit[smc-1]"]][i - 1], ran
        man = json.loads((short_tmp / f"s{i}" / shards.MANIFEST).read_text())
        assert (man["shard"], man["unit"], man["harness_commit"]) == (f"{i}/2", "test", shards.git_commit())
    r = _cli("matrix", "--merge", str(short_tmp / "s1"), str(short_tmp / "s2"), "--out", str(merged),
             "--kcidb", str(merged / "k.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]

    def rows(d: Path) -> list[list[str]]:
        return [line.split() for line in (d / "report.txt").read_text().splitlines()
                if line.startswith(("test_forwarding_el1::", "total"))]

    def kcidb_tests(d: Path) -> dict[str, str]:
        return {t["path"]: t["status"] for t in json.loads((d / "k.json").read_text())["tests"]}

    assert rows(merged) == rows(whole) and [row[-1] for row in rows(merged)[:2]] == ["PASS", "PASS"]
    assert rows(merged)[2] == ["total", "2P", "0F", "0E", "0S", "0X"]
    assert kcidb_tests(merged) == kcidb_tests(whole) and len(kcidb_tests(merged)) == 2
    assert (merged / "report.html").read_text().count("<td class=passed") == 2


def test_parallel_workers_each_boot_their_own_guest(default_image, tmp_path):
    """pytest -n 2: two workers, two QEMUs, two console logs (never one shared guest)."""
    junit = tmp_path / "j.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q", "--kernel",
                        default_image, "tests/system/test_forwarding_el1.py", "-k", "test_hypercall_flags_name_the_conduit",
                        "--dist", "load", f"--junitxml={junit}", "--results-dir", str(tmp_path)],
                       cwd=paths.REPO_ROOT, text=True, capture_output=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:]
    logs = {p.get("value") for p in ET.parse(junit).getroot().iter("property") if p.get("name") == "console_log"}
    assert len(logs) == 2 and all(Path(p).is_file() for p in logs), logs
    pids = {re.search(r"-(\d+)-\d+/console\.log$", p).group(1) for p in logs}  # run dirs are <prefix>-<time>-<pid>-<n>
    assert len(pids) == 2, logs
    suite = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot().find("testsuite/properties")}
    assert suite["kernel_image"] == default_image  # the xdist controller still describes the kernel


@pytest.mark.slow
def test_minimal_kernel_from_debian_source_runs_the_forwarding_suite_via_its_vmlinux():
    """``kernel build`` of linux-source-7.3 with images/kernel.config (cached O= + ccache: ~10 s when
    unchanged, ~6-8 min cold), then the EL1 forwarding tests with ``--kernel <O>/vmlinux``."""
    src = kbuild.source_tree()
    r = _cli("kernel", "build", str(src), timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    image = Path(r.stdout.strip().splitlines()[-1])
    vmlinux = image.parents[3] / "vmlinux"
    k = resolve_kernel(vmlinux)
    assert k.image == image and k.vmlinux == vmlinux
    t = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--no-snapshot",
                        "tests/system/test_forwarding_el1.py", "--kernel", str(vmlinux)],
                       cwd=paths.REPO_ROOT, text=True, capture_output=True, timeout=900, check=False)
    assert t.returncode == 0, t.stdout[-4000:]
    assert "VHE+NV2" in t.stdout, t.stdout[-2000:]


@pytest.mark.slow
def test_ssh_into_a_self_built_kernel_with_virtio_net_built_in():
    """``kernel build --ssh`` (images/kernel.config + images/kernel-ssh.config, its own O=: ~10 s when
    unchanged, ~10 min cold on 2 cores), then the SSH system tests against that Image: no modules package
    exists for it, virtio_net is built in (harness/images/sshimage.py ``has_builtin_virtio_net``)."""
    r = _cli("kernel", "build", "--ssh", str(kbuild.source_tree()), timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    image = Path(r.stdout.strip().splitlines()[-1])
    assert image.parents[3].name.endswith("-ssh"), image
    from harness.images.sshimage import has_builtin_virtio_net
    assert has_builtin_virtio_net(image)
    t = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/system/test_ssh.py",
                        "--kernel", str(image), "-k", "not default_guest_has_no_network"],
                       cwd=paths.REPO_ROOT, text=True, capture_output=True, timeout=900, check=False)
    assert t.returncode == 0, t.stdout[-4000:]
    assert re.search(r"\b7 passed\b", t.stdout), t.stdout[-2000:]


def test_fragment_option_the_base_config_rules_out_fails_and_leaves_o_as_it_was(tmp_path):
    """Real Kconfig on Debian's linux-source-7.3: a configured O=, then ``kernel build --config BASE`` whose
    BASE turns VIRTUALIZATION off under a fragment asking for KVM.  The build stops naming CONFIG_KVM, exits 2,
    and O=/.config is the one from before (harness/kdev/kbuild.py ``configure``)."""
    src = kbuild.source_tree()
    out = tmp_path / "o"
    out.mkdir()
    frag = tmp_path / "frag.config"
    frag.write_text("CONFIG_VIRTUALIZATION=y\nCONFIG_KVM=y\n")
    tc = toolchain.resolve_toolchain(env={}, install=True, progress=lambda m: None)
    assert kconfig.configure(src, out, fragment_text=frag.read_text(), fragment_path=frag, config=None, toolchain=tc,
                            env=make.make_env(), log=out / "build.log", jobs=2, ccache=False,
                            progress=lambda m: None)
    before = (out / ".config").read_text()
    assert "CONFIG_KVM=y" in before
    base = tmp_path / "base.config"
    base.write_text("CONFIG_ARM64=y\n# CONFIG_VIRTUALIZATION is not set\n")
    only_kvm = tmp_path / "kvm.config"
    only_kvm.write_text("CONFIG_KVM=y\n")
    r = _cli("kernel", "build", str(src), "--out", str(out), "--config", str(base), "--fragment", str(only_kvm),
             "--no-ccache", timeout=900)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "did not stick" in r.stderr and "CONFIG_KVM=y (got n)" in r.stderr, r.stderr[-2000:]
    assert "toolchain: CROSS_COMPILE=aarch64-linux-gnu-" in r.stdout, r.stdout[-2000:]
    assert (out / ".config").read_text() == before


@pytest.mark.slow
def test_minimal_kernel_built_with_llvm_passes_the_psci_suite():
    """``kernel build --llvm`` of linux-source-7.3 with Debian's clang (LLVM=1 where the release's clang is new
    enough for the tree's scripts/min-tool-version.sh, else the newest versioned clang-N, e.g. LLVM=-19 on
    bookworm whose clang 14 is too old for 7.x), installed through harness/images/sysdeps.py; then the PSCI suite
    with ``--kernel <O>/vmlinux``.  Cold: ~10-15 min on 2 cores."""
    src = kbuild.source_tree()
    llvm = toolchain.debian_llvm_for(src)
    if llvm is None:
        pytest.skip(f"apt offers no clang new enough for {src.name} (scripts/min-tool-version.sh llvm)")
    r = _cli("kernel", "build", str(src), "--llvm", llvm, "--install-toolchain", timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"toolchain: LLVM={llvm} (clang" in r.stdout, r.stdout[-2000:]
    image = Path(r.stdout.strip().splitlines()[-1])
    out = image.parents[3]
    cfg = kconfig.parse_fragment((out / ".config").read_text())
    assert cfg.get("CONFIG_CC_IS_CLANG") == "y" and cfg.get("CONFIG_LD_IS_LLD") == "y", out
    t = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--no-snapshot",
                        "tests/system/test_psci_el1.py", "--kernel", str(out / "vmlinux")],
                       cwd=paths.REPO_ROOT, text=True, capture_output=True, timeout=1800, check=False)
    assert t.returncode == 0, t.stdout[-4000:]
    assert re.search(r"\b\d+ passed\b", t.stdout) and " failed" not in t.stdout, t.stdout[-2000:]
