// The status page: polls /status/data and redraws in place. No framework, no network
// beyond this gateway; every value from the server goes in as text, never as markup.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const STATE_WORDS = {
  ready: "serving", starting: "starting", building_env: "building env",
  cold: "cold", failed: "failed", stopping: "stopping",
};
const STATE_ORDER = { failed: 0, starting: 1, building_env: 1, stopping: 2, ready: 3, cold: 4 };

let token = sessionStorage.getItem("model-gateway-token") || "";
let latest = null;
let timer = null;
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ago(t, now) {
  if (!t) return "–";
  const s = Math.max(0, now - t);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

// A small line chart of one column of a series; gaps where there is no value.
function spark(points, column, opts) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark" + (opts && opts.bad ? " bad" : ""));
  svg.setAttribute("viewBox", "0 0 90 22");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const values = points.map((p) => p[column]);
  const max = Math.max(...values.filter((v) => v !== null), (opts && opts.floor) || 0);
  const n = Math.max(points.length - 1, 1);
  const label = [];
  if (opts && opts.bars) {
    values.forEach((v, i) => {
      if (!v) return;
      const r = document.createElementNS(SVG, "rect");
      const h = Math.max(2, (v / max) * 20);
      r.setAttribute("x", String((i / n) * 86));
      r.setAttribute("y", String(21 - h));
      r.setAttribute("width", "3");
      r.setAttribute("height", String(h));
      svg.append(r);
    });
  } else {
    let run = [];
    const flush = () => {
      if (run.length) {
        const line = document.createElementNS(SVG, "polyline");
        line.setAttribute("points", run.join(" "));
        svg.append(line);
      }
      run = [];
    };
    values.forEach((v, i) => {
      if (v === null || v === undefined) { flush(); return; }
      const x = (i / n) * 90;
      const y = max > 0 ? 21 - (v / max) * 20 : 21;
      run.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      if (run.length === 1 && (i === values.length - 1 || values[i + 1] === null)) {
        run.push(`${(x + 1).toFixed(1)},${y.toFixed(1)}`);  // a lone point shows as a dash
      }
    });
    flush();
  }
  label.push(`last ${Math.round(points.length * (latest ? latest.tick : 5) / 60)} min`);
  svg.setAttribute("aria-label", label.join(", "));
  return svg;
}

function last(points, column) {
  for (let i = points.length - 1; i >= 0; i -= 1) {
    if (points[i][column] !== null && points[i][column] !== undefined) return points[i][column];
  }
  return null;
}

function traffic(ep) { return last(ep.series, 1) || 0; }
function errors(ep) { return last(ep.series, 4) || 0; }

function sorted(endpoints) {
  const how = $("sort").value;
  const byName = (a, b) => `${a.name}/${a.alias}`.localeCompare(`${b.name}/${b.alias}`);
  const keys = {
    name: byName,
    state: (a, b) => (STATE_ORDER[a.state] - STATE_ORDER[b.state]) || byName(a, b),
    traffic: (a, b) => (traffic(b) - traffic(a)) || byName(a, b),
    errors: (a, b) => (errors(b) - errors(a)) || byName(a, b),
  };
  return [...endpoints].sort(keys[how] || byName);
}

function matches(ep, words) {
  const text = [ep.name, ep.alias, `${ep.name}/${ep.alias}`, ep.state, STATE_WORDS[ep.state],
    ep.version || "", ep.model_uri || ""].join(" ").toLowerCase();
  return words.every((w) => text.includes(w));
}

function stateCell(ep) {
  const word = STATE_WORDS[ep.state] || ep.state;
  const cell = el("td", { "data-state": ep.state },
    el("span", { class: `state state-${ep.state}`, title: ep.state }, word));
  const r = ep.rollout;
  if (r) {
    const errors = r.new.errors ? `, ${r.new.errors} failed` : "";
    cell.append(el("span", { class: "cutover rollout", title: "rolling out step by step" },
      `rollout of v${r.version}: step ${r.step}/${r.steps.length} · ${r.share} % · ` +
      `${r.new.requests} requests${errors}`));
  } else if (ep.pending_version) {
    cell.append(el("span", { class: "cutover" },
      `cutover to v${ep.pending_version}: ${ep.pending_state || "starting"}`));
  }
  if (ep.rolled_back) {
    cell.append(el("span", { class: "cutover rolled-back", title: ep.rolled_back.reason },
      `v${ep.rolled_back.version} rolled back`));
  }
  if (ep.state === "failed" && ep.retry_in !== null) {
    cell.append(el("span", { class: "cutover" }, `retry in ${ep.retry_in} s`));
  }
  return cell;
}

function batching(b) {
  if (!b) return "";
  const mean = b.mean_batch_size === null ? "–" : b.mean_batch_size.toFixed(1);
  const wait = b.max_wait_ms ? `, wait ${b.max_wait_ms} ms` : "";
  return el("span", { class: "cutover batching", title: "requests per predict call (last 100)" },
    `batches ≤ ${b.max_batch_size}${wait} · mean ${mean}`);
}

