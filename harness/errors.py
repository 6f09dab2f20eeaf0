"""The harness's exception hierarchy.

Every error the harness raises on purpose is a :class:`HarnessError`; ``hint`` says what the user can do
about it (shown by the CLI and the pytest plugin below the message).
"""

from __future__ import annotations


class HarnessError(Exception):
    """Base class. ``hint``: an optional one-line suggestion for the user."""

    def __init__(self, message: str = "", *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class SetupError(HarnessError):
    """The host is missing something (a tool, a permission, /dev/kvm, ...)."""


class AssetError(HarnessError):
    """An input artifact (kernel, package, initramfs) is missing, corrupt or cannot be fetched."""


class PayloadError(HarnessError):
    """A bare-metal payload failed to build or does not satisfy the memory map."""


class BootError(HarnessError):
    """QEMU or the guest kernel did not come up (QEMU exited, panic, timeout before the agent's banner)."""


class GuestError(HarnessError):
    """The guest agent reported an error, or the guest died while running a scenario."""
