"""An unmodified arm64 Linux (L2) whose CPUs are powered by the Python handler's PSCI emulator.

The L1 guest (the kernel under test, with KVM) runs the agent; the agent boots the L2 kernel as a KVM guest
with a generated device tree (``psci`` node, ``method = "hvc"`` or ``"smc"``), an emulated PL011 console and
a tiny busybox initramfs whose /init reports the CPUs, offlines and onlines cpu1 through sysfs and powers off
or reboots (harness/images/l2.py).  The PSCI function ranges are forwarded to userspace with
KVM_ARM_VM_SMCCC_FILTER FWD_TO_USER (docs/kvm-smccc-abi.md §1.1, §1.2) and answered by harness/guest/psci.py
(DEN0022: CPU_ON §5.6, CPU_OFF §5.5, AFFINITY_INFO §5.7, SYSTEM_OFF §5.10, SYSTEM_RESET §5.11); the
secondaries are powered the way kvmtool's userspace PSCI does it (docs/kvm-smccc-abi.md §3.5).  The differential
run boots the same guest with KVM's in-kernel PSCI (no filter).

Cost: one extra L1 boot (its initramfs carries the 42 MB L2 Image) and ~40-60 s of TCG time per L2 boot
(six L2 boots: 3-5 minutes on a 2-core host), so the whole file is ``slow``.
"""

from __future__ import annotations

import re

import pytest

from harness.errors import HarnessError
from harness.guest import psci
from harness.images import assets, l2
from harness.images.kernel import resolve_kernel
from harness.machine.guests import GuestOptions, guest_assets, new_session
from harness.model.results import ScenarioResult
from harness.model.splats import scan_failures
from harness.paths import new_run_dir

pytestmark = [pytest.mark.linux_guest, pytest.mark.psci, pytest.mark.slow]

DEADLINE_S = 420.0
VCPUS = 3
CPU_ON_IDS = (psci.CPU_ON, psci.CPU_ON64)
AFFINITY_IDS = (psci.AFFINITY_INFO, psci.AFFINITY_INFO64)


@pytest.fixture(scope="module")
def l2_host(request):
    """An L1 guest whose initramfs also holds /l2/Image and /l2/initrd.cpio (the default L1 boot is untouched)."""
    opt = request.config.getoption
    try:
        opts = GuestOptions.from_pytest(request.config, snapshots=False)
        a = guest_assets(opts)
        rootfs = assets.ensure_rootfs()
        l2_kernel = resolve_kernel(l2.l2_kernel_spec(opt("--kernel"))).image
        initrd = l2.build_l1_initrd(a.initrd, l2_kernel, l2.build_l2_initrd(l2.busybox_path(rootfs)))
        session = new_session(opts, new_run_dir("l2host"), assets=a, initrd=initrd).start()
    except HarnessError as e:
        pytest.fail(f"the L1 guest for the Linux-guest tests did not come up: {e}", pytrace=False)
    try:
        caps = session.caps
        if not caps.get("kvm"):
            pytest.skip(f"kernel {caps.get('uname')}: {caps.get('reason', '/dev/kvm is absent')}")
        if not caps.get("smccc_filter"):
            pytest.skip(f"kernel {caps.get('uname')}: no SMCCC filter (KVM_HAS_DEVICE_ATTR failed: "
                        f"{caps.get('smccc_filter_errno')}); it needs Linux 6.4+")
        yield session
    finally:
        session.close()


def _boot(host, name, **kw):
    # The emulator answers the PSCI minor version KVM has (1.3 on 7.x, 1.1 on 6.12): like for like in the
    # differential tests.
    minor = host.caps.get("psci_version_raw", 0x1_0003) & 0xFFFF
    return l2.run_linux(host, l2.linux_request(name, deadline_s=DEADLINE_S, psci_minor=minor, **kw))


@pytest.fixture(scope="module")
def hvc_run(l2_host):
    return _boot(l2_host, "linux_hvc_poweroff", vcpus=VCPUS, method="hvc", psci="fwd", hotplug=(1,),
                 action="poweroff")


@pytest.fixture(scope="module")
def smc_run(l2_host):
    return _boot(l2_host, "linux_smc_reboot", vcpus=2, method="smc", psci="fwd", hotplug=(1,), action="reboot")


