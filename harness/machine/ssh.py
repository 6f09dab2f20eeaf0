"""The host end of the opt-in SSH channel into the guest (guest side: harness/images/sshimage.py).

* :class:`SshKeys`: a fresh ed25519 client key and a fresh ed25519 host key per run (``cryptography``),
  the client's ``authorized_keys`` line and the host key in OpenSSH format for the guest.
* :func:`free_port`: a free TCP port on 127.0.0.1 for QEMU's ``hostfwd`` (harness/machine/config.py
  ``MachineConfig.ssh_port``; the forward is bound to 127.0.0.1 only).
* :class:`SshChannel`: a paramiko client that only accepts the host key it generated (no AutoAddPolicy),
  offers only the client key (no agent, no key files, no password): ``run(cmd, timeout) -> (rc, out, err)``
  and ``put(local_or_bytes, remote, mode)`` (``cat > remote`` over exec: dropbear ships no sftp-server).
"""

from __future__ import annotations

import io
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import GuestError

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (QEMU may still lose a race for it: the caller retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ed25519_openssh() -> tuple[bytes, str]:
    """A new ed25519 key: (private key in OpenSSH PEM, public key line ``ssh-ed25519 AAAA...``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    k = Ed25519PrivateKey.generate()
    priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                           serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return priv, pub


@dataclass(frozen=True)
class SshKeys:
    client_private: bytes      # OpenSSH PEM, stays on the host (written 0600 into the run dir for humans)
    client_public: str         # "ssh-ed25519 AAAA..."
    host_private: bytes        # OpenSSH PEM, goes into the guest's keys.cpio
    host_public: str

    @classmethod
    def generate(cls) -> SshKeys:
        cp, cpub = _ed25519_openssh()
        hp, hpub = _ed25519_openssh()
        return cls(cp, cpub, hp, hpub)

    def authorized_keys(self) -> str:
        return f"{self.client_public} smccc-harness\n"

    def paramiko_client_key(self):
        import paramiko
        return paramiko.Ed25519Key.from_private_key(io.StringIO(self.client_private.decode()))

    def paramiko_host_key(self):
        import paramiko
        kind, b64 = self.host_public.split()[:2]
        return paramiko.PKey.from_type_string(kind, __import__("base64").b64decode(b64))

    def save(self, run_dir: Path) -> Path:
        """The client key as ``<run_dir>/ssh/id_ed25519`` (0600) + known_hosts, for ``ssh -i`` by hand."""
        d = Path(run_dir) / "ssh"
        d.mkdir(mode=0o700, exist_ok=True)
        p = d / "id_ed25519"
        p.touch(mode=0o600)
        p.write_bytes(self.client_private)
        (d / "id_ed25519.pub").write_text(self.client_public + "\n")
        return p


class SshChannel:
    """A connected SSH client to the guest's dropbear through the 127.0.0.1 port forward."""

    def __init__(self, port: int, keys: SshKeys, host: str = LOOPBACK, user: str = "root") -> None:
        self.port, self.keys, self.host, self.user = port, keys, host, user
        self.client = None

    def known_host_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def connect(self, deadline_s: float = 60.0, alive=lambda: True) -> SshChannel:
        """Connect, retrying until the guest's dropbear answers or ``deadline_s`` passes (or ``alive()`` is
        False: QEMU died).  Only the generated host key is accepted; only the client key is offered."""
        import paramiko
        stop = time.monotonic() + deadline_s
        last: Exception | None = None
        while True:
            c = paramiko.SSHClient()
            c.get_host_keys().add(self.known_host_name(), self.keys.host_public.split()[0],
                                  self.keys.paramiko_host_key())
            c.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                c.connect(self.host, self.port, username=self.user, pkey=self.keys.paramiko_client_key(),
                          allow_agent=False, look_for_keys=False, timeout=5.0, banner_timeout=10.0,
                          auth_timeout=10.0)
                self.client = c
                return self
            except (paramiko.SSHException, OSError, EOFError) as e:
                c.close()
                last = e
                if isinstance(e, paramiko.BadHostKeyException):
                    raise GuestError(f"the guest's SSH host key is not the one the harness generated: {e}") from e
                if time.monotonic() > stop or not alive():
                    raise GuestError(f"no SSH connection to {self.host}:{self.port} within {deadline_s:g} s: "
                                     f"{type(last).__name__}: {last}") from e
                time.sleep(0.25)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> SshChannel:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, cmd: str, timeout: float = 30.0, stdin: bytes | None = None) -> tuple[int, str, str]:
        """Run ``cmd`` with the guest's /bin/sh; (exit status, stdout, stderr).  Raises GuestError after
        ``timeout`` seconds (the command may still be running in the guest)."""
        if self.client is None:
            raise GuestError("the SSH channel is not connected")
        chan = self.client.get_transport().open_session(timeout=timeout)
        try:
            chan.settimeout(timeout)
            chan.exec_command(cmd)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            stop = time.monotonic() + timeout
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                elif time.monotonic() > stop:
                    raise GuestError(f"SSH command {cmd!r} did not finish within {timeout:g} s; output so far: "
                                     f"{bytes(out[-500:])!r} {bytes(err[-500:])!r}")
                else:
                    time.sleep(0.005)
            while chan.recv_ready():
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            return chan.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace")
        finally:
            chan.close()

    def put(self, src: Path | bytes, remote: str, mode: int = 0o644, timeout: float = 30.0) -> None:
        """Write ``src`` (a file or bytes) to ``remote`` in the guest (parent directories created)."""
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        q = shlex.quote(remote)
        rc, _, err = self.run(f"mkdir -p \"$(dirname {q})\" && cat > {q}.smccc-tmp && chmod {mode:o} {q}.smccc-tmp "
                              f"&& mv {q}.smccc-tmp {q}", timeout, stdin=data)
        if rc != 0:
            raise GuestError(f"writing {remote} in the guest failed (exit {rc}): {err.strip()}")


def push_guest_code(session, files: dict[str, Path] | None = None, timeout: float = 30.0) -> list[str]:
    """Copy the host's current guest code (harness/initramfs.guest_sources: harness/protocol.py,
    harness/guest/*.py) into the running guest over SSH; only files whose sha256 differs are sent, and their
    stale ``__pycache__`` entries (unchecked-hash .pyc, which Python would otherwise keep using) are removed.
    Returns the guest paths written.  The running agent still has the old code: see :meth:`GuestSession.reload_agent`."""
    import hashlib

    from ..images.initramfs import guest_sources
    ch: SshChannel = session.ssh
    if ch is None:
        raise GuestError("this guest was not booted with SSH", hint="GuestOptions(ssh=True) (harness/machine/guests.py) / --ssh")
    files = files if files is not None else guest_sources()
    paths = " ".join(shlex.quote("/" + g) for g in sorted(files))
    _rc, out, _err = ch.run(f"sha256sum {paths} 2>/dev/null; true", timeout)
    have = {}
    for line in out.splitlines():
        digest, _, path = line.partition("  ")
        have[path.strip()] = digest
    written = []
    for gpath, host in sorted(files.items()):
        data = Path(host).read_bytes()
        if have.get("/" + gpath) == hashlib.sha256(data).hexdigest():
            continue
        ch.put(data, "/" + gpath, 0o644, timeout)
        d, name = ("/" + gpath).rsplit("/", 1)
        stem = name.removesuffix(".py")
        ch.run(f"rm -f {shlex.quote(d)}/__pycache__/{shlex.quote(stem)}.*.pyc", timeout)
        written.append("/" + gpath)
    return written
