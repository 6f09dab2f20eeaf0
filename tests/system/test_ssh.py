"""The opt-in SSH channel into a real guest (docs/ssh.md): dropbear from Debian arm64
and the kernel's own virtio_net module in an appended cpio, QEMU user networking with one forward bound to
127.0.0.1, a fresh ed25519 client and host key per run; then pushing changed guest code and re-exec'ing the
agent (the ``reload`` op) without a new initramfs.

Cost: one extra cold boot with SSH (~5 s under TCG; the first run also fetches dropbear, its libraries and
the kernel's modules package, ~20 MB, and builds the cached ssh.cpio in ~3 s).
"""

from __future__ import annotations

import hashlib
import os
import time

import paramiko
import pytest

from harness.errors import HarnessError
from harness.images import initramfs
from harness.machine import ssh
from harness.machine.guests import GuestOptions, new_session
from harness.paths import new_run_dir

pytestmark = pytest.mark.infra  # the harness's own plumbing (harness/plugin/tiers.py)


@pytest.fixture(scope="module")
def ssh_guest(request):
    try:
        session = new_session(GuestOptions.from_pytest(request.config, ssh=True), new_run_dir("ssh")).start()
    except HarnessError as e:
        pytest.fail(f"the guest with SSH did not come up: {e}", pytrace=False)
    try:
        yield session
    finally:
        session.close()


def test_command_exit_status_zero_and_output(ssh_guest):
    rc, out, err = ssh_guest.ssh.run("uname -r", 20)
    assert (rc, out.strip()) == (0, ssh_guest.caps["uname"]), err


def test_command_exit_status_nonzero(ssh_guest):
    assert ssh_guest.ssh.run("false", 20)[0] == 1


def test_command_stderr_is_separate(ssh_guest):
    rc, out, err = ssh_guest.ssh.run("echo out; echo err >&2; exit 7", 20)
    assert (rc, out, err) == (7, "out\n", "err\n")


def test_put_file_reads_back_identical_with_its_mode(ssh_guest):
    data = os.urandom(200_000)
    ssh_guest.ssh.put(data, "/tmp/smccc-ssh-test/blob.bin", 0o640)
    rc, out, err = ssh_guest.ssh.run("sha256sum /tmp/smccc-ssh-test/blob.bin; stat -c %a /tmp/smccc-ssh-test/blob.bin", 30)
    assert rc == 0, err
    digest, mode = out.split()[0], out.split()[-1]
    assert (digest, mode) == (hashlib.sha256(data).hexdigest(), "640")


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp{,6}) in LISTEN state on ``port`` on this host."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                addr, hexport = fields[1].rsplit(":", 1)
                if int(hexport, 16) == port and fields[3] == "0A":
                    out.append(addr)
    return out


def test_port_forward_listens_on_loopback_only(ssh_guest):
    assert _listeners(ssh_guest.config.ssh_port) == ["0100007F"]    # 127.0.0.1, and nothing else


def test_password_login_is_refused(ssh_guest):
    t = paramiko.Transport(("127.0.0.1", ssh_guest.config.ssh_port))
    try:
        t.start_client(timeout=20)
        with pytest.raises(paramiko.BadAuthenticationType) as e:
            t.auth_password("root", "root")
        assert e.value.allowed_types == ["publickey"]
    finally:
        t.close()


def test_reload_runs_pushed_guest_code_without_a_new_initramfs(ssh_guest, tmp_path, record_property):
    files = initramfs.guest_sources()
    target = "opt/smccc/harness/protocol.py"
    marker = f"SSH_RELOAD_MARK = {time.time_ns()}"
    (tmp_path / "protocol.py").write_text(files[target].read_text() + f"\n{marker}\n")
    pid_before = ssh_guest.request("stats", {})["pid"]
    t0 = time.monotonic()
    written = ssh.push_guest_code(ssh_guest, {**files, target: tmp_path / "protocol.py"})
    t1 = time.monotonic()
    ssh_guest.reload_agent()
    t2 = time.monotonic()
    record_property("push_s", round(t1 - t0, 3))
    record_property("reload_s", round(t2 - t1, 3))
    assert written == ["/" + target]
    got = ssh_guest.request("exec", {"argv": ["/usr/bin/python3", "-S", "-c",
                                              "import harness.protocol as p; print(p.SSH_RELOAD_MARK)"]})
    assert got["stdout"].strip() == marker.split(" = ")[1]
    # the re-exec'd agent is the same process under /init (exec, not a new child), serving the same channel
    assert ssh_guest.request("stats", {})["pid"] == pid_before
    ssh.push_guest_code(ssh_guest)      # back to the checked-out code
    ssh_guest.reload_agent()


def test_default_guest_has_no_network_interface(guest, request):
    """Opt-in only: a guest booted without SSH has no NIC and no dropbear (only the loopback device)."""
    if request.config.getoption("--ssh"):
        pytest.skip("--ssh was given: the pool's guests have the SSH NIC on purpose")
    if guest.reuse is not None and guest.config.ssh_port is not None:
        pytest.skip("--reuse-vm attached to a VM started with --ssh: its NIC is there on purpose (docs/reuse-vm.md)")
    got = guest.request("exec", {"argv": ["/bin/ls", "/sys/class/net"]})
    assert got["stdout"].split() == ["lo"]
    assert not os.path.exists(guest.run_dir / "ssh")