@pytest.fixture(scope="module")
def kernel_run(l2_host):
    return _boot(l2_host, "linux_in_kernel_psci", vcpus=VCPUS, method="hvc", psci="kernel", hotplug=(1,),
                 action="poweroff")


@pytest.fixture(scope="module")
def restart_run(l2_host):
    return _boot(l2_host, "linux_reset_restarts", vcpus=2, method="hvc", psci="fwd", action="reboot",
                 on_reset="restart", max_boots=2)


@pytest.fixture(scope="module")
def idle_run(l2_host):
    return _boot(l2_host, "linux_cpu_suspend_idle", vcpus=2, method="hvc", psci="fwd", hotplug=(1,),
                 action="poweroff", idle_state="standby")


@pytest.fixture(params=[pytest.param("hvc", marks=pytest.mark.hvc), pytest.param("smc", marks=pytest.mark.smc)])
def fwd_run(request):
    """The forwarded-PSCI boot over each conduit, with its vCPU count."""
    if request.param == "hvc":
        return request.getfixturevalue("hvc_run"), VCPUS, "hvc"
    return request.getfixturevalue("smc_run"), 2, "smc"


# ---- helpers ------------------------------------------------------------------------------------------------
def _console(r) -> str:
    return r.raw.get("console", "")


def _init_line(r) -> re.Match:
    m = l2.INIT_LINE_RE.search(_console(r))
    assert m, f"the L2 /init never reported (outcome {r.outcome}); L2 console tail:\n{_console(r)[-3000:]}\n" \
              f"{r.describe()}"
    return m


def _hotplug_lines(r) -> list[tuple]:
    return [(m["cpu"], m["dir"], m["rc"], m["online"], m["processors"]) for m in l2.HOTPLUG_RE.finditer(_console(r))]


def _cpulist(cpus) -> str:
    """The kernel's cpulist format (/sys/devices/system/cpu/online): "0,2-3"."""
    out, cpus = [], sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def _psci_calls(r, ids=None) -> list[dict]:
    return [h for h in r.hypercalls if h.get("by") == "psci" and (ids is None or h["nr"] in ids)]


def _first_cpu_off_t(r) -> float:
    offs = _psci_calls(r, (psci.CPU_OFF,))
    return offs[0]["t"] if offs else float("inf")


# ---- bring-up ---------------------------------------------------------------------------------------------
@pytest.mark.el1
def test_all_vcpus_come_online(fwd_run):
    """DEN0022 §5.6 CPU_ON: Linux brings every secondary up through the emulator; /proc/cpuinfo counts them."""
    r, n, method = fwd_run
    m = _init_line(r)
    assert m["psci"] == method, r.describe()
    assert int(m["processors"]) == n, f"L2 saw {m['processors']} CPUs, expected {n}\n{r.describe()}"
    assert m["online"] == f"0-{n - 1}", r.describe()


@pytest.mark.el1
def test_one_cpu_on_per_secondary_with_the_entry_point_linux_gave(fwd_run):
    """docs/kvm-smccc-abi.md §3.5: each forwarded CPU_ON powers its target from userspace at the entry Linux passed."""
    r, n, _ = fwd_run
    boot_ons = [h for h in _psci_calls(r, CPU_ON_IDS) if h["t"] < _first_cpu_off_t(r)]
    targets = sorted(h["args"][1] for h in boot_ons)
    assert targets == list(range(1, n)), r.describe()
    assert all(h["reply"][0] == psci.SUCCESS for h in boot_ons), r.describe()
    powered = [e for e in r.events if e["kind"] == "psci" and e.get("effect") == "powered_on" and
               e["t"] < _first_cpu_off_t(r)]
    for h in boot_ons:
        mine = [e for e in powered if e["vcpu"] == h["args"][1]]
        assert len(mine) == 1, r.describe()
        assert mine[0]["entry"] == h["args"][2] and mine[0]["context_id"] == h["args"][3], r.describe()
    kernel, image_size = r.raw["layout"]["kernel"], r.raw["layout"]["image_size"]
    assert all(kernel <= h["args"][2] < kernel + image_size for h in boot_ons), \
        f"CPU_ON entry outside the kernel image [{kernel:#x}, +{image_size:#x})\n{r.describe()}"


