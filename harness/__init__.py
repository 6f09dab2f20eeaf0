"""smccc-harness: end-to-end tests of arm64 KVM's forwarding of SMCCC calls to userspace.

This package is imported on the host and, for ``harness.protocol`` and ``harness.guest``, inside the
arm64 guest (Python 3.13, standard library only): keep this file free of imports.
"""
__version__ = "0.1.0"
