"""The opt-in SSH channel's host side (harness/machine/ssh.py, harness/images/sshimage.py, MachineConfig.ssh_port):
argv rendering (the forward is bound to 127.0.0.1 only), key generation, host-key pinning against a real
paramiko server, module dependency order, and the guest archive's key files."""

from __future__ import annotations

import os
import shlex
import socket
import stat
import threading
import time
from pathlib import Path

import paramiko
import pytest

from harness.errors import GuestError, SetupError
from harness.images import sshimage
from harness.machine import ssh
from harness.machine.config import MachineConfig


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(os.urandom(4096))
    return k


def test_default_machine_has_no_nic(kernel):
    argv = MachineConfig(kernel=kernel).argv()
    assert argv[argv.index("-nic") + 1] == "none"
    assert not any("hostfwd" in a or "netdev" in a for a in argv)


def test_ssh_port_renders_a_forward_bound_to_loopback_only(kernel):
    argv = MachineConfig(kernel=kernel, ssh_port=40022).argv()
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22"
    assert argv[argv.index("-device", argv.index("-netdev")) + 1] == "virtio-net-pci,netdev=net0,romfile="
    assert "-nic" not in argv
    assert shlex.split(MachineConfig(kernel=kernel, ssh_port=40022).shell_command()) == argv


@pytest.mark.parametrize("port", [0, 65536, "22", True, -1])
def test_ssh_port_out_of_range_is_refused(kernel, port):
    with pytest.raises(SetupError, match="ssh_port"):
        MachineConfig(kernel=kernel, ssh_port=port)


def test_free_port_is_bindable_on_loopback():
    port = ssh.free_port()
    with socket.socket() as s:
        s.bind((ssh.LOOPBACK, port))


def test_keys_are_fresh_per_generation():
    a, b = ssh.SshKeys.generate(), ssh.SshKeys.generate()
    assert a.client_public != b.client_public and a.host_public != b.host_public
    assert a.client_public != a.host_public


def test_authorized_keys_line_matches_the_client_key_paramiko_uses():
    k = ssh.SshKeys.generate()
    line = k.authorized_keys()
    assert line.startswith("ssh-ed25519 ") and line.endswith("\n")
    assert line.split()[1] == k.paramiko_client_key().get_base64()


def test_saved_client_key_is_private(tmp_path):
    p = ssh.SshKeys.generate().save(tmp_path)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700


def test_guest_key_files_have_strict_modes():
    k = ssh.SshKeys.generate()
    modes = {e.path: stat.S_IMODE(e.mode) for e in sshimage.keys_cpio_entries(k.authorized_keys(), k.host_private)}
    assert modes["root/.ssh"] == 0o700
    assert modes["root/.ssh/authorized_keys"] == 0o600
    assert modes[sshimage.HOST_KEY_OPENSSH] == 0o600


def test_dropbear_is_started_without_password_logins():
    line = next(ln for ln in sshimage.SSH_SETUP.splitlines() if ln.startswith("dropbear "))
    assert " -s " in line


def test_kernel_release_from_the_extracted_debian_layout():
    assert sshimage.kernel_release(Path("/c/x/usr/lib/modules/7.3.4+deb13-cloud-arm64/vmlinuz")) == \
        "7.3.4+deb13-cloud-arm64"
    assert sshimage.kernel_release(Path("/c/x/boot/vmlinuz-6.12.117+deb13-cloud-arm64")) == "6.12.117+deb13-cloud-arm64"
    assert sshimage.kernel_release(Path("/src/linux/arch/arm64/boot/Image")) is None


def test_modinfo_depends_is_read_from_the_module():
    ko = b"\x7fELF...\0license=GPL\0depends=net_failover,some-mod\0intree=Y\0"
    assert sshimage.modinfo_depends(ko) == ["net_failover", "some_mod"]
    assert sshimage.modinfo_depends(b"\0depends=\0") == []


def test_load_order_puts_dependencies_first():
    dep = {"virtio_net": ["net_failover"], "net_failover": ["failover"], "failover": []}
    assert sshimage.load_order(dep, "virtio_net") == ["failover", "net_failover", "virtio_net"]


