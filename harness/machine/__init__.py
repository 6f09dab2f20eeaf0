"""One guest and its links: QEMU config/argv and process, the detached (reusable) machine, the session, the
serial console, the control channel, snapshots, reuse, SSH, accelerator probing, run directories and leftovers."""
