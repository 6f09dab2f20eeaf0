"""harness/plugin/tiers.py: what a bare ``pytest`` leaves out, and how naming a file or ``-m`` brings it back.

Runs pytest (in-process, pytester) on a throw-away project whose tests carry the tier markers."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INI = """[pytest]
addopts = -p harness.plugin.tiers --strict-markers
markers =
    infra: plumbing
    upstream: kselftests
    slow: slow
"""
TESTS = {
    "test_kvm.py": "def test_psci(): pass\ndef test_filter(): pass\n",
    "test_plumbing.py": "import pytest\npytestmark = pytest.mark.infra\ndef test_bad_input(): pass\n"
                        "def test_fault(): pass\n",
    "test_mixed.py": "import pytest\n@pytest.mark.upstream\ndef test_kselftest(): pass\n"
                     "@pytest.mark.slow\ndef test_bisect(): pass\ndef test_plain(): pass\n",
}


@pytest.fixture
def project(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")   # only harness.plugin.tiers: no xdist/benchmark/hypothesis
    pytester.makeini(INI)
    pytester.makepyfile(**{name[:-3]: text for name, text in TESTS.items()})
    return pytester


def collect(project, *args: str) -> tuple[set[str], str]:
    """The test names pytest would run with ``args``, and its output."""
    r = project.runpytest_inprocess("--co", "-q", "-p", "no:cacheprovider", *args)
    out = r.stdout.str()
    assert r.ret in (0, 5), out
    names = {ln.split("::")[-1] for ln in out.splitlines() if "::" in ln}
    return names, out


def test_bare_pytest_runs_only_untiered_tests_and_says_what_it_left_out(project):
    names, out = collect(project)
    assert names == {"test_psci", "test_filter", "test_plain"}
    assert "left out 2 infra, 1 slow, 1 upstream test(s)" in out
    assert "4 deselected" in out


def test_a_named_file_runs_its_tiered_tests(project):
    names, _ = collect(project, "test_plumbing.py")
    assert names == {"test_bad_input", "test_fault"}


def test_a_named_node_id_runs_that_test_only(project):
    names, _ = collect(project, "test_mixed.py::test_bisect")
    assert names == {"test_bisect"}
    names, _ = collect(project, "test_mixed.py::test_plain", "test_kvm.py")
    assert names == {"test_plain", "test_psci", "test_filter"}


def test_a_directory_is_not_a_name(project):
    names, _ = collect(project, ".")
    assert names == {"test_psci", "test_filter", "test_plain"}


def test_m_replaces_the_rule(project):
    names, out = collect(project, "-m", "not slow")
    assert names == {"test_psci", "test_filter", "test_plain", "test_bad_input", "test_fault", "test_kselftest"}
    assert "left out" not in out
    names, _ = collect(project, "-m", "infra")
    assert names == {"test_bad_input", "test_fault"}
