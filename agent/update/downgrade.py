"""Rollback protection: may a desired version lower than the highest activated one go in (pure)."""

from __future__ import annotations

from protocol.versions import compare_versions


def downgrade_refusal(
    version: str, highest: str | None, *, ordered: bool, serving: bool
) -> str | None:
    """Why ``version`` is refused, or None when it may go in.

    ``highest`` is the highest version of the model ever activated here, ``ordered`` whether
    the control plane ordered this version as a rollback, ``serving`` whether exactly this
    version serves already (then there is nothing to refuse).
    """
    if not highest or ordered or serving or compare_versions(version, highest) >= 0:
        return None
    return (
        f"version {version} is lower than {highest}, already activated; "
        "only a rollback ordered by the control plane may go down"
    )
