"""The kernel developer's tools: kernel build, bisect steps, the kernel matrix and its report, upstream's KVM
selftests and their TAP.  Uses machine/images/model; never the CLI or the pytest plugin."""
