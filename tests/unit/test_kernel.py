"""``--kernel PATH`` / ``--kernel-pkg``: Image, Image.gz and vmlinux files, clear errors for anything else,
the panic symbolizer, the config fragment helpers, and capability -> skip reasons.

The ELF files are real: assembled and linked with aarch64-linux-gnu-as/ld (a tiny "vmlinux" with a
``linux_banner`` and two functions at kernel addresses), and the host's own x86-64 /bin/true."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.errors import SetupError
from harness.images import kernel as K
from harness.kdev import kbuild, kconfig, make
from harness.model import capabilities as C

BANNER = "Linux version 7.3.4-smccc (u@h) (aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0) #1 SMP PREEMPT"
TEXT_BASE = 0xFFFF800080010000

VMLINUX_S = f"""
    .section .rodata
    .globl linux_banner
linux_banner:
    .asciz "{BANNER}\\n"
    .text
    .globl handle_smc
    .type handle_smc, %function
handle_smc:
    nop
    nop
    nop
    ret
    .size handle_smc, .-handle_smc
    .globl kvm_handle_guest_abort
    .type kvm_handle_guest_abort, %function
kvm_handle_guest_abort:
    .rept 16
    nop
    .endr
    ret
    .size kvm_handle_guest_abort, .-kvm_handle_guest_abort
