"""The command line without QEMU: the argv `smccc-harness run` hands to pytest, option parsing."""

import os

from harness import cli


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_run_keeps_the_cache_provider_so_lf_works_afterwards():
    argv = cli.run_argv(parse("run", "--no-setup", "-k", "psci"))
    assert not any("cacheprovider" in a for a in argv), argv
    assert argv[0] == "tests/system" and argv[argv.index("-k") + 1] == "psci"
    assert argv[argv.index("-m") + 1] == cli.RUN_MARKERS


def test_run_in_a_read_only_checkout_keeps_its_pytest_cache_in_the_harness_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    argv = cli.run_argv(parse("run", "--no-setup"))
    assert not any("cacheprovider" in a for a in argv), argv
    assert argv[argv.index("-o") + 1] == f"cache_dir={tmp_path / 'pytest-cache'}"


def test_results_dir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli._results_root(parse("boot", "--results-dir", "out")) == tmp_path / "out"
    assert cli._results_root(parse("boot")) is None
    assert os.path.isabs(cli._results_root(parse("run-payload", "x.elf", "--results-dir", "r")))
