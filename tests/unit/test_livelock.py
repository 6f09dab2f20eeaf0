"""The progress watchdog's pure parts (harness/guest/watchdog.py): the instruction decoder, the verdict on PC
samples (recorded from real runs: tests/unit/data/livelock/recorded.json), the scenario key and the host's
SMCCC_LIVELOCK_S knob, and how the host shows a livelock (harness/model/results.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import protocol as P
from harness.errors import HarnessError
from harness.guest import watchdog as W
from harness.images.payloads import get_payload
from harness.model.results import ScenarioResult
from harness.model.scenarios import LIVELOCK_ENV, scenario, watchdog_from_env

RECORDED = json.loads((Path(__file__).parent / "data" / "livelock" / "recorded.json").read_text())


# ---- decoding: words the assembler made (firmware/*.S) ------------------------------------------------
@pytest.mark.parametrize("payload,symbol,offset,text", [
    ("spin", "spin_loop", 0, "b ."),
    ("smccc_calls", "call_smc0", 0, "smc #0"),
    ("smccc_calls", "call_hvc0", 0, "hvc #0"),
    ("smccc_calls", "call_smc1", 0, "smc #1"),
    ("smccc_calls", "call_hvcffff", 0, "hvc #0xffff"),
    ("smccc_calls", "call_smcffff", 0, "smc #0xffff"),
    ("psci_version", "smc_insn", 0, "smc #0"),
    ("wait", "wait_wfi", 0, "wfi"),
    ("wait", "wait_wfi", 4, "b .-0x4"),
    ("wait", "wait_wfe", 0, "wfe"),
])
def test_decode_names_the_assembled_instruction(payload, symbol, offset, text):
    p = get_payload(payload)
    assert W.decode(p.word(p.sym(symbol) + offset)) == text


@pytest.mark.parametrize("word,text", [          # Arm ARM C6.2 encodings
    (0xD4000001, "svc #0"), (0xD4200000, "brk #0"), (0xD4400000, "hlt #0"), (0xD4000023, "smc #1"),
    (0xD503201F, "nop"), (0xD503203F, "yield"), (0xD503209F, "sev"), (0xD50320BF, "sevl"),
    (0xD5031003, "wfet x3"), (0xD5031025, "wfit x5"), (0xD69F03E0, "eret"),
    (0x94000000, "bl ."), (0x14000010, "b .+0x40"), (0x17FFFFFE, "b .-0x8"),
    (0x54000001, "b.ne ."), (0x54FFFFEB, "b.lt .-0x4"), (0xB4000000, "cbz x0, ."), (0x35FFFFE1, "cbnz w1, .-0x4"),
    (0xF9400020, ".inst 0xf9400020"), (0xD4000007, ".inst 0xd4000007"), (None, "unreadable"),
])
def test_decode_hand_encoded(word, text):
    assert W.decode(word) == text


def test_only_smc_and_hvc_trap_to_kvm_and_only_wfx_waits():
    assert W.traps_to_kvm(0xD4000003) and W.traps_to_kvm(0xD41FFFE2)       # smc #0, hvc #0xffff
    assert not any(W.traps_to_kvm(w) for w in (0xD4000001, 0x14000000, 0xD503207F, None))
    assert all(W.waits(w) for w in (0xD503207F, 0xD503205F, 0xD5031000, 0xD5031020))
    assert not any(W.waits(w) for w in (0xD503201F, 0xD4000003, 0x14000000, None))


# ---- the verdict ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", RECORDED["cases"], ids=[c["name"] for c in RECORDED["cases"]])
def test_verdict_on_recorded_samples(case):
    """Samples as the runner took them, from real runs (data file: where each was recorded)."""
    samples = [tuple(s) for s in case["samples"]]
    got = W.verdict(samples, case["word_at"], case["word_before"], any_insn=case["any_insn"],
                    min_span_s=case["window_s"] * 0.72)
    assert (got is not None) == case["livelock"], (case["name"], got)
    if case["livelock"]:
        assert W.decode(case["word_at"]) == case["insn"]


SMC, B_SELF, LDR = 0xD4000003, 0x14000000, 0xF9400020


def _still(pc: int, n: int = W.SAMPLES, step: float = 0.3) -> list[tuple[float, int]]:
    return [(0.3 + i * step, pc) for i in range(n)]


def test_a_polling_loop_at_one_pc_is_no_livelock_unless_opted_in():
    """TCG shows a loop's first instruction at every kick: stillness alone proves nothing."""
    assert W.verdict(_still(0x4000_0010), LDR, 0xD503201F, any_insn=False) is None
    assert W.verdict(_still(0x4000_0010), LDR, 0xD503201F, any_insn=True) is not None


def test_too_few_samples_or_too_short_a_span_is_no_verdict_yet():
    assert W.verdict(_still(0x4000_0010, W.SAMPLES - 1), SMC, None, any_insn=False) is None
    assert W.verdict(_still(0x4000_0010, step=0.01), SMC, None, any_insn=False, min_span_s=1.0) is None
    assert W.verdict(_still(0x4000_0010), SMC, None, any_insn=False, min_span_s=1.0) is not None


