// tidings dashboard: polls the broker's JSON API and renders with plain DOM and
// inline SVG. No framework, no build step; everything user-supplied (queue names,
// client names, payloads) goes into the page as text, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const PAGE = 50;
const SERIES = [
  { key: "publish", label: "Publish", color: "var(--publish)" },
  { key: "deliver", label: "Deliver", color: "var(--deliver)" },
  { key: "ack", label: "Ack", color: "var(--ack)" },
  { key: "messages_in", label: "All publishes in", color: "var(--in)" },
  { key: "messages_out", label: "Pub/sub out", color: "var(--out)" },
];

const state = {
  tab: "queues",
  paused: false,
  filter: "",
  sort: "name",
  order: "asc",
  offset: 0,
  connOffset: 0,
  selected: null,
  hidden: new Set(["messages_in", "messages_out"]),
  timer: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function num(n) {
  if (n === null || n === undefined) return "–";
  const a = Math.abs(n);
  if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
  if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
  if (a >= 1e4) return (n / 1e3).toFixed(a >= 1e5 ? 0 : 1) + "k";
  if (Number.isInteger(n)) return n.toLocaleString("en-US");
  return n < 10 ? n.toFixed(1) : Math.round(n).toLocaleString("en-US");
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n >= 100 ? 0 : 1)) + " " + units[i];
}

function duration(s) {
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}

function ago(ms) {
  return duration(Math.max(0, Math.floor((Date.now() - ms) / 1000))) + " ago";
}

async function api(path, options) {
  const res = await fetch(path, Object.assign({ cache: "no-store" }, options));
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (!res.ok) {
    const err = new Error((body && body.error) || res.status + " " + res.statusText);
    err.status = res.status;
    throw err;
  }
  return body;
}

function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

// ------------------------------------------------------------------ overview

function renderOverview(o) {
  setText("version", "v" + o.version);
  setText("uptime", "up " + duration(o.uptime_seconds));
  const ready = $("ready-badge");
  ready.className = "badge " + (o.ready ? "ok" : "bad");
  ready.textContent = o.ready ? "Ready" : "Not ready: " + (o.not_ready_reason || "unknown");
  const storage = $("storage-badge");
  storage.className = "badge " + (o.storage.healthy ? "ok" : "bad");
  storage.textContent = o.storage.healthy ? "Storage healthy" : "Storage failed";
  storage.title = o.storage.failure || "";

  const q = o.queues;
  setText("c-connections", num(o.connections.current));
  setText("c-connections-sub", num(o.connections.total) + " since start");
  setText("c-queues", num(q.count));
  setText("c-queues-sub", num(q.consumers) + " consumers");
  setText("c-depth", num(q.depth));
  setText("c-depth-sub", bytes(q.bytes) + (q.delayed ? " · " + num(q.delayed) + " delayed" : ""));
  setText("c-inflight", num(q.in_flight));
  setText("c-inflight-sub", "delivered, awaiting ack");
  setText("c-dead", num(q.dead_letters));
  $("c-dead").parentElement.classList.toggle("alert", q.dead_letters > 0);
  setText("c-publish", num(q.publish_rate));
  setText("c-deliver", num(q.deliver_rate));
  setText("c-ack", num(q.ack_rate));
  const last = o.history.length ? o.history[o.history.length - 1] : null;
  setText("c-in", last ? num(last.messages_in) + " publishes in/s, all topics" : "");
  setText("c-out", last ? num(last.messages_out) + " pub/sub messages out/s" : "");
  setText("c-slow", o.slow_consumers ? num(o.slow_consumers) + " slow consumers cut off" : "");
  setText("tab-queues-count", num(q.count));
  setText("tab-connections-count", num(o.connections.current));
  renderChart(o.history, o.rate_interval_seconds);
}

function renderLegend() {
  const legend = $("legend");
  legend.replaceChildren(...SERIES.map((s) => {
    const sw = el("span", { class: "swatch" });
    sw.style.background = s.color;
    return el("span", {
      class: "key" + (state.hidden.has(s.key) ? " off" : ""),
      title: "Show or hide",
      onclick: () => {
        if (state.hidden.has(s.key)) state.hidden.delete(s.key); else state.hidden.add(s.key);
        renderLegend();
        if (state.lastHistory) renderChart(state.lastHistory, state.lastInterval);
      },
    }, sw, s.label);
  }));
}

