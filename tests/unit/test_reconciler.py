"""The agent's pure plan: what to fetch, activate and unload."""

from __future__ import annotations

from agent.update.plan import plan
from protocol.desired import DesiredModel

A1 = DesiredModel("a", "1", "sha256:" + "1" * 64)
A2 = DesiredModel("a", "2", "sha256:" + "2" * 64)
B1 = DesiredModel("b", "1", "sha256:" + "3" * 64)


def test_nothing_installed_fetches_and_activates() -> None:
    p = plan([A1], set(), {}, {})
    assert p.fetch == (A1,) and p.activate == (A1,) and not p.unload


def test_running_is_left_alone() -> None:
    assert plan([A1], {A1.manifest_digest}, {"a": A1.manifest_digest}, {}).empty


def test_installed_but_not_running_is_activated_without_fetch() -> None:
    p = plan([A2], {A2.manifest_digest}, {"a": A1.manifest_digest}, {})
    assert p.fetch == () and p.activate == (A2,) and p.unload == ()


def test_upgrade_keeps_the_old_version_until_the_new_one_activates() -> None:
    p = plan([A2], set(), {"a": A1.manifest_digest}, {})
    assert p.fetch == (A2,) and p.activate == (A2,)
    assert p.unload == ()  # same model name: the swap replaces it, nothing is unloaded first


def test_model_no_longer_desired_is_unloaded() -> None:
    p = plan([B1], set(), {"a": A1.manifest_digest}, {})
    assert p.unload == ("a",) and p.fetch == (B1,)


def test_failed_version_is_not_retried() -> None:
    p = plan([A2], set(), {"a": A1.manifest_digest}, {A2.manifest_digest: "smoke test"})
    assert p.empty and p.blocked == ((A2, "smoke test"),)


def test_several_models_each_their_own_lifecycle() -> None:
    p = plan([A1, B1], {A1.manifest_digest}, {}, {})
    assert p.fetch == (B1,) and set(p.activate) == {A1, B1}