@pytest.mark.el1
def test_forwarded_calls_name_the_conduit_of_the_psci_node(fwd_run):
    """docs/kvm-smccc-abi.md §1.2: hypercall.flags bit 0 is set iff the guest used SMC, as its DT "method" says."""
    r, _, method = fwd_run
    calls = _psci_calls(r)
    assert calls, r.describe()
    assert {h["conduit"] for h in calls} == {method}, r.describe()


# ---- hotplug ------------------------------------------------------------------------------------------------
@pytest.mark.el1
def test_offlining_a_cpu_calls_cpu_off_and_onlining_calls_cpu_on(fwd_run):
    """DEN0022 §5.5/§5.6 through sysfs hotplug: CPU_OFF from cpu1 itself, then a fresh CPU_ON(cpu1)."""
    r, n, _ = fwd_run
    offs = _psci_calls(r, (psci.CPU_OFF,))
    assert [h["vcpu"] for h in offs] == [1], r.describe()
    ons_after = [h for h in _psci_calls(r, CPU_ON_IDS) if h["t"] > offs[0]["t"]]
    assert [h["args"][1] for h in ons_after] == [1], r.describe()
    assert ons_after[0]["reply"][0] == psci.SUCCESS, r.describe()
    assert _hotplug_lines(r) == [("1", "off", "0", _cpulist([c for c in range(n) if c != 1]), str(n - 1)),
                                 ("1", "on", "0", _cpulist(range(n)), str(n))], _console(r)[-2000:]


@pytest.mark.el1
def test_affinity_info_answers_agree_with_the_power_state(fwd_run):
    """DEN0022 §5.7: AFFINITY_INFO reports OFF for a CPU after its CPU_OFF and ON after its CPU_ON.

    Linux's psci_cpu_kill() may poll while the dying CPU is still on its way to CPU_OFF (an ON answer is then
    right); the handler serialises PSCI calls, so the trace order is the order the emulator saw."""
    r, _, _ = fwd_run
    state = {0: True}
    checked = 0
    for h in _psci_calls(r):
        if h["nr"] in CPU_ON_IDS and h["reply"][0] == psci.SUCCESS:
            state[h["args"][1]] = True
        elif h["nr"] == psci.CPU_OFF:
            state[h["vcpu"]] = False
        elif h["nr"] in AFFINITY_IDS:
            expected = psci.AFFINITY_ON if state.get(h["args"][1], False) else psci.AFFINITY_OFF
            assert h["reply"][0] == expected, f"AFFINITY_INFO({h['args'][1]}) at t={h['t']}\n{r.describe()}"
            checked += 1
    assert checked >= 1, f"Linux never asked AFFINITY_INFO (psci_cpu_kill)\n{r.describe()}"


# ---- system power ---------------------------------------------------------------------------------------------
@pytest.mark.el1
@pytest.mark.hvc
def test_poweroff_ends_the_vm_with_system_off(hvc_run):
    """DEN0022 §5.10: `poweroff -f` in the guest is a SYSTEM_OFF; the handler ends the VM (SHUTDOWN)."""
    r = hvc_run
    assert r.outcome == "system_event", r.describe()
    assert _psci_calls(r)[-1]["nr"] == psci.SYSTEM_OFF, r.describe()
    ev = [e for e in r.events if e["kind"] == "system_event"]
    assert [(e["name"], e["by"]) for e in ev] == [("SHUTDOWN", "psci")], r.describe()


@pytest.mark.el1
@pytest.mark.smc
def test_reboot_ends_the_vm_with_system_reset(smc_run):
    """DEN0022 §5.11: `reboot -f` (reboot_mode cold) is a SYSTEM_RESET; the handler ends the VM (RESET)."""
    r = smc_run
    assert r.outcome == "system_event", r.describe()
    assert _psci_calls(r)[-1]["nr"] == psci.SYSTEM_RESET, r.describe()
    ev = [e for e in r.events if e["kind"] == "system_event"]
    assert [(e["name"], e["by"]) for e in ev] == [("RESET", "psci")], r.describe()


