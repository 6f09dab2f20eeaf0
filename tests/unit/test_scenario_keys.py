"""A scenario key the guest does not know is an error on the host, before anything is sent
(harness/protocol.py ``SCENARIO_KEYS``, ``validate_scenario``)."""

from __future__ import annotations

import pytest

from harness import protocol as P
from harness.images.payloads import get_payload
from harness.model.scenarios import PSCI_FWD, scenario


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    return get_payload("psci_version")


def test_a_misspelt_key_is_refused_naming_the_key_it_meant(payload):
    with pytest.raises(P.ProtocolError) as e:
        scenario("typo", payload, filters=PSCI_FWD, max_exit=3)
    assert "max_exit (did you mean 'max_exits'?)" in str(e.value)


def test_an_unknown_key_lists_the_known_ones(payload):
    with pytest.raises(P.ProtocolError, match=r"unknown scenario key\(s\): colour; known: .*deadline_s"):
        scenario("odd", payload, colour="blue")


@pytest.mark.parametrize("key,value", [("max_exits", 5), ("psci_minor", 1), ("in_kernel_gic", False),
                                       ("probes", []), ("late_filters", []), ("psci_0_2", False)])
def test_every_key_the_guest_reads_is_accepted(payload, key, value):
    assert scenario("ok", payload, **{key: value})[key] == value


def test_the_guest_reads_no_key_outside_the_list():
    """Every ``spec[...]`` / ``spec.get(...)`` / ``s.get(...)`` key in the scenario runner is a known key."""
    import re
    from pathlib import Path
    src = (Path(P.__file__).parent / "guest" / "runner.py").read_text() + \
        (Path(P.__file__).parent / "guest" / "vmsetup.py").read_text()
    read = set(re.findall(r"(?:spec|\bs)(?:\.get\(|\[)\"(\w+)\"", src))
    assert read and read <= P.SCENARIO_KEYS, sorted(read - P.SCENARIO_KEYS)
