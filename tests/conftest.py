"""Shared test configuration: the pytest plugin is loaded from pytest.ini (-p harness.plugin)."""
