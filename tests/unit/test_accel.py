"""``--accel``: the accelerator plan and its KVM command line (nested virt needs KVM_CAP_ARM_EL2 on the host;
Documentation/virt/kvm/api.rst).  These x86 hosts cannot run arm64 KVM, so the KVM paths are checked on
described hosts; the real probe runs here too and must say why KVM is out."""

from __future__ import annotations

import platform

import pytest

from harness.errors import SetupError
from harness.machine import accel as A
from harness.machine.config import MachineConfig

ARM_NV = A.HostKvm("aarch64", True, el2=1)
ARM_NO_NV = A.HostKvm("aarch64", True, el2=0)
ARM_NO_KVM = A.HostKvm("aarch64", False, error="/dev/kvm does not exist")
X86 = A.HostKvm("x86_64", True)


def test_kvm_on_a_nested_capable_host_uses_cpu_host_and_el2():
    p = A.plan("kvm", ARM_NV)
    assert (p.accel, p.cpu, p.virtualization) == ("kvm", "host", True)


@pytest.mark.parametrize("host,missing", [
    (X86, "the host is x86_64, not arm64"),
    (ARM_NO_KVM, "no usable /dev/kvm (/dev/kvm does not exist)"),
    (ARM_NO_NV, "KVM_CHECK_EXTENSION(KVM_CAP_ARM_EL2) = 0"),
])
def test_kvm_request_names_what_the_host_lacks_and_never_falls_back(host, missing):
    with pytest.raises(SetupError, match="--accel kvm is unavailable") as e:
        A.plan("kvm", host)
    assert missing in str(e.value)
    assert "--accel tcg" in e.value.hint


@pytest.mark.parametrize("host,accel", [(ARM_NV, "kvm"), (ARM_NO_NV, "tcg"), (X86, "tcg"), (ARM_NO_KVM, "tcg")])
def test_auto_picks_kvm_only_with_nested_virt_and_says_why_not(host, accel):
    p = A.plan("auto", host)
    assert p.accel == accel
    if accel == "tcg":
        assert p.note.startswith("accel auto -> tcg: ") and len(p.note) > len("accel auto -> tcg: ")


def test_tcg_request_is_tcg_with_cpu_max():
    p = A.plan("tcg", ARM_NV)
    assert (p.accel, p.cpu, p.virtualization) == ("tcg", "max", True)


def test_kvm_machine_command_line(tmp_path):
    k = tmp_path / "Image"
    k.write_bytes(b"\0" * 64)
    p = A.plan("kvm", ARM_NV)
    argv = MachineConfig(kernel=k, accel=p.accel, cpu=p.cpu, virtualization=p.virtualization).argv()
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-M") + 1] == "virt,virtualization=on,gic-version=3"


def test_qemu_probe_asks_for_exactly_the_machine_the_tests_use():
    argv = A.qemu_probe_argv("qemu-system-aarch64")
    assert argv[argv.index("-M") + 1] == "virt,virtualization=on,gic-version=3"
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"
    assert "-S" in argv and argv[argv.index("-qmp") + 1] == "stdio"


def test_qemu_that_refuses_kvm_nesting_is_reported_with_its_message(monkeypatch):
    monkeypatch.setattr(A, "qemu_can_nest", lambda qemu_bin: (False, "KVM does not support virtualization=on"))
    with pytest.raises(SetupError, match="refuses -accel kvm .*KVM does not support virtualization=on"):
        A.resolve("kvm", host=ARM_NV)
    assert A.resolve("auto", host=ARM_NV).accel == "tcg"


@pytest.mark.skipif(platform.machine() in A.ARM64_MACHINES, reason="checks the non-arm64 host path")
def test_this_x86_host_refuses_kvm_clearly():
    with pytest.raises(SetupError, match=f"the host is {platform.machine()}, not arm64"):
        A.resolve("kvm")
    assert A.resolve("auto").accel == "tcg"
