"""A KVM fix from patches/linux, end to end (slow): ``kernel source --patches patches/linux`` makes a patched copy
of Debian's linux-source-7.3, ``kernel build`` builds its minimal Image (release ``7.3.4-kvm-nv-hcd-elr``: the
directory's localversion), and the HCD test that is a strict xfail on 7.3 passes on it; the same test on the
unpatched minimal build stays an xfail.  docs/upstream/kvm-nv-hcd-undef-elr.md has the analysis and the figures.

Cold, each build is a full minimal kernel (~6-8 min on 2 cores); with the O= directory and ccache kept, a rerun
is ~10-20 s.  The nested tests boot without a snapshot (``--no-snapshot``): each run is a new kernel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import paths
from harness.images.kernel import resolve_kernel
from harness.kdev import kbuild
from harness.model.known_bad import KNOWN_BAD

pytestmark = pytest.mark.slow

PATCHES = paths.REPO_ROOT / "patches" / "linux"
HCD_TEST = "tests/system/test_nested_el2.py::test_hcd_undef_at_vel2_returns_to_the_hvc_itself"
BAD = KNOWN_BAD["hcd_undef_elr_after_hvc"]


def _cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=paths.REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def _build(tree: Path) -> Path:
    """``kernel build TREE`` (minimal config, cached O= and ccache): the vmlinux next to the printed Image."""
    r = _cli("kernel", "build", str(tree))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    image = Path(r.stdout.strip().splitlines()[-1])
    vmlinux = image.parents[3] / "vmlinux"
    assert resolve_kernel(vmlinux).image == image
    return vmlinux


def _hcd_test(kernel: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "--no-snapshot",
                           HCD_TEST, "--kernel", str(kernel)],
                          cwd=paths.REPO_ROOT, text=True, capture_output=True, timeout=1800, check=False)


def test_patched_kernel_passes_the_hcd_undef_elr_test_its_fix_is_for():
    r = _cli("kernel", "source", "--patches", str(PATCHES), timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tree = Path(r.stdout.strip().splitlines()[-1])
    assert tree.parent.parent.name == "ksrc-patched" and tree != kbuild.source_tree()
    assert "*vcpu_pc(vcpu) -= 4;" in (tree / "arch" / "arm64" / "kvm" / "handle_exit.c").read_text()
    vmlinux = _build(tree)
    version = resolve_kernel(vmlinux).version
    assert version.endswith(BAD.fixed_by) and not BAD.applies(version), version
    t = _hcd_test(vmlinux)
    assert t.returncode == 0, t.stdout[-4000:]
    assert re.search(r"\b2 passed\b", t.stdout) and "xfail" not in t.stdout and "XPASS" not in t.stdout, \
        t.stdout[-2000:]


def test_unpatched_kernel_keeps_the_hcd_xfail():
    vmlinux = _build(kbuild.source_tree())
    version = resolve_kernel(vmlinux).version
    assert BAD.applies(version), version
    t = _hcd_test(vmlinux)
    assert t.returncode == 0, t.stdout[-4000:]
    assert re.search(r"\b2 xfailed\b", t.stdout) and " passed" not in t.stdout, t.stdout[-2000:]
