// modelfleet dashboard: plain JavaScript over the REST API, no build step.
// The bearer token is entered once and kept in this tab's session storage.
"use strict";
(function () {
  const TOKEN_KEY = "modelfleet.token";
  const view = document.getElementById("view");
  const state = { charts: [] };
  window.__modelfleet = state; // lets tests (and curious operators) inspect the charts

  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const token = () => sessionStorage.getItem(TOKEN_KEY);
  const fmt = (v, digits = 3) => (v === null || v === undefined ? "–"
    : typeof v === "number" ? Number(v.toPrecision(digits)).toString() : String(v));
  const ago = (t) => {
    if (!t) return "never";
    const s = (Date.now() - Date.parse(t)) / 1000;
    return s < 120 ? `${Math.round(s)}s ago` : `${Math.round(s / 60)}m ago`;
  };

  async function api(path, options = {}) {
    const resp = await fetch(`/api/v1${path}`, {
      ...options,
      headers: { Authorization: `Bearer ${token()}`, "Content-Type": "application/json" },
    });
    const body = resp.status === 204 ? null : await resp.json();
    if (resp.status === 401) { sessionStorage.removeItem(TOKEN_KEY); route(); throw new Error("log in"); }
    if (!resp.ok) throw new Error(body?.error?.message || `HTTP ${resp.status}`);
    return body;
  }

  function login() {
    document.getElementById("logout").hidden = true;
    view.innerHTML = `<h1>Log in</h1>
      <p class="muted">Paste an API token (the admin token is in the control plane's data
      directory, <code>admin-token</code>). It stays in this tab only.</p>
      <form id="login"><input id="token" type="password" placeholder="mfa_…" autofocus>
      <button class="primary" type="submit">Log in</button></form><p id="login-error" class="error"></p>`;
    document.getElementById("login").onsubmit = async (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
      try { await api("/fleet"); route(); } catch (err) {
        sessionStorage.removeItem(TOKEN_KEY);
        document.getElementById("login-error").textContent = `Refused: ${err.message}`;
      }
    };
  }

  function destroyCharts() { state.charts.forEach((c) => c.destroy()); state.charts = []; }

  async function fleetPage() {
    const selector = new URLSearchParams(location.hash.split("?")[1] || "").get("selector") || "";
    const [overview, agents] = await Promise.all([
      api("/fleet"), api(`/agents${selector ? `?selector=${encodeURIComponent(selector)}` : ""}`)]);
    const sites = Object.entries(overview.sites).map(([site, states]) =>
      `<div class="card">site <b>${esc(site)}</b>${Object.entries(states).map(([s, n]) =>
        `<span class="state-${esc(s)}">${n} ${esc(s)}</span>`).join(" · ")}</div>`).join("");
    const models = Object.entries(overview.models).map(([m, vs]) =>
      `<div class="card">model <b><a href="#/model/${esc(m)}">${esc(m)}</a></b>${
        Object.entries(vs).map(([v, n]) => `${esc(v)} on ${n}`).join(" · ")}</div>`).join("");
    const rollouts = overview.rollouts.map((r) => `<div class="card">rollout
      <b><a href="#/rollout/${esc(r.id)}">${esc(r.model)} ${esc(r.version)}</a></b>
      <span class="state-${esc(r.state)}">${esc(r.state)}</span> stage ${r.stage}/${r.stages}</div>`).join("");
    const rows = agents.agents.map((a) => `<tr data-agent="${esc(a.id)}">
      <td><a href="#/agent/${esc(a.id)}">${esc(a.name)}</a><div class="muted">${esc(a.id.slice(0, 8))}</div></td>
      <td>${Object.entries(a.labels).map(([k, v]) => `<span class="tag">${esc(k)}=${esc(v)}</span>`).join("")}</td>
      <td>${esc(a.labels.site || "–")}</td>
      <td>${esc(a.facts.cpuCount ?? "?")} cpu ${esc(a.facts.arch || "")} ${esc((a.facts.accelerators || []).join(",") || "")}</td>
      <td class="state-${esc(a.state)}">${esc(a.state)}</td>
      <td>${a.models.map((m) => `<a href="#/model/${esc(m.name)}">${esc(m.name)}</a> ${esc(m.version)}
        <span class="state-${esc(m.state)}">${esc(m.state)}</span>`).join("<br>") || "–"}</td>
      <td>${ago(a.lastSeen)}</td></tr>`).join("");
    view.innerHTML = `<h1>Fleet</h1><div class="cards">${sites}${models}${rollouts}</div>
      <h2>Agents (${agents.agents.length})</h2>
      <form id="filter"><input id="selector" type="text" placeholder="selector, e.g. site=onprem,hw in (cpu,gpu)"
        value="${esc(selector)}"> <button type="submit">Filter</button></form><br>
      <table id="agents"><thead><tr><th>name</th><th>labels</th><th>site</th><th>hardware</th>
      <th>state</th><th>models</th><th>last seen</th></tr></thead><tbody>${rows}</tbody></table>`;
    document.getElementById("filter").onsubmit = (e) => {
      e.preventDefault();
      location.hash = `#/fleet?selector=${encodeURIComponent(document.getElementById("selector").value)}`;
    };
  }

  const COLORS = ["#2563eb", "#c2410c", "#15803d", "#7c3aed", "#0891b2", "#be185d"];

  function lineChart(el, title, series, field, unit, bucket) {
    const times = [...new Set(series.flatMap((s) => s.points.map((p) => Date.parse(p.t) / 1000)))].sort();
    const data = [times, ...series.map((s) => {
      const byT = new Map(s.points.map((p) => [Date.parse(p.t) / 1000, p[field]]));
      return times.map((t) => (byT.has(t) ? byT.get(t) : null));
    })];
    const opts = {
      title, width: el.clientWidth - 16, height: 240,
      series: [{}, ...series.map((s, i) => ({
        label: Object.values(s.key).join(","), stroke: COLORS[i % COLORS.length], width: 2,
        points: { show: true }, spanGaps: true }))],
      axes: [{}, { label: unit }],
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max * 1.15, 1)] } },
    };
    const chart = new uPlot(opts, data, el);
    if (times.length) {
      // Pad the time axis by a bucket each side, so a single bucket still reads as a moment.
      chart.setScale("x", { min: times[0] - bucket, max: times[times.length - 1] + bucket });
    }
    chart.mfField = field;
    state.charts.push(chart);
  }

  async function modelPage(name) {
    const [versions, agents, compare, series, rollouts] = await Promise.all([
      api(`/models/${encodeURIComponent(name)}/versions`), api("/agents"),
      api(`/reports/compare?model=${encodeURIComponent(name)}&since=1h`),
      api(`/reports/timeseries?model=${encodeURIComponent(name)}&since=1h&bucket=1m`),
      api("/rollouts")]);
    const where = {};
    agents.agents.forEach((a) => a.models.filter((m) => m.name === name && m.state === "active")
      .forEach((m) => { (where[m.version] ||= []).push(a.name); }));
    const vrows = versions.versions.map((v) => `<tr><td>${esc(v.version)}</td><td>${esc(v.runtime)}</td>
      <td>${esc(v.created)}</td><td>${(where[v.version] || []).map(esc).join(", ") || "–"}</td></tr>`).join("");
    const maxCost = Math.max(0, ...compare.groups.map((g) => g.cost_per_million || 0));
    const crows = compare.groups.map((g) => `<tr><td>${esc(Object.values(g.key).join(","))}</td>
      <td>${g.agents}</td><td>${g.requests}</td><td>${fmt(g.throughput_rps)}</td>
      <td>${fmt(g.latency_ms.p50)}</td><td>${fmt(g.latency_ms.p95)}</td><td>${fmt(g.latency_ms.p99)}</td>
      <td>${fmt(100 * g.error_rate)}%</td>
      <td>${g.cost_per_million === null ? "–" : `<span class="hbar" style="width:${
        Math.max(2, 160 * g.cost_per_million / (maxCost || 1))}px"></span>${fmt(g.cost_per_million)}`}</td></tr>`).join("");
    const rl = rollouts.rollouts.filter((r) => r.model === name).map((r) =>
      `<li><a href="#/rollout/${esc(r.id)}">${esc(r.version)}</a> <span class="state-${esc(r.state)}">${esc(r.state)}</span>
       stage ${r.stage}/${r.stages} <span class="muted">${esc(r.createdAt)}</span></li>`).join("");
    view.innerHTML = `<h1>Model ${esc(name)}</h1>
      <h2>Versions and where they run</h2><table><thead><tr><th>version</th><th>runtime</th>
      <th>published</th><th>active on</th></tr></thead><tbody>${vrows}</tbody></table>
      <h2>Cloud against on-prem (last hour)</h2>
      <div class="verdict" id="verdict">${esc(compare.verdict.summary)}</div>
      <table id="compare"><thead><tr><th>site</th><th>agents</th><th>requests</th><th>req/s</th>
      <th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>errors</th><th>cost / million</th></tr></thead>
      <tbody>${crows}</tbody></table>
      <div class="charts"><div class="chart" id="chart-p95"></div><div class="chart" id="chart-rps"></div>
      <div class="chart" id="chart-errors"></div></div>
      <h2>Rollouts</h2><ul>${rl || "<li class='muted'>none</li>"}</ul>`;
    const errs = series.series.map((s) => ({ key: s.key, points: s.points.map((p) => ({
      ...p, error_pct: p.requests ? 100 * p.errors / p.requests : 0 })) }));
    const b = series.bucket_seconds;
    lineChart(document.getElementById("chart-p95"), "p95 latency by site", series.series, "p95_ms", "ms", b);
    lineChart(document.getElementById("chart-rps"), "throughput by site", series.series, "throughput_rps", "req/s", b);
    lineChart(document.getElementById("chart-errors"), "error rate by site", errs, "error_pct", "%", b);
  }

  async function rolloutsPage() {
    const out = await api("/rollouts");
    view.innerHTML = `<h1>Rollouts</h1><table><thead><tr><th>model</th><th>version</th><th>state</th>
      <th>stage</th><th>created</th></tr></thead><tbody>${out.rollouts.map((r) => `<tr>
      <td>${esc(r.model)}</td><td><a href="#/rollout/${esc(r.id)}">${esc(r.version)}</a></td>
      <td class="state-${esc(r.state)}">${esc(r.state)}</td><td>${r.stage}/${r.stages}</td>
      <td>${esc(r.createdAt)}</td></tr>`).join("")}</tbody></table>`;
  }

  // The failed-agents limit and stall bound in force (defaults marked), and what it waits on.
  function limits(r) {
    const failed = (r.effectiveGates || {}).max_failed_agents;
    const mark = (g) => (g.default ? " (default)" : "");
    const shown = failed && r.maxStall ? `<p class="muted">max_failed_agents ${esc(failed.value)}${mark(failed)}:
      ${r.failedAgents} failed or refused · max stall ${esc(r.maxStall.value)}${mark(r.maxStall)}</p>` : "";
    const w = r.waiting;
    const ends = w && w.failsAt ? ` <span class="muted">(no progress by ${esc(w.failsAt.slice(11, 19))}
      ends it: ${esc(r.spec.on_failure)})</span>` : "";
    return shown + (w ? `<p id="rollout-waiting">waiting on ${esc(w.on)}: ${esc(w.reason)}${ends}</p>` : "");
  }

  async function rolloutPage(id) {
    const r = await api(`/rollouts/${encodeURIComponent(id)}`);
    const stages = r.stages.map((s, i) => {
      const pct = s.target ? Math.round(100 * s.moved / s.target) : 100;
      const gates = (s.gates || []).map((g) => `<div class="outcome-${esc(g.outcome)}">${esc(g.outcome)}
        ${esc(g.gate)}: ${fmt(g.value)} vs ${fmt(g.threshold)} ${g.note ? `<span class="muted">(${esc(g.note)})</span>` : ""}</div>`).join("");
      return `<tr><td>${i + 1}</td><td>${s.percent !== undefined ? `${s.percent}%` : `${s.count} agents`}</td>
        <td>${esc(s.soak || "–")}</td><td><span class="bar"><span style="width:${pct}%"></span></span>
        ${s.moved}/${s.target}</td><td class="state-${esc(s.status)}">${esc(s.status)}</td><td>${gates || "–"}</td></tr>`;
    }).join("");
    const timeline = r.timeline.map((e) => `<tr><td>${esc(e.at.slice(11, 19))}</td><td>${esc(e.kind)}</td>
      <td>${esc(e.reason)}</td></tr>`).join("");
    const active = ["pending", "running", "paused"].includes(r.state);
    view.innerHTML = `<h1>Rollout ${esc(r.model)} ${esc(r.version)}
      <span id="rollout-state" class="state-${esc(r.state)}">${esc(r.state)}</span></h1>
      <p class="muted">${esc(r.selector || "every agent")} · matching ${r.progress.matching},
      moved ${r.progress.moved}, active ${r.progress.active}</p>${limits(r)}
      <div id="actions">${active ? `<button data-action="${r.state === "paused" ? "resume" : "pause"}">
        ${r.state === "paused" ? "Resume" : "Pause"}</button> <button data-action="promote">Promote</button>
        <button data-action="abort">Abort and roll back</button>` : ""}</div><p id="action-error" class="error"></p>
      <h2>Stages</h2><table id="stages"><thead><tr><th>#</th><th>size</th><th>soak</th><th>cohort</th>
      <th>status</th><th>gates</th></tr></thead><tbody>${stages}</tbody></table>
      <h2>Timeline</h2><table id="timeline"><tbody>${timeline}</tbody></table>`;
    view.querySelectorAll("#actions button").forEach((b) => {
      b.onclick = async () => {
        try { await api(`/rollouts/${encodeURIComponent(id)}/${b.dataset.action}`,
          { method: "POST", body: JSON.stringify({ rollback: true }) }); route(); }
        catch (err) { document.getElementById("action-error").textContent = err.message; }
      };
    });
  }

  // One agent: its labels (locked ones marked) and its effective configuration per model, as
  // signed for it, beside the digest the agent reports it applied.
  async function agentPage(id) {
    const [agent, config] = await Promise.all([
      api(`/agents/${encodeURIComponent(id)}`), api(`/config/agents/${encodeURIComponent(id)}`)]);
    const locked = new Set(agent.lockedLabels || []);
    const labels = Object.entries(agent.labels).map(([k, v]) =>
      `<span class="tag">${esc(k)}=${esc(v)}${locked.has(k) ? " 🔒" : ""}</span>`).join("") || "–";
    const rows = config.models.map((m) => `<tr data-model="${esc(m.model)}">
      <td>${esc(m.model)} ${esc(m.version)}</td>
      <td><pre class="config">${esc(JSON.stringify(m.config, null, 2))}</pre></td>
      <td><code>${esc((m.configDigest || "none").slice(0, 19))}</code></td>
      <td class="${m.applied ? "state-active" : "state-failed"}">${m.applied ? "applied"
        : `agent reports ${esc((m.appliedDigest || "none").slice(0, 19))}`}${
        m.failed ? `<div class="error">failed: ${esc(m.failed)}</div>` : ""}${
        m.invalid ? `<div class="error">not signed: ${esc(m.invalid.join("; "))}</div>` : ""}</td>
      <td>${m.layers.map((l) => `#${esc(l)}`).join(" ") || "defaults"}</td></tr>`).join("");
    view.innerHTML = `<h1>Agent ${esc(agent.name)}</h1>
      <p class="muted">${esc(agent.id)} · <span class="state-${esc(agent.state)}">${esc(agent.state)}</span>
      · last seen ${ago(agent.lastSeen)}</p><p>${labels}</p>
      <h2>Effective configuration</h2>
      <table id="agent-config"><thead><tr><th>model</th><th>configuration</th><th>digest</th>
      <th>on the agent</th><th>layers</th></tr></thead><tbody>${rows ||
        "<tr><td colspan=5>no model</td></tr>"}</tbody></table>`;
  }

  async function route() {
    destroyCharts();
    if (!token()) return login();
    document.getElementById("logout").hidden = false;
    const hash = location.hash.split("?")[0];
    try {
      const models = await api("/models");
      document.getElementById("models-nav").innerHTML = models.models.map((m) =>
        `<a href="#/model/${esc(m.name)}">${esc(m.name)}</a>`).join("");
      let m;
      if ((m = hash.match(/^#\/model\/(.+)$/))) await modelPage(decodeURIComponent(m[1]));
      else if ((m = hash.match(/^#\/rollout\/(.+)$/))) await rolloutPage(decodeURIComponent(m[1]));
      else if ((m = hash.match(/^#\/agent\/(.+)$/))) await agentPage(decodeURIComponent(m[1]));
      else if (hash === "#/rollouts") await rolloutsPage();
      else await fleetPage();
      document.body.dataset.loaded = hash || "#/fleet";
    } catch (err) {
      if (token()) view.innerHTML = `<p class="error">${esc(err.message)}</p>`;
    }
  }

  document.getElementById("logout").onclick = () => { sessionStorage.removeItem(TOKEN_KEY); route(); };
  window.addEventListener("hashchange", route);
  route();
})();
