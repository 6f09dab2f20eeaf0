"""``smccc-harness kernel source --patch``: a hard-linked copy of a tree with patches applied by the real GNU
patch, cached by the patches' hash; a patch that does not apply names the patch, the file and the hunk and
leaves nothing behind; the base tree never changes (harness/kdev/patched.py).

The trees here are small stand-ins for the kernel tree; the real one (Debian's linux-source-7.3 with
patches/linux) is built and booted by tests/system/test_kernel_patches.py (slow)."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest

from harness import cli
from harness.kdev import kbuild, patched
from harness.kdev.patched import PatchError

HVC_OLD = """static int handle_hvc(struct kvm_vcpu *vcpu)
{
\t/* Forward hvc instructions to the virtual EL2 if the guest has EL2. */
\tif (vcpu_has_nv(vcpu)) {
\t\tif (vcpu_read_sys_reg(vcpu, HCR_EL2) & HCR_HCD)
\t\t\tkvm_inject_undefined(vcpu);
\t\telse
\t\t\tkvm_inject_nested_sync(vcpu, kvm_vcpu_get_esr(vcpu));

\t\treturn 1;
\t}

\treturn kvm_smccc_call_handler(vcpu);
}
"""
HVC_NEW = HVC_OLD.replace("""\t\tif (vcpu_read_sys_reg(vcpu, HCR_EL2) & HCR_HCD)
\t\t\tkvm_inject_undefined(vcpu);
\t\telse
""", """\t\tif (vcpu_read_sys_reg(vcpu, HCR_EL2) & HCR_HCD) {
\t\t\t*vcpu_pc(vcpu) -= 4;
\t\t\tkvm_inject_undefined(vcpu);
\t\t} else {
""").replace("kvm_vcpu_get_esr(vcpu));\n\n", "kvm_vcpu_get_esr(vcpu));\n\t\t}\n\n")
REL = "arch/arm64/kvm/handle_exit.c"


def diff(rel: str, old: str, new: str, subject: str = "KVM: arm64: nv: test") -> bytes:
    """A git format-patch style mail with a real unified diff of ``old`` -> ``new``."""
    body = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{rel}", f"b/{rel}", n=3))
    return (f"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\nFrom: A <a@example.org>\n"
            f"Subject: [PATCH] {subject}\n\nWhy.\n\nSigned-off-by: A <a@example.org>\n---\n"
            f"diff --git a/{rel} b/{rel}\n{body}--\n2.39.5\n").encode()


@pytest.fixture
def base(tmp_path) -> Path:
    t = tmp_path / "src" / "linux-source-7.3"
    (t / "arch" / "arm64" / "kvm").mkdir(parents=True)
    (t / "Makefile").write_text("VERSION = 7\nPATCHLEVEL = 3\nSUBLEVEL = 4\n")
    (t / REL).write_text(HVC_OLD)
    (t / "arch" / "arm64" / "kvm" / "other.c").write_text("int x;\n")
    return t


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "cache" / "ksrc-patched"


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def quiet(_msg: str) -> None:
    pass


def test_patch_applies_to_a_hardlinked_copy_and_the_base_is_untouched(base, root, tmp_path):
    p = write(tmp_path, "0001-fix.patch", diff(REL, HVC_OLD, HVC_NEW))
    before = (base / REL).stat()
    r = patched.patched_tree(base, [p], progress=quiet, cache_root=root)
    assert r.made and r.tree.name == base.name and r.tree.parent.parent == root
    assert (r.tree / REL).read_text() == HVC_NEW
    assert (base / REL).read_text() == HVC_OLD and (base / REL).stat().st_ino == before.st_ino
    assert (r.tree / REL).stat().st_ino != before.st_ino                       # the patched file: its own inode
    other = "arch/arm64/kvm/other.c"
    assert (r.tree / other).stat().st_ino == (base / other).stat().st_ino      # the rest: hard links
    m = json.loads((r.tree.parent / patched.MANIFEST).read_text())
    assert m["patches"][0]["name"] == "0001-fix.patch" and m["base"] == str(base) and m["key"] == r.key
    assert not (r.tree / patched.LOCALVERSION_FILE).exists()
    assert [x.name for x in root.iterdir()] == [r.key]                           # no temporary left


def test_same_patches_reuse_the_tree_and_other_bytes_make_another(base, root, tmp_path):
    p = write(tmp_path, "a.patch", diff(REL, HVC_OLD, HVC_NEW))
    first = patched.patched_tree(base, [p], progress=quiet, cache_root=root)
    (first.tree / "marker").write_text("kept")
    reworded = p.read_bytes().replace(b"\nWhy.\n", b"\nA better reason, reworded for review.\n")
    again = patched.patched_tree(base, [write(tmp_path, "renamed.patch", reworded)], progress=quiet, cache_root=root)
    assert (again.made, again.tree, again.key) == (False, first.tree, first.key)   # keyed by the diff only
    assert (again.tree / "marker").read_text() == "kept"
    other = write(tmp_path, "b.patch", diff(REL, HVC_OLD, HVC_NEW.replace("-= 4", "-= 4 /* HVC */")))
    third = patched.patched_tree(base, [other], progress=quiet, cache_root=root)
    assert third.made and third.key != first.key
    lv = patched.patched_tree(base, [p], localversion="-kvm-nv-hcd-elr", progress=quiet, cache_root=root)
    assert lv.made and lv.key not in (first.key, third.key)
    assert (lv.tree / patched.LOCALVERSION_FILE).read_text() == "-kvm-nv-hcd-elr\n"


def test_patches_apply_in_order(base, root, tmp_path):
    mid = HVC_OLD.replace("Forward hvc", "Forward HVC")
    p1 = write(tmp_path, "0001.patch", diff(REL, HVC_OLD, mid))
    last = mid.replace("Forward HVC", "Forward HVC (p2)")
    p2 = write(tmp_path, "0002.patch", diff(REL, mid, last))
    r = patched.patched_tree(base, [p1, p2], progress=quiet, cache_root=root)
    assert (r.tree / REL).read_text() == last
    with pytest.raises(PatchError, match="0002.patch does not apply"):
        patched.patched_tree(base, [p2, p1], progress=quiet, cache_root=root)


def test_a_hunk_that_does_not_apply_names_patch_file_and_hunk_and_leaves_nothing(base, root, tmp_path):
    stale = HVC_OLD.replace("kvm_smccc_call_handler", "kvm_hvc_call_handler")   # the patch was made on another tree
    p = write(tmp_path, "0001-KVM-arm64-nv-x.patch",
              diff(REL, stale, stale.replace("return kvm_hvc_call_handler(vcpu);", "return 0;")))
    with pytest.raises(PatchError) as e:
        patched.patched_tree(base, [p], progress=quiet, cache_root=root)
    msg = str(e.value)
    assert f"0001-KVM-arm64-nv-x.patch does not apply: {REL} hunk #1 (@@ -" in msg, msg
    assert "rebase" in e.value.hint
    assert list(root.iterdir()) == []                                            # no half-made tree, no temp
    assert (base / REL).read_text() == HVC_OLD


def test_second_hunk_failing_is_named_by_number(base, root, tmp_path):
    old = "".join(f"line {i}\n" for i in range(40))
    (base / "big.c").write_text(old)
    new = old.replace("line 2\n", "line 2 changed\n").replace("line 30\n", "line 30 changed\n")
    text = diff("big.c", old, new).decode().replace(" line 31\n", " line 31 was different\n")
    p = write(tmp_path, "two.patch", text.encode())
    with pytest.raises(PatchError, match=r"big\.c hunk #2 \(@@ -28,7 \+28,7 @@\) failed at line 28"):
        patched.patched_tree(base, [p], progress=quiet, cache_root=root)
    assert (base / "big.c").read_text() == old


def test_already_applied_missing_file_and_not_a_patch_are_errors(base, root, tmp_path):
    applied = write(tmp_path, "rev.patch", diff(REL, HVC_NEW, HVC_OLD))         # reversed: the tree has it
    with pytest.raises(PatchError, match="already has it"):
        patched.patched_tree(base, [applied], progress=quiet, cache_root=root)
    missing = write(tmp_path, "missing.patch", diff("arch/arm64/kvm/nope.c", HVC_OLD, HVC_NEW))
    with pytest.raises(PatchError, match=r"not in the tree \(arch/arm64/kvm/nope\.c\)"):
        patched.patched_tree(base, [missing], progress=quiet, cache_root=root)
    junk = write(tmp_path, "junk.patch", b"just some text\n")
    with pytest.raises(PatchError, match="junk.patch is not a patch"):
        patched.patched_tree(base, [junk], progress=quiet, cache_root=root)
    with pytest.raises(PatchError, match="cannot read the patch"):
        patched.patched_tree(base, [tmp_path / "absent.patch"], progress=quiet, cache_root=root)
    escape = write(tmp_path, "escape.patch", diff("../outside.c", "a\n", "b\n"))
    with pytest.raises(PatchError, match="outside the tree"):
        patched.patched_tree(base, [escape], progress=quiet, cache_root=root)
    assert not root.exists() or list(root.iterdir()) == []


def test_localversion_must_be_a_release_suffix(base, root, tmp_path):
    p = write(tmp_path, "a.patch", diff(REL, HVC_OLD, HVC_NEW))
    with pytest.raises(PatchError, match="localversion"):
        patched.patched_tree(base, [p], localversion="-has space", progress=quiet, cache_root=root)


def test_patches_dir_takes_patch_files_in_name_order_and_its_localversion_files(tmp_path):
    d = tmp_path / "series"
    d.mkdir()
    for n in ("0002-b.patch", "0001-a.patch", "README", "localversion-x", "localversion-x~"):
        (d / n).write_text("")
    patches, lvs = patched.patches_in(d)
    assert [p.name for p in patches] == ["0001-a.patch", "0002-b.patch"]
    assert [p.name for p in lvs] == ["localversion-x"]
    with pytest.raises(PatchError, match="no \\*.patch file"):
        patched.patches_in(tmp_path / "series" / "..")
    with pytest.raises(PatchError, match="not a directory"):
        patched.patches_in(tmp_path / "nope")


def test_the_repo_patches_parse(tmp_path):
    """patches/linux: every patch names its files and hunks, and the directory names the release it builds."""
    patches, lvs = patched.patches_in(Path(__file__).resolve().parents[2] / "patches" / "linux")
    for p in patches:
        text = p.read_text()
        assert patched.hunks(text) and text.startswith("From ") and "\nSubject: [PATCH" in text, p
        assert "\nSigned-off-by: " in text and "\nFixes: " in text, p
    lv = "".join(f.read_text().strip() for f in lvs)
    assert patched.check_localversion(lv) == lv


def test_cli_kernel_source_patch_prints_the_patched_tree(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kbuild, "source_tree", lambda progress=print: base)
    d = tmp_path / "series"
    d.mkdir()
    (d / "0001-fix.patch").write_bytes(diff(REL, HVC_OLD, HVC_NEW))
    (d / "localversion-fix").write_text("-fix\n")
    assert cli.main(["kernel", "source", "--patches", str(d)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    tree = Path(out[-1])
    assert tree.parent.parent == tmp_path / "cache" / "ksrc-patched" and (tree / REL).read_text() == HVC_NEW
    assert (tree / patched.LOCALVERSION_FILE).read_text() == "-fix\n"
    assert any("made: 1 patch(es)" in line and "localversion -fix" in line for line in out), out
    assert cli.main(["kernel", "source", "--patches", str(d)]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == tree
    assert cli.main(["kernel", "source", "--localversion=-x"]) == 2
    assert "--localversion without a patch" in capsys.readouterr().err
    bad = tmp_path / "bad.patch"
    bad.write_bytes(diff(REL, HVC_NEW, HVC_NEW.replace("-= 4;", "-= 4; /* x */")))
    assert cli.main(["kernel", "source", "--patch", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"bad.patch does not apply: {REL} hunk #1" in err, err
    assert sorted(os.listdir(tmp_path / "cache" / "ksrc-patched")) == [tree.parent.name]
