"""``pytest --dump-on-splat``: on a guest's first kernel splat its memory is dumped (QMP dump-guest-memory, ELF)
into its run directory and the failure names the file and how to open it (harness/machine/vmcore.py).

An inner pytest run on the default kernel writes a real kernel log record (a WARNING, through /dev/kmsg: the
agent's ``kmsg`` op) in two tests: the first fails naming the dump, the second fails without a second dump; the
dump is an AArch64 ELF core whose memory holds the running kernel's banner.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

pytestmark = pytest.mark.infra
REPO = Path(__file__).resolve().parents[2]

INNER = '''
import re

def warn(g, n):
    line = f"WARNING: CPU: 0 PID: 1 at smccc-harness/vmcore.c:{n} vmcore_test+0x0/0x4"
    g.request("kmsg", {"lines": ["<4>" + line]})
    # on the console before the test ends (printk reaches the serial console asynchronously): else the record
    # may land in the next window, as tests/system/test_console_scanning.py's kmsg() explains
    g.machine.console.expect(re.escape(line), 20, watch_failures=False)

def test_a_first_splat(guest): warn(guest, 1)
def test_b_second_splat(guest): warn(guest, 2)
'''


def test_first_splat_dumps_guest_memory_once(tmp_path, pytestconfig):
    (tmp_path / "test_inner.py").write_text(INNER)
    junit = tmp_path / "j.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-c",
                        "/dev/null", "-p", "harness.plugin", f"--junitxml={junit}", "--dump-on-splat",
                        "--kernel", pytestconfig.getoption("--kernel"), "--results-dir", str(tmp_path / "runs"),
                        "test_inner.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert junit.is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    msgs = {tc.get("name"): "".join((c.get("message") or "") + (c.text or "") for c in tc if c.tag == "failure")
            for tc in ET.parse(junit).getroot().iter("testcase")}
    first, second = msgs["test_a_first_splat"], msgs["test_b_second_splat"]
    assert "'kernel WARNING' while this test ran" in first and "guest memory: " in first, first[-2000:]
    assert "open it with: crash " in first and " drgn -s " in first, first[-2000:]
    assert "'kernel WARNING' while this test ran" in second and "guest memory" not in second, second[-2000:]
    cores = list((tmp_path / "runs").glob("guest-*/vmcore.elf"))
    assert len(cores) == 1 and str(cores[0]) in first, (cores, first[-1000:])
    with open(cores[0], "rb") as f:
        elf = ELFFile(f)
        assert (elf["e_type"], elf["e_machine"]) == ("ET_CORE", "EM_AARCH64")
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert sum(s["p_filesz"] for s in loads) == 1024 * 2**20      # all of the guest's RAM (--memory 1024)
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m.find(b"Linux version 7.") >= 0, "the kernel's banner is not in the dumped memory"
