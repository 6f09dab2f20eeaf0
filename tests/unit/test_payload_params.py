"""``run-payload --param OFFSET=VALUE`` / ``--params FILE``: the payload's parameter block, without QEMU."""

import json
import struct

import pytest

from harness import cli
from harness.errors import HarnessError
from harness.images import payloads as pl
from harness.images.payloads import get_payload
from harness.model import payload_abi as abi


def test_param_is_offset_equals_u64():
    assert abi.parse_param("0x8=0xC4000003") == (8, 0xC400_0003)
    assert abi.parse_param("16=1") == (16, 1)
    assert abi.parse_param(" 0x10 = 0xffff_ffff_ffff_ffff ") == (0x10, 2**64 - 1)
    assert abi.parse_param("0=-1") == (0, 2**64 - 1)                     # two's complement
    assert abi.parse_param(f"{abi.PARAM_BLOCK_SIZE - 8:#x}=1") == (0x7FF8, 1)


@pytest.mark.parametrize(("text", "says"), [
    ("0x8", "not OFFSET=VALUE"), ("=5", "not OFFSET=VALUE"), ("8=", "not OFFSET=VALUE"),
    ("eight=1", "'eight' is not a number"), ("8=0xZZ", "'0xZZ' is not a number"),
    ("0x7ff9=1", "offset 0x7ff9 is outside the parameter block"), ("-8=1", "outside the parameter block"),
    ("0x8=0x10000000000000000", "does not fit in 64 bits"),
])
def test_bad_param_is_a_harness_error_with_a_hint(text, says):
    with pytest.raises(HarnessError, match="^--param") as ei:
        abi.parse_param(text)
    assert says in str(ei.value) and "--param OFFSET=VALUE" in ei.value.hint


def test_param_words_are_little_endian_u64_over_the_file_bytes():
    assert abi.param_words(b"", [(0, 1), (0x10, 0x8400_0000)]) == [1, 0, 0x8400_0000]
    assert abi.param_words(b"", [(4, 0x1_0000_0002)]) == [0x2_0000_0000, 1]        # any byte offset
    base = struct.pack("<3Q", 7, 8, 9)
    assert abi.param_words(base, [(8, 0xAA)]) == [7, 0xAA, 9]                       # later wins
    assert abi.param_words(b"\x01\x02\x03") == [0x030201]                          # padded to a whole word
    assert abi.param_words() == []


def test_params_file_raw_and_json(tmp_path):
    raw = tmp_path / "p.bin"
    raw.write_bytes(struct.pack("<2Q", 1, 0x8400_0000))
    assert abi.read_params_file(raw) == raw.read_bytes()
    words = tmp_path / "w.json"
    words.write_text(json.dumps([1, "0x8400000A", 0]))
    assert abi.param_words(abi.read_params_file(words)) == [1, 0x8400_000A, 0]
    offsets = tmp_path / "o.json"
    offsets.write_text(json.dumps({"0x10": "0xC4000003", "0": 1}))
    assert abi.param_words(abi.read_params_file(offsets)) == [1, 0, 0xC400_0003]


@pytest.mark.parametrize(("name", "content", "says"), [
    ("missing.bin", None, "cannot read it"),
    ("big.bin", b"\0" * (abi.PARAM_BLOCK_SIZE + 1), "more than the parameter block"),
    ("bad.json", b"{not json", "not JSON"),
    ("str.json", b'"0x8"', "a list of u64 words or an object"),
    ("word.json", b'[1, "x"]', "'x' is not a number"),
    ("off.json", b'{"0x8000": 1}', "offset 0x8000 is outside the parameter block"),
])
def test_bad_params_file_is_a_harness_error_with_a_hint(tmp_path, name, content, says):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(HarnessError, match="^--params ") as ei:
        abi.read_params_file(path)
    assert says in str(ei.value) and ".json" in ei.value.hint


def test_cli_builds_the_block_from_params_then_param(tmp_path):
    f = tmp_path / "p.json"
    f.write_text("[1, 0, 132]")
    args = cli.build_parser().parse_args(["run-payload", "x.elf", "--params", str(f), "--param", "0x10=0x84000000",
                                          "--param", "0x18=5"])
    assert cli.payload_params(args) == [1, 0, 0x8400_0000, 5]


@pytest.mark.parametrize(("argv", "says"), [
    (["--param", "0x8=banana"], "'banana' is not a number"),
    (["--param", "0x8000=1"], "outside the parameter block"),
    (["--params", "/nonexistent/params.bin"], "cannot read it"),
])
def test_cli_bad_param_exits_2_with_a_hint_before_booting(capsys, monkeypatch, argv, says):
    elf = pl.build_payloads()["smccc_calls"]
    monkeypatch.setattr(cli, "_session", lambda *a, **k: pytest.fail("booted despite bad input"))
    assert cli.main(["run-payload", str(elf), "--forward", "psci", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --param") and says in err and "hint: " in err


def test_the_block_fits_what_the_protocol_accepts():
    from harness.model.scenarios import scenario
    words = abi.param_words(b"", [(abi.PARAM_BLOCK_SIZE - 8, 1)])
    spec = scenario("p", get_payload("smccc_calls"), params=words)
    assert len(spec["params"]) == abi.PARAM_BLOCK_SIZE // 8 and spec["params"][-1] == 1
