"""The dashboard in a real browser (headless Chromium from Debian's packages, driven by
Playwright) against a running control plane with real agents on two sites."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from tests.support.agents import eventually
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import cp_config, start_control_plane
from tests.support.fleet import Fleet, Traffic

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow


def _chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


async def test_dashboard_shows_the_fleet_charts_and_pauses_a_rollout(
    tmp_path: Path, publisher: Publisher
) -> None:
    executable = _chromium()
    from playwright.async_api import async_playwright, expect

    config = dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher), controller_interval_s=0.2
    )
    cp = await start_control_plane(config)
    (tmp_path / "fleet").mkdir()
    fleet = Fleet(cp, tmp_path / "fleet")
    try:
        await cp.push(iris_bundle(publisher.key, "1.0.0"))
        await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
        await fleet.add(2, "cloud", facts={"cpuCount": 8, "costPerHour": 2.0})
        await fleet.add(
            2,
            "onprem",
            facts={"cpuCount": 2, "costPerHour": 0.25},
            extra=("--added-latency-ms", "2"),
        )
        await cp.rollout("1.0.0")

        async def all_active() -> bool:
            agents = (await (await cp.call("GET", "/agents")).json())["agents"]
            return len(agents) == 4 and all(
                any(m["state"] == "active" for m in a["models"]) for a in agents
            )

        await eventually(all_active, 30)
        async with Traffic(fleet):

            async def traffic_recorded() -> bool:
                rep = await (await cp.call("GET", "/reports/compare?model=iris&since=1h")).json()
                return len(rep["groups"]) == 2 and all(g["requests"] > 150 for g in rep["groups"])

            await eventually(traffic_recorded, 60)
        staged = await cp.rollout("2.0.0", stages=[{"count": 1, "soak": "1h"}, {"percent": 100}])

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
            )
            page = await browser.new_page(viewport={"width": 1360, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{cp.url}/ui/")
            await page.fill("#token", "mfa_wrong")
            await page.click("button[type=submit]")
            await page.wait_for_selector("#login-error:has-text('Refused')")
            await page.fill("#token", cp.token)
            await page.click("button[type=submit]")
            await page.wait_for_selector("#agents tbody tr")
            rows = await page.locator("#agents tbody tr").count()
            names = await page.locator("#agents tbody").inner_text()
            assert rows == 4 and "cloud" in names and "onprem" in names
            await page.fill("#selector", "site=onprem")
            await page.click("#filter button")
            await expect(page.locator("#agents tbody tr")).to_have_count(2)
            await page.screenshot(path=str(tmp_path / "dashboard-fleet.png"), full_page=True)

            await page.goto(f"{cp.url}/ui/#/model/iris")
            await page.wait_for_selector("body[data-loaded='#/model/iris']")
            points = await page.evaluate(
                "window.__modelfleet.charts.map(c => c.data.slice(1).flat()"
                ".filter(v => v !== null).length)"
            )
            assert len(points) == 3 and all(n > 0 for n in points), points
            assert await page.locator(".uplot canvas").count() == 3
            verdict = await page.locator("#verdict").inner_text()
            assert "fastest: site=cloud" in verdict and "cheapest: site=onprem" in verdict
            await page.screenshot(path=str(tmp_path / "dashboard-model.png"), full_page=True)

            await page.goto(f"{cp.url}/ui/#/rollout/{staged['id']}")
            await page.wait_for_selector("#stages")
            await page.click("button[data-action=pause]")
            await page.wait_for_selector("#rollout-state:has-text('paused')")
            await page.screenshot(path=str(tmp_path / "dashboard-rollout.png"), full_page=True)
            await browser.close()
        assert errors == []
        state = (await (await cp.call("GET", f"/rollouts/{staged['id']}")).json())["state"]
        assert state == "paused"
        shots = os.environ.get("MODELFLEET_SCREENSHOT_DIR")
        if shots:  # how docs/img/dashboard-*.png were made (README)
            for name in ("dashboard-fleet.png", "dashboard-model.png", "dashboard-rollout.png"):
                shutil.copy(tmp_path / name, Path(shots) / name)
    finally:
        await fleet.stop()
        await cp.client.close()


async def test_the_agent_page_shows_its_effective_configuration(
    tmp_path: Path, publisher: Publisher
) -> None:
    executable = _chromium()
    from playwright.async_api import async_playwright

    schema = {
        "type": "object",
        "properties": {"maxBatch": {"type": "integer", "minimum": 1, "default": 8}},
    }
    cp = await start_control_plane(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher)
    )
    (tmp_path / "fleet").mkdir()
    fleet = Fleet(cp, tmp_path / "fleet")
    try:
        await cp.push(iris_bundle(publisher.key, "1.0.0", config_schema=schema))
        (agent,) = await fleet.add(1, "onprem")
        await cp.rollout("1.0.0")
        body = {
            "model": "iris",
            "scope": "selector",
            "selector": "site=onprem",
            "set": {"maxBatch": 2},
        }
        assert (await cp.call("POST", "/config/layers", json=body)).status == 200

        async def applied() -> bool:
            r = await cp.call("GET", f"/config/agents/{agent.agent_id}")
            return all(m["applied"] for m in (await r.json())["models"])

        await eventually(applied, 30)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
            )
            page = await browser.new_page(viewport={"width": 1360, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{cp.url}/ui/")
            await page.fill("#token", cp.token)
            await page.click("button[type=submit]")
            await page.click(f"a[href='#/agent/{agent.agent_id}']")
            await page.wait_for_selector("#agent-config tbody tr[data-model=iris]")
            row = await page.locator("#agent-config tbody tr").inner_text()
            assert '"maxBatch": 2' in row and "applied" in row and "#1" in row, row
            await page.screenshot(path=str(tmp_path / "dashboard-agent.png"), full_page=True)
            await browser.close()
        assert errors == []
        shots = os.environ.get("MODELFLEET_SCREENSHOT_DIR")
        if shots:
            shutil.copy(tmp_path / "dashboard-agent.png", Path(shots) / "dashboard-agent.png")
    finally:
        await fleet.stop()
        await cp.client.close()
