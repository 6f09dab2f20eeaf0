"""A kernel build's configuration: the harness's fragment (images/kernel.config) on top of ``allnoconfig``, or
merged into your own .config / defconfig / the .config in O= the way scripts/kconfig/merge_config.sh does.
Every fragment option must stick; a failed configuration puts the previous .config back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import HarnessError
from .make import KernelBuildError, make_argv, run_make
from .toolchain import Toolchain

MERGED_BASE = ".smccc-harness-merged.config"  # in O=: base config + fragment (--config), KCONFIG_ALLCONFIG
STAMP = ".smccc-harness-fragment"  # in O=: JSON of what the .config was made from (fragment, base, toolchain)
CONFIG_MODES = ("allnoconfig", "defconfig", "olddefconfig")  # besides a path to a .config


# ---- configuration --------------------------------------------------------------------------------------
def parse_fragment(text: str) -> dict[str, str]:
    """``CONFIG_X=y`` / ``# CONFIG_X is not set`` lines of a fragment -> {"CONFIG_X": "y" | "n" | value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("# CONFIG_") and s.endswith(" is not set"):
            out[s[2:-len(" is not set")]] = "n"
        elif s.startswith("CONFIG_") and "=" in s:
            k, _, v = s.partition("=")
            out[k.strip()] = v.strip()
    return out


def unmet_options(fragment: dict[str, str], config_text: str) -> list[str]:
    """Fragment options the resulting .config does not have (typos, unmet dependencies): 'CONFIG_X=y (got n)'."""
    have = parse_fragment(config_text)
    bad = []
    for k, want in fragment.items():
        got = have.get(k, "n")
        if got.strip('"') != want.strip('"'):
            bad.append(f"{k}={want} (got {got})")
    return bad


def merge_config(base_text: str, fragment_text: str) -> str:
    """scripts/kconfig/merge_config.sh's merge: every symbol the fragment names loses its lines in the base
    (``CONFIG_X=...`` and ``# CONFIG_X is not set``), then the fragment's lines are appended."""
    names = set(parse_fragment(fragment_text))
    kept = []
    for line in base_text.splitlines():
        s = line.strip()
        sym = None
        if s.startswith("CONFIG_") and "=" in s:
            sym = s.split("=", 1)[0].strip()
        elif s.startswith("# CONFIG_") and s.endswith(" is not set"):
            sym = s[2:-len(" is not set")]
        if sym not in names:
            kept.append(line)
    frag = [ln for ln in fragment_text.splitlines() if ln.strip()]
    return "\n".join(kept + ["", "# ---- merged by smccc-harness (kernel build --config) ----", *frag]) + "\n"


def check_kernel_config(path: Path) -> str:
    """The text of a .config given with --config PATH; a HarnessError if it is missing or not a kernel config."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        raise HarnessError(f"--config {path}: no such file",
                           hint="pass a kernel .config, or 'defconfig' / 'olddefconfig' (the .config in O=)") from None
    except OSError as e:
        raise HarnessError(f"--config {path}: cannot read it ({e.strerror})") from None
    opts = parse_fragment(text)
    if not opts:
        raise HarnessError(f"--config {path}: not a kernel config (no CONFIG_ lines)",
                           hint="pass a .config written by the kernel's make *config, or 'defconfig'")
    if "CONFIG_ARM64" in text or "CONFIG_X86" not in opts:
        return text
    raise HarnessError(f"--config {path}: a config for another architecture (CONFIG_X86 is set, no CONFIG_ARM64)",
                       hint="pass an arm64 .config (make ARCH=arm64 ...), or 'defconfig'")


def configure(src: Path, out: Path, *, fragment_text: str, fragment_path: Path, config: str | None,
              toolchain: Toolchain, env: dict, log: Path, jobs: int, ccache: bool, progress,
              verbose: bool = False) -> bool:
    """Make O=/.config (see the module's docstring); return whether the configuration step ran.

    Any failure puts back the .config (and stamp) that were there before, so O= is never half-configured."""
    cfg = out / ".config"
    base_text = check_kernel_config(Path(config)) if config and config not in CONFIG_MODES else None
    if config == "olddefconfig" and not cfg.is_file():
        raise HarnessError(f"--config olddefconfig: there is no .config in {out} to start from",
                           hint="pass --config PATH (your .config) or --config defconfig, or --out your build dir")
    mode = config or "allnoconfig"
    inputs = {"mode": mode if base_text is None else "file", "fragment": hashlib.sha256(fragment_text.encode()).hexdigest(),
              "base": hashlib.sha256(base_text.encode()).hexdigest() if base_text is not None else None,
              "toolchain": f"{toolchain.family} {toolchain.version}"}
    stamp = out / STAMP
    try:
        old = json.loads(stamp.read_text()) if stamp.is_file() else {}
    except ValueError:
        old = {}
    old = old if isinstance(old, dict) else {}
    current_sha = hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None
    if cfg.is_file() and old.get("inputs") == inputs and old.get("config") == current_sha:
        return False
    saved = {p: p.read_bytes() for p in (cfg, stamp) if p.is_file()}
    stamp.unlink(missing_ok=True)
    try:
        if mode == "allnoconfig":
            cenv = dict(env, KCONFIG_ALLCONFIG=str(fragment_path.resolve()))
            run_make(make_argv(src, out, "allnoconfig", jobs, ccache, toolchain), cenv, log, "configuration",
                      progress, verbose)
        else:
            if mode == "defconfig":
                run_make(make_argv(src, out, "defconfig", jobs, ccache, toolchain), env, log, "defconfig",
                          progress, verbose)
                base_text = cfg.read_text()
            elif mode == "olddefconfig":
                base_text = cfg.read_text()
            merged = out / MERGED_BASE
            merged.write_text(merge_config(base_text, fragment_text))
            progress(f"merging {fragment_path.name} into the {'given' if mode not in CONFIG_MODES else mode} "
                     f".config (merge_config.sh style): {merged}")
            cenv = dict(env, KCONFIG_ALLCONFIG=str(merged))
            run_make(make_argv(src, out, "alldefconfig", jobs, ccache, toolchain), cenv, log, "configuration",
                      progress, verbose)
        missing = unmet_options(parse_fragment(fragment_text), cfg.read_text())
        if missing:
            raise KernelBuildError(f"{fragment_path}: these options did not stick in {cfg}: " + ", ".join(missing),
                                   hint="a typo, an option whose dependencies are not in the fragment, or one the "
                                        "base config rules out; O= keeps its previous .config")
    except BaseException:
        for p in (cfg, stamp):
            if p in saved:
                p.write_bytes(saved[p])
            else:
                p.unlink(missing_ok=True)
        raise
    stamp.write_text(json.dumps({"inputs": inputs, "config": hashlib.sha256(cfg.read_bytes()).hexdigest()}) + "\n")
    return True
