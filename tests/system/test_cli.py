"""The command line a kernel developer types: run-payload on their own ELF, boot --print-cmd."""

import shlex
import subprocess
import sys

import pytest

from harness.images.payloads import build_payloads
from harness.paths import REPO_ROOT

pytestmark = pytest.mark.infra  # the harness's own plumbing (harness/plugin/tiers.py)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.el1
@pytest.mark.psci
@pytest.mark.hvc
@pytest.mark.smc
def test_run_payload_prints_the_handler_trace(tmp_path):
    elf = build_payloads()["psci_version"]
    p = cli("run-payload", str(elf), "--forward", "psci", "--results-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if " hypercall " in ln]
    assert len(lines) == 2, p.stdout
    assert "conduit=hvc" in lines[0] and "pc=hvc_insn+0x4" in lines[0] and "name=PSCI_VERSION" in lines[0]
    assert "conduit=smc" in lines[1] and "pc=smc_insn+0x4" in lines[1]
    assert "outcome=done" in p.stdout and "trace:" in p.stderr + p.stdout
    (log,) = tmp_path.glob("run_payload-*/console.log")       # --results-dir is where the run goes
    assert f"console log: {log}" in p.stdout and "trace: " + str(log.parent) in p.stdout


@pytest.mark.bad_input
def test_run_payload_rejects_a_non_arm64_elf(tmp_path):
    p = cli("run-payload", "/bin/true", "--forward", "psci", "--results-dir", str(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "EM_X86_64" in p.stderr or "x86" in p.stderr, p.stderr


def test_boot_print_cmd_is_a_runnable_qemu_command_line(tmp_path):
    p = cli("boot", "--print-cmd", "--results-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    argv = shlex.split(p.stdout.strip().splitlines()[-1])
    assert argv[0].endswith("qemu-system-aarch64")
    assert "virt,virtualization=on,gic-version=3" in " ".join(argv)
    assert "-kernel" in argv and "-initrd" in argv and "kvm-arm.mode=nested" in " ".join(argv)


def test_boot_append_reaches_the_kernel_command_line(tmp_path):
    p = cli("boot", "--print-cmd", "--append", "initcall_debug dyndbg=+p", "--results-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    argv = shlex.split(p.stdout.strip().splitlines()[-1])
    cmdline = argv[argv.index("-append") + 1]
    assert cmdline.startswith("console=ttyAMA0") and cmdline.endswith(" initcall_debug dyndbg=+p"), cmdline


def test_boot_results_dir_gets_the_run_directory(tmp_path):
    p = cli("boot", "--results-dir", str(tmp_path / "results"))
    assert p.returncode == 0, p.stdout + p.stderr
    logs = list((tmp_path / "results").glob("boot-*/console.log"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0, p.stdout + p.stderr
    assert f"console log: {logs[0]}" in p.stdout + p.stderr


@pytest.mark.bad_input
def test_boot_panic_shows_its_cause_and_logs_under_results_dir(tmp_path):
    """A kernel that cannot start its rdinit panics with 'VFS: Unable to mount root fs'; the cause is printed
    lines before the panic line, and the excerpt shown must reach back to it."""
    p = cli("boot", "--no-snapshot", "--append", "rdinit=/nonexistent", "--results-dir", str(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in p.stderr, p.stderr
    excerpt = p.stderr.split("console excerpt:", 1)[-1]
    assert "check access for rdinit=/nonexistent failed" in excerpt, p.stderr
    (log,) = tmp_path.glob("boot-*/console.log")
    assert "check access for rdinit=/nonexistent failed" in log.read_text()
    assert f"full console log: {log}" in p.stderr


@pytest.mark.el1
@pytest.mark.psci
@pytest.mark.hvc
def test_run_payload_param_changes_what_the_payload_calls(tmp_path):
    """One ELF, two parameter blocks: smccc_calls makes the call its table describes ([count, conduit, x0..]),
    so x0 at offset 0x10 is the function id the handler sees."""
    elf = build_payloads()["smccc_calls"]
    seen = {}
    for fid in (0x8400_0000, 0x8400_000A):      # PSCI_VERSION, PSCI_FEATURES(PSCI_VERSION)
        p = cli("run-payload", str(elf), "--forward", "psci", "--results-dir", str(tmp_path),
                "--param", "0x0=1", "--param", f"0x10={fid:#x}", "--param", "0x18=0x84000000")
        assert p.returncode == 0, p.stdout + p.stderr
        lines = [ln for ln in p.stdout.splitlines() if " hypercall " in ln]
        assert len(lines) == 1 and "conduit=hvc" in lines[0], p.stdout
        seen[fid] = lines[0]
    assert "name=PSCI_VERSION nr=0x84000000 " in seen[0x8400_0000], seen
    assert "nr=0x8400000a " in seen[0x8400_000A] and "x0..x3=0x8400000a 0x84000000 " in seen[0x8400_000A], seen
    assert "reply=0x10003 " in seen[0x8400_0000] and "reply=0x0 " in seen[0x8400_000A], seen   # v1.3; supported
