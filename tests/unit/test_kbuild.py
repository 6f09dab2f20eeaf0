"""``smccc-harness kernel build``: the developer's toolchain (LLVM=, CROSS_COMPILE=, KBUILD_OUTPUT), --config
merging, live progress, and bad input that stops before anything is made (harness/kdev/kbuild.py).

The real builds (gcc and LLVM=, a real Kconfig run) are in tests/system/test_kernel_workflow.py."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.kdev import kbuild, kconfig, make, toolchain


def _tool(d: Path, name: str, version_line: str = "") -> Path:
    p = d / name
    p.write_text(f"#!/bin/sh\necho '{version_line or name + ' version 1.0.0'}'\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


@pytest.fixture
def bare_path(tmp_path, monkeypatch):
    """PATH holding only a directory of our own (plus sh for the scripts)."""
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", str(d))
    return d


# ---- toolchain ------------------------------------------------------------------------------------------
def test_llvm_without_clang_names_debian_packages(bare_path):
    with pytest.raises(HarnessError) as e:
        toolchain.resolve_toolchain(env={"LLVM": "1"}, install=False)
    assert "LLVM=1 (env LLVM)" in str(e.value) and "clang" in str(e.value)
    assert "clang lld llvm" in e.value.hint


def test_versioned_llvm_names_versioned_packages(bare_path):
    with pytest.raises(HarnessError) as e:
        toolchain.resolve_toolchain(llvm="-19", env={}, install=False)
    assert "clang-19" in str(e.value) and "--llvm" in str(e.value)
    assert "clang-19 lld-19 llvm-19" in e.value.hint


def test_llvm_value_kbuild_does_not_know_is_refused(bare_path):
    with pytest.raises(HarnessError, match="LLVM='yes'"):
        toolchain.resolve_toolchain(env={"LLVM": "yes"}, install=False)


def test_llvm_zero_means_gcc(bare_path):
    _tool(bare_path, "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0")
    tc = toolchain.resolve_toolchain(env={"LLVM": "0"}, install=False)
    assert tc.llvm == "" and tc.cc == "aarch64-linux-gnu-gcc" and tc.origin == "default"


def test_llvm_found_uses_clang_and_passes_llvm_to_make(bare_path):
    for t in ("clang-19", "ld.lld-19", "llvm-ar-19", "llvm-objcopy-19", "llvm-nm-19"):
        _tool(bare_path, t, "Debian clang version 19.1.7 (3~deb12u1)")
    tc = toolchain.resolve_toolchain(env={"LLVM": "-19"}, install=False)
    assert (tc.cc, tc.family, tc.origin) == ("clang-19", "llvm", "env LLVM")
    argv = make.make_argv(Path("/src"), Path("/o"), "Image", 2, ccache=True, toolchain=tc)
    assert "LLVM=-19" in argv and "CC=ccache clang-19" in argv and not any(a.startswith("CROSS_COMPILE") for a in argv)
    assert "LLVM=-19 (clang-19: Debian clang version 19.1.7" in tc.describe()


def test_llvm_dir_prefix(tmp_path, bare_path):
    d = tmp_path / "llvm" / "bin"
    d.mkdir(parents=True)
    for t in ("clang", "ld.lld", "llvm-ar", "llvm-objcopy", "llvm-nm"):
        _tool(d, t, "clang version 20.1.0")
    tc = toolchain.resolve_toolchain(llvm=f"{d}/", env={}, install=False)
    assert tc.cc == f"{d}/clang" and toolchain.llvm_packages(tc.llvm) == []


def test_clang_older_than_the_tree_needs_is_refused_before_make(tmp_path, bare_path):
    for t in ("clang", "ld.lld", "llvm-ar", "llvm-objcopy", "llvm-nm"):
        _tool(bare_path, t, "Debian clang version 14.0.6")
    (bare_path / "sh").symlink_to("/bin/sh")
    src = tmp_path / "src"
    (src / "scripts").mkdir(parents=True)
    (src / "scripts" / "min-tool-version.sh").write_text(
        'case "$1" in llvm) echo 17.0.1 ;; gcc) echo 8.1.0 ;; esac\n')
    with pytest.raises(HarnessError, match=r"older than the 17\.0\.1 this tree needs"):
        toolchain.resolve_toolchain(env={"LLVM": "1"}, install=False, src=src)


def test_cross_compile_prefix_without_gcc_is_an_error(bare_path):
    with pytest.raises(HarnessError) as e:
        toolchain.resolve_toolchain(env={"CROSS_COMPILE": "/opt/nope/bin/aarch64-none-elf-"}, install=False)
    assert "aarch64-none-elf-gcc not found" in str(e.value) and "unset CROSS_COMPILE" in e.value.hint


def test_cross_compile_from_env_is_used(bare_path):
    _tool(bare_path, "aarch64-none-linux-gnu-gcc", "aarch64-none-linux-gnu-gcc (Arm GNU Toolchain 14.2) 14.2.1")
    tc = toolchain.resolve_toolchain(env={"CROSS_COMPILE": "aarch64-none-linux-gnu-"}, install=False)
    assert tc.cross_compile == "aarch64-none-linux-gnu-" and tc.origin == "env CROSS_COMPILE"
    argv = make.make_argv(Path("/s"), Path("/o"), "Image", 1, ccache=False, toolchain=tc)
    assert "CROSS_COMPILE=aarch64-none-linux-gnu-" in argv and not any(a.startswith("CC=") for a in argv)


def test_make_env_leaves_the_toolchain_to_argv(monkeypatch):
    for k in ("LLVM", "CROSS_COMPILE", "KBUILD_OUTPUT", "CC", "KCONFIG_ALLCONFIG"):
        monkeypatch.setenv(k, "x")
    env = make.make_env()
    assert not {"LLVM", "CROSS_COMPILE", "KBUILD_OUTPUT", "CC", "KCONFIG_ALLCONFIG"} & set(env)


def test_tool_versions_parse():
    assert toolchain.parse_tool_version("Debian clang version 19.1.7 (3~deb12u1)") == (19, 1, 7)
    assert toolchain.parse_tool_version("aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0") == (12, 2, 0)


def test_debian_llvm_pick_prefers_the_release_clang_then_the_newest_versioned(tmp_path):
    src = tmp_path / "src"
    (src / "scripts").mkdir(parents=True)
    (src / "scripts" / "min-tool-version.sh").write_text('case "$1" in llvm) echo 17.0.1 ;; esac\n')
    bookworm = {"clang": "1:14.0-55.7~deb12u1", "clang-16": "1:16.0.6-15~deb12u1", "clang-19": "1:19.1.7-3~deb12u1"}
    assert toolchain.debian_llvm_for(src, bookworm) == "-19"
    assert toolchain.debian_llvm_for(src, {"clang": "1:19.0-63"}) == "1"
    assert toolchain.debian_llvm_for(src, {"clang": "1:14.0-55.7~deb12u1"}) is None


# ---- output directory -------------------------------------------------------------------------------------
def test_kbuild_output_is_the_default_out_dir(tmp_path):
    assert kbuild.resolve_out_dir(tmp_path, None, env={"KBUILD_OUTPUT": str(tmp_path / "kb")}) == tmp_path / "kb"
    assert kbuild.resolve_out_dir(tmp_path, tmp_path / "o", env={"KBUILD_OUTPUT": "/x"}) == tmp_path / "o"
    plain = kbuild.resolve_out_dir(tmp_path, None, env={})
    llvm = kbuild.resolve_out_dir(tmp_path, None, env={}, flavour=kbuild.out_flavour(llvm=True))
    assert plain != llvm and llvm.name.endswith("-llvm")


def test_flavours_keep_configs_apart(tmp_path):
    assert kbuild.out_flavour() == ""
    assert kbuild.out_flavour(ssh=True, llvm=True) == "ssh-llvm"
    assert kbuild.out_flavour(config="defconfig") == "defconfig"
    assert kbuild.out_flavour(config="olddefconfig") == ""
    assert kbuild.out_flavour(config=str(tmp_path / "a")) != kbuild.out_flavour(config=str(tmp_path / "b"))
    assert kbuild.out_flavour(debug=True) == "debug" and kbuild.out_flavour(debug=True, llvm=True) == "debug-llvm"


def test_debug_fragment_names_every_detector_the_splat_table_needs():
    """docs/debug-kernels.md's table: each splat class needs one of these built in."""
    frag = kconfig.parse_fragment(kbuild.DEBUG_FRAGMENT.read_text())
    for opt in ("PROVE_LOCKING", "DEBUG_ATOMIC_SLEEP", "KASAN", "KASAN_GENERIC", "DEBUG_LIST",
                "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT", "KALLSYMS_ALL", "DEBUG_FS", "LKDTM"):
        assert frag.get(f"CONFIG_{opt}") == "y", opt
    assert not set(frag) & set(kconfig.parse_fragment(kbuild.FRAGMENT.read_text())), "only adds to kernel.config"


