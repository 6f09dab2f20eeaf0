"""The VMM's progress watchdog (harness/guest/runner.py "Progress watchdog", harness/guest/watchdog.py).

A vCPU that makes no exit and whose PC does not move across a few kicks is a livelock when it sits on an
SMC/HVC (a trapped call KVM never completes: the planted kernel of tests/system/data/broken-kernel/), or on any
instruction when the scenario opts in with ``livelock_s``.  A vCPU that sleeps in WFI/WFE, one STOPPED inside
KVM_RUN and one parked in userspace are never one, and without the opt-in a ``b .`` still runs to its
deadline.  The kick is the deadline's (vm.py: immediate_exit + SIGUSR1, KVM_RUN returns EINTR).

The last test (slow) builds the planted kernel and checks that the main job's SMC scenarios end as
``livelock`` and a bisect step calls the kernel bad (exit 1).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import paths
from harness.guest import kvm
from harness.images.payloads import get_payload
from harness.kdev import bisect as B
from harness.model.scenarios import PSCI_FWD, scenario

pytestmark = pytest.mark.infra  # the harness's own plumbing (harness/plugin/tiers.py)

BROKEN_PATCH = (paths.REPO_ROOT / "tests/system/data/broken-kernel/"
                "0001-DELIBERATELY-BROKEN-KVM-arm64-handle_smc-does-not-advance-PC.patch")


def _watch(r, vcpu: int) -> dict:
    return r.raw["watchdog"]["vcpus"][vcpu]


@pytest.mark.parametrize("el2", [pytest.param(False, marks=pytest.mark.el1, id="el1"),
                                 pytest.param(True, marks=pytest.mark.el2, id="el2")])
def test_self_branch_with_the_opt_in_ends_as_livelock_naming_the_pc_and_the_instruction(guest, el2):
    p = get_payload("spin")
    r = guest.run(scenario("spin_livelock", p, el2=el2, livelock_s=1.5, deadline_s=60.0), payload=p)
    assert r.outcome == "livelock", r.describe()       # not "deadline": the watchdog ended it, long before 60 s
    ll = r.livelock
    assert ll["vcpu"] == 0 and ll["pc"] == p.sym("spin_loop") and ll["insn"] == "b .", r.describe()
    assert ll["message"] == f"livelock at pc={p.sym('spin_loop'):#x} (b .)", r.describe()
    assert ll["kicks"] >= 5 and len({pc for _, pc in ll["samples"]}) == 1, r.describe()
    text = r.describe()
    assert "vcpu0 livelock at pc=spin_loop (b .)" in text and "vcpu0: pc=spin_loop " in text, text
    assert [e["pc"] for e in r.events if e["kind"] == "livelock"] == [p.sym("spin_loop")], text
    assert r.reports == {0: 0x5B1}, text
    assert kvm.pstate_el(r.vcpus[0]["pstate"]) == (2 if el2 else 1), text
    q = get_payload("psci_version")
    assert guest.run(scenario("after_livelock", q, filters=PSCI_FWD), payload=q).outcome == "done"


@pytest.mark.el1
def test_self_branch_without_the_opt_in_still_ends_at_the_deadline_and_a_parked_vcpu_is_not_kicked(guest):
    """The default watchdog watches the spinning vCPU (it kicks it) but a ``b .`` is no trapped call; vCPU 1,
    parked in userspace for a forwarded CPU_ON that never comes, is not in KVM_RUN and never kicked."""
    p = get_payload("spin")
    r = guest.run(scenario("spin_default_watchdog", p, vcpus=2, filters=PSCI_FWD, deadline_s=4.0), payload=p)
    assert r.outcome == "deadline", r.describe()
    assert r.livelock is None and r.vcpus[0]["pc"] == p.sym("spin_loop"), r.describe()
    assert r.raw["watchdog"]["any_insn"] is False and _watch(r, 0)["kicks"] >= 5, r.raw["watchdog"]
    assert {pc for _, pc in _watch(r, 0)["samples"]} == {p.sym("spin_loop")}, r.raw["watchdog"]
    assert r.vcpus[1]["parked"] and _watch(r, 1)["kicks"] == 0, r.raw["watchdog"]


@pytest.mark.el1
@pytest.mark.parametrize("insn", ["wfi", "wfe"])
def test_sleeping_and_stopped_vcpus_are_not_livelocked_even_with_the_opt_in(guest, insn):
    """vCPU 0 sleeps in a WFI (or WFE) loop; vCPU 1 stays STOPPED inside KVM_RUN (PSCI in the kernel, nobody
    calls CPU_ON).  Both are kicked and sampled; neither is a livelock, so the deadline ends the run."""
    p = get_payload("wait")
    r = guest.run(scenario(f"wait_{insn}", p, vcpus=2, params=[insn == "wfe"], livelock_s=1.0, deadline_s=4.0),
                  payload=p)
    assert r.outcome == "deadline", r.describe()
    assert r.livelock is None and r.reports == {0: int(insn == "wfe")}, r.describe()
    loop = p.sym(f"wait_{insn}")
    assert r.vcpus[0]["pc"] in (loop, loop + 4), r.describe()
    assert _watch(r, 0)["kicks"] >= 5 and _watch(r, 0)["samples"], r.raw["watchdog"]
    assert {pc for _, pc in _watch(r, 0)["samples"]} <= {loop, loop + 4}, r.raw["watchdog"]
    assert r.vcpus[1]["mp_state"] == kvm.KVM_MP_STATE_STOPPED, r.describe()
    assert _watch(r, 1)["kicks"] >= 5 and _watch(r, 1)["samples"] == [], r.raw["watchdog"]


@pytest.mark.el1
def test_livelock_s_0_turns_the_watchdog_off(guest):
    p = get_payload("spin")
    r = guest.run(scenario("spin_no_watchdog", p, livelock_s=0, deadline_s=2.0), payload=p)
    assert r.outcome == "deadline", r.describe()
    assert r.raw["watchdog"]["window_s"] == 0 and _watch(r, 0)["kicks"] == 0, r.raw["watchdog"]


# ---- the planted kernel ---------------------------------------------------------------------------------
def _cli(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=paths.REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_kernel_that_never_completes_an_smc_fails_its_smc_scenarios_as_livelock(tmp_path):
    """``kernel source --patch`` the deliberately broken handle_smc() onto Debian's 7.3 source, ``kernel
    build`` it (ccache; ~8 min cold), then one ``bisect`` step on the forwarded-SMC test: the test fails with
    outcome livelock on the SMC (not at its 10 s deadline) and the step says bad (exit 1)."""
    src = _cli("kernel", "source", "--patch", str(BROKEN_PATCH), "--localversion=-broken-smc-livelock",
               timeout=600)
    assert src.returncode == 0, src.stdout[-2000:] + src.stderr[-2000:]
    tree = src.stdout.strip().splitlines()[-1]
    build = _cli("kernel", "build", tree, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-2000:]
    image = Path(build.stdout.strip().splitlines()[-1])
    step = _cli("bisect", "--no-build", "--image", str(image), "--src", str(tmp_path), "--",
                "tests/system/test_forwarding_el1.py", "-k", "test_hypercall_flags_name_the_conduit and smc",
                timeout=900)
    out = step.stdout + step.stderr
    assert step.returncode == B.BAD, out[-4000:]
    assert re.search(r"outcome=livelock", out) and "livelock at pc=smc_insn (smc #0)" in out, out[-4000:]