// A round step (1, 2, 2.5 or 5 times a power of ten) of at least `v`.
function niceStep(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function renderChart(history, interval) {
  state.lastHistory = history;
  state.lastInterval = interval;
  const box = $("chart");
  const W = Math.max(box.clientWidth, 300), H = box.clientHeight || 220;
  const pad = { l: 48, r: 12, t: 10, b: 24 };
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": "message rates" });
  const shown = SERIES.filter((s) => !state.hidden.has(s.key));
  const now = history.length ? history[history.length - 1].t : Date.now();
  // Up to ten minutes: a young broker's line fills the width instead of a corner.
  const oldest = history.length ? history[0].t : now;
  const span = Math.min(10 * 60000, Math.max(60000, now - oldest));
  const x = (t) => pad.l + (W - pad.l - pad.r) * (1 - (now - t) / span);
  let max = 0;
  for (const p of history) for (const s of shown) max = Math.max(max, p[s.key]);
  const tick = niceStep(max / 4);
  const top = Math.max(tick, Math.ceil(max / tick) * tick);
  const y = (v) => pad.t + (H - pad.t - pad.b) * (1 - v / top);
  for (let v = 0; v <= top + tick / 2; v += tick) {
    root.append(svg("line", { class: "grid-line", x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v) }));
    const label = svg("text", { class: "axis", x: pad.l - 8, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = num(v);
    root.append(label);
  }
  const step = span > 5 * 60000 ? 120000 : span > 2 * 60000 ? 60000 : 15000;
  for (let back = 0; back <= span; back += step) {
    const label = svg("text", { class: "axis", x: x(now - back), y: H - 6, "text-anchor": back === 0 ? "end" : "middle" });
    label.textContent = back === 0 ? "now" : back % 60000 === 0 ? "-" + back / 60000 + "m" : "-" + back / 1000 + "s";
    root.append(label);
  }
  if (history.length < 2) {
    const t = svg("text", { class: "nodata", x: W / 2, y: H / 2, "text-anchor": "middle" });
    t.textContent = "Collecting samples every " + (interval || 2) + " s…";
    root.append(t);
  }
  for (const s of shown) {
    if (history.length < 2) break;
    const pts = history.map((p) => `${x(p.t).toFixed(1)},${y(p[s.key]).toFixed(1)}`);
    const area = svg("polygon", {
      class: "area",
      points: `${x(history[0].t).toFixed(1)},${y(0)} ${pts.join(" ")} ${x(now).toFixed(1)},${y(0)}`,
      fill: s.color,
    });
    root.append(area);
    root.append(svg("polyline", { class: "series", points: pts.join(" "), stroke: s.color }));
  }
  box.replaceChildren(root);
}

// -------------------------------------------------------------------- queues

function cell(value, cls) {
  return el("td", { class: cls || (value ? "" : "zero"), text: num(value) });
}

function renderQueues(page) {
  const rows = $("queue-rows");
  const maxDepth = Math.max(1, ...page.queues.map((q) => q.depth));
  const out = page.queues.map((q) => {
    const bar = el("span", { class: "bar" }, el("span"));
    bar.firstChild.style.width = Math.round((100 * q.depth) / maxDepth) + "%";
    const isDlq = q.name.endsWith(".dlq");
    const tr = el("tr", {
      class: state.selected === q.name ? "selected" : "",
      dataset: { queue: q.name, publishRate: String(q.rates.publish), depth: String(q.depth) },
      onclick: () => openQueue(q.name),
    },
    el("td", { class: "left" }, el("span", { class: "qname" + (isDlq ? " dlq" : ""), text: q.name, title: q.name })),
    el("td", {}, num(q.depth), bar),
    cell(q.ready),
    cell(q.in_flight),
    cell(q.delayed),
    cell(q.dead_letters, q.dead_letters ? "hot" : "zero"),
    cell(q.consumers),
    cell(q.rates.publish, q.rates.publish ? "rate accent-publish" : "zero"),
    cell(q.rates.deliver, q.rates.deliver ? "rate accent-deliver" : "zero"),
    cell(q.rates.ack, q.rates.ack ? "rate accent-ack" : "zero"));
    return tr;
  });
  rows.replaceChildren(...out);
  $("queue-empty").hidden = page.total !== 0;
  for (const th of document.querySelectorAll("#queue-table th[data-sort]")) {
    th.classList.toggle("sorted", th.dataset.sort === state.sort);
    th.classList.toggle("asc", th.dataset.sort === state.sort && state.order === "asc");
  }
  pager($("queue-pager"), page.offset, page.queues.length, page.matched,
    page.matched === page.total ? "queues" : `of ${num(page.total)} queues match`,
    (offset) => { state.offset = offset; refresh(); });
}

function pager(node, offset, shown, total, noun, go) {
  const from = total ? offset + 1 : 0;
  node.replaceChildren(
    el("span", { text: `${num(from)}–${num(offset + shown)} of ${num(total)} ${noun}` }),
    el("button", { type: "button", class: "ghost", disabled: offset === 0 ? "" : null, onclick: () => go(Math.max(0, offset - PAGE)), text: "‹ Prev" }),
    el("button", { type: "button", class: "ghost", disabled: offset + shown >= total ? "" : null, onclick: () => go(offset + PAGE), text: "Next ›" }),
  );
}

// --------------------------------------------------------------- connections

function renderConnections(page) {
  const rows = page.connections.map((c) => el("tr", { dataset: { connection: String(c.id) } },
    el("td", { class: "left" }, el("b", { text: c.client_name || "(unnamed)" }), el("span", { class: "muted small", text: "  #" + c.id })),
    el("td", { class: "left muted", text: c.peer }),
    el("td", { class: "left", text: c.user || "–" }),
    el("td", { text: num(c.subscription_count), title: (c.subscriptions || []).map((s) => s.pattern + (s.group ? " [" + s.group + "]" : "")).join("\n") }),
    el("td", { class: c.pending_bytes > 1048576 ? "hot" : "", text: bytes(c.pending_bytes) }),
    cell(c.messages_in),
    cell(c.messages_out),
    el("td", { class: "muted", text: ago(c.connected_ms) }),
    el("td", {}, el("button", { type: "button", class: "ghost close-conn", text: "Close", onclick: (e) => { e.stopPropagation(); closeConnection(c); } })),
  ));
  $("conn-rows").replaceChildren(...rows);
  $("conn-empty").hidden = page.total !== 0;
  setText("conn-summary", num(page.total) + " live connections");
  pager($("conn-pager"), page.offset, page.connections.length, page.total, "connections",
    (offset) => { state.connOffset = offset; refresh(); });
}

// -------------------------------------------------------------- queue drawer

function kv(node, pairs) {
  node.replaceChildren(...pairs.map(([k, v]) => el("div", {}, el("div", { class: "k", text: k }), el("div", { class: "v", text: v }))));
}

function ms(v) {
  if (v === null || v === undefined) return "–";
  if (v % 3600000 === 0 && v) return v / 3600000 + " h";
  if (v % 60000 === 0 && v) return v / 60000 + " min";
  if (v % 1000 === 0 && v) return v / 1000 + " s";
  return v + " ms";
}

function renderMessages(node, page, dead) {
  if (!page.messages.length) {
    node.replaceChildren(el("p", { class: "muted small", text: dead ? "No dead letters." : "No stored messages." }));
    return;
  }
  node.replaceChildren(...page.messages.map((m) => el("div", { class: "msg" },
    el("div", { class: "meta" },
      el("span", {}, "#", el("b", { text: String(m.id) })),
      el("span", {}, "topic ", el("b", { text: m.topic })),
      m.reason ? el("span", { class: "reason", text: m.reason + " after " + m.attempts + " attempts" }) : el("span", { text: "deliveries " + m.deliveries }),
      el("span", { text: bytes(m.payload_bytes) }),
      el("span", { text: new Date(m.published_ms).toLocaleString() }),
      m.message_id ? el("span", {}, "id ", el("b", { text: m.message_id })) : null,
      m.headers.length ? el("span", { text: m.headers.map(([k, v]) => k + "=" + v).join("  ") }) : null),
    el("pre", { text: (m.payload_utf8 ? m.payload_preview : "(binary) " + m.payload_preview) + (m.payload_truncated ? " …" : "") }))));
}

async function openQueue(name) {
  state.selected = name;
  history.replaceState(null, "", "#queue=" + encodeURIComponent(name));
  $("drawer").hidden = false;
  setText("d-name", name);
  $("d-notice").hidden = true;
  for (const tr of document.querySelectorAll("#queue-rows tr")) tr.classList.toggle("selected", tr.dataset.queue === name);
  await refreshDrawer();
}

async function refreshDrawer() {
  const name = state.selected;
  if (!name) return;
  const enc = encodeURIComponent(name);
  try {
    const [q, msgs, dead] = await Promise.all([
      api(`/api/queues/${enc}`),
      api(`/api/queues/${enc}/messages?limit=20`),
      api(`/api/queues/${enc}/dead-letters?limit=20`),
    ]);
    if (state.selected !== name) return;
    kv($("d-figures"), [
      ["Depth", num(q.depth)], ["Ready", num(q.ready)], ["In flight", num(q.in_flight)],
      ["Delayed", num(q.delayed)], ["Bytes", bytes(q.bytes)], ["Dead letters", num(q.dead_letters)],
      ["Publish/s", num(q.rates.publish)], ["Deliver/s", num(q.rates.deliver)], ["Ack/s", num(q.rates.ack)],
      ["Published", num(q.published)], ["Delivered", num(q.delivered)], ["Acked", num(q.acked)],
      ["Redelivered", num(q.redelivered)], ["Expired", num(q.expired)], ["Rejected", num(q.rejected)],
    ]);
    const o = q.options;
    kv($("d-options"), [
      ["Bindings", q.bindings.join(", ") || "–"], ["Max deliveries", String(o.max_deliveries)], ["Ack timeout", ms(o.ack_timeout_ms)],
      ["Backoff", o.backoff_ms.length ? o.backoff_ms.map(ms).join(", ") : "none"], ["Max length", o.max_length === null ? "unlimited" : num(o.max_length)],
      ["Max bytes", o.max_bytes === null ? "unlimited" : bytes(o.max_bytes)], ["Overflow", o.overflow], ["TTL", o.ttl_ms === null ? "none" : ms(o.ttl_ms)],
      ["Dead-letter queue", o.dead_letter],
    ]);
    const consumers = q.consumer_list;
    $("d-consumers").replaceChildren(consumers.length
      ? el("table", { class: "grid" },
        el("thead", {}, el("tr", {}, el("th", { class: "left", text: "Client" }), el("th", { class: "left", text: "Address" }), el("th", { class: "left", text: "User" }), el("th", { text: "Unacked" }), el("th", { text: "Prefetch" }))),
        el("tbody", {}, ...consumers.map((c) => el("tr", {},
          el("td", { class: "left", text: c.connection ? c.connection.client_name + " #" + c.connection.id : "consumer " + c.consumer_id }),
          el("td", { class: "left muted", text: c.connection ? c.connection.peer : "–" }),
          el("td", { class: "left", text: (c.connection && c.connection.user) || "–" }),
          cell(c.unacked), cell(c.window)))))
      : el("p", { class: "muted small", text: "No consumer is attached." }));
    renderMessages($("d-messages"), msgs, false);
    setText("d-dlq-name", "from " + dead.read_from);
    renderMessages($("d-dead"), dead, true);
  } catch (err) {
    if (err.status === 404) closeDrawer();
    else notice(err.message, true);
  }
}

function closeDrawer() {
  state.selected = null;
  history.replaceState(null, "", location.pathname + location.search);
  $("drawer").hidden = true;
  for (const tr of document.querySelectorAll("#queue-rows tr.selected")) tr.classList.remove("selected");
}

function notice(text, bad) {
  const n = $("d-notice");
  n.hidden = false;
  n.className = "notice" + (bad ? " bad" : "");
  n.textContent = text;
}

// ------------------------------------------------------------------- actions

function adminToken(again) {
  let token = sessionStorage.getItem("tidings-admin-token");
  if (!token || again) {
    token = window.prompt("Admin token (--http-admin-token), or user:password of a broker user:", "");
    if (!token) return null;
    sessionStorage.setItem("tidings-admin-token", token);
  }
  return token;
}

async function admin(path) {
  for (const again of [false, true]) {
    const token = adminToken(again);
    if (!token) throw new Error("no admin token given");
    try {
      // "user:password" logs in as a configured user; anything else is the admin token.
      const auth = token.includes(":") ? "Basic " + btoa(token) : "Bearer " + token;
      return await api(path, { method: "POST", headers: { Authorization: auth } });
    } catch (err) {
      if (err.status === 401 && !again) { sessionStorage.removeItem("tidings-admin-token"); continue; }
      throw err;
    }
  }
  throw new Error("unauthorized");
}

async function queueAction(action) {
  const name = state.selected;
  if (!name) return;
  const what = { redrive: "Move all dead letters of", purge: "Remove every ready message of", delete: "Delete, with all its messages,"}[action];
  if (!window.confirm(`${what} queue “${name}”?`)) return;
  try {
    const r = await admin(`/api/queues/${encodeURIComponent(name)}/${action}`);
    if (action === "delete") { closeDrawer(); refresh(); return; }
    notice(action === "purge" ? `Purged ${num(r.purged)} messages.` : `Redrove ${num(r.moved)} dead letters.`, false);
    refresh();
  } catch (err) {
    notice(err.message, true);
  }
}

async function closeConnection(c) {
  if (!window.confirm(`Close connection #${c.id} (${c.client_name || c.peer})?`)) return;
  try { await admin(`/api/connections/${c.id}/close`); refresh(); } catch (err) { window.alert(err.message); }
}

// ------------------------------------------------------------------- refresh

async function refresh() {
  clearTimeout(state.timer);
  try {
    const overview = api("/api/overview");
    let list;
    if (state.tab === "queues") {
      const q = new URLSearchParams({ offset: state.offset, limit: PAGE, sort: state.sort, order: state.order, filter: state.filter });
      list = api("/api/queues?" + q);
    } else {
      list = api(`/api/connections?offset=${state.connOffset}&limit=${PAGE}`);
    }
    const [o, page] = await Promise.all([overview, list]);
    renderOverview(o);
    if (state.tab === "queues") renderQueues(page); else renderConnections(page);
    if (state.selected) refreshDrawer();
    setText("refreshed", "updated " + new Date().toLocaleTimeString());
  } catch (err) {
    const badge = $("ready-badge");
    badge.className = "badge bad";
    badge.textContent = "Broker unreachable";
    setText("refreshed", err.message);
  }
  if (!state.paused) state.timer = setTimeout(refresh, REFRESH_MS);
}

function showTab(name) {
  state.tab = name;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.tab === name);
  $("panel-queues").hidden = name !== "queues";
  $("panel-connections").hidden = name !== "connections";
  if (name === "connections") history.replaceState(null, "", "#connections");
  else if (location.hash === "#connections") history.replaceState(null, "", location.pathname + location.search);
}

function init() {
  renderLegend();
  for (const th of document.querySelectorAll("#queue-table th[data-sort]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      if (state.sort === key) state.order = state.order === "asc" ? "desc" : "asc";
      else { state.sort = key; state.order = key === "name" ? "asc" : "desc"; }
      state.offset = 0;
      refresh();
    });
  }
  let debounce = null;
  $("queue-filter").addEventListener("input", (e) => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { state.filter = e.target.value.trim(); state.offset = 0; refresh(); }, 200);
  });
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => { showTab(tab.dataset.tab); refresh(); });
  }
  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    if (!state.paused) refresh(); else clearTimeout(state.timer);
  });
  $("d-close").addEventListener("click", closeDrawer);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDrawer(); });
  for (const b of document.querySelectorAll("[data-action]")) b.addEventListener("click", () => queueAction(b.dataset.action));
  window.addEventListener("resize", () => { if (state.lastHistory) renderChart(state.lastHistory, state.lastInterval); });
  // A link to a queue (#queue=NAME) opens its drawer.
  const linked = location.hash.startsWith("#queue=") ? decodeURIComponent(location.hash.slice(7)) : null;
  if (linked) openQueue(linked);
  if (location.hash === "#connections") showTab("connections");
  refresh();
}

init();
