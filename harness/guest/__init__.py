"""Code that runs inside the arm64 guest: a small VMM over /dev/kvm. Standard library only (Python 3.13)."""
