"""The dashboard page: one self-contained HTML document (inline CSS and JS, hand-drawn SVG charts, no
CDN), which polls `/api/overview` with the API key the user typed (kept in sessionStorage)."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>AIMaaS monitor</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  :root { --fg:#1d2330; --muted:#6b7385; --line:#e3e6ee; --bg:#f6f7fb; --ok:#1a8f4c; --bad:#c62e2e; --warn:#c77d00; }
  body { font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); margin: 0; }
  header { background: #232a3b; color: #fff; padding: 10px 20px; display: flex; gap: 16px; align-items: center; }
  header h1 { font-size: 18px; margin: 0; }
  header .status { margin-left: auto; font-size: 12px; opacity: .85; }
  main { padding: 16px 20px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin-bottom: 16px; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); font-variant-numeric: tabular-nums; }
  th { color: var(--muted); font-weight: 600; font-size: 12px; }
  .cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 12px; }
  .card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
  .card h3 { margin: 0 0 4px; font-size: 14px; }
  .kpis { display: flex; gap: 14px; font-size: 12px; color: var(--muted); flex-wrap: wrap; }
  .kpis b { color: var(--fg); font-size: 14px; }
  .charts { display: grid; grid-template-columns: repeat(3, 1fr); gap: 6px; margin-top: 6px; }
  .chart svg { width: 100%; height: 70px; background: #fbfcfe; border: 1px solid var(--line); border-radius: 4px; }
  .chart .label { font-size: 11px; color: var(--muted); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
  .firing { color: var(--bad); font-weight: 600; } .pending { color: var(--warn); font-weight: 600; }
  .up { color: var(--ok); } .down { color: var(--bad); }
  #login { max-width: 420px; margin: 60px auto; }
  #login input { width: 100%; padding: 6px; margin: 6px 0; box-sizing: border-box; }
  .error { color: var(--bad); }
  .empty { color: var(--muted); font-style: italic; }
</style>
</head>
<body>
<header><h1>AIMaaS monitor</h1><span class="status" id="status">connecting…</span></header>
<main>
  <section id="login" hidden>
    <h2>API key</h2>
    <p>This monitor requires an API key with the <b>read</b> permission.</p>
    <form id="login-form"><input id="token" type="password" autocomplete="off" placeholder="aimaas_…">
    <button type="submit">Show dashboard</button></form>
    <p class="error" id="login-error"></p>
  </section>
  <div id="content" hidden>
    <section><h2>Models</h2><div class="cards" id="models"></div></section>
    <section><h2>Firing and pending alerts</h2><table id="alerts"></table></section>
    <section><h2>Nodes</h2><table id="nodes"></table></section>
    <section><h2>Deployments</h2><table id="deployments"></table></section>
  </div>
</main>
<script>
"use strict";
const KEY = "aimaas_token";
const POLL_MS = 2000;
let timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
const fmt = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toFixed(d);
const pct = (x) => fmt(100 * x, 1) + "%";
const bytes = (n) => {
  if (!n) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(1) + " " + u[i];
};

function chart(points, key, color, label, unit) {
  const W = 300, H = 70, pad = 4;
  const values = points.map(p => p[key]);
  const max = Math.max(1e-9, ...values);
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("data-metric", key);
  const step = values.length > 1 ? (W - 2 * pad) / (values.length - 1) : 0;
  const coords = values.map((v, i) => `${(pad + i * step).toFixed(1)},${(H - pad - (H - 2 * pad) * v / max).toFixed(1)}`);
  const area = document.createElementNS(svgNS, "polygon");
  area.setAttribute("points", `${pad},${H - pad} ${coords.join(" ")} ${pad + (values.length - 1) * step},${H - pad}`);
  area.setAttribute("fill", color); area.setAttribute("fill-opacity", "0.12");
  const line = document.createElementNS(svgNS, "polyline");
  line.setAttribute("points", coords.join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", color); line.setAttribute("stroke-width", "1.5");
  svg.append(area, line);
  const last = values.length ? values[values.length - 1] : 0;
  return el("div", {class: "chart"}, el("div", {class: "label"}, `${label} (max ${fmt(max, 2)}${unit})`), svg);
}

function renderModels(models) {
  const box = document.getElementById("models");
  box.replaceChildren();
  if (!models.length) { box.append(el("p", {class: "empty"}, "No statistics reported yet.")); return; }
  for (const m of models) {
    const card = el("div", {class: "card", "data-model": m.model, "data-version": m.version},
      el("h3", {}, `${m.model} v${m.version}`),
      el("div", {class: "kpis"},
        el("span", {}, "QPS ", el("b", {class: "qps"}, fmt(m.qps))),
        el("span", {}, "success ", el("b", {class: "success"}, pct(m.success_rate))),
        el("span", {}, "p50 ", el("b", {}, fmt(m.p50_ms, 1) + " ms")),
        el("span", {}, "p95 ", el("b", {}, fmt(m.p95_ms, 1) + " ms")),
        el("span", {}, "p99 ", el("b", {class: "p99"}, fmt(m.p99_ms, 1) + " ms")),
        el("span", {}, "queue ", el("b", {}, fmt(m.queue_ms, 2) + " ms")),
        el("span", {}, "requests ", el("b", {class: "requests"}, m.requests)),
        el("span", {}, "replicas ", el("b", {}, m.replicas))),
      el("div", {class: "charts"},
        chart(m.timeline, "qps", "#3060d0", "QPS", ""),
        chart(m.timeline, "p99_ms", "#8a3ad0", "p99 latency", " ms"),
        chart(m.timeline, "error_rate", "#c62e2e", "error rate", "")));
    box.append(card);
  }
}

function renderTable(id, head, rows, empty) {
  const table = document.getElementById(id);
  table.replaceChildren(el("tr", {}, ...head.map(h => el("th", {}, h))));
  if (!rows.length) { table.append(el("tr", {}, el("td", {class: "empty", colspan: head.length}, empty))); return; }
  for (const cells of rows) table.append(el("tr", {}, ...cells.map(c => c instanceof Node ? el("td", {}, c) : el("td", {}, c))));
}

function render(data) {
  renderModels(data.models);
  renderTable("alerts", ["state", "rule", "subject", "value", "since", "summary"],
    data.alerts.map(a => [el("span", {class: a.state}, a.state), a.rule_name || a.rule_id, a.subject, fmt(a.value, 3),
      a.active_since ? new Date(a.active_since).toLocaleTimeString() : "–", a.summary]), "No alerts.");
  renderTable("nodes", ["node", "state", "address", "CPU", "memory", "GPU memory", "GPU util", "last report"],
    data.nodes.map(n => [n.id, el("span", {class: n.up ? "up" : "down"}, n.up ? "up" : "down"), n.address || "–",
      n.cpu_percent === null ? "–" : fmt(n.cpu_percent, 1) + "%",
      n.memory_total_bytes ? `${bytes(n.memory_used_bytes)} / ${bytes(n.memory_total_bytes)}` : "–",
      n.gpu_memory_total_bytes ? `${bytes(n.gpu_memory_used_bytes)} / ${bytes(n.gpu_memory_total_bytes)}` : "–",
      n.gpu_memory_total_bytes ? fmt(n.gpu_utilization_percent, 0) + "%" : "–",
      n.age_seconds === null ? "–" : fmt(n.age_seconds, 0) + " s ago"]), "No nodes.");
  renderTable("deployments", ["deployment", "model", "traffic", "ready / min–max"],
    data.deployments.map(d => [d.name, d.model, d.traffic, `${d.ready} / ${d.min_replicas}–${d.max_replicas}`]),
    "No deployments.");
  document.getElementById("status").textContent =
    `updated ${new Date(data.as_of * 1000).toLocaleTimeString()} · window ${data.window}` + (data.leader ? " · alert leader" : "");
}

function showLogin(message) {
  if (timer) { clearTimeout(timer); timer = null; }
  document.getElementById("content").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("status").textContent = "signed out";
}

async function poll() {
  timer = null;
  const token = sessionStorage.getItem(KEY);
  const headers = token ? {"Authorization": "Bearer " + token} : {};
  try {
    const response = await fetch("api/overview", {headers, cache: "no-store"});
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      sessionStorage.removeItem(KEY);
      showLogin(token ? (body.error || "access denied") : "");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    document.getElementById("login").hidden = true;
    document.getElementById("content").hidden = false;
    render(data);
  } catch (err) {
    document.getElementById("status").textContent = "error: " + err.message + " (retrying)";
  }
  timer = setTimeout(poll, POLL_MS);
}

document.getElementById("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = document.getElementById("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(KEY, token);
  document.getElementById("token").value = "";
  poll();
});
poll();
</script>
</body>
</html>
"""