@pytest.mark.el1
@pytest.mark.hvc
def test_system_reset_restarts_the_guest_when_configured(restart_run):
    """DEN0022 §5.11 with on_reset = "restart": the handler boots the guest again in a fresh VM, and the second
    boot brings its secondary up through the emulator again."""
    r = restart_run
    boots = [*(ScenarioResult(raw=b) for b in r.raw.get("previous_boots", [])), r]
    assert r.raw.get("boot_count") == 2 and len(boots) == 2, r.describe()
    for i, b in enumerate(boots):
        assert b.outcome == "system_event", f"boot {i + 1}\n{b.describe()}"
        assert [h["nr"] for h in _psci_calls(b, (psci.SYSTEM_RESET,))] == [psci.SYSTEM_RESET], b.describe()
        assert [h["args"][1] for h in _psci_calls(b, CPU_ON_IDS)] == [1], f"boot {i + 1}\n{b.describe()}"
        assert _init_line(b)["processors"] == "2", b.describe()


# ---- CPU_SUSPEND from the idle loop ----------------------------------------------------------------------------
@pytest.mark.el1
@pytest.mark.hvc
def test_linux_idles_through_cpu_suspend_with_the_dt_suspend_param(idle_run):
    """DEN0022 §5.4: with an `arm,idle-state` whose arm,psci-suspend-param is 0x1 (standby), Linux's psci_idle
    driver enters idle with CPU_SUSPEND(0x1); the emulator answers SUCCESS."""
    r = idle_run
    m = l2.CPUIDLE_RE.search(_console(r))
    assert m and m["driver"] == "psci_idle" and int(m["usage"] or 0) > 0, _console(r)[-2000:]
    traced = _psci_calls(r, (psci.CPU_SUSPEND, psci.CPU_SUSPEND64))
    assert traced, r.describe()
    assert {h["args"][1] for h in traced} == {0x1}, r.describe()
    assert {h["reply"][0] for h in traced} == {psci.SUCCESS}, r.describe()


@pytest.mark.el1
@pytest.mark.hvc
def test_each_cpu_suspend_sleeps_in_kvm_until_a_wakeup(idle_run):
    """api.rst KVM_SET_MP_STATE(KVM_MP_STATE_SUSPENDED): after a forwarded CPU_SUSPEND the vCPU waits in KVM's
    WFI emulation and comes back with KVM_SYSTEM_EVENT_WAKEUP once an interrupt is pending: one wakeup per call
    (a vCPU still asleep when the guest powers off has one call without a wakeup)."""
    r = idle_run
    calls, wakeups = r.raw["cpu_suspend"]["calls"], r.raw["cpu_suspend"]["wakeups"]
    assert sum(calls) > 0, r.raw["cpu_suspend"]
    assert all(0 <= c - w <= 1 for c, w in zip(calls, wakeups, strict=True)), r.raw["cpu_suspend"]
    assert [e["name"] for e in r.events if e["kind"] == "system_event" and e["by"] == "kvm"][:1] == ["WAKEUP"], \
        r.describe()


@pytest.mark.el1
@pytest.mark.hvc
def test_cpus_and_hotplug_work_with_idle_states(idle_run):
    """The same bring-up and hotplug results with CPU_SUSPEND in the idle loop."""
    r = idle_run
    assert _init_line(r)["processors"] == "2", r.describe()
    assert _hotplug_lines(r) == [("1", "off", "0", "0", "1"), ("1", "on", "0", "0-1", "2")], _console(r)[-2000:]
    assert _psci_calls(r)[-1]["nr"] == psci.SYSTEM_OFF, r.describe()


# ---- differential ---------------------------------------------------------------------------------------------
@pytest.mark.el1
@pytest.mark.hvc
def test_in_kernel_psci_brings_up_the_same_cpus(hvc_run, kernel_run):
    """docs/kvm-smccc-abi.md §2.3: with no filter KVM's own PSCI answers; Linux ends up with the same CPUs and the
    same hotplug results as on the userspace emulator, and nothing is forwarded."""
    k, u = kernel_run, hvc_run
    assert k.hypercalls == [], k.describe()
    ki, ui = _init_line(k), _init_line(u)
    assert (ki["processors"], ki["online"]) == (ui["processors"], ui["online"]), (ki.group(0), ui.group(0))
    assert _hotplug_lines(k) == _hotplug_lines(u)
    ev = [(e["name"], e["by"]) for e in k.events if e["kind"] == "system_event"]
    assert ev == [("SHUTDOWN", "kvm")], k.describe()


