"""Host end of the control channel: JSON lines over the unix socket QEMU exposes for the virtio-serial port.

Every call has a deadline; a dead guest or a dropped channel raises :class:`ChannelError` naming the cause,
never hangs.
"""

from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path

from .. import protocol as P
from ..errors import HarnessError

# Request ids are unique per host process, not per connection: after a reconnect, a late answer to a request
# sent over the dropped connection is skipped instead of being taken for the answer to a new request.
_REQUEST_IDS = itertools.count(1)


class ChannelError(HarnessError):
    """The control channel failed: timeout, EOF, a malformed message, or an error the agent reported."""

    def __init__(self, message: str, *, kind: str = "channel", remote_traceback: str | None = None, hint=None):
        super().__init__(message, hint=hint)
        self.kind = kind
        self.remote_traceback = remote_traceback


class Channel:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.sock: socket.socket | None = None
        self.buf = b""
        self.next_id = 1
        self.hello: dict | None = None
        self.log: list[tuple[float, str, dict]] = []

    def connect(self, deadline_s: float = 10.0) -> None:
        end = time.monotonic() + deadline_s
        last: Exception | None = None
        while time.monotonic() < end:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self.sock = s
                return
            except OSError as e:
                last = e
                s.close()
                time.sleep(0.02)
        raise ChannelError(f"cannot connect to the control socket {self.path} within {deadline_s:.0f} s: {last}")

    def read_message(self, deadline: float) -> dict:
        assert self.sock is not None
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelError("no answer from the guest agent before the deadline", kind="timeout")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as e:
                raise ChannelError(f"control channel broke: {e}", kind="eof") from e
            if not chunk:
                raise ChannelError("control channel closed by QEMU (the VM is gone)", kind="eof")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = P.decode(line)
        self.log.append((time.time(), "recv", msg))
        return msg

    def wait_hello(self, deadline_s: float) -> dict:
        msg = self.read_message(time.monotonic() + deadline_s)
        if msg.get("type") != "hello":
            raise ChannelError(f"expected the agent's hello, got {msg!r}")
        self.hello = msg
        return msg

    def request(self, op: str, args: dict | None = None, deadline_s: float = 30.0) -> dict:
        return self.response(self.send(op, args), op, deadline_s)

    def send(self, op: str, args: dict | None = None) -> int:
        """Send a request without waiting for its answer (:meth:`response`); returns its id."""
        if self.sock is None:
            raise ChannelError("control channel is not connected")
        rid = next(_REQUEST_IDS)
        self.next_id = rid + 1
        msg = {"type": "request", "id": rid, "op": op, "args": args or {}}
        self.log.append((time.time(), "send", {"id": rid, "op": op}))
        try:
            self.sock.sendall(P.encode(msg))
        except OSError as e:
            raise ChannelError(f"cannot send to the guest agent: {e}", kind="eof") from e
        return rid

    def response(self, rid: int, op: str, deadline_s: float = 30.0) -> dict:
        """The answer to request ``rid`` (sent by :meth:`send`), within ``deadline_s`` from now."""
        deadline = time.monotonic() + deadline_s
        while True:
            resp = self.read_message(deadline)
            if resp.get("type") == "response" and resp.get("id") == rid:
                break
        if not resp.get("ok"):
            err = resp.get("error") or {}
            raise ChannelError(f"guest agent failed {op!r}: {err.get('kind')}: {err.get('message')}",
                               kind="remote", remote_traceback=err.get("traceback"))
        return resp["result"]

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
