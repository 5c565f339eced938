/* llmobserve dashboard: reads /api/* of the same origin and draws the
 * overview, the calls list, a call's detail and a run's timeline. Every view
 * and window lives in the address (shareable); live mode polls every 3 s.
 * Values from applications are only ever set as text, never as markup.
 */
"use strict";
(function () {
  const main = document.getElementById("main");
  const POLL_MS = 3000;
  const PAGE = 50;
  const DEFAULT_SINCE = "24h";
  const BREAKDOWNS = [
    ["customer", "customer", "customer"],
    ["tenant", "tenant", "tenant"],
    ["section", "section_path", "section_path"],
    ["model", "model", "model"],
    ["provider", "provider", "provider"],
    ["endpoint", "endpoint", "endpoint"],
  ];
  const CALL_FILTERS = [
    ["provider", "provider"], ["model", "model"], ["customer", "customer"],
    ["tenant", "tenant"], ["section_path", "section"], ["endpoint", "endpoint"],
    ["status", "status"], ["outcome", "outcome"], ["usage_source", "usage"], ["run", "run"],
  ];
  const sortState = {};
  let leaving = false; // on the way to the login page
  let refresh = null; // the current view's live update, if it has one
  let generation = 0; // bumped on every navigation: late answers are dropped

  // ---- formatting ----
  function usd(v) {
    if (v === null || v === undefined) return "unknown";
    const a = Math.abs(v);
    if (a === 0) return "$0.00";
    if (a >= 1) {
      return "$" + v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    }
    const digits = Math.min(12, 2 - Math.floor(Math.log10(a)));
    return "$" + v.toFixed(digits);
  }
  /** A chart axis's money: two significant digits, no trailing zeros. */
  function usdTick(v) {
    if (!(v > 0)) return "$0";
    if (v >= 1) return usd(v);
    const digits = Math.min(12, 1 - Math.floor(Math.log10(v)));
    return "$" + Number(v.toPrecision(2)).toFixed(digits).replace(/0+$/, "").replace(/\.$/, "");
  }
  const int = (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US"));
  const pct = (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(v && v < 0.001 ? 3 : 1) + " %");
  function ms(v) {
    if (v === null || v === undefined) return "–";
    return v >= 1000 ? (v / 1000).toFixed(2) + " s" : Math.round(v).toLocaleString("en-US") + " ms";
  }
  function when(ts) {
    if (ts === null || ts === undefined) return "–";
    const d = new Date(ts * 1000);
    if (isNaN(d.getTime())) return String(ts);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
      `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  // ---- DOM ----
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const k in attrs || {}) {
      const v = attrs[k];
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }
  const link = (href, text, attrs) => h("a", Object.assign({ href, "data-link": "" }, attrs || {}), text);

  // ---- address ----
  const query = () => new URLSearchParams(location.search);
  function windowParams() {
    const q = query();
    const out = new URLSearchParams();
    out.set("since", q.get("since") || DEFAULT_SINCE);
    if (q.get("until")) out.set("until", q.get("until"));
    return out;
  }
  function href(view, extra) {
    const p = windowParams();
    if (view && view !== "overview") p.set("view", view);
    for (const k in extra || {}) if (extra[k] !== null && extra[k] !== undefined && extra[k] !== "") p.set(k, extra[k]);
    return "/dashboard?" + p.toString();
  }
  function navigate(url, replace) {
    if (replace) history.replaceState(null, "", url);
    else history.pushState(null, "", url);
    route();
  }

  // ---- API ----
  async function api(path, params) {
    const url = path + (params ? "?" + params.toString() : "");
    const response = await fetch(url, { headers: { accept: "application/json" } });
    const body = await response.json().catch(() => null);
    if (response.status === 401 && !document.getElementById("logout").hidden && !leaving) {
      leaving = true;  // once: the view's parallel calls all see the 401
      location.assign("/dashboard/login");  // the session ended (expired, revoked, logged out)
    }
    if (!response.ok) {
      const message = body && body.error ? body.error.message : response.statusText;
      const err = new Error(message);
      err.status = response.status;
      throw err;
    }
    return body;
  }
  function apiParams(extra) {
    const p = windowParams();
    for (const k in extra || {}) if (extra[k] !== null && extra[k] !== undefined && extra[k] !== "") p.set(k, extra[k]);
    return p;
  }
  function showError(target, err) {
    target.replaceChildren(h("p", { class: "error-box", role: "alert" }, err.message || String(err)));
  }
  function stamp() {
    document.getElementById("updated").textContent = "updated " + when(Date.now() / 1000).slice(11);
  }

  // ---- sortable table ----
  function table(key, columns, rows, rowLink) {
    const state = sortState[key] || { col: null, dir: -1 };
    const sorted = rows.slice();
    if (state.col !== null) {
      const c = columns[state.col];
      sorted.sort((a, b) => {
        const x = c.value(a), y = c.value(b);
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * state.dir;
      });
    }
    const head = h("tr", {}, columns.map((c, i) => h("th", {
      class: ["sortable", c.num ? "num" : "", c.narrow ? "hide-narrow" : "",
        state.col === i ? (state.dir > 0 ? "sorted-asc" : "sorted-desc") : ""].join(" ").trim(),
      scope: "col",
      onclick: () => {
        sortState[key] = { col: i, dir: state.col === i ? -state.dir : (c.num ? -1 : 1) };
        holder.replaceWith(table(key, columns, rows, rowLink));
      },
    }, c.title)));
    const body = sorted.length ? sorted.map((r) => h("tr", rowLink ? { class: "clickable", "data-href": rowLink(r) } : {},
      columns.map((c) => {
        const v = c.value(r);
        const shown = c.show ? c.show(v, r) : v;
        return h("td", { class: [c.num ? "num" : "", v === null || v === undefined ? "none" : "",
          c.narrow ? "hide-narrow" : ""].join(" ").trim() || null }, shown === null || shown === undefined ? "–" : shown);
      }))) : [h("tr", {}, h("td", { colspan: columns.length, class: "none" }, "no calls in this window"))];
    const holder = h("table", { "data-table": key }, h("thead", {}, head), h("tbody", {}, body));
    return holder;
  }
  document.addEventListener("click", (e) => {
    const a = e.target.closest("a[data-link]");
    if (a && !e.ctrlKey && !e.metaKey && !e.shiftKey && e.button === 0) {
      e.preventDefault();
      navigate(a.getAttribute("href"));
      return;
    }
    const tr = e.target.closest("tr[data-href]");
    if (tr && !e.target.closest("a")) navigate(tr.getAttribute("data-href"));
  });

  // ---- overview ----
  function card(id, label, value, raw, sub) {
    return h("div", { class: "card" }, h("div", { class: "label" }, label),
      h("div", { class: "value", id, "data-value": raw === null || raw === undefined ? "" : String(raw) }, value),
      sub ? h("div", { class: "sub", title: sub }, sub) : null);
  }
  function sectionTree(rows) {
    const nodes = new Map();
    for (const r of rows) {
      if (r.section_path === null || r.section_path === undefined) {
        nodes.set("\u0000none", Object.assign({ path: null, depth: 0, name: "(no section)" }, sums(r)));
        continue;
      }
      const parts = r.section_path.split("/");
      for (let i = 1; i <= parts.length; i++) {
        const path = parts.slice(0, i).join("/");
        const node = nodes.get(path) || { path, depth: i - 1, name: parts[i - 1], calls: 0, cost_usd: null,
          unpriced_calls: 0, input_tokens: 0, output_tokens: 0 };
        add(node, r);
        nodes.set(path, node);
      }
    }
    const children = (prefix, depth) => [...nodes.values()]
      .filter((n) => n.path !== null && n.depth === depth && (depth === 0 || n.path.startsWith(prefix + "/")))
      .sort((a, b) => (b.cost_usd || 0) - (a.cost_usd || 0) || b.calls - a.calls);
    const out = [];
    const walk = (prefix, depth) => {
      for (const n of children(prefix, depth)) { out.push(n); walk(n.path, depth + 1); }
    };
    walk("", 0);
    if (nodes.has("\u0000none")) out.push(nodes.get("\u0000none"));
    return out;
  }
  function sums(r) {
    return { calls: r.calls, cost_usd: r.cost_usd, unpriced_calls: r.unpriced_calls,
      input_tokens: r.input_tokens, output_tokens: r.output_tokens };
  }
  function add(node, r) {
    node.calls += r.calls;
    if (r.cost_usd !== null) node.cost_usd = (node.cost_usd || 0) + r.cost_usd;
    node.unpriced_calls += r.unpriced_calls;
    node.input_tokens += r.input_tokens;
    node.output_tokens += r.output_tokens;
  }
  const MONEY_COLUMNS = [
    { title: "calls", num: true, value: (r) => r.calls, show: int },
    { title: "cost", num: true, value: (r) => r.cost_usd, show: usd },
    { title: "unpriced", num: true, value: (r) => r.unpriced_calls, show: int, narrow: true },
    { title: "tokens in", num: true, value: (r) => r.input_tokens, show: int, narrow: true },
    { title: "tokens out", num: true, value: (r) => r.output_tokens, show: int, narrow: true },
  ];

  function overview() {
    const q = query();
    const by = q.get("by") === "model" ? "model" : "provider";
    const metric = q.get("metric") === "calls" ? "calls" : "cost";
    const group = BREAKDOWNS.find((b) => b[0] === q.get("group")) || BREAKDOWNS[0];
    const cards = h("div", { class: "cards", id: "summary" });
    const chart = h("div", { class: "chart", id: "chart" });
    const breakdown = h("div", { id: "breakdown" });
    const setParam = (k, v) => { const p = query(); p.set(k, v); navigate("/dashboard?" + p.toString(), true); };
    const tab = (label, active, onclick, id) => h("button", { type: "button", class: active ? "active" : null, onclick, id }, label);
    main.replaceChildren(
      h("h1", {}, "Overview"), cards,
      h("section", { class: "panel" },
        h("h2", {}, metric === "cost" ? "Cost over time" : "Calls over time"),
        h("div", { class: "tabs" },
          tab("cost", metric === "cost", () => setParam("metric", "cost"), "metric-cost"),
          tab("calls", metric === "calls", () => setParam("metric", "calls"), "metric-calls"),
          h("span", { class: "muted" }, " by "),
          tab("provider", by === "provider", () => setParam("by", "provider"), "by-provider"),
          tab("model", by === "model", () => setParam("by", "model"), "by-model")),
        chart),
      h("section", { class: "panel" },
        h("h2", {}, "Breakdown"),
        h("div", { class: "tabs" }, BREAKDOWNS.map((b) =>
          tab(b[0], b === group, () => setParam("group", b[0]), "group-" + b[0]))),
        breakdown));
    async function update() {
      const [summary, series, report] = await Promise.all([
        api("/api/summary", apiParams()),
        api("/api/timeseries", apiParams({ by })),
        api("/api/report", apiParams({ by: group[1] })),
      ]);
      const reasons = summary.unpriced_reasons.map((r) => `${r.reason ?? "no reason"} (${int(r.calls)})`).join("; ");
      cards.replaceChildren(
        card("total-cost", "cost", usd(summary.cost_usd), summary.cost_usd),
        card("total-calls", "calls", int(summary.calls), summary.calls,
          summary.refused_calls ? `${int(summary.refused_calls)} refused, not forwarded` : null),
        card("tokens-in", "tokens in", int(summary.input_tokens), summary.input_tokens),
        card("tokens-out", "tokens out", int(summary.output_tokens), summary.output_tokens),
        card("error-rate", "error rate", pct(summary.error_rate), summary.error_rate, `${int(summary.errors)} errors`),
        card("unpriced-share", "cost unknown", pct(summary.unpriced_share), summary.unpriced_share,
          summary.unpriced_calls ? reasons : "every call priced"),
        card("latency-p50", "latency p50", ms(summary.latency_ms.p50), summary.latency_ms.p50),
        card("latency-p95", "latency p95", ms(summary.latency_ms.p95), summary.latency_ms.p95));
      const data = { starts: series.starts, bucket: series.bucket, series: series.series.map((s) => ({
        name: s.name, values: metric === "cost" ? s.cost_usd : s.calls })) };
      if (data.series.length) window.StackedBars.draw(chart, data, metric === "cost" ? usd : int, metric === "cost" ? usdTick : int);
      else chart.replaceChildren(h("p", { class: "muted" }, "no calls in this window"));
      const rows = group[0] === "section" ? sectionTree(report.rows) : report.rows;
      const first = {
        title: group[0], value: (r) => (group[0] === "section" ? r.path : r[group[1]]),
        show: (v, r) => {
          const label = group[0] === "section" ? r.name : v;
          const text = label === null || label === undefined ? "(none)" : label;
          const cell = v === null || v === undefined ? text : link(href("calls", { [group[2]]: v }), text);
          return group[0] === "section" ? h("span", { class: "tree-" + Math.min(r.depth, 4) }, cell) : cell;
        },
      };
      const holder = table("breakdown-" + group[0], [first, ...MONEY_COLUMNS], rows,
        (r) => { const v = group[0] === "section" ? r.path : r[group[1]];
          return v === null || v === undefined ? null : href("calls", { [group[2]]: v }); });
      breakdown.replaceChildren(holder);
      holder.querySelectorAll("tr[data-href='null']").forEach((tr) => tr.removeAttribute("data-href"));
    }
    return update;
  }

  // ---- calls ----
  function calls() {
    const q = query();
    const offset = Math.max(0, parseInt(q.get("offset") || "0", 10) || 0);
    const filters = {};
    for (const [name] of CALL_FILTERS) filters[name] = q.get(name) || "";
    const form = h("form", { class: "filters", id: "filters" }, CALL_FILTERS.map(([name, label]) =>
      h("label", {}, label, h("input", { name, value: filters[name], type: "search", autocomplete: "off" }))));
    form.addEventListener("change", () => {
      const p = windowParams();
      p.set("view", "calls");
      for (const input of form.querySelectorAll("input")) if (input.value.trim()) p.set(input.name, input.value.trim());
      navigate("/dashboard?" + p.toString(), true);
    });
    form.addEventListener("submit", (e) => { e.preventDefault(); form.dispatchEvent(new Event("change")); });
    const list = h("div", { id: "calls" });
    const pager = h("div", { class: "pager" });
    main.replaceChildren(h("h1", {}, "Calls"), h("section", { class: "panel" }, form, list, pager));
    const page = (o) => { const p = query(); p.set("offset", String(Math.max(0, o))); return "/dashboard?" + p.toString(); };
    const columns = [
      { title: "time", value: (e) => e.ts, show: (v, e) => link(href("call", { id: e.id }), when(v)) },
      { title: "provider", value: (e) => e.provider },
      { title: "model", value: (e) => e.model },
      { title: "customer", value: (e) => (e.context || {}).customer_id ?? null, narrow: true },
      { title: "section", value: (e) => (e.context || {}).section_path ?? (e.context || {}).section ?? null, narrow: true },
      { title: "tokens in", num: true, value: (e) => (e.usage || {}).input_tokens ?? null, show: int, narrow: true },
      { title: "tokens out", num: true, value: (e) => (e.usage || {}).output_tokens ?? null, show: int, narrow: true },
      { title: "cost", num: true, value: (e) => e.cost_usd, show: usd },
      { title: "status", num: true, value: (e) => e.status,
        show: (v, e) => h("span", { class: (v >= 400 || (e.outcome && e.outcome !== "ok")) ? "bad" : null },
          `${v ?? "–"}${e.outcome && e.outcome !== "ok" ? " " + e.outcome : ""}`) },
      { title: "latency", num: true, value: (e) => e.duration_ms, show: ms },
      { title: "usage", value: (e) => e.usage_source, narrow: true },
    ];
    async function update() {
      const body = await api("/api/events", apiParams(Object.assign({ kind: "call", order: "desc", limit: PAGE, offset }, filters)));
      list.replaceChildren(table("calls", columns, body.events, (e) => href("call", { id: e.id })));
      pager.replaceChildren(
        offset > 0 ? link(page(offset - PAGE), "← newer", { id: "newer" }) : null,
        h("span", { class: "muted" }, body.count ? `calls ${int(offset + 1)}–${int(offset + body.count)}` : "no calls"),
        body.count === PAGE ? link(page(offset + PAGE), "older →", { id: "older" }) : null);
    }
    return update;
  }

  // ---- one call ----
  function call() {
    const id = query().get("id") || "";
    main.replaceChildren(h("h1", {}, "Call"), h("p", { class: "loading" }, "Loading…"));
    api("/api/events/" + encodeURIComponent(id)).then(({ event }) => {
      const ctx = event.context || {};
      const fields = h("dl", { class: "fields", id: "call-fields" });
      for (const k of Object.keys(event)) {
        const v = event[k];
        let shown;
        if (v !== null && typeof v === "object") shown = h("pre", {}, JSON.stringify(v, null, 2));
        else if (k === "ts") shown = `${when(v)} (${v})`;
        else if (k === "cost_usd") shown = `${usd(v)}${v === null ? "" : " (" + v + ")"}`;
        else shown = v === null ? "–" : String(v);
        fields.append(h("dt", {}, k), h("dd", { "data-field": k }, shown));
      }
      main.replaceChildren(
        h("h1", {}, `Call ${event.provider ?? ""} ${event.model ?? ""}`.trim()),
        h("p", {}, when(event.ts), " · ", h("b", { id: "call-cost" }, usd(event.cost_usd)),
          ctx.run_id ? [" · ", link(href("run", { run: ctx.run_id }), "run " + ctx.run_id, { id: "run-link" })] : null,
          ctx.customer_id ? [" · ", link(href("calls", { customer: ctx.customer_id }), "calls of " + ctx.customer_id)] : null),
        h("section", { class: "panel" }, fields));
    }).catch((err) => showError(main, err));
    return null;
  }

  // ---- one run ----
  function runView() {
    const runId = query().get("run") || "";
    const head = h("div", { id: "run-head" });
    const timeline = h("div", { class: "timeline", id: "timeline" });
    main.replaceChildren(h("h1", {}, "Run " + runId), head, h("section", { class: "panel" }, timeline));
    async function update() {
      const run = await api("/api/runs/" + encodeURIComponent(runId));
      const start = run.start, span = Math.max(1e-3, (run.end ?? start) - start);
      head.replaceChildren(h("div", { class: "cards" },
        card("run-cost", "run cost", usd(run.cost_usd), run.cost_usd),
        card("run-calls", "calls", int(run.calls), run.calls),
        card("run-duration", "duration", ms(span * 1000), span),
        card("run-start", "started", when(start), start)));
      timeline.replaceChildren(...run.events.map((e) => {
        const left = ((e.ts - start) / span) * 100;
        const width = (((e.duration_ms || 0) / 1000) / span) * 100;
        const bar = h("div", { class: "tl-bar" + (e.kind === "call" ? "" : " span"),
          title: `${e.kind} ${ms(e.duration_ms)}` });
        bar.style.left = Math.min(100, Math.max(0, left)) + "%";
        bar.style.width = Math.min(100 - Math.min(100, left), Math.max(0, width)) + "%";
        const ctx = e.context || {};
        const label = e.kind === "call"
          ? link(href("call", { id: e.id }), `${ctx.section_path ?? ctx.section ?? e.provider ?? "?"} · ${e.model ?? ""} · ${usd(e.cost_usd)}`, { title: `${e.provider ?? ""} ${e.model ?? ""}` })
          : `${e.kind} ${e.name ?? ctx.section_path ?? e.section_path ?? e.section ?? ""}`;
        return h("div", { class: "tl-row" }, h("div", { class: "tl-label" }, label), h("div", { class: "tl-track" }, bar));
      }));
    }
    return update;
  }

  // ---- router ----
  function markWindow() {
    const q = query();
    const since = q.get("since") || DEFAULT_SINCE;
    const custom = !!q.get("until") || !["1h", "24h", "7d", "30d"].includes(since);
    for (const b of document.querySelectorAll("#window button[data-since]")) {
      b.classList.toggle("active", custom ? b.dataset.since === "custom" : b.dataset.since === since);
    }
    document.getElementById("custom").hidden = !custom;
    const view = q.get("view") || "overview";
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === view);
    for (const a of document.querySelectorAll("[data-nav]")) {
      a.setAttribute("href", href(a.dataset.nav === "overview" ? null : a.dataset.nav));
      a.setAttribute("data-link", "");
    }
  }
  async function run(update) {
    const mine = generation;
    try {
      await update();
      if (mine === generation) stamp();
    } catch (err) {
      if (mine === generation) showError(main, err);
    }
  }
  function route() {
    generation += 1;
    markWindow();
    const view = query().get("view") || "overview";
    const make = { overview, calls, call, run: runView }[view] || overview;
    refresh = make();
    if (refresh) run(refresh);
  }

  document.getElementById("window").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-since]");
    if (!b) return;
    if (b.dataset.since === "custom") {
      document.getElementById("custom").hidden = false;
      return;
    }
    const p = query();
    p.set("since", b.dataset.since);
    p.delete("until");
    p.delete("offset");
    navigate("/dashboard?" + p.toString());
  });
  document.getElementById("custom").addEventListener("submit", (e) => {
    e.preventDefault();
    const form = e.target;
    const p = query();
    const iso = (v) => (v ? new Date(v).toISOString().replace(/\.\d+Z$/, "Z") : "");
    if (form.since.value) p.set("since", iso(form.since.value));
    if (form.until.value) p.set("until", iso(form.until.value)); else p.delete("until");
    p.delete("offset");
    navigate("/dashboard?" + p.toString());
  });
  window.addEventListener("popstate", route);
  setInterval(() => {
    if (refresh && document.getElementById("live").checked && !document.hidden) run(refresh);
  }, POLL_MS);
  route();
})();
