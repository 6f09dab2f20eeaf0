"""harness.images.payloads: build firmware/*.S, load and check ELF files, call-table encodings."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from harness import protocol
from harness.errors import HarnessError, PayloadError, SetupError
from harness.images import payloads
from harness.model import payload_abi as abi
from harness.paths import FIRMWARE_DIR

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-as") is None,
                                reason="binutils-aarch64-linux-gnu not installed")

EXPECTED = {
    "psci_version": ["hvc_insn", "smc_insn"],
    "smccc_calls": [f"call_{c}" for c in abi.CONDUITS],
    "el2_hello": ["read_hcr"],
    "el2_vectors": ["hvc_insn", "smc_insn", "el2_vectors"],
    "el2_guest_hyp": ["inner_entry", "inner_hvc", "inner_smc", "inner_exit_hvc", "l1_proxy_smc", "l1_vectors",
                      "inner_vectors"],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return payloads.build_payloads(tmp_path_factory.mktemp("fwcache"))


@pytest.fixture(scope="module")
def loaded(built) -> dict[str, payloads.Payload]:
    return {name: payloads.load_elf(path) for name, path in built.items()}


def test_every_source_is_built(built):
    sources = {p.stem for p in FIRMWARE_DIR.glob("*.S")}
    assert set(built) == sources
    assert set(EXPECTED) <= sources
    for path in built.values():
        assert path.is_file() and path.stat().st_size > 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_payload_loads_with_expected_symbols(loaded, name):
    p = loaded[name]
    assert p.entry == protocol.RAM_BASE == p.symbols["_start"]
    assert p.segments[0].addr == protocol.RAM_BASE
    for s in p.segments:
        assert s.end <= protocol.PARAM_BASE
        assert len(s.image) == s.memsz >= len(s.data)
    for sym in EXPECTED[name]:
        addr = p.sym(sym)
        assert addr % 4 == 0
        assert any(s.addr <= addr < s.end for s in p.segments)
    assert not any(k.startswith("$") for k in p.symbols)
    wire = p.to_wire()
    protocol.validate_scenario({"name": name, "payload": wire})
    assert wire["entry"] == p.entry
    assert protocol.unb64(wire["segments"][0]["data"]) == p.segments[0].image


@pytest.mark.parametrize("name", ["psci_version", "el2_vectors"])
def test_hvc_smc_encodings(loaded, name):
    p = loaded[name]
    assert p.word(p.sym("hvc_insn")) == 0xD4000002     # HVC #0
    assert p.word(p.sym("smc_insn")) == 0xD4000003     # SMC #0
    assert p.symbolize(p.sym("smc_insn") + 4).startswith(("smc_insn+0x4", "smc_insn"))
    assert p.symbolize(p.sym("hvc_insn")) == "hvc_insn"
    assert p.symbolize(0x1234) == "0x1234"


def test_call_table_instructions(loaded):
    p = loaded["smccc_calls"]
    for c in abi.CONDUITS:
        assert p.word(p.sym(abi.conduit_symbol(c))) == abi.CONDUIT_INSNS[c], c
    # all slots are equally spaced (the dispatcher indexes them)
    addrs = [p.sym(abi.conduit_symbol(i)) for i in range(len(abi.CONDUITS))]
    assert len({b - a for a, b in itertools.pairwise(addrs)}) == 1


def test_guest_hyp_instructions(loaded):
    p = loaded["el2_guest_hyp"]
    assert p.word(p.sym("inner_hvc")) == 0xD4000002
    assert p.word(p.sym("inner_smc")) == 0xD4000003
    assert p.word(p.sym("inner_exit_hvc")) == 0xD41FFFE2
    assert p.word(p.sym("l1_proxy_smc")) == 0xD4000003
    assert p.sym("l1_vectors") % 2048 == 0 and p.sym("inner_vectors") % 2048 == 0


def test_vector_tables_aligned(loaded):
    assert loaded["el2_vectors"].sym("el2_vectors") % 2048 == 0
    for name in ("psci_version", "smccc_calls", "el2_hello"):
        assert loaded[name].sym("fatal_el1") % 2048 == 0
        assert loaded[name].sym("fatal_el2") % 2048 == 0


def test_common_inc_matches_protocol():
    c = abi.common_inc_constants()
    for name in ("RAM_BASE", "PARAM_BASE", "RESULT_BASE", "REPORT_BASE", "REPORT_DONE", "STACK_SIZE"):
        assert c[name] == getattr(protocol, name), name
    assert c["FATAL_SLOT_VECTOR"] == payloads.FATAL_SLOT_VECTOR
    assert c["FATAL_SLOT_SPSR"] == payloads.FATAL_SLOT_SPSR
    assert (c["DONE_UNEXPECTED"], c["DONE_BAD_PARAMS"], c["DONE_WRONG_EL"]) == (
        payloads.DONE_UNEXPECTED, payloads.DONE_BAD_PARAMS, payloads.DONE_WRONG_EL)
    assert c["PSCI_VERSION"] == payloads.PSCI_VERSION
    ld = (FIRMWARE_DIR / "payload.ld").read_text()
    assert f"RAM_BASE   = {protocol.RAM_BASE:#x};" in ld
    assert f"PARAM_BASE = {protocol.PARAM_BASE:#x};" in ld


# ---- rejected files ---------------------------------------------------------------------------------
def test_wrong_machine_names_it():
    with pytest.raises(PayloadError) as ei:
        payloads.load_elf("/bin/true")
    msg = str(ei.value)
    assert "EM_X86_64" in msg and "x86-64" in msg
    assert "aarch64-linux-gnu-as" in str(ei.value) + ei.value.hint


def test_not_an_elf(tmp_path):
    f = tmp_path / "junk.elf"
    f.write_bytes(b"#!/bin/sh\necho hi\n")
    with pytest.raises(PayloadError, match="not an ELF"):
        payloads.load_elf(f)
    with pytest.raises(PayloadError, match="cannot read"):
        payloads.load_elf(tmp_path / "missing.elf")


def test_truncated_elf(tmp_path, built):
    f = tmp_path / "cut.elf"
    f.write_bytes(built["psci_version"].read_bytes()[:100])
    with pytest.raises(PayloadError):
        payloads.load_elf(f)


def test_elf32_and_big_endian(tmp_path, built):
    raw = bytearray(built["psci_version"].read_bytes())
    f = tmp_path / "x.elf"
    raw32 = bytearray(raw)
    raw32[4] = 1
    f.write_bytes(raw32)
    with pytest.raises(PayloadError, match="ELF32"):
        payloads.load_elf(f)
    raw[5] = 2
    f.write_bytes(raw)
    with pytest.raises(PayloadError, match="big-endian"):
        payloads.load_elf(f)


def _link(tmp_path: Path, text_addr: int, name: str = "t", extra: str = "") -> Path:
    src = tmp_path / f"{name}.s"
    src.write_text(f".text\n.global _start\n_start:\n  hvc #0\n  b .\n{extra}\n")
    obj = tmp_path / f"{name}.o"
    elf = tmp_path / f"{name}.elf"
    subprocess.run(["aarch64-linux-gnu-as", "-o", obj, src], check=True)
    subprocess.run(["aarch64-linux-gnu-ld", "-N", "-Ttext", hex(text_addr),
                    "-o", elf, obj], check=True, capture_output=True)
    return elf


def test_segment_outside_ram(tmp_path):
    ok = payloads.load_elf(_link(tmp_path, protocol.RAM_BASE, "ok"))
    assert ok.entry == protocol.RAM_BASE
    with pytest.raises(PayloadError, match="outside guest RAM") as ei:
        payloads.load_elf(_link(tmp_path, 0x8000_0000, "high"))
    assert "payload.ld" in ei.value.hint
    with pytest.raises(PayloadError, match="outside guest RAM"):
        payloads.load_elf(_link(tmp_path, 0x1000, "low"))


def test_segment_over_param_pages_and_stacks(tmp_path):
    with pytest.raises(PayloadError, match="parameter/result"):
        payloads.load_elf(_link(tmp_path, protocol.PARAM_BASE, "param"))
    with pytest.raises(PayloadError, match="stacks"):
        payloads.load_elf(_link(tmp_path, protocol.RAM_BASE + protocol.RAM_SIZE_DEFAULT - 0x800, "stack"))
    # a bigger RAM makes the same address legal
    payloads.load_elf(_link(tmp_path, 0x4020_0000, "big"), ram_size=0x40_0000)


def test_object_file_rejected(tmp_path):
    src = tmp_path / "o.s"
    src.write_text(".text\nnop\n")
    subprocess.run(["aarch64-linux-gnu-as", "-o", tmp_path / "o.o", src], check=True)
    with pytest.raises(PayloadError, match="ET_REL"):
        payloads.load_elf(tmp_path / "o.o")


# ---- build machinery --------------------------------------------------------------------------------
def test_cache_hit_does_not_rebuild(tmp_path, monkeypatch):
    first = payloads.build_payloads(tmp_path)
    mtimes = {n: p.stat().st_mtime_ns for n, p in first.items()}

    def boom(*a, **k):
        raise AssertionError("rebuilt although the cache key matched")
    monkeypatch.setattr(payloads, "_assemble_and_link", boom)
    second = payloads.build_payloads(tmp_path)
    assert second == first
    assert {n: p.stat().st_mtime_ns for n, p in second.items()} == mtimes
    assert [p.name for p in tmp_path.iterdir()] == [first["psci_version"].parent.name]


def test_source_change_changes_key(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIRMWARE_DIR, src)
    k1 = payloads.build_key(src)
    (src / "psci_version.S").write_text((src / "psci_version.S").read_text() + "\n// changed\n")
    assert payloads.build_key(src) != k1
    assert payloads.build_key(FIRMWARE_DIR) == payloads.build_key(FIRMWARE_DIR)


def test_assembler_error_names_file_and_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(FIRMWARE_DIR / "payload.ld", src)
    shutil.copy(FIRMWARE_DIR / "common.inc", src)
    (src / "bad.S").write_text('    .include "common.inc"\n    .section .text.entry, "ax"\n'
                               "    .global _start\n_start:\n    frobnicate x0, x1\n")
    with pytest.raises(PayloadError) as ei:
        payloads.build_payloads(tmp_path / "out", src_dir=src)
    assert "bad.S:5" in str(ei.value)
    assert not any((tmp_path / "out").glob("*/manifest.json"))   # no half-built cache entry left


def test_missing_toolchain(monkeypatch, tmp_path):
    monkeypatch.setenv(payloads.CROSS_PREFIX_ENV, "no-such-prefix-")
    with pytest.raises(SetupError) as ei:
        payloads.build_payloads(tmp_path)
    assert "apt-get install binutils-aarch64-linux-gnu" in str(ei.value)
    assert isinstance(ei.value, HarnessError)


def test_get_payload(monkeypatch, tmp_path):
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(tmp_path))
    p = payloads.get_payload("psci_version")
    assert p.name == "psci_version" and "hvc_insn" in p.symbols
    with pytest.raises(PayloadError, match="no payload named"):
        payloads.get_payload("nope")


# ---- encoders / decoders ----------------------------------------------------------------------------
def test_call_table_round_trip():
    calls = [abi.Call("hvc", (0x84000000,)),
             {"conduit": "smcffff", "regs": list(range(1, 19))},
             ("hvc1", [-1, 2**64 - 1]),
             abi.Call(3, ())]
    params = abi.encode_call_table(calls)
    assert params[0] == 4
    assert len(params) == 1 + 4 * abi.CALL_ENTRY_WORDS
    assert params[1:3] == [0, 0x84000000]
    assert params[1 + 20] == abi.conduit_index("smcffff") == 5
    back = abi.decode_call_table(params)
    assert [abi.conduit_index(c.conduit) for c in back] == [0, 5, 2, 3]
    assert back[1].regs == tuple(range(1, 19))
    assert back[2].regs[:2] == (2**64 - 1, 2**64 - 1)
    assert all(len(c.regs) == 18 for c in back)
    protocol.validate_scenario({"name": "t", "payload": {"entry": protocol.RAM_BASE, "segments": [
        {"addr": protocol.RAM_BASE, "data": protocol.b64(b"\0" * 4)}]}, "params": params})


def test_call_table_limits():
    with pytest.raises(ValueError, match="at most"):
        abi.encode_call_table([("hvc", [])] * (abi.CALLS_MAX + 1))
    with pytest.raises(ValueError, match="conduit"):
        abi.encode_call_table([("svc", [])])
    with pytest.raises(ValueError, match="x0..x17"):
        abi.encode_call_table([("hvc", [0] * 19)])
    with pytest.raises(ValueError, match="64 bits"):
        abi.encode_call_table([("hvc", [2**64])])
    assert abi.call_results_size(abi.CALLS_MAX) <= payloads.RESULT_BLOCK_SIZE
    assert 8 * len(abi.encode_call_table([("hvc", [])] * abi.CALLS_MAX)) <= (
        protocol.RESULT_BASE - protocol.PARAM_BASE)


def test_decode_call_results():
    n = 2
    block = bytearray(payloads.RESULT_BLOCK_SIZE)
    struct.pack_into("<8Q", block, 0, 0x8, 0x4_8000_0000, 2, 2, 0x401FFFF0, 0, 0, abi.CALL_RESULT_MAGIC)
    for i in range(n):
        regs = [0x100 * i + k for k in range(31)] + [0x401FFFD0]
        struct.pack_into("<32Q", block, 64 + 256 * i, *regs)
    hdr = abi.decode_call_header(bytes(block))
    assert hdr["current_el"] == 2 and hdr["calls_done"] == 2 and hdr["magic_ok"]
    assert hdr["sp"] - abi.CALL_FRAME == 0x401FFFD0
    res = abi.decode_call_results(bytes(block), n)
    assert res[1]["regs"][30] == 0x100 + 30 and res[1]["ret"] == [0x100, 0x101, 0x102, 0x103]
    assert res[0]["sp"] == 0x401FFFD0
    with pytest.raises(PayloadError, match="need"):
        abi.decode_call_results(bytes(100), 1)
    assert abi.call_pattern(1, 30) == 0x1181E


def test_decode_el2_vectors_and_guest_hyp():
    block = bytearray(payloads.RESULT_BLOCK_SIZE)
    struct.pack_into("<Q", block, 0, 1)
    struct.pack_into("<7Q", block, 0x40, 0x200, 0x5A000000, 0x4000004C, 0, 0x3C9, 0x84000000, 0xE1E10000)
    d = abi.decode_el2_vectors(bytes(block))
    assert d["count"] == 1 and d["traps"][0]["ec"] == payloads.EC_HVC64 and d["traps"][0]["x0_out"] == 0xE1E10000

    block = bytearray(payloads.RESULT_BLOCK_SIZE)
    struct.pack_into("<8Q", block, 0, 0x8, 1 << 34 | 1 << 31, 5, 2, 0xE1E10000, 0x5C5C0000, 1, 0)
    struct.pack_into("<8Q", block, 0x40 + 0x40, 0x400, 0x5E000000, 0x40000100, 0x3C5, 0x84000000, 0x5C5C0000, 3, 0)
    g = abi.decode_guest_hyp(bytes(block))
    assert g["current_el"] == 2 and g["ntraps"] == 2 and g["exit_path"] == abi.GH_EXIT_BY_L1
    assert g["traps"][1]["ec"] == payloads.EC_SMC64 and g["traps"][1]["action"] == abi.GH_ACT_SMC_MARKER
    assert abi.encode_guest_hyp_params(tsc=True, proxy=True) == [0b101]


def test_concurrent_builds_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: payloads.build_payloads(tmp_path), range(4)))
    assert all(r == results[0] for r in results)
    assert [p.name for p in tmp_path.iterdir()] == [results[0]["psci_version"].parent.name]   # no temp dirs left
    for path in results[0].values():
        payloads.load_elf(path)


def test_asm_layout_constants_match_python():
    c = abi.common_inc_constants(FIRMWARE_DIR / "smccc_calls.S")
    assert c["MAX_CALLS"] == abi.CALLS_MAX
    assert c["ENTRY_SIZE"] == 8 * abi.CALL_ENTRY_WORDS
    assert c["RECORD_SIZE"] == abi.CALL_RECORD_SIZE
    assert c["HEADER_SIZE"] == abi.CALL_HEADER_SIZE
    assert c["RESULT_MAGIC"] == abi.CALL_RESULT_MAGIC
    assert c["N_CONDUITS"] == len(abi.CONDUITS)
    v = abi.common_inc_constants(FIRMWARE_DIR / "el2_vectors.S")
    assert (v["MAX_TRAPS"], v["TRAP_LOG"], v["TRAP_SIZE"]) == (
        abi.EV_MAX_TRAPS, abi.EV_TRAP_LOG, abi.EV_TRAP_SIZE)
    g = abi.common_inc_constants(FIRMWARE_DIR / "el2_guest_hyp.S")
    assert g["GH_FLAGS"] == abi.GH_HDR_FLAGS and g["GH_NTRAPS"] == abi.GH_HDR_NTRAPS
    assert g["GH_X0_HVC"] == abi.GH_HDR_X0_AFTER_HVC and g["GH_X0_SMC"] == abi.GH_HDR_X0_AFTER_SMC
    assert g["GH_EXIT_PATH"] == abi.GH_HDR_EXIT_PATH and g["GH_NINNER"] == abi.GH_HDR_NINNER
    assert (g["GH_TRAP_LOG"], g["GH_MAX_TRAPS"], g["GH_INNER_LOG"], g["GH_MAX_INNER"], g["GH_RESULT_SIZE"]) == (
        abi.GH_TRAP_LOG, abi.GH_MAX_TRAPS, abi.GH_INNER_LOG, abi.GH_MAX_INNER_EXC,
        abi.GH_RESULT_SIZE)
    assert [1 << g[f"FLAG_{n}_BIT"] for n in ("TSC", "HCD", "PROXY", "PROXY_SMC")] == [
        abi.GH_FLAG_TSC, abi.GH_FLAG_HCD, abi.GH_FLAG_PROXY, abi.GH_FLAG_PROXY_SMC]
    assert [g[f"ACT_{n}"] for n in ("HVC_MARKER", "HVC_PROXY", "SMC_MARKER", "SMC_PROXY", "EXIT", "FATAL")] == [
        abi.GH_ACT_HVC_MARKER, abi.GH_ACT_HVC_PROXY, abi.GH_ACT_SMC_MARKER,
        abi.GH_ACT_SMC_PROXY, abi.GH_ACT_EXIT, abi.GH_ACT_FATAL]
