"""Shared fixtures: isolated postwell and reference Postfix instances.

Instances are always stopped at teardown, even when the test failed, and any
process left over is killed by pid (from the instance's pid file).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

try:
    from hypothesis import HealthCheck, settings as _hsettings
except ImportError:   # the fuzz tests skip themselves without hypothesis
    pass
else:
    # Deterministic (same examples every run) and blind to machine load: no
    # per-example deadline, no "too slow" health check on a busy 2-core box, and
    # no example database replaying yesterday's failures from the work tree.
    _hsettings.register_profile("postwell", derandomize=True, deadline=None, database=None,
                                suppress_health_check=[HealthCheck.too_slow])
    _hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "postwell"))


def _stop_all(instances) -> None:
    """Stop and remove every instance, even when one of them fails to stop; several
    at once (stopping one is mostly waiting for its processes to leave)."""
    errors = []

    def finish(inst):
        try:
            inst.stop()
        except Exception as e:  # noqa: BLE001 - the others must still be stopped
            errors.append(e)
        try:
            inst.cleanup()
        except OSError as e:
            errors.append(e)
    if len(instances) > 1:
        with ThreadPoolExecutor(min(4, len(instances))) as pool:
            list(pool.map(finish, instances))
    else:
        for inst in instances:
            finish(inst)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftover_instances():
    """After the run, nothing of an instance this run created may keep running
    (a test that never stopped its instance, a master whose directory was removed)."""
    yield
    leftover = harness.sweep_instances(harness.created_roots)
    if leftover:
        sys.stderr.write(f"\nconftest: killed {len(leftover)} leftover instance process(es)\n")


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
    _stop_all(made)


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
    _stop_all(made)


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


# ---------------------------------------------------------------- pytest-xdist
#
# The suite runs with "-n 2 --dist loadgroup" (pyproject addopts).  Each test
# module is one xdist group, so module-scoped fixtures (a shared reference
# Postfix, real users) are set up once; modules that share a machine-wide
# resource form one group, so they run one after the other on the same worker
# instead of one worker idling on the other's lock (harness.machine_lock).
_SHARED_GROUPS = {
    # useradd'd pwe1..pwe3 and /tmp/pwe-shared (e2e_users, machine_lock "users-pwe")
    "test_issue3_local_e2e": "users-pwe",
    "test_issue3_reference": "users-pwe",
    "test_issue3_tools_e2e": "users-pwe",
    "test_parity_delivery5": "users-pwf",   # useradd'd pwf1..pwf3 (machine_lock "users-pwf")
}
# The longest modules start first (by the test time they took in a whole run), so
# no worker is left with a long one at the end while the other idles.
_LONG_FIRST = (
    "users-pwf", "users-pwe", "test_parity_dialogues3", "test_parity_dialogues2",
    "test_cli_gaps7", "test_parity_fuzz7", "test_smtp_client_fuzz7", "test_size_limit7",
    "test_delivery_gaps7", "test_verify7", "test_cli_fuzz7",
    "test_resolve_parity6", "test_parity_gaps5", "test_parity_smtpd", "test_outbound_relay",
    "test_parity_sweep", "test_xclient", "test_outbound_compare", "test_soak_smoke",
    "test_qmgr_notices_e2e", "test_sasl_realm", "test_smtpd_tls", "test_cli_leftovers",
    "test_e2e_recipe", "test_anvil_e2e", "test_policy_delegation", "test_policy_e2e",
    "test_cli_parity", "test_smtpd_auth", "test_security_resources", "test_bench_smoke",
    "test_outbound_8bit", "test_outbound_mx", "test_on_demand_helpers", "test_crash",
    "test_showq", "test_outbound_flood", "test_security_smuggling", "test_tls_clientcerts",
    "test_tls_resumption", "test_postconf", "test_pipe_reference", "test_outbound_retry",
    "test_harness", "test_reliability_crash", "test_sasl_digest", "test_spawn", "test_master",
)


def pytest_configure(config):
    # pytest-xdist (3.6+) hands out groups largest-first by their number of tests,
    # which puts a few long tests (a soak, a benchmark smoke) at the end of the run;
    # keep the order set below (longest test time first) instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# tryfirst: xdist's own hook turns the xdist_group marks into node id suffixes
# (its loadgroup scheduling key); marks added after it ran would be ignored and
# every module would be spread over both workers.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    def group(item) -> str:
        mod = item.module.__name__.rpartition(".")[2] if item.module else item.nodeid
        return _SHARED_GROUPS.get(mod, mod)

    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    # Stable: within a group (and among the rest) the file order is kept.
    items.sort(key=lambda item: rank.get(group(item), len(rank)))
