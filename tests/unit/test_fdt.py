"""The flattened-device-tree writer (harness/guest/fdt.py) and the L2 guest's device tree (harness/guest/linux.py).

Format: Devicetree Specification v0.4 chapter 5; bindings: arm/psci.yaml, arm/cpus.yaml,
interrupt-controller/arm,gic-v3.yaml.  When ``dtc`` is installed the blob is also decompiled by it.
"""

import shutil
import struct
import subprocess

import pytest

from harness.guest import fdt, linux
from harness.guest.uart import Pl011


def _tree():
    root = fdt.Node("", compatible="test,board")
    root.set("#address-cells", 2).set("#size-cells", 2)
    root.add("memory@40000000", device_type="memory", reg=[*fdt.u64(0x4000_0000), *fdt.u64(0x1000_0000)])
    cpus = root.add("cpus")
    cpus.set("#address-cells", 1).set("#size-cells", 0)
    cpus.add("cpu@0", device_type="cpu", reg=0, enable_method="psci")
    cpus.add("cpu@1", device_type="cpu", reg=1, enable_method="psci")
    root.add("psci", compatible=["arm,psci-1.0", "arm,psci-0.2"], method="hvc")
    return root


def test_header_describes_the_blob():
    blob = fdt.build(_tree())
    magic, total, off_struct, off_strings, off_rsv, version, last, boot, size_strings, size_struct = \
        struct.unpack_from(">10I", blob)
    assert (magic, version, last, boot) == (0xD00DFEED, 17, 16, 0)
    assert total == len(blob)
    assert off_rsv == 40 and off_rsv % 8 == 0
    assert blob[off_rsv:off_rsv + 16] == b"\0" * 16          # empty reservation map, zero-terminated
    assert off_struct % 4 == 0 and off_struct + size_struct == off_strings
    assert off_strings + size_strings == total
    assert struct.unpack_from(">I", blob, off_struct + size_struct - 4)[0] == fdt.FDT_END


def test_round_trip_keeps_nodes_properties_and_order():
    t = fdt.parse(fdt.build(_tree()))
    assert t["name"] == "" and list(t["children"]) == ["memory@40000000", "cpus", "psci"]
    mem = t["children"]["memory@40000000"]["props"]
    assert mem["device_type"] == b"memory\0"
    assert fdt.cells(mem["reg"]) == [0, 0x4000_0000, 0, 0x1000_0000]
    cpu1 = t["children"]["cpus"]["children"]["cpu@1"]["props"]
    assert fdt.cells(cpu1["reg"]) == [1] and cpu1["enable-method"] == b"psci\0"
    psci = t["children"]["psci"]["props"]
    assert fdt.strings_of(psci["compatible"]) == ["arm,psci-1.0", "arm,psci-0.2"]


def test_property_names_are_stored_once_in_the_strings_block():
    blob = fdt.build(_tree())
    _, _, _, off_strings, _, _, _, _, size_strings, _ = struct.unpack_from(">10I", blob)
    names = blob[off_strings:off_strings + size_strings].split(b"\0")[:-1]
    assert len(names) == len(set(names))
    assert b"device_type" in names and b"enable-method" in names


@pytest.mark.parametrize("value,encoded", [
    ("hvc", b"hvc\0"),
    (["a", "bc"], b"a\0bc\0"),
    (7, b"\0\0\0\x07"),
    ([1, 2], b"\0\0\0\x01\0\0\0\x02"),
    (list(fdt.u64(0x1_2345_6789)), b"\0\0\0\x01\x23\x45\x67\x89"),
    (True, b""),
    (b"\x01\x02", b"\x01\x02"),
])
def test_values_are_encoded_big_endian(value, encoded):
    assert fdt.encode_value(value) == encoded


def test_a_cell_wider_than_32_bits_is_refused():
    with pytest.raises(ValueError, match="32 bits"):
        fdt.encode_value([0x1_0000_0000])


def test_keyword_underscores_become_dashes_except_device_type():
    n = fdt.Node("x", device_type="cpu", enable_method="psci")
    assert set(n.props) == {"device_type", "enable-method"}


def test_duplicate_child_is_refused():
    root = fdt.Node("")
    root.add("a")
    with pytest.raises(ValueError, match="duplicate"):
        root.add("a")


def _l2_tree(method="hvc", ncpus=3):
    mpidrs = [0x8000_0000 | i for i in range(ncpus)]
    blob = linux.device_tree(mpidrs, 256 << 20, method, "console=ttyAMA0 l2.action=poweroff",
                             (0x4F00_0000, 0x4F10_0000))
    return blob, fdt.parse(blob)


@pytest.mark.parametrize("method", ["hvc", "smc"])
def test_l2_psci_node_names_the_conduit(method):
    _, t = _l2_tree(method)
    p = t["children"]["psci"]["props"]
    assert fdt.strings_of(p["compatible"]) == ["arm,psci-1.0", "arm,psci-0.2"]
    assert p["method"] == method.encode() + b"\0"


def test_l2_cpus_use_psci_and_the_vcpu_mpidr_affinity():
    _, t = _l2_tree(ncpus=3)
    cpus = t["children"]["cpus"]["children"]
    assert list(cpus) == ["cpu@0", "cpu@1", "cpu@2"]
    for i, (name, node) in enumerate(cpus.items()):
        assert fdt.cells(node["props"]["reg"]) == [i], name      # MPIDR bit 31 (RES1) is not part of the hwid
        assert node["props"]["enable-method"] == b"psci\0"
        assert node["props"]["device_type"] == b"cpu\0"


