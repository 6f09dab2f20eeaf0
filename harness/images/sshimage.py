"""The guest side of the opt-in SSH channel: what ``--ssh`` adds to the initramfs.

Only a session that asks for SSH (``GuestOptions(ssh=True)``, pytest ``--ssh``, ``smccc-harness
boot --ssh``) uses any of this; the default initramfs, its /init and its snapshot key are untouched.

Transport (as harness/images/l2.py does it): the kernel unpacks *concatenated* newc archives into one rootfs, so the
SSH guest's initrd is ``base initramfs + ssh.cpio + keys.cpio``:

* ``ssh.cpio`` (cached by kernel release + package set): dropbear and its libraries from Debian arm64
  (images/manifest.toml ``[ssh]``: dropbear-bin, libcrypt1, libtomcrypt1, libtommath1, libgmp10; libc6
  and zlib1g are in the base rootfs), ``virtio_net`` and its module dependencies (``net_failover``,
  ``failover``) from the kernel's own modules (``linux-modules-<release>`` for the split 7.x packages, the
  image package itself for 6.12), decompressed on the host (Debian ships ``.ko.xz``, busybox insmod wants
  plain ELF), busybox applet links (ip, insmod), /etc/passwd and two scripts: :data:`SSH_INIT` (the
  ``rdinit=`` of an SSH boot: starts :data:`SSH_SETUP` in the background, then ``exec /init``) and
  :data:`SSH_SETUP`.
* ``keys.cpio`` (per run, in the run directory): the fresh client key's ``authorized_keys`` and the fresh
  host key (OpenSSH format; converted with ``dropbearconvert`` in the guest), so the host pins the exact
  host key it generated.

The guest network is QEMU user networking: eth0 10.0.2.15/24, gateway 10.0.2.2; the host reaches the guest's
port 22 only through the ``hostfwd`` bound to 127.0.0.1 (harness/machine/config.py ``MachineConfig.ssh_port``).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import SetupError
from ..paths import cache_dir, prune_newest
from . import cpio

BUILDER_VERSION = "smccc-ssh v1"
SSH_RDINIT = "/bin/smccc-ssh-init"
SSH_CMDLINE = f"rdinit={SSH_RDINIT} smccc.ssh"   # the later rdinit= wins (init/main.c rdinit_setup)
GUEST_ADDR, GUEST_GW = "10.0.2.15/24", "10.0.2.2"
MODULE_DIR = "usr/lib/smccc-ssh"
NET_MODULE = "virtio_net"
MULTIARCH = "usr/lib/aarch64-linux-gnu"
HOST_KEY_OPENSSH = "etc/smccc-ssh/host_key"        # host-generated (keys.cpio); converted at boot
HOST_KEY_DROPBEAR = "etc/dropbear/host_key"
READY_LINE = "smccc-ssh: dropbear listening"
FAILED_LINE = "smccc-ssh: FAILED"

SSH_INIT = """#!/bin/busybox sh
# rdinit of an --ssh boot (harness/images/sshimage.py): network + dropbear in the background, then the usual /init.
/bin/busybox sh /etc/smccc-ssh.sh &
exec /init
"""

SSH_SETUP = f"""#!/bin/busybox sh
# Started by {SSH_RDINIT} before /init: wait for /init's mounts, load virtio_net, configure eth0 for QEMU
# user networking, start dropbear (public-key logins only) on port 22.
PATH=/bin:/usr/bin:/usr/sbin
say() {{ echo "smccc-ssh: $*"; }}
i=0
until [ -r /proc/mounts ] && /bin/busybox grep -q ' /tmp tmpfs' /proc/mounts && [ -c /dev/urandom ]; do
  i=$((i + 1)); [ $i -gt 1200 ] && {{ say "FAILED: /init did not mount /proc, /dev and /tmp within 60 s"; exit 1; }}
  /bin/busybox sleep 0.05
done
for m in $(cat /{MODULE_DIR}/load-order); do
  /bin/busybox insmod /{MODULE_DIR}/$m.ko || {{ say "FAILED: insmod $m"; exit 1; }}
done
i=0
until [ -e /sys/class/net/eth0 ]; do
  i=$((i + 1))
  if [ $i -gt 200 ]; then
    [ -s /{MODULE_DIR}/load-order ] && {{ say "FAILED: no eth0 10 s after loading {NET_MODULE}"; exit 1; }}
    say "FAILED: no eth0: this kernel has no {NET_MODULE} built in (CONFIG_VIRTIO_NET=y, CONFIG_INET=y:" \
        "smccc-harness kernel build --ssh) and no Debian modules package"; exit 1
  fi
  /bin/busybox sleep 0.05
