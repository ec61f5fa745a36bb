"""The memory plan: a version loads beside the others only when the host holds both."""

from __future__ import annotations

from agent.update.memory import human, memory_refusal, parse_meminfo


def test_fits_under_the_limit_and_the_available_memory() -> None:
    assert memory_refusal(what="m 2", needed=100, loaded=[200], limit=300, available=100) is None
    assert memory_refusal(what="m 2", needed=100, loaded=[], limit=None, available=None) is None


def test_refused_beside_the_running_version_over_the_limit() -> None:
    reason = memory_refusal(
        what="iris 2.0.0", needed=300 * 1024, loaded=[300 * 1024], limit=500 * 1024, available=None
    )
    assert reason == (
        "not enough memory to load iris 2.0.0: it needs ~300.0 KiB beside the 300.0 KiB "
        "loaded now, over the 500.0 KiB memory limit"
    )


def test_refused_when_the_host_has_less_available() -> None:
    reason = memory_refusal(
        what="big 1", needed=3 * 1024**3, loaded=[], limit=None, available=2 * 1024**3
    )
    assert reason is not None and "host has 2.0 GiB available" in reason


def test_meminfo_and_sizes() -> None:
    text = "MemTotal:       16318024 kB\nMemAvailable:    8000000 kB\n"
    assert parse_meminfo(text) == 8_000_000 * 1024
    assert parse_meminfo("MemTotal: 1 kB\n") is None
    assert (human(512), human(1536), human(5 * 1024**4)) == ("512 B", "1.5 KiB", "5120.0 GiB")
