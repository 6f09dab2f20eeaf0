"""The pure layer: scenarios and results, the filter model, PSCI programs, known-bad tables. No I/O, no processes;
imports only harness.protocol, harness.errors and each other."""