"""

needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-as") is None,
                                 reason="aarch64-linux-gnu-as missing (smccc-harness setup installs binutils-aarch64-linux-gnu)")


def _link(tmp: Path, src: str, name: str = "vmlinux") -> Path:
    (tmp / "v.S").write_text(src)
    subprocess.run(["aarch64-linux-gnu-as", "-o", str(tmp / "v.o"), str(tmp / "v.S")], check=True)
    out = tmp / name
    subprocess.run(["aarch64-linux-gnu-ld", "-Ttext", hex(TEXT_BASE), "-o", str(out), str(tmp / "v.o")], check=True)
    return out


def _image(path: Path, banner: str = BANNER) -> Path:
    head = bytearray(0x40)
    head[0x38:0x3C] = b"ARM\x64"
    path.write_bytes(bytes(head) + b"\0" * 64 + banner.encode() + b"\n\0" + b"\0" * 256)
    return path


@pytest.fixture
def otree(tmp_path):
    """An O= build tree: vmlinux at the top, arch/arm64/boot/Image below, same banner."""
    _link(tmp_path, VMLINUX_S)
    boot = tmp_path / "arch" / "arm64" / "boot"
    boot.mkdir(parents=True)
    _image(boot / "Image")
    return tmp_path


def test_plain_image_reports_its_banner_version(tmp_path):
    k = K.resolve_kernel(_image(tmp_path / "Image"))
    assert (k.image, k.version) == (tmp_path / "Image", "7.3.4-smccc")


def test_image_gz_is_unpacked_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(tmp_path / "cache"))
    raw = _image(tmp_path / "Image")
    (tmp_path / "Image.gz").write_bytes(gzip.compress(raw.read_bytes()))
    k = K.resolve_kernel(tmp_path / "Image.gz")
    assert k.image.parent == tmp_path / "cache" / "kernels"
    assert k.image.read_bytes() == raw.read_bytes()


def test_corrupt_gzip_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "Image.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(SetupError, match="corrupt gzip"):
        K.resolve_kernel(tmp_path / "Image.gz")


@needs_cross
def test_vmlinux_resolves_to_the_image_of_its_tree(otree):
    k = K.resolve_kernel(otree / "vmlinux")
    assert k.image == otree / "arch" / "arm64" / "boot" / "Image"
    assert K.vmlinux_of(k) == otree / "vmlinux"
    assert k.version == "7.3.4-smccc"


@needs_cross
def test_image_in_an_o_tree_finds_its_vmlinux(otree):
    k = K.resolve_kernel(otree / "arch" / "arm64" / "boot" / "Image")
    assert K.vmlinux_of(k) == otree / "vmlinux"


@needs_cross
def test_vmlinux_banner_is_read_from_the_linux_banner_symbol(otree):
    assert K.vmlinux_banner(otree / "vmlinux") == BANNER


@needs_cross
def test_vmlinux_from_another_build_is_refused(otree):
    _image(otree / "arch" / "arm64" / "boot" / "Image", banner=BANNER.replace("#1", "#2"))
    with pytest.raises(SetupError, match="different builds"):
        K.resolve_kernel(otree / "vmlinux")


@needs_cross
def test_vmlinux_without_an_image_says_what_to_build(tmp_path):
    _link(tmp_path, VMLINUX_S)
    with pytest.raises(SetupError, match="no Image next to it"):
        K.resolve_kernel(tmp_path / "vmlinux")


def test_x86_elf_is_refused_naming_its_machine(tmp_path):
    with pytest.raises(SetupError, match="EM_X86_64, not EM_AARCH64"):
        K.resolve_kernel(Path(shutil.which("true")).resolve())


@needs_cross
def test_arm64_elf_that_is_not_a_kernel_is_refused(tmp_path):
    _link(tmp_path, "    .text\n    .globl _start\n_start:\n    ret\n", name="prog")
    with pytest.raises(SetupError, match="without a linux_banner symbol"):
        K.resolve_kernel(tmp_path / "prog")


@pytest.mark.parametrize("content,what", [
    (b"#!/bin/sh\necho hi\n" + b"\0" * 0x400, "not a kernel image"),
    (b"MZ" + b"\0" * 0x400, "PE/EFI image"),
    (b"\0" * 0x202 + b"HdrS" + b"\0" * 0x200, "x86 bzImage"),
])
def test_non_kernel_files_get_a_clear_error(tmp_path, content, what):
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(SetupError, match=what):
        K.resolve_kernel(tmp_path / "f")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SetupError, match="no such file"):
        K.resolve_kernel(tmp_path / "nope" / "Image")


@pytest.mark.parametrize("spec,parsed", [
    ("linux-image-6.12.117+deb13-cloud-arm64/trixie", ("linux-image-6.12.117+deb13-cloud-arm64", "trixie")),
    ("linux-image-cloud-arm64", ("linux-image-cloud-arm64", None)),
])
def test_kernel_pkg_spec_parses(spec, parsed):
    assert K.parse_pkg_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["Linux Image", "/abs/path", "linux-image/trixie backports", ""])
def test_kernel_pkg_spec_rejects_non_package_names(spec):
    with pytest.raises(SetupError, match="NAME"):
        K.parse_pkg_spec(spec)


# ---- symbolizer -------------------------------------------------------------------------------------
@needs_cross
def test_symbolizer_names_function_offset_and_size(otree):
    s = K.Symbolizer(otree / "vmlinux")
    assert s.lookup(TEXT_BASE + 8) == "handle_smc+0x8/0x10"
    assert s.lookup(TEXT_BASE + 0x10 + 0x14) == "kvm_handle_guest_abort+0x14/0x44"
    assert s.lookup(TEXT_BASE - 4) is None


@needs_cross
def test_panic_excerpt_gets_symbolized_pc_and_lr(otree):
    excerpt = (f"Internal error: Oops: 0000000096000004 [#1]  SMP\n"
               f"pc : {TEXT_BASE + 0x18:016x}\nlr : {TEXT_BASE + 4:016x}\nsp : ffff80008000bd60\n"
               f"Call trace:\n {TEXT_BASE + 0x18:016x}\n")
    out = K.Symbolizer(otree / "vmlinux").symbolize_excerpt(excerpt)
    assert f"pc {TEXT_BASE + 0x18:#018x} = kvm_handle_guest_abort+0x8/0x44" in out
    assert f"lr {TEXT_BASE + 4:#018x} = handle_smc+0x4/0x10" in out
    assert "ffff80008000bd60" not in out  # sp is not code


@needs_cross
def test_kaslr_offset_in_the_excerpt_is_subtracted(otree):
    excerpt = f"pc : {TEXT_BASE + 0x200000 + 8:016x}\nKernel Offset: 0x200000 from 0xffff800080000000\n"
    assert "handle_smc+0x8/0x10" in K.Symbolizer(otree / "vmlinux").symbolize_excerpt(excerpt)


@needs_cross
def test_kallsyms_call_trace_gets_addresses_and_file_line_from_dwarf(tmp_path):
    """A kernel with kallsyms prints function+off/size; with DWARF (as -g: line info for v.S) each pc/lr/frame
    gets its file:line; a return address (lr, frames after the first) is looked up at its call (4 bytes back)."""
    (tmp_path / "v.S").write_text(VMLINUX_S)
    subprocess.run(["aarch64-linux-gnu-as", "-g", "-o", str(tmp_path / "v.o"), str(tmp_path / "v.S")], check=True)
    subprocess.run(["aarch64-linux-gnu-ld", "-Ttext", hex(TEXT_BASE), "-o", str(tmp_path / "vmlinux"),
                    str(tmp_path / "v.o")], check=True)
    lines = VMLINUX_S.splitlines()       # lines[i] is v.S line i + 1
    nop3 = next(i for i, ln in enumerate(lines) if ln.strip() == "ret")     # handle_smc+0x8, the 3rd nop
    excerpt = ("[    5.1] WARNING: CPU: 0 PID: 1 at v.S:1 handle_smc+0x8/0x10\n"
               "[    5.1] pc : handle_smc+0x8/0x10\n[    5.1] lr : kvm_handle_guest_abort+0x14/0x44\n"
               "[    5.1] sp : ffff80008000bd60\n[    5.1] Call trace:\n[    5.1]  handle_smc+0x8/0x10 (P)\n"
               "[    5.1]  kvm_handle_guest_abort+0x14/0x44\n[    5.1] ---[ end trace 0000000000000000 ]---\n")
    s = K.Symbolizer(tmp_path / "vmlinux")
    assert s.has_dwarf
    out = s.symbolize_excerpt(excerpt)
    assert f"pc {TEXT_BASE + 8:#018x} = handle_smc+0x8/0x10 at {tmp_path / 'v.S'}:{nop3}" in out, out
    assert f"lr {TEXT_BASE + 0x10 + 0x14:#018x} = kvm_handle_guest_abort+0x14/0x44 at" in out, out
    assert f"#0 {TEXT_BASE + 8:#018x} = handle_smc+0x8/0x10 at {tmp_path / 'v.S'}:{nop3}" in out, out
    assert f"#1 {TEXT_BASE + 0x24:#018x} = kvm_handle_guest_abort+0x14/0x44" in out, out
    assert "bd60" not in out


@needs_cross
def test_lockdep_held_lock_lines_get_where_the_lock_was_taken(otree):
    out = K.Symbolizer(otree / "vmlinux").symbolize_excerpt(
        "[    9.1]  #0: ffff000002d41038 (lock_me_up){+.+.}-{3:3}, at: kvm_handle_guest_abort+0x14/0x44\n")
    assert f"at {TEXT_BASE + 0x24:#018x} = kvm_handle_guest_abort+0x14/0x44" in out, out


@needs_cross
def test_a_frame_after_a_noreturn_call_names_the_function_the_call_is_in(otree):
    """panic() does not return: the return address is the next function's first byte (what the kernel prints)."""
    out = K.Symbolizer(otree / "vmlinux").symbolize_excerpt(
        "Call trace:\n show_stack+0x14/0x1c (C)\n kvm_handle_guest_abort+0x0/0x44\n")
    assert "= kvm_handle_guest_abort+0x0/0x44 (the call is in handle_smc+0xc/0x10)" in out, out