done
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_ADDR} dev eth0
ip route add default via {GUEST_GW}
mkdir -p /dev/pts /etc/dropbear
mount -t devpts devpts /dev/pts 2>/dev/null
dropbearconvert openssh dropbear /{HOST_KEY_OPENSSH} /{HOST_KEY_DROPBEAR} >/dev/null 2>&1 ||
  {{ say "FAILED: dropbearconvert of the host key"; exit 1; }}
dropbear -s -p 22 -r /{HOST_KEY_DROPBEAR} -P /etc/dropbear/dropbear.pid || {{ say "FAILED: dropbear"; exit 1; }}
read -r up _ < /proc/uptime
say "dropbear listening on 22 (eth0 {GUEST_ADDR}) at uptime $up s"
"""

PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
GROUP = "root:x:0:\n"
APPLETS = ("ip", "insmod", "lsmod", "id", "base64", "md5sum", "sha256sum", "netstat")


@dataclass(frozen=True)
class SshGroup:
    suite: str
    packages: list[str]


def load_group(manifest: Path | None = None) -> SshGroup:
    from .lock import MANIFEST
    d = tomllib.loads((manifest or MANIFEST).read_text())
    g = d.get("ssh")
    if not g:
        raise SetupError("images/manifest.toml has no [ssh] package group", hint="restore it from git")
    return SshGroup(suite=g.get("suite", d["rootfs"]["suite"]), packages=list(g["packages"]))


# ---- the kernel's modules ----------------------------------------------------------------------------
def kernel_release(image: Path) -> str | None:
    """The uname -r of a Debian kernel extracted by harness.images.assets (``usr/lib/modules/<release>/vmlinuz`` or
    ``boot/vmlinuz-<release>``), else None."""
    image = Path(image)
    if image.name == "vmlinuz" and image.parent.parent.name == "modules":
        return image.parent.name
    if image.name.startswith("vmlinuz-"):
        return image.name[len("vmlinuz-"):]
    return None


def load_order(dep: dict[str, list[str]], module: str) -> list[str]:
    """``module`` and its dependencies, each after everything it needs (what ``modprobe`` would insmod)."""
    order: list[str] = []

    def visit(m: str, stack: tuple[str, ...]) -> None:
        if m in order:
            return
        if m in stack:
            raise SetupError(f"module dependency cycle: {' -> '.join(stack + (m,))}")
        if m not in dep:
            raise SetupError(f"module {m} is not in modules.dep")
        for d in dep[m]:
            visit(d, stack + (m,))
        order.append(m)
    visit(module, ())
    return order


def _modules_root(release: str, progress=print) -> Path:
    """The extracted ``usr/lib/modules/<release>`` that holds ``kernel/`` (the image package on 6.12, the
    ``linux-modules-<release>`` package on the split 7.x layout, fetched at the kernel's version)."""
    from .store import Store
    store = Store(progress)
    lock = store.read_lock()
    kpkg = next((e for n, e in lock.packages.items()
                 if n in (f"linux-binary-{release}", f"linux-image-{release}")), None)
    if kpkg is None:
        raise SetupError(f"--ssh needs the {NET_MODULE} module of kernel {release}, which is not a Debian kernel "
                         "known to images/lock.json",
                         hint="use a Debian kernel (--kernel default/7.2/6.12), or build virtio_net in (=y)")
    d = store.extract(store.fetch_exact(kpkg.name, kpkg.version, kpkg.suite)) / "usr/lib/modules" / release
    if (d / "kernel").is_dir():
        return d
    mods = store.fetch_exact(f"linux-modules-{release}", kpkg.version, kpkg.suite)
    d = store.extract(mods) / "usr/lib/modules" / release
    if not (d / "kernel").is_dir():
        raise SetupError(f"linux-modules-{release} {kpkg.version} has no kernel/ under {d}")
    return d


def module_name(path: str) -> str:
    return re.sub(r"\.ko(\.\w+)?$", "", path.rsplit("/", 1)[-1]).replace("-", "_")


def modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` of a module's .modinfo (what depmod writes into modules.dep; the .deb has none)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d] if m else []


def module_closure(root: Path, module: str) -> tuple[list[str], dict[str, bytes]]:
    """``module`` and its dependencies in load order, and their decompressed bytes."""
    files = {module_name(p.name): p for p in (root / "kernel").rglob("*.ko*")}
    blobs: dict[str, bytes] = {}
    dep: dict[str, list[str]] = {}
    todo = [module]
    while todo:
        m = todo.pop()
        if m in blobs:
            continue
        if m not in files:
            raise SetupError(f"module {m} is not under {root}/kernel")
        blobs[m] = _decompress(files[m])
        dep[m] = modinfo_depends(blobs[m])
        todo += dep[m]
    return load_order(dep, module), blobs


def _decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        raise SetupError(f"{path}: zstd-compressed modules are not supported (only .ko and .ko.xz)")
    if path.name.endswith(".ko.gz"):
        import gzip
        return gzip.decompress(data)
    return data


def has_builtin_virtio_net(image: Path) -> bool:
    """Does this arm64 Image (or Image.gz) have the virtio_net driver built in?  Its driver name and its
    module parameter prefix ("virtio_net.napi_tx") are strings in the image; a modular kernel has neither."""
    import gzip
    data = Path(image).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return b"virtio_net.napi_tx" in data or b"virtio_net\0" in data


# ---- the archives -----------------------------------------------------------------------------------
def _key(*parts: bytes) -> str:
    h = hashlib.sha256(BUILDER_VERSION.encode() + b"\n")
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:24]


def build_ssh_cpio(release: str | None, progress=print) -> Path:
    """The cached ``ssh.cpio`` for the Debian kernel ``release`` (see the module docstring); ``None``: a kernel
    with virtio-net built in (``smccc-harness kernel build --ssh``), no modules."""
    group = load_group()
    rel = (release or "built-in virtio_net").encode()
    out = cache_dir() / "ssh" / f"ssh-{_key(rel, repr(group).encode(), Path(__file__).read_bytes())}.cpio"
    if out.exists():
        return out
    from .store import Store
    store = Store(progress)
    entries: list[cpio.Entry] = []
    for name in group.packages:
        root = store.extract(store.fetch(name, group.suite))
        for sub in ("usr/sbin", "usr/bin", MULTIARCH):
            d = root / sub
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                rel = f"{sub}/{p.name}"
                if p.is_symlink():
                    entries.append(cpio.symlink(rel, os.readlink(p)))
                elif p.is_file():
                    entries.append(cpio.file(rel, source=p, mode=0o755 if os.access(p, os.X_OK) else 0o644))
    if not any(e.path == "usr/sbin/dropbear" for e in entries):
        raise SetupError("dropbear-bin has no usr/sbin/dropbear", hint="the Debian package layout changed")
    order, blobs = module_closure(_modules_root(release, progress), NET_MODULE) if release else ([], {})
    for m in order:
        entries.append(cpio.file(f"{MODULE_DIR}/{m}.ko", blobs[m]))
    entries.append(cpio.file(f"{MODULE_DIR}/load-order", (" ".join(order) + "\n").encode()))
    entries += [cpio.symlink(f"bin/{a}", "busybox") for a in APPLETS]
    entries += [cpio.file("etc/passwd", PASSWD.encode()), cpio.file("etc/group", GROUP.encode()),
                cpio.file("etc/smccc-ssh.sh", SSH_SETUP.encode(), 0o755),
                cpio.file(SSH_RDINIT, SSH_INIT.encode(), 0o755),
                cpio.chardev("dev/null", 1, 3, 0o666)]   # ash's '&' opens it before /init mounts devtmpfs
    out.parent.mkdir(parents=True, exist_ok=True)
    cpio.build(out, entries)
    progress(f"ssh: built {out.name} (dropbear + {', '.join(order) or 'no modules'} for "
             f"{release or 'a kernel with virtio_net built in'})")
    return out


def keys_cpio_entries(authorized_keys: str, host_key_openssh: bytes) -> list[cpio.Entry]:
    return [cpio.directory("root", 0o700), cpio.directory("root/.ssh", 0o700),
            cpio.file("root/.ssh/authorized_keys", authorized_keys.encode(), 0o600),
            cpio.directory("etc/smccc-ssh", 0o700), cpio.file(HOST_KEY_OPENSSH, host_key_openssh, 0o600)]


def build_ssh_initrd(base: Path, kernel_image: Path, out: Path, authorized_keys: str, host_key_openssh: bytes,
                     progress=print) -> Path:
    """``out`` = ``base`` + the cached ssh.cpio for the kernel + this run's keys (written atomically)."""
    release = kernel_release(kernel_image)
    if release is None and not has_builtin_virtio_net(kernel_image):
        raise SetupError(f"--ssh: {kernel_image} is not a Debian kernel from the cache (whose virtio_net module the "
                         "harness fetches) and has no virtio_net built in",
                         hint="build it with 'smccc-harness kernel build --ssh' (images/kernel-ssh.config: "
                              "CONFIG_VIRTIO_NET=y, CONFIG_INET=y), or use a Debian kernel (--kernel default/7.2/6.12)")
    ssh = build_ssh_cpio(release, progress)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(Path(base).read_bytes())
            f.write(ssh.read_bytes())
            cpio.write(f, keys_cpio_entries(authorized_keys, host_key_openssh))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    _prune_run_initrds(out)
    return out


def _prune_run_initrds(keep: Path, max_keep: int = 3) -> None:
    """Each SSH run writes a ~25 MB initrd into its run dir: keep only the newest ``max_keep`` of them
    (older runs keep their logs; their qemu-cmd.sh then names an initrd that is gone)."""
    prune_newest(keep.parent.parent, f"*/{keep.name}", keep, max_keep)
