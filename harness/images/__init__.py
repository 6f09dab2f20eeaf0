"""Cached inputs of a guest: Debian packages (fetch, lock, store), kernels, the initramfs and its cpio, payload
builds, the SSH and Linux-guest images, host packages.  Never starts a guest (nothing from harness.machine)."""
