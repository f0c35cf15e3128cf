"""Shared fixtures: isolated postwell and reference Postfix instances.

Instances are always stopped at teardown, even when the test failed, and any
process left over is killed by pid (from the instance's pid file).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402


def _reference_or_skip():
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def postwell_factory(tmp_path):
    """Build (not start) PostwellInstance objects; all are stopped at teardown."""
    made: list[harness.PostwellInstance] = []

    def make(main_cf=None, master_cf=None, name=None, **kw):
        inst = harness.PostwellInstance(tmp_path, main_cf, master_cf,
                                        name=name or f"postwell{len(made) or ''}", **kw)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.stop()
        inst.cleanup()


@pytest.fixture
def postwell(postwell_factory):
    """A started postwell with the test defaults."""
    return postwell_factory().start()


@pytest.fixture
def reference_factory(tmp_path):
    """Build (not start) ReferencePostfix objects; all are stopped at teardown."""
    _reference_or_skip()
    made: list[harness.ReferencePostfix] = []

    def make(main_cf_extra=None, name=None, **kw):
        inst = harness.ReferencePostfix(tmp_path, main_cf_extra,
                                        name=name or f"postfix{len(made) or ''}", **kw)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.stop()
        inst.cleanup()


@pytest.fixture(scope="session")
def reference_postfix(tmp_path_factory):
    """One reference Postfix for the whole run (start-up takes a second or two).

    Tests that change its configuration must use ``reference_factory`` instead.
    """
    _reference_or_skip()
    inst = harness.ReferencePostfix(tmp_path_factory.mktemp("ref"))
    try:
        inst.start()
        yield inst
    finally:
        inst.stop()
        inst.cleanup()