@pytest.mark.el1
@pytest.mark.hvc
def test_in_kernel_psci_gives_linux_the_same_view_of_the_firmware(hvc_run, kernel_run):
    """docs/kvm-smccc-abi.md §2.3: Linux's own conclusions from probing PSCI (version, function ids, Trusted OS
    migration, SMCCC version) and from bringing up the secondaries are the same with the emulator as with KVM."""
    u = [m["text"] for m in l2.DMESG_RE.finditer(_console(hvc_run))]
    k = [m["text"] for m in l2.DMESG_RE.finditer(_console(kernel_run))]
    assert any(t.startswith("psci: PSCIv") for t in u), f"no 'psci: PSCIv' line from the L2 /init:\n{u}"
    assert u == k


# ---- health -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["hvc_run", "smc_run", "kernel_run", "restart_run", "idle_run"])
def test_neither_kernel_printed_a_failure(request, which):
    """The L2 console (emulated PL011) and the L1 console while it ran carry no Oops/WARNING/BUG/panic/lockup."""
    r = request.getfixturevalue(which)
    for name, text in (("L2", _console(r)), ("L1", r.console)):
        findings = scan_failures(text)
        assert not findings, f"the {name} kernel printed {findings[0].name!r}:\n{findings[0].excerpt}"


# ---- SDEI (DEN0054): an arm,sdei-1.0 node in the L2 device tree, the calls forwarded to harness/guest/sdei.py ----
@pytest.fixture(scope="module")
def sdei_run(l2_host):
    return _boot(l2_host, "linux_sdei_smc", vcpus=2, method="hvc", psci="fwd", hotplug=(1,), sdei="smc")


def _sdei_calls(r) -> list[dict]:
    return [h for h in r.hypercalls if h.get("by") == "sdei"]


@pytest.mark.sdei
@pytest.mark.smc
def test_linux_sdei_driver_probes_the_vmm_dispatcher(sdei_run):
    """drivers/firmware/arm_sdei.c sdei_probe: SDEI_VERSION (printed), PRIVATE_RESET on every CPU and SHARED_RESET
    (sdei_platform_reset), then PE_UNMASK on every CPU as it comes online (sdei_cpuhp_up); offlining cpu1
    masks it (sdei_cpuhp_down: PE_MASK) and onlining unmasks it again.  All over the node's conduit (SMC)."""
    r = sdei_run
    m = re.search(r"sdei: SDEIv(\d+)\.(\d+) \(0x([0-9a-f]+)\) detected in firmware", _console(r))
    assert m and m.groups() == ("1", "1", "0"), f"no SDEI probe line; L2 console tail:\n{_console(r)[-3000:]}"
    calls = _sdei_calls(r)
    assert calls, r.describe()
    assert all(h["conduit"] == "smc" for h in calls), r.describe()
    assert calls[0]["nr"] == 0xC400_0020 and calls[0]["reply"][0] == 0x0001_0001_0000_0000, r.describe()
    by_cpu = {}
    for h in calls:
        by_cpu.setdefault(h["vcpu"], []).append(h["name"])
    for cpu in (0, 1):
        seq = by_cpu.get(cpu, [])
        assert "SDEI_PRIVATE_RESET" in seq and "SDEI_PE_UNMASK" in seq, f"vcpu{cpu}: {seq}"
        assert seq.index("SDEI_PRIVATE_RESET") < seq.index("SDEI_PE_UNMASK"), f"vcpu{cpu}: {seq}"
    names = [h["name"] for h in calls]
    probe = names[:names.index("SDEI_PE_MASK")]        # before cpu1 goes offline
    assert probe.count("SDEI_SHARED_RESET") == 1 and probe.count("SDEI_PRIVATE_RESET") == 2, probe
    # the reboot notifier (sdei_reboot_notifier) at poweroff: every CPU masked, then the platform reset again
    tail = names[names.index("SDEI_PE_UNMASK", len(probe)) + 1:]
    assert tail.count("SDEI_SHARED_RESET") == 1 and tail.count("SDEI_PRIVATE_RESET") == 2, tail
    seq1 = by_cpu[1]
    i_mask = seq1.index("SDEI_PE_MASK")
    assert "SDEI_PE_UNMASK" in seq1[i_mask + 1:], f"cpu1 offline/online: {seq1}"
    assert all(h["reply"] is not None and h["reply"][0] >> 63 == 0 for h in calls), "an SDEI call failed"
    assert _init_line(r)["online"] == "0-1"
    assert not scan_failures(_console(r)), _console(r)[-3000:]