# ---- --config ---------------------------------------------------------------------------------------------
def test_merge_replaces_the_fragments_symbols_and_keeps_the_rest():
    base = "CONFIG_A=y\n# CONFIG_KVM is not set\nCONFIG_NR_CPUS=256\nCONFIG_B=m\n"
    frag = "CONFIG_KVM=y\nCONFIG_NR_CPUS=2\n# CONFIG_B is not set\n"
    merged = kconfig.merge_config(base, frag)
    cfg = kconfig.parse_fragment(merged)
    assert cfg == {"CONFIG_A": "y", "CONFIG_KVM": "y", "CONFIG_NR_CPUS": "2", "CONFIG_B": "n"}
    assert merged.count("CONFIG_NR_CPUS") == 1 and merged.count("CONFIG_KVM") == 1


def test_config_file_that_does_not_exist(tmp_path):
    with pytest.raises(HarnessError, match="no such file") as e:
        kconfig.check_kernel_config(tmp_path / "nope")
    assert "defconfig" in e.value.hint


def test_config_file_that_is_not_a_kernel_config(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\nworld\n")
    with pytest.raises(HarnessError, match="not a kernel config"):
        kconfig.check_kernel_config(p)


def test_config_of_another_architecture(tmp_path):
    p = tmp_path / "x86.config"
    p.write_text("CONFIG_X86=y\nCONFIG_X86_64=y\n")
    with pytest.raises(HarnessError, match="another architecture"):
        kconfig.check_kernel_config(p)


# ---- configure(): O= is never left half-configured ---------------------------------------------------------
FAKE_MAKEFILE = """\
# a stand-in for the kernel's kconfig targets: writes O/.config from KCONFIG_ALLCONFIG (or fails on request)
allnoconfig alldefconfig defconfig:
\t@test -z "$(FAIL)" || { echo "make: *** [Makefile] Error 2"; exit 2; }
\t@echo "  HOSTCC  scripts/kconfig/conf.o"
\t@if [ -n "$(KCONFIG_ALLCONFIG)" ]; then grep -v DROPPED "$(KCONFIG_ALLCONFIG)" > $(O)/.config; \\
\t else echo CONFIG_DEFCONFIG=y > $(O)/.config; fi
"""


@pytest.fixture
def fake_tree(tmp_path):
    src = tmp_path / "src"
    (src / "arch" / "arm64").mkdir(parents=True)
    (src / "Makefile").write_text(FAKE_MAKEFILE)
    out = tmp_path / "o"
    out.mkdir()
    return src, out


def _configure(src, out, frag, config=None, env=None):
    fp = out.parent / "frag.config"
    fp.write_text(frag)
    tc = toolchain.Toolchain("", "aarch64-linux-gnu-", "aarch64-linux-gnu-gcc", "gcc 12", "default")
    return kconfig.configure(src, out, fragment_text=frag, fragment_path=fp, config=config, toolchain=tc,
                            env=dict(os.environ, **(env or {})), log=out / "build.log", jobs=1, ccache=False,
                            progress=lambda m: None)


def test_configure_runs_once_then_only_when_inputs_change(fake_tree):
    src, out = fake_tree
    assert _configure(src, out, "CONFIG_KVM=y\n") is True
    assert _configure(src, out, "CONFIG_KVM=y\n") is False
    assert _configure(src, out, "CONFIG_KVM=y\nCONFIG_PCI=y\n") is True


def test_option_that_does_not_stick_fails_and_restores_the_previous_config(fake_tree):
    src, out = fake_tree
    _configure(src, out, "CONFIG_KVM=y\n")
    before = (out / ".config").read_bytes(), (out / kconfig.STAMP).read_bytes()
    with pytest.raises(make.KernelBuildError, match=r"CONFIG_DROPPED_BY_KCONFIG=y \(got n\)"):
        _configure(src, out, "CONFIG_KVM=y\nCONFIG_DROPPED_BY_KCONFIG=y\n")
    assert ((out / ".config").read_bytes(), (out / kconfig.STAMP).read_bytes()) == before
    assert _configure(src, out, "CONFIG_KVM=y\n") is False     # nothing half-done: the old config still counts


def test_failed_make_leaves_no_config_where_there_was_none(fake_tree):
    src, out = fake_tree
    with pytest.raises(make.KernelBuildError, match="make exit 2"):
        _configure(src, out, "CONFIG_KVM=y\n", env={"FAIL": "1"})
    assert not (out / ".config").exists() and not (out / kconfig.STAMP).exists()


def test_config_file_is_merged_with_the_fragment(fake_tree, tmp_path):
    src, out = fake_tree
    mine = tmp_path / "my.config"
    mine.write_text("CONFIG_ARM64=y\nCONFIG_MINE=y\n# CONFIG_KVM is not set\n")
    assert _configure(src, out, "CONFIG_KVM=y\n", config=str(mine)) is True
    cfg = kconfig.parse_fragment((out / ".config").read_text())
    assert cfg["CONFIG_MINE"] == "y" and cfg["CONFIG_KVM"] == "y"


def test_olddefconfig_needs_a_config_in_o(fake_tree):
    src, out = fake_tree
    with pytest.raises(HarnessError, match="no .config in"):
        _configure(src, out, "CONFIG_KVM=y\n", config="olddefconfig")


def test_olddefconfig_remerges_after_the_config_was_edited(fake_tree):
    src, out = fake_tree
    (out / ".config").write_text("CONFIG_ARM64=y\nCONFIG_OLD=y\n")
    assert _configure(src, out, "CONFIG_KVM=y\n", config="olddefconfig") is True
    assert _configure(src, out, "CONFIG_KVM=y\n", config="olddefconfig") is False
    with open(out / ".config", "a") as f:          # menuconfig, say
        f.write("CONFIG_EDITED=y\n")
    assert _configure(src, out, "CONFIG_KVM=y\n", config="olddefconfig") is True
    assert "CONFIG_EDITED=y" in (out / ".config").read_text()


def test_defconfig_then_merge(fake_tree):
    src, out = fake_tree
    assert _configure(src, out, "CONFIG_KVM=y\n", config="defconfig") is True
    assert kconfig.parse_fragment((out / ".config").read_text()) == {"CONFIG_DEFCONFIG": "y", "CONFIG_KVM": "y"}


# ---- progress ---------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_counter_on_a_terminal_redraws_one_line():
    clock, out = _Clock(), io.StringIO()
    p = make.Progress(lambda m: None, tty=True, stream=out, clock=clock)
    for i, f in enumerate(("init/main.o", "kernel/fork.o", "arch/arm64/kvm/hypercalls.o")):
        clock.t = 0.2 * (i + 1)
        p.line(f"  CC      {f}")
    p.line("make[2]: Nothing to be done")
    p.done()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 4 and "\n" not in text
    assert "3 built, now CC arch/arm64/kvm/hypercalls.o" in text and p.files == 3


def test_progress_without_a_terminal_prints_a_line_every_interval():
    clock, said = _Clock(), []
    p = make.Progress(said.append, tty=False, stream=io.StringIO(), clock=clock)
    for i in range(100):
        clock.t = i * 1.0
        p.line(f"  CC [M]  drivers/x{i}.o")
    assert len(said) == int(99 // make.PROGRESS_EVERY_S)
    assert said[0].startswith("[0m15s] 16 built, now CC drivers/x15.o")


def test_verbose_progress_prints_makes_lines():
    out = io.StringIO()
    p = make.Progress(lambda m: None, verbose=True, stream=out)
    p.line("  LD      vmlinux")
    assert out.getvalue() == "  LD      vmlinux\n"


def test_make_output_all_goes_to_the_log(fake_tree):
    src, out = fake_tree
    log = out / "build.log"
    log.write_text("")
    make.run_make(["make", "-C", str(src), f"O={out}", "allnoconfig"], dict(os.environ), log, "configuration",
                     lambda m: None)
    assert "HOSTCC  scripts/kconfig/conf.o" in log.read_text()


# ---- the CLI's bad input: exit 2, a message, nothing made ---------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})), check=False)


def test_cli_config_that_does_not_exist(fake_tree, tmp_path):
    src, out = fake_tree
    r = _cli("kernel", "build", str(src), "--out", str(out), "--config", str(tmp_path / "missing.config"))
    assert r.returncode == 2 and "no such file" in r.stderr and "hint:" in r.stderr
    assert not (out / ".config").exists()


def test_cli_cross_compile_pointing_nowhere(fake_tree):
    src, out = fake_tree
    r = _cli("kernel", "build", str(src), "--out", str(out), env={"CROSS_COMPILE": "/nonexistent/bin/aarch64-x-"})
    assert r.returncode == 2 and "/nonexistent/bin/aarch64-x-gcc not found" in r.stderr
    assert not (out / ".config").exists()
