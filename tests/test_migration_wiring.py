"""The `migration:` section of the policy document, and both drivers started by it: the
router's MigrationLoop over real emulated engines with worker tokens, and the simulator's
MigrationDriver from a cluster YAML."""

from __future__ import annotations

import pytest

from scheduler.migration import NoMigration, VirtualUsageBalance
from scheduler.policy_document import PolicyDocumentError, load_policy_document


def test_migration_section_defaults_off_and_round_trips() -> None:
    doc = load_policy_document({})
    assert not doc.migration.enabled and not doc.migration.active()
    raw = {"migration": {"enabled": True, "interval_s": 0.2, "link_gbps": 25,
                         "params": {"overload_usage": 0.8, "underload_usage": 0.5, "grow_room_blocks": 2}}}
    doc = load_policy_document(raw)
    assert doc.migration.active()
    policy = doc.migration.build_policy()
    assert isinstance(policy, VirtualUsageBalance)
    assert (policy.overload_usage, policy.underload_usage, policy.grow_room_blocks) == (0.8, 0.5, 2)
    assert load_policy_document(doc.to_dict()) == doc
    assert load_policy_document(doc.to_dict(minimal=True)) == doc
    assert doc.to_dict(minimal=True)["migration"]["link_gbps"] == 25
    off = load_policy_document({"migration": {"enabled": True, "policy": "none"}})
    assert not off.migration.active() and isinstance(off.migration.build_policy(), NoMigration)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"policy": "llumnx"}, "policy.migration.policy: unknown 'llumnx'; allowed: llumnix, none"),
    ({"interval_s": 0}, "policy.migration.interval_s: Input should be greater than 0 (got 0)"),
    ({"link_gbps": -1}, "policy.migration.link_gbps: Input should be greater than 0 (got -1)"),
    ({"every": 1}, "policy.migration.every: unknown key; allowed: enabled, policy, interval_s, link_gbps, params"),
    ({"params": {"overload": 1}}, "policy.migration.params.overload: unknown key; allowed: overload_usage"),
    ({"params": {"underload_usage": 0.95}},
     "policy.migration.params: underload_usage (0.95) must be below overload_usage (0.9)"),
])
def test_migration_errors_name_path_value_and_allowed(raw: dict[str, object], expected: str) -> None:
    with pytest.raises(PolicyDocumentError) as info:
        load_policy_document({"migration": raw})
    assert str(info.value).startswith(expected), str(info.value)
