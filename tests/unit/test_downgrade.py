"""agent/update/downgrade.py: refuse going below the highest activated version unless ordered."""

from __future__ import annotations

from agent.update.downgrade import downgrade_refusal


def test_a_lower_version_is_refused_with_the_reason() -> None:
    reason = downgrade_refusal("1.0.0", "2.0.0", ordered=False, serving=False)
    assert reason == (
        "version 1.0.0 is lower than 2.0.0, already activated; "
        "only a rollback ordered by the control plane may go down"
    )


def test_equal_higher_or_first_versions_go_in() -> None:
    assert downgrade_refusal("2.0.0", "2.0.0", ordered=False, serving=False) is None
    assert downgrade_refusal("3.0.0", "2.0.0", ordered=False, serving=False) is None
    assert downgrade_refusal("1.0.0", None, ordered=False, serving=False) is None
    assert downgrade_refusal("1.0.0", "", ordered=False, serving=False) is None


def test_an_ordered_rollback_or_the_version_serving_already_is_not_refused() -> None:
    assert downgrade_refusal("1.0.0", "2.0.0", ordered=True, serving=False) is None
    assert downgrade_refusal("1.0.0", "2.0.0", ordered=False, serving=True) is None


def test_versions_compare_as_versions_not_strings() -> None:
    assert downgrade_refusal("1.10.0", "1.9.0", ordered=False, serving=False) is None
    assert downgrade_refusal("1.9.0", "1.10.0", ordered=False, serving=False) is not None