@needs_cross
def test_without_dwarf_the_symbolizer_says_how_to_get_file_line(otree):
    out = K.Symbolizer(otree / "vmlinux").symbolize_excerpt("pc : handle_smc+0x4/0x10\n")
    assert f"pc {TEXT_BASE + 4:#018x} = handle_smc+0x4/0x10" in out and " at " not in out.splitlines()[1]
    assert "no DWARF" in out and "--debug" in out


# ---- the config fragment ----------------------------------------------------------------------------
def test_fragment_names_every_option_the_agent_and_platform_doc_need():
    frag = kconfig.parse_fragment(kbuild.FRAGMENT.read_text())
    for opt in ("KVM", "VIRTUALIZATION", "SERIAL_AMBA_PL011_CONSOLE", "BLK_DEV_INITRD", "INITRAMFS_PRESERVE_MTIME",
                "DEVTMPFS_MOUNT", "VIRTIO_PCI", "VIRTIO_CONSOLE", "PCI_HOST_GENERIC", "MAGIC_SYSRQ", "TMPFS"):
        assert frag.get(f"CONFIG_{opt}") == "y", opt
    assert frag["CONFIG_NR_CPUS"] == "4"


def test_unmet_options_lists_what_kconfig_dropped():
    frag = {"CONFIG_KVM": "y", "CONFIG_NR_CPUS": "2", "CONFIG_TYPO": "y", "CONFIG_FOO": "n"}
    cfg = "CONFIG_KVM=y\nCONFIG_NR_CPUS=2\n# CONFIG_FOO is not set\n"
    assert kconfig.unmet_options(frag, cfg) == ["CONFIG_TYPO=y (got n)"]


def test_make_command_is_out_of_tree_cross_and_through_ccache(tmp_path):
    argv = make.make_argv(tmp_path / "src", tmp_path / "o", "Image", 2)
    assert argv[:3] == ["make", "-C", str(tmp_path / "src")]
    assert {f"O={tmp_path / 'o'}", "ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-", "-j2",
            "CC=ccache aarch64-linux-gnu-gcc"} <= set(argv)
    assert make.make_env()["CCACHE_SLOPPINESS"] == "include_file_mtime,include_file_ctime,time_macros"