function row(ep, now) {
  const s = ep.series;
  const rate = last(s, 1);
  const p50 = last(s, 2);
  const p99 = last(s, 3);
  const err = last(s, 4);
  const version = ep.version ? `v${ep.version}` : "–";
  const tr = el("tr", { "data-endpoint": `${ep.name}/${ep.alias}`, "data-state": ep.state },
    el("td", {}, el("strong", {}, ep.name), " / ", ep.alias),
    stateCell(ep),
    el("td", { class: "version" }, version,
      ep.failed_version ? el("span", { class: "cutover" }, `v${ep.failed_version} failed`) : ""),
    el("td", { class: "muted" }, ep.model_uri || ""),
    el("td", { class: "num" }, el("span", { class: "value" }, rate === null ? "0" : rate.toFixed(1)),
      spark(s, 1, { floor: 1 }), batching(ep.batching)),
    el("td", { class: "num" },
      el("span", { class: "value" }, p50 === null ? "–" : `${p50} / ${p99}`), spark(s, 3)),
    el("td", { class: "num" },
      el("span", { class: "value" }, err === null ? "–" : `${(err * 100).toFixed(1)} %`),
      spark(s, 4, { bad: err > 0, floor: 0.01 })),
    el("td", { class: "num" }, bytes(ep.memory_bytes)),
    el("td", { class: "num" }, ago(ep.last_started, now)),
    el("td", { class: "admin-only error" }, ep.last_error || ""));
  return tr;
}

function drawPool(pool) {
  const full = pool.live_runners >= pool.max_runners;
  $("pool-runners").textContent = `${pool.live_runners} / ${pool.max_runners}`;
  const rb = $("pool-runners-bar");
  rb.style.width = `${Math.min(100, (100 * pool.live_runners) / pool.max_runners)}%`;
  rb.classList.toggle("full", full);
  $("pool-memory").textContent = pool.memory_limit
    ? `${bytes(pool.memory_bytes)} / ${bytes(pool.memory_limit)}` : bytes(pool.memory_bytes);
  const mb = $("pool-memory-bar");
  mb.style.width = pool.memory_limit
    ? `${Math.min(100, (100 * pool.memory_bytes) / pool.memory_limit)}%` : "0";
  const charts = [["pool-starts", 3], ["pool-evictions", 4], ["pool-cutovers", 5]];
  for (const [id, column] of charts) {
    const total = pool.series.reduce((sum, p) => sum + p[column], 0);
    $(id).textContent = pool.series.length ? `${total}` : "–";
    $(`${id}-chart`).replaceChildren(spark(pool.series, column, { bars: true, floor: 1 }));
  }
}

function drawEvents(events) {
  const items = events.slice().reverse().map((e) => el("li", { "data-kind": e.kind },
    el("time", {}, clock(e.t)), el("span", { class: `kind kind-${e.kind}` }, e.kind),
    el("strong", {}, e.endpoint), " ", e.text));
  $("events").replaceChildren(...items);
}

function draw() {
  if (!latest) return;
  const data = latest;
  document.body.classList.toggle("admin", data.role === "admin");
  $("role").textContent = { admin: "admin", caller: "api key", anyone: "" }[data.role] || "";
  drawPool(data.pool);
  const words = $("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = sorted(data.endpoints).filter((ep) => matches(ep, words));
  $("endpoints").tBodies[0].replaceChildren(...shown.map((ep) => row(ep, data.now)));
  $("count").textContent = `${shown.length} of ${data.endpoints.length} endpoints`;
  drawEvents(data.events);
}

function say(text) {
  const m = $("message");
  m.textContent = text;
  m.hidden = !text;
}

async function poll() {
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const answer = await fetch("status/data", { headers, cache: "no-store" });
    if (answer.status === 401) {
      latest = null;
      say(token ? "This token may see no endpoint: enter another one."
        : "This gateway needs a token: enter an api key or an admin token above.");
      $("updated").textContent = "";
    } else if (!answer.ok) {
      say(`The gateway answered ${answer.status}.`);
    } else {
      latest = await answer.json();
      say("");
      draw();
      $("updated").textContent = `updated ${clock(latest.now)}`;
    }
  } catch (err) {
    say("The gateway cannot be reached; retrying.");
  }
  clearTimeout(timer);  // one chain of polls, even when a token change polled at once
  timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token;
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("model-gateway-token", token);
    poll();
  });
  $("forget").addEventListener("click", () => {
    token = "";
    $("token").value = "";
    sessionStorage.removeItem("model-gateway-token");
    latest = null;
    $("endpoints").tBodies[0].replaceChildren();
    poll();
  });
  $("filter").addEventListener("input", draw);
  $("sort").addEventListener("change", draw);
  poll();
});