def test_a_pc_that_moved_counts_only_the_samples_since():
    moved = [(0.1, 0x4000_0000)] + _still(0x4000_0010, W.SAMPLES - 1)
    assert W.verdict(moved, SMC, None, any_insn=True) is None
    assert W.still_run(moved) == _still(0x4000_0010, W.SAMPLES - 1)
    assert W.verdict(moved + [(2.0, 0x4000_0010)], SMC, None, any_insn=False) is not None


def test_a_vcpu_at_or_just_past_a_wfi_or_wfe_is_asleep():
    for at, before in ((0xD503207F, B_SELF), (B_SELF, 0xD503207F), (B_SELF, 0xD503205F), (0xD5031020, None)):
        assert W.verdict(_still(0x4000_0044), at, before, any_insn=True) is None


def test_mode_follows_the_scenario_key():
    assert W.mode({}) == (W.DEFAULT_WINDOW_S, False)
    assert W.mode({"livelock_s": 2}) == (2.0, True)
    assert W.mode({"livelock_s": 0}) == (0.0, False)


# ---- the scenario key and the host's knob ------------------------------------------------------------
@pytest.fixture(scope="module")
def spin():
    return get_payload("spin")


@pytest.mark.parametrize("value", [0, 0.1, 1.5, 600])
def test_livelock_s_accepts_0_and_a_window(spin, value):
    assert scenario("ok", spin, livelock_s=value)["livelock_s"] == value


@pytest.mark.parametrize("value", [-1, 0.05, 601, True, "1.5", None])
def test_livelock_s_refuses_anything_else_saying_what_it_takes(spin, value):
    with pytest.raises(P.ProtocolError, match=r"livelock_s must be 0 \(watchdog off\) or in \[0\.1, 600\] seconds"):
        scenario("bad", spin, livelock_s=value)


def test_smccc_livelock_s_0_turns_the_watchdog_off_where_the_scenario_does_not_choose(spin):
    s = scenario("s", spin)
    assert watchdog_from_env(s, {}) is s
    assert watchdog_from_env(s, {LIVELOCK_ENV: "0"})["livelock_s"] == 0
    own = scenario("own", spin, livelock_s=2)
    assert watchdog_from_env(own, {LIVELOCK_ENV: "0"})["livelock_s"] == 2
    with pytest.raises(HarnessError, match=r"SMCCC_LIVELOCK_S='1.5': only 0 .* is understood") as e:
        watchdog_from_env(s, {LIVELOCK_ENV: "1.5"})
    assert "unset SMCCC_LIVELOCK_S" in e.value.hint


# ---- what the host shows -----------------------------------------------------------------------
def test_describe_names_the_livelock_with_the_pc_symbolized(spin):
    case = next(c for c in RECORDED["cases"] if c["name"] == "spin_b_self_opt_in_el1")
    pc = spin.sym("spin_loop")
    raw = {"name": "spin_livelock", "outcome": "livelock", "exit_code": None, "events": [
        {"t": 1.9, "kind": "livelock", "vcpu": 0, "pc": pc, "insn": "b .", "word": case["word_at"], "kicks": 5,
         "still_s": 1.317, "why": "the scenario's livelock_s opts in to any instruction"}],
        "livelock": {"vcpu": 0, "pc": pc, "insn": "b .", "word": case["word_at"], "kicks": 5, "still_s": 1.317,
                     "window_s": 1.5, "why": "the scenario's livelock_s opts in to any instruction",
                     "samples": case["samples"], "message": f"livelock at pc={pc:#x} (b .)"},
        "vcpus": [{"index": 0, "pc": pc, "pstate": 0x3C5, "x": [0] * 31}]}
    r = ScenarioResult(raw=raw, payload=spin)
    text = r.describe()
    assert text.splitlines()[1].startswith("vcpu0 livelock at pc=spin_loop (b .): the scenario's livelock_s"), text
    assert "across 5 watchdog kicks in 1.317 s (window 1.5 s)" in text
    assert "livelock     pc=spin_loop insn=b ." in text and "vcpu0: pc=spin_loop " in text
    assert ScenarioResult(raw={"outcome": "done"}).livelock_message() is None


def test_a_vm_run_without_a_kick_handler_installs_one_or_says_what_to_call():
    """The watchdog kicks (SIGUSR1) within a second: a process without the handler would die of the signal."""
    import subprocess
    import sys
    code = ("import signal, threading\n"
            "from harness.guest import vm\n"
            "out = []\n"
            "def worker():\n"
            "    try:\n"
            "        vm.ensure_kick_handler()\n"
            "    except RuntimeError as e:\n"
            "        out.append(str(e))\n"
            "t = threading.Thread(target=worker); t.start(); t.join()\n"
            "print(out[0])\n"
            "vm.ensure_kick_handler()\n"
            "print(signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None))\n"
            "signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)\n"
            "print('alive')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "call harness.guest.vm.install_kick_handler() from the main thread" in lines[0], r.stdout
    assert lines[1:] == ["True", "alive"], r.stdout