def test_building_something_that_is_not_a_kernel_tree_says_so(tmp_path):
    with pytest.raises(Exception, match="not a Linux source tree"):
        kbuild.build(tmp_path)


# ---- capabilities -> skip reasons -------------------------------------------------------------------
FULL = {"uname": "7.3.4", "kvm": True, "smccc_filter": True, "KVM_CAP_ARM_EL2": 1, "KVM_CAP_ARM_EL2_E2H0": 1,
        "KVM_CAP_ARM_SYSTEM_SUSPEND": 1, "kvm_mode": "VHE+NV2 mode initialized successfully"}


@pytest.mark.parametrize("missing,markers,reason", [
    ({"kvm": False, "reason": "/dev/kvm is absent: x"}, {"el1"}, "kernel 7.3.4: /dev/kvm is absent: x"),
    ({"smccc_filter": False, "smccc_filter_errno": "ENXIO"}, {"psci"}, "no SMCCC filter (KVM_HAS_DEVICE_ATTR on the VM fd failed: ENXIO)"),
    ({"smccc_filter": False}, {"filter"}, "it needs Linux 6.4+"),
    ({"KVM_CAP_ARM_EL2": 0, "kvm_mode": "VHE mode initialized successfully"}, {"el2"},
     "KVM_CAP_ARM_EL2 is 0 (nested virt needs 6.16+, FEAT_NV2 and kvm-arm.mode=nested; KVM says: VHE mode"),
    ({"KVM_CAP_ARM_EL2_E2H0": 0}, {"e2h0"}, "KVM_CAP_ARM_EL2_E2H0 is 0"),
    ({"KVM_CAP_ARM_SYSTEM_SUSPEND": 0}, {"system_suspend"}, "KVM_CAP_ARM_SYSTEM_SUSPEND is 0"),
])
def test_missing_capability_skip_names_it(missing, markers, reason):
    assert reason in C.skip_reason({**FULL, **missing}, markers)


@pytest.mark.parametrize("missing,markers", [
    ({"KVM_CAP_ARM_EL2": 0}, {"el1", "psci"}),          # EL1 tests do not need nested virt
    ({"smccc_filter": False}, {"el1"}),                 # tests without filter/psci markers do not need the filter
    ({"KVM_CAP_ARM_EL2_E2H0": 0}, {"el2"}),
])
def test_capability_a_test_does_not_need_does_not_skip_it(missing, markers):
    assert C.skip_reason({**FULL, **missing}, markers) is None


@needs_cross
def test_console_failure_gets_symbolized_only_when_the_kernel_has_a_vmlinux(otree):
    excerpt = f"Unable to handle kernel NULL pointer dereference\npc : {TEXT_BASE + 4:016x}\n"
    with_vm = K.resolve_kernel(otree / "vmlinux")
    (otree / "alone").mkdir()
    without = K.resolve_kernel(_image(otree / "alone" / "Image"))
    assert "pc" in K.symbolize_for(with_vm, excerpt) and "handle_smc+0x4/0x10" in K.symbolize_for(with_vm, excerpt)
    assert K.symbolize_for(without, excerpt) == ""
    assert K.symbolize_for(None, excerpt) == ""


def test_image_banner_prefers_the_real_banner_over_the_weak_placeholder(tmp_path):
    """init/version.c leaves a placeholder ('#' with no build number) in the Image besides the real one."""
    placeholder = BANNER.replace("#1 SMP PREEMPT", "# SMP PREEMPT ")
    p = tmp_path / "Image"
    _image(p, banner=placeholder)
    p.write_bytes(p.read_bytes() + (BANNER + " Wed Nov 25 13:34:19 UTC 2026\n\0").encode())
    assert K.image_banner(p)[1].strip() == BANNER + " Wed Nov 25 13:34:19 UTC 2026"


def test_ssh_fragment_adds_networking_to_the_base_fragment():
    base, ssh = (kconfig.parse_fragment(f.read_text()) for f in (kbuild.FRAGMENT, kbuild.SSH_FRAGMENT))
    assert ssh["CONFIG_VIRTIO_NET"] == "y" and ssh["CONFIG_INET"] == "y"
    assert not set(base) & set(ssh), "the SSH fragment only adds options"


def test_each_flavour_has_its_own_build_directory(tmp_path):
    plain, ssh = kbuild.default_out_dir(tmp_path), kbuild.default_out_dir(tmp_path, "ssh")
    assert ssh.name == plain.name + "-ssh" and ssh.parent == plain.parent
