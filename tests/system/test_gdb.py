"""gdb on the guest kernel through QEMU's gdbstub (``--gdb``), end to end (slow: needs a kernel build's vmlinux).

A guest booted with ``GuestOptions(gdb=True)`` (what ``pytest --gdb`` / ``smccc-harness boot --gdb`` use) listens
on 127.0.0.1 only and runs with nokaslr, so the vmlinux's addresses are the running kernel's.  gdb-multiarch (batch
mode) attaches, breaks on ``kvm_prepare_hypercall_exit`` (arch/arm64/kvm/hypercalls.c: KVM fills the
KVM_EXIT_HYPERCALL exit there for a call the SMCCC filter forwards to user space), the harness runs a forwarded
PSCI_VERSION, and the breakpoint shows the function id: the function's ``func_id`` argument and the vCPU's own x0
(``vcpu->arch.ctxt.regs.regs[0]``, read through DWARF).  gdb then detaches and the scenario completes.

The debug build is used because it has DWARF: ``kvm_prepare_hypercall_exit`` is a static function with one caller,
which gcc inlines into ``kvm_smccc_call_handler``; gdb finds an inlined function only through DWARF
(``.debug_info``), never in the ELF symbol table, and reading ``vcpu->...`` needs the struct layout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import paths
from harness.images.kernel import resolve_kernel
from harness.images.payloads import get_payload
from harness.images.sysdeps import ensure_debug_packages
from harness.kdev import kbuild
from harness.machine.config import gdb_command
from harness.machine.guests import GuestOptions, new_session
from harness.model.scenarios import PSCI_FWD, scenario

pytestmark = pytest.mark.slow

PSCI_VERSION = 0x8400_0000
BREAK_AT = "kvm_prepare_hypercall_exit"


@pytest.fixture(scope="module")
def debug_vmlinux() -> Path:
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT))
    r = subprocess.run([sys.executable, "-m", "harness.cli", "kernel", "build", "--debug", str(kbuild.source_tree())],
                       cwd=paths.REPO_ROOT, env=env, text=True, capture_output=True, timeout=7200, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    vmlinux = Path(r.stdout.strip().splitlines()[-1]).parents[3] / "vmlinux"
    assert resolve_kernel(vmlinux).vmlinux == vmlinux
    return vmlinux


class Gdb:
    """gdb-multiarch in batch mode on a script; its output collected by a thread, waitable by pattern."""

    def __init__(self, vmlinux: Path, script: Path) -> None:
        self.p = subprocess.Popen(["gdb-multiarch", "-batch", "-nx", "-x", str(script), str(vmlinux)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.out = ""
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.out += line

    def wait_for(self, pattern: str, timeout: float) -> None:
        stop = time.monotonic() + timeout
        while not re.search(pattern, self.out):
            assert self.p.poll() is None or re.search(pattern, self.out), f"gdb exited:\n{self.out}"
            assert time.monotonic() < stop, f"no {pattern!r} from gdb within {timeout} s:\n{self.out}"
            time.sleep(0.1)

    def finish(self, timeout: float) -> str:
        """gdb's whole output once it exited (killed after ``timeout`` s: the output then ends without a hit)."""
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.out += f"\n[test: gdb still running after {timeout} s, killed]\n"
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
            self._t.join(5)
        return self.out


def test_gdb_breaks_on_the_hypercall_exit_with_the_function_id_then_the_scenario_passes(debug_vmlinux, tmp_path):
    ensure_debug_packages()
    run_dir = paths.new_run_dir("gdb_test")
    s = new_session(GuestOptions(kernel=str(debug_vmlinux), gdb=True, boot_deadline_s=600), run_dir)
    assert s.config.gdb_port and "nokaslr" in s.config.cmdline and not s.snapshots
    assert f"-gdb tcp:127.0.0.1:{s.config.gdb_port}" in s.config.shell_command()
    with s:
        port = s.config.gdb_port
        script = tmp_path / "hypercall.gdb"
        script.write_text("\n".join([
            "set pagination off", "set confirm off", "set width 0",
            f"target remote 127.0.0.1:{port}",
            f"break {BREAK_AT}",
            "continue",
            "python",                   # an expression gdb cannot read must not end the script before detach
            "for e in ('func_id', '$x1', 'vcpu->arch.ctxt.regs.regs[0]'):",
            "    try:",
            "        v = hex(int(gdb.parse_and_eval(e)) & 0xffffffffffffffff)",
            "    except gdb.error as err:",
            "        v = f'<{err}>'",
            "    print(f'SMCCC-GDB {e} = {v}')",
            "end",
            "bt 4",
            "delete", "detach", "quit"]) + "\n")
        gdb = Gdb(debug_vmlinux, script)
        gdb.wait_for(r"Breakpoint 1 at 0x[0-9a-f]+", 120)
        # no need to wait for gdb's "Continuing." (its stdout is a pipe, buffered): attached, gdb holds the vCPUs
        # until it continues them, so the run request below simply waits for that
        p = get_payload("psci_version")
        r = s.run(scenario("psci_version_gdb", p, filters=PSCI_FWD, psci_minor=1, deadline_s=120), payload=p)
        out = gdb.finish(120)
        (run_dir / "gdb-output.txt").write_text(out)
        assert re.search(rf"Breakpoint 1, (?:0x[0-9a-f]+ in )?{BREAK_AT} \(", out), out
        # the function id in the vCPU's x0 as KVM holds it (what the exit will carry in run->hypercall.nr); gcc
        # inlines kvm_prepare_hypercall_exit into kvm_smccc_call_handler, so its func_id argument is in no fixed
        # register there and gdb may say "optimized out" (measured with gcc 12: it does)
        assert f"SMCCC-GDB vcpu->arch.ctxt.regs.regs[0] = {PSCI_VERSION:#x}" in out, out
        assert (f"SMCCC-GDB func_id = {PSCI_VERSION:#x}" in out
                or "SMCCC-GDB func_id = <value has been optimized out>" in out), out
        assert re.search(r"#1  kvm_smccc_call_handler \(", out), out     # inlined: the frame gdb shows above it
        assert gdb.p.returncode == 0, out
        assert r.outcome == "done", r.describe()
        assert [h["nr"] for h in r.hypercalls] == [PSCI_VERSION, PSCI_VERSION], r.describe()
        assert s.alive()
    print(f"attach line: {gdb_command(port, debug_vmlinux)}\n{out}")