def test_load_order_cycle_is_an_error():
    with pytest.raises(SetupError, match="cycle"):
        sshimage.load_order({"a": ["b"], "b": ["a"]}, "a")


def test_builtin_virtio_net_is_recognised_in_a_plain_or_gzipped_image(tmp_path):
    import gzip
    modular, builtin = tmp_path / "modular", tmp_path / "Image"
    modular.write_bytes(b"ARM\x64" + os.urandom(4096) + b"net_failover is a module\0")
    builtin.write_bytes(b"ARM\x64" + os.urandom(4096) + b"virtio_net\0" + os.urandom(64))
    (tmp_path / "Image.gz").write_bytes(gzip.compress(builtin.read_bytes()))
    assert not sshimage.has_builtin_virtio_net(modular)
    assert sshimage.has_builtin_virtio_net(builtin) and sshimage.has_builtin_virtio_net(tmp_path / "Image.gz")


def test_a_self_built_kernel_without_virtio_net_is_refused_naming_the_ssh_build(tmp_path):
    k = tmp_path / "Image"
    k.write_bytes(b"ARM\x64" + os.urandom(4096))
    with pytest.raises(SetupError, match="no virtio_net built in") as ei:
        sshimage.build_ssh_initrd(tmp_path / "base.cpio", k, tmp_path / "out.cpio", "", b"")
    assert "smccc-harness kernel build --ssh" in ei.value.hint


def test_the_guest_script_names_the_missing_builtin_driver():
    assert "CONFIG_VIRTIO_NET=y" in sshimage.SSH_SETUP and "kernel build --ssh" in sshimage.SSH_SETUP


# ---- host-key pinning and auth against a real paramiko server on 127.0.0.1 --------------------------
class _Server(paramiko.ServerInterface):
    def __init__(self, allowed: paramiko.PKey):
        self.allowed = allowed
        self.password_tried = False

    def get_allowed_auths(self, username):
        return "publickey,password"

    def check_auth_password(self, username, password):
        self.password_tried = True
        return paramiko.AUTH_FAILED

    def check_auth_publickey(self, username, key):
        return paramiko.AUTH_SUCCESSFUL if key.get_base64() == self.allowed.get_base64() else paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        def answer():
            time.sleep(0.1)     # after the exec request's success reply
            channel.sendall(b"ran " + command)
            channel.send_exit_status(3)
            channel.close()
        threading.Thread(target=answer, daemon=True).start()
        return True


def _serve(host_key: paramiko.PKey, server: _Server) -> tuple[int, socket.socket]:
    lsock = socket.socket()
    lsock.bind((ssh.LOOPBACK, 0))
    lsock.listen(1)
    lsock.settimeout(10)

    def run():
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        t = paramiko.Transport(conn)
        t.add_server_key(host_key)
        try:
            t.start_server(server=server)
        except (paramiko.SSHException, EOFError):
            return
    threading.Thread(target=run, daemon=True).start()
    return lsock.getsockname()[1], lsock


def _host_key(keys: ssh.SshKeys) -> paramiko.PKey:
    import io
    return paramiko.Ed25519Key.from_private_key(io.StringIO(keys.host_private.decode()))


def test_channel_runs_a_command_with_its_exit_status_against_the_pinned_host_key():
    keys = ssh.SshKeys.generate()
    srv = _Server(keys.paramiko_client_key())
    port, lsock = _serve(_host_key(keys), srv)
    with lsock, ssh.SshChannel(port, keys).connect(10) as ch:
        assert ch.run("true", 10)[:2] == (3, "ran true")
    assert not srv.password_tried


def test_channel_refuses_a_host_key_it_did_not_generate():
    keys, other = ssh.SshKeys.generate(), ssh.SshKeys.generate()
    port, lsock = _serve(_host_key(other), _Server(keys.paramiko_client_key()))
    with lsock, pytest.raises(GuestError, match="host key"):
        ssh.SshChannel(port, keys).connect(10)
