"""Exceptions the harness raises for problems the user can fix (each carries a ``hint``)."""

from __future__ import annotations


class HarnessError(Exception):
    """Base class: ``str(err)`` says what went wrong, ``err.hint`` how to fix it (may be empty)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class SetupError(HarnessError):
    """The host lacks something (a package, a tool, a too-old QEMU)."""


class AssetError(HarnessError):
    """A Debian package, kernel, or initramfs could not be fetched, verified, or built."""


class PayloadError(HarnessError):
    """A bare-metal payload failed to build, or does not fit the payload VM memory map."""


class BootError(HarnessError):
    """QEMU or the guest did not come up: QEMU exited, the kernel panicked, or no agent banner in time."""


class GuestError(HarnessError):
    """The guest agent reported an error, or the guest died while running a scenario."""