def test_l2_gic_redistributor_region_covers_every_vcpu():
    _, t = _l2_tree(ncpus=3)
    gic = t["children"][f"intc@{linux.GICD_BASE:x}"]["props"]
    reg = fdt.cells(gic["reg"])
    assert reg == [0, linux.GICD_BASE, 0, linux.GICD_SIZE, 0, linux.GICR_BASE, 0, 3 * linux.GICR_STRIDE]
    assert fdt.cells(gic["#interrupt-cells"]) == [3] and "interrupt-controller" in gic


def test_l2_chosen_carries_bootargs_and_the_initrd():
    _, t = _l2_tree()
    ch = t["children"]["chosen"]["props"]
    assert ch["bootargs"] == b"console=ttyAMA0 l2.action=poweroff\0"
    assert fdt.cells(ch["linux,initrd-start"]) == [0, 0x4F00_0000]
    assert fdt.cells(ch["linux,initrd-end"]) == [0, 0x4F10_0000]


def test_l2_timer_lists_the_four_arch_timer_ppis():
    _, t = _l2_tree()
    irqs = fdt.cells(t["children"]["timer"]["props"]["interrupts"])
    assert [irqs[i + 1] for i in range(0, 12, 3)] == [13, 14, 11, 10]
    assert all(irqs[i] == 1 for i in range(0, 12, 3))            # GIC_PPI


def test_l2_idle_state_links_every_cpu_to_the_psci_suspend_param():
    blob = linux.device_tree([0x8000_0000, 0x8000_0001], 256 << 20, "hvc", "", None,
                             idle_param=linux.IDLE_STATES["standby"])
    cpus = fdt.parse(blob)["children"]["cpus"]["children"]
    idle = cpus["idle-states"]
    assert idle["props"]["entry-method"] == b"psci\0"
    st = idle["children"]["cpu-standby"]["props"]
    assert fdt.strings_of(st["compatible"]) == ["arm,idle-state"]
    assert fdt.cells(st["arm,psci-suspend-param"]) == [0x1]
    for name in ("cpu@0", "cpu@1"):
        assert fdt.cells(cpus[name]["props"]["cpu-idle-states"]) == fdt.cells(st["phandle"])


def test_l2_tree_has_no_idle_states_by_default():
    _, t = _l2_tree()
    cpus = t["children"]["cpus"]["children"]
    assert "idle-states" not in cpus and "cpu-idle-states" not in cpus["cpu@0"]["props"]


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc (device-tree-compiler) is not installed")
def test_dtc_decompiles_the_l2_tree_without_warnings():
    blob, _ = _l2_tree()
    p = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-"], input=blob, capture_output=True, check=False)
    assert p.returncode == 0, p.stderr.decode()
    assert 'enable-method = "psci"' in p.stdout.decode()
    assert b"Warning" not in p.stderr, p.stderr.decode()


def test_image_header_rejects_a_non_arm64_file():
    with pytest.raises(ValueError, match="ARM"):
        linux.image_header(b"\0" * 128)


def test_image_header_reads_text_offset_and_size():
    head = bytearray(64)
    struct.pack_into("<QQ", head, 8, 0, 0x2A0_0000)
    head[0x38:0x3C] = b"ARM\x64"
    assert linux.image_header(bytes(head)) == (0, 0x2A0_0000)


# ---- the PL011 model (DDI 0183G §3) ------------------------------------------------------------------
def test_pl011_captures_lines_and_reports_an_idle_fifo():
    lines = []
    u = Pl011(0x0900_0000, on_line=lines.append)
    assert u.read(0x0900_0018, 4) == 0x90                       # UARTFR: TXFE | RXFE, not busy, not full
    for b in b"hi\r\nthere\n":
        u.write(0x0900_0000, 4, b)
    assert lines == ["hi", "there"] and u.text() == "hi\r\nthere\n"


def test_pl011_reports_the_primecell_ids():
    u = Pl011(0x0900_0000)
    periph = [u.read(0x0900_0FE0 + 4 * i, 4) for i in range(4)]
    cell = [u.read(0x0900_0FF0 + 4 * i, 4) for i in range(4)]
    assert periph == [0x11, 0x10, 0x14, 0x00] and cell == [0x0D, 0xF0, 0x05, 0xB1]


def test_pl011_drops_loopback_bytes():
    u = Pl011(0x0900_0000)
    u.write(0x0900_0030, 4, 0x80)       # UARTCR.LBE
    u.write(0x0900_0000, 4, ord("x"))
    assert u.text() == "" and u.read(0x0900_0030, 4) == 0x80


@pytest.mark.parametrize("method", ["hvc", "smc"])
def test_l2_sdei_node_under_firmware_names_its_conduit(method):
    """arm/firmware/sdei.txt: /firmware/sdei, compatible "arm,sdei-1.0", method = the conduit (the Linux driver
    drivers/firmware/arm_sdei.c sdei_get_conduit reads it); absent unless asked for."""
    blob = linux.device_tree([0x8000_0000], 256 << 20, "hvc", "", None, sdei_method=method)
    p = fdt.parse(blob)["children"]["firmware"]["children"]["sdei"]["props"]
    assert fdt.strings_of(p["compatible"]) == ["arm,sdei-1.0"] and p["method"] == method.encode() + b"\0"
    assert "firmware" not in _l2_tree()[1]["children"]
    if shutil.which("dtc"):
        out = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-"], input=blob, capture_output=True, check=True)
        assert b"Warning" not in out.stderr and b'compatible = "arm,sdei-1.0"' in out.stdout


def test_linux_request_sdei_must_name_a_conduit():
    from harness import protocol
    assert linux.validate({"sdei": "smc"})["sdei"] == "smc" and linux.validate({})["sdei"] is None
    with pytest.raises(protocol.ProtocolError, match="sdei"):
        linux.validate({"sdei": "svc"})
