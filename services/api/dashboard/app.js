// The cotune dashboard: plain JS, no build step, no external sources.
// Routes live in the URL fragment: #/jobs (the list) and #/jobs/<id> (a job). A key may also
// come in the fragment (#key=<key>&/jobs/<id>): it is stored in localStorage and taken out of
// the URL at once. Every request sends it as "Authorization: Bearer <key>".
// Data only ever reaches the DOM as text nodes or attribute values, never as markup.
"use strict";

(() => {
  const KEY_STORE = "cotune.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const SVG_NS = "http://www.w3.org/2000/svg";
  let apiKey = localStorage.getItem(KEY_STORE) || "";
  let viewAbort = null;

  // -- DOM helpers ------------------------------------------------------------------------------

  function build(node, attrs, children) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) node.append(c);
    return node; // append() turns strings into text nodes: nothing is parsed as HTML
  }
  const el = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
  const svg = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);

  const fmt = (x) => (x === null || x === undefined ? "—" : Number(x).toFixed(3));
  const pct = (x) => (x === null || x === undefined ? "—" : `${(x * 100).toFixed(0)}%`);
  const text = (v) => (v === null || v === undefined ? "—" : typeof v === "string" ? v : JSON.stringify(v, null, 2));
  const date = (s) => (s ? new Date(s * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "—");
  const badge = (status) => el("span", { class: `badge status-${String(status).replace(/[^a-z_]/g, "")}` }, String(status));
  const passBadge = (passed) =>
    passed === null || passed === undefined ? el("span", { class: "badge" }, "unscored")
      : el("span", { class: `badge ${passed ? "pass" : "fail"}` }, passed ? "passed" : "failed");
  const dl = (pairs) => el("dl", { class: "facts" }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const table = (attrs, heads, rows) =>
    el("table", attrs, el("thead", {}, el("tr", {}, heads.map((h) => el("th", {}, h)))), el("tbody", {}, rows));

  // -- the API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options = {}) {
    if (!apiKey) throw new ApiError(401, "no API key: paste one in the field above");
    const headers = { ...(options.headers || {}), Authorization: `Bearer ${apiKey}` };
    const res = await fetch(path, { ...options, headers, cache: "no-store" });
    if (res.ok) return res;
    let message = `${res.status} ${res.statusText}`;
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(res.status, message);
  }

  const getJSON = async (path, signal) => (await api(path, { signal })).json();
  const isAbort = (err) => err && err.name === "AbortError";
  const describe = (err) => (err.status ? `HTTP ${err.status}: ${err.message}` : String(err.message || err));

  function showError(err) {
    if (isAbort(err)) return;
    const box = document.getElementById("error");
    box.textContent = describe(err);
    if (err.status === 401) document.getElementById("key-input").focus();
    box.hidden = false;
  }

  function sectionError(section, err) {
    if (!isAbort(err)) section.append(el("p", { class: "error" }, describe(err)));
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
    });
  }

  // -- key and routing --------------------------------------------------------------------------

  function saveKey(value) {
    apiKey = value.trim();
    if (apiKey) localStorage.setItem(KEY_STORE, apiKey);
    else localStorage.removeItem(KEY_STORE);
    document.getElementById("key-state").textContent = apiKey ? "key saved" : "no key";
  }

  function safeDecode(text) {
    try {
      return decodeURIComponent(text);
    } catch (_err) {
      return text; // a malformed escape: take it as written rather than break the page
    }
  }

  function currentRoute() {
    let route = "/jobs";
    let key = null;
    for (const part of location.hash.replace(/^#/, "").split("&")) {
      if (part.startsWith("key=")) key = safeDecode(part.slice(4));
      else if (part.startsWith("/")) route = part;
    }
    if (key !== null) {
      saveKey(key);
      history.replaceState(null, "", `${location.pathname}#${route}`); // the key leaves the URL
    }
    return route;
  }

  async function render() {
    if (viewAbort) viewAbort.abort();
    viewAbort = new AbortController();
    const signal = viewAbort.signal;
    document.body.removeAttribute("data-ready");
    document.getElementById("error").hidden = true;
    const view = document.getElementById("view");
    view.replaceChildren();
    const match = currentRoute().match(/^\/jobs\/([^/?&]+)$/);
    try {
      if (match) await jobPage(view, safeDecode(match[1]), signal);
      else await jobList(view, signal);
    } catch (err) {
      showError(err);
    }
    if (!signal.aborted) document.body.setAttribute("data-ready", "1");
  }

  // -- the job list -----------------------------------------------------------------------------

  function jobRow(job) {
    const r = job.result || {};
    return el("tr", { "data-job": job.id },
      el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
      el("td", {}, job.name), el("td", {}, badge(job.status)), el("td", {}, date(job.created_at)),
      el("td", { class: "num" }, fmt(r.base_val_score)), el("td", { class: "num" }, fmt(r.best_val_score)));
  }

  async function jobList(view, signal) {
    const jobs = table({ id: "jobs", class: "grid" }, ["id", "name", "status", "created", "base val", "best val"], []);
    const more = el("button", { type: "button", hidden: true }, "load more");
    view.append(el("h1", {}, "Jobs"), jobs, more);
    let after = null;
    const page = async () => {
      more.disabled = true;
      const query = new URLSearchParams({ limit: "20" });
      if (after) query.set("after", after);
      const list = await getJSON(`/v1/jobs?${query}`, signal);
      jobs.tBodies[0].append(...list.data.map(jobRow));
      if (!after && !list.data.length) jobs.tBodies[0].append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "no jobs yet")));
      after = list.last_id;
      more.hidden = !list.has_more;
      more.disabled = false;
    };
    more.addEventListener("click", () => page().catch(showError));
    await page();
  }

  // -- a job ------------------------------------------------------------------------------------

  async function jobPage(view, id, signal) {
    const base = `/v1/jobs/${encodeURIComponent(id)}`;
    const job = await getJSON(base, signal);
    const section = (name, title) => el("section", { id: name }, title ? el("h2", {}, title) : null);
    const s = {
      summary: section("summary"), charts: section("charts", "Scores and losses"),
      components: section("components", "Components"), traces: section("traces", "Traces"),
      events: section("events", "Events"),
    };
    view.append(el("p", {}, el("a", { href: "#/jobs" }, "← all jobs")), ...Object.values(s));
    renderSummary(s.summary, job, base);
    const loads = [
      charts(s.charts, base, signal).catch((err) => sectionError(s.charts, err)),
      components(s.components, base, signal).catch((err) => sectionError(s.components, err)),
      traces(s.traces, base, signal).catch((err) => sectionError(s.traces, err)),
    ];
    const events = eventLog(s.events, base, signal, job.status);
    await Promise.all(TERMINAL.has(job.status) ? [...loads, events] : loads); // a live log never ends
  }

  function renderSummary(section, job, base) {
    const r = job.result || {};
    const hp = job.hyperparameters || {};
    section.append(el("h1", {}, job.name, " ", badge(job.status)));
    if (job.error) section.append(el("p", { class: "error", id: "job-error" }, `${job.error.code}: ${job.error.message}`));
    section.append(dl([
      ["id", el("code", {}, job.id)], ["model", job.model], ["created", date(job.created_at)],
      ["finished", date(job.finished_at)], ["epochs", String(hp.n_epochs ?? "—")],
      ["method", String(hp.method ?? "—")], ["seed", String(job.seed)],
      ["base val score", fmt(r.base_val_score)], ["best epoch", r.best_epoch ?? "none beat the base"],
      ["best val score", fmt(r.best_val_score)], ["base test score", fmt(r.base_test_score)],
      ["test score", fmt(r.test_score)], ["stop reason", r.stop_reason || "—"],
    ]));
    const actions = el("p", { class: "actions" });
    if (!TERMINAL.has(job.status)) {
      const note = el("span", { class: "action-note" });
      const cancel = el("button", { type: "button", id: "cancel" }, job.cancel_requested ? "cancel requested" : "cancel job");
      cancel.addEventListener("click", async () => {
        cancel.disabled = true;
        try {
          await api(`${base}/cancel`, { method: "POST" });
          note.textContent = "cancel requested: the job stops at the next stage boundary";
        } catch (err) {
          note.textContent = describe(err);
          note.classList.add("error");
          cancel.disabled = false;
        }
      });
      actions.append(cancel, " ", note);
    }
    for (const component of r.adapters || []) {
      actions.append(download(`adapter: ${component}`, `${base}/adapters/${encodeURIComponent(component)}`, `${job.id}-${component}.tar.gz`), " ");
    }
    if ((r.adapters || []).length) actions.prepend(download("bundle", `${base}/bundle`, `${job.id}-bundle.tar.gz`), " ");
    section.append(actions);
  }

  function download(label, url, fallbackName) {
    const button = el("button", { type: "button", class: "download", "data-url": url }, `⬇ ${label}`);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const res = await api(url);
        const match = /filename="([^"]+)"/.exec(res.headers.get("content-disposition") || "");
        const href = URL.createObjectURL(await res.blob());
        const a = el("a", { href, download: match ? match[1] : fallbackName });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(href), 10000);
      } catch (err) {
        showError(err);
      } finally {
        button.disabled = false;
      }
    });
    return button;
  }

  // -- charts (our own small SVG) ---------------------------------------------------------------

  function lineChart({ id, series, hline, xLabel, yLabel, xMin, yMin, yMax, integerX }) {
    const points = series.flatMap((s) => s.points);
    if (!points.length) return el("p", { class: "muted" }, "no data yet");
    const W = 560, H = 240, L = 52, R = 16, T = 14, B = 40;
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]).concat(hline ? [hline.y] : []);
    let x0 = Math.min(xMin ?? Infinity, ...xs), x1 = Math.max(...xs);
    let y0 = Math.min(yMin ?? Infinity, ...ys), y1 = Math.max(yMax ?? -Infinity, ...ys);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const P = 10; // keep the end points off the axes
    const sx = (x) => (L + P + ((x - x0) / (x1 - x0)) * (W - L - R - 2 * P)).toFixed(1);
    const sy = (y) => (T + (1 - (y - y0) / (y1 - y0)) * (H - T - B)).toFixed(1);
    const root = svg("svg", { id, class: "chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" },
      svg("title", {}, `${yLabel} per ${xLabel}`));
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4;
      root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }),
        svg("text", { class: "tick", x: L - 6, y: Number(sy(y)) + 4, "text-anchor": "end" }, y.toFixed(2)));
    }
    const step = integerX ? Math.max(1, Math.ceil((x1 - x0) / 10)) : (x1 - x0) / 5;
    for (let x = integerX ? Math.ceil(x0) : x0; x <= x1 + 1e-9; x += step) {
      root.append(svg("text", { class: "tick", x: sx(x), y: H - B + 16, "text-anchor": "middle" }, integerX ? String(x) : x.toFixed(0)));
    }
    root.append(
      svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
      svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
      svg("text", { class: "label", x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, xLabel),
      svg("text", { class: "label", x: 12, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(T + H - B) / 2})` }, yLabel));
    if (hline) {
      root.append(
        svg("line", { class: "base", x1: L, x2: W - R, y1: sy(hline.y), y2: sy(hline.y), "stroke-dasharray": "6 4" }),
        svg("text", { class: "base-label", x: W - R - 4, y: Number(sy(hline.y)) - 5, "text-anchor": "end" }, `${hline.label} ${fmt(hline.y)}`));
    }
    for (const s of series) {
      if (!s.points.length) continue;
      root.append(svg("polyline", { class: `line ${s.cls}`, points: s.points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" ") }));
      if (s.points.length > 80) continue;
      for (const [x, y] of s.points) {
        root.append(svg("circle", { class: `pt ${s.cls}`, cx: sx(x), cy: sy(y), r: 3.5, "data-x": x, "data-y": y },
          svg("title", {}, `${s.name}, ${xLabel} ${x}: ${fmt(y)}`)));
      }
    }
    const legend = el("div", { class: "legend" },
      series.filter((s) => s.points.length).map((s) => el("span", {}, el("i", { class: `swatch ${s.cls}` }), s.name)),
      hline ? el("span", {}, el("i", { class: "swatch base" }), hline.label) : null);
    return el("figure", {}, root, legend);
  }

  async function charts(section, base, signal) {
    const m = await getJSON(`${base}/metrics`, signal);
    const epochs = m.epochs || [];
    const series = (field) => epochs.filter((e) => e[field] !== null && e[field] !== undefined).map((e) => [e.epoch, e[field]]);
    const grid = el("div", { class: "charts" });
    grid.append(el("div", { class: "chart-box" }, el("h3", {}, "Score per epoch"), lineChart({
      id: "score-chart", xLabel: "epoch", yLabel: "score", xMin: 0, yMin: 0, yMax: 1, integerX: true,
      series: [{ name: "val", cls: "val", points: series("val_score") }, { name: "train", cls: "train", points: series("train_score") }],
      hline: m.base_val_score === null || m.base_val_score === undefined ? null : { y: m.base_val_score, label: "base val" },
    })));
    const losses = new Map();
    for (const e of epochs) {
      for (const c of e.components || []) {
        const entry = losses.get(c.component) || { sft: [], dpo: [] };
        c.sft_losses.forEach((v) => entry.sft.push([entry.sft.length + 1, v]));
        c.dpo_losses.forEach((v) => entry.dpo.push([entry.dpo.length + 1, v]));
        losses.set(c.component, entry);
      }
    }
    for (const [component, entry] of losses) {
      if (!entry.sft.length && !entry.dpo.length) continue;
      grid.append(el("div", { class: "chart-box" }, el("h3", {}, `${component}: loss per step`), lineChart({
        id: `loss-${component}`, xLabel: "step (all epochs)", yLabel: "loss", xMin: 1, yMin: 0, integerX: true,
        series: [{ name: "SFT", cls: "sft", points: entry.sft }, { name: "DPO", cls: "dpo", points: entry.dpo }],
      })));
    }
    section.append(grid);
    const cost = m.cost || {};
    if (Object.keys(cost).length) {
      section.append(el("p", { class: "muted", id: "cost" }, "cost: ",
        Object.entries(cost).map(([k, v]) => `${k.replace(/_/g, " ")} ${v}`).join(" · ")));
    }
  }

  // -- components -------------------------------------------------------------------------------

  async function components(section, base, signal) {
    const list = await getJSON(`${base}/components`, signal);
    const rows = [];
    for (const c of list.data) {
      const what = [c.kind, c.model, c.tool, c.trainable ? "trainable" : "frozen"].filter(Boolean).join(" · ");
      const epochs = c.epochs.length ? c.epochs : [null];
      epochs.forEach((e, i) => rows.push(el("tr", { "data-component": c.name },
        el("td", {}, i === 0 ? c.name : ""), el("td", {}, i === 0 ? what : ""),
        el("td", { class: "num" }, e ? String(e.epoch) : "—"), el("td", { class: "num" }, e ? pct(e.blame_rate) : "—"),
        el("td", { class: "num" }, e ? pct(e.verified_rate) : "—"),
        el("td", { class: "num" }, e ? String(e.candidates_proposed) : "—"), el("td", { class: "num" }, e ? String(e.candidates_verified) : "—"),
        el("td", { class: "num" }, e ? String(e.samples) : "—"), el("td", { class: "num" }, e ? String(e.pairs) : "—"),
        el("td", {}, !e ? "—" : e.trained ? "yes" : e.skipped_reason || "no"))));
    }
    section.append(table({ id: "components-table", class: "grid" },
      ["component", "what", "epoch", "blame rate", "verified rate", "proposed", "verified", "samples", "pairs", "trained"], rows));
  }

  // -- traces -----------------------------------------------------------------------------------

  function spansTable(spans) {
    if (!spans || !spans.length) return null;
    return table({ class: "grid spans" }, ["component", "input", "output", "notes"], spans.map((sp) => {
      const notes = [sp.model && `model ${sp.model}`, sp.adapter && `adapter ${sp.adapter}`, sp.replaced && "output replaced",
        sp.rerun && "re-run", sp.error && `error: ${sp.error}`].filter(Boolean).join("; ");
      return el("tr", { "data-span": sp.span_id || sp.component },
        el("td", {}, String(sp.component)), el("td", {}, el("pre", {}, text(sp.inputs))),
        el("td", {}, el("pre", {}, text(sp.output))), el("td", {}, notes || "—"));
    }));
  }

  function candidatesTable(candidates) {
    if (!Array.isArray(candidates) || !candidates.length) return null;
    const mean = (xs) => (xs && xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null);
    return el("div", {}, el("h4", {}, "candidate corrections"), table({ class: "grid candidates" },
      ["component", "source", "original", "proposed", "replay score", "verified"], candidates.map((c) => el("tr", {},
        el("td", {}, String(c.component)), el("td", {}, String(c.source ?? "—")),
        el("td", {}, el("pre", {}, text(c.original_output))), el("td", {}, el("pre", {}, text(c.proposed_output))),
        el("td", { class: "num" }, `${fmt(mean(c.replay_scores))} (was ${fmt(c.original_score)})`),
        el("td", {}, passBadge(c.accepted))))));
  }

  function traceCard(t) {
    return el("details", { class: "trace", "data-trace": t.id },
      el("summary", {}, el("code", {}, t.id), " ", passBadge(t.passed), ` score ${fmt(t.score)}`),
      dl([["inputs", el("pre", {}, text(t.inputs))], ["expected", el("pre", {}, text(t.expected))],
        ["output", el("pre", {}, text(t.output))],
        ...(t.replay_of ? [["replay of", `${t.replay_of} (span ${t.replaced_span ?? "?"} replaced)`]] : [])]),
      spansTable(t.spans), candidatesTable(t.candidates));
  }

  async function traces(section, base, signal) {
    const choice = (name, options) => el("select", { name }, options.map(([v, label]) => el("option", { value: v }, label)));
    const stage = choice("stage", [["", "all stages"], ["baseline", "baseline"], ["rollout", "rollout"], ["evaluate", "evaluate"], ["test", "test"]]);
    const passed = choice("passed", [["", "passed or failed"], ["true", "passed"], ["false", "failed"]]);
    const list = el("div", { class: "trace-list" });
    const more = el("button", { type: "button", hidden: true }, "load more traces");
    section.append(el("p", { class: "filters" }, stage, " ", passed), list, more);
    let after = null;
    const page = async (reset) => {
      if (reset) { after = null; list.replaceChildren(); }
      const query = new URLSearchParams({ limit: "10" });
      if (stage.value) query.set("stage", stage.value);
      if (passed.value) query.set("passed", passed.value);
      if (after) query.set("after", after);
      const res = await getJSON(`${base}/traces?${query}`, signal);
      const cards = res.data.map(traceCard);
      if (!after && cards.length) cards[0].open = true; // show what a trace holds
      list.append(...cards);
      if (!after && !res.data.length) list.append(el("p", { class: "muted" }, "no traces"));
      after = res.last_id;
      more.hidden = !res.has_more;
    };
    const reload = () => page(true).catch((err) => sectionError(section, err));
    stage.addEventListener("change", reload);
    passed.addEventListener("change", reload);
    more.addEventListener("click", () => page(false).catch((err) => sectionError(section, err)));
    await page(true);
  }

  // -- the live event log (server-sent events read with fetch) ----------------------------------

  // Calls onEvent({id, event, data}) per event; stops when it returns true (then resolves true)
  // or when the stream ends (resolves false).
  async function readEvents(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let event = { data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (line === "") {
          if (event.data.length || event.event) {
            if (onEvent({ id: event.id, event: event.event || "message", data: event.data.join("\n") })) {
              await reader.cancel();
              return true;
            }
          }
          event = { data: [] };
          continue;
        }
        if (line.startsWith(":")) continue; // a comment (keep-alive)
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(val);
        else if (field === "event") event.event = val;
        else if (field === "id") event.id = val;
      }
    }
  }

  async function eventLog(section, base, signal, shownStatus) {
    const state = el("p", { class: "muted", id: "event-state" }, "connecting…");
    const log = el("ol", { id: "event-log", class: "log" });
    section.append(state, log);
    let after = null;
    const add = (e) => {
      log.append(el("li", { class: `level-${String(e.level).replace(/[^a-z]/g, "")}` },
        el("time", {}, date(e.created_at)), " ", el("span", { class: "message" }, e.message),
        e.data ? el("span", { class: "data" }, ` ${JSON.stringify(e.data).slice(0, 200)}`) : null));
      log.scrollTop = log.scrollHeight;
    };
    while (!signal.aborted) {
      let finished = null;
      try {
        const query = new URLSearchParams({ stream: "true" });
        if (after) query.set("after", after);
        const res = await api(`${base}/events?${query}`, { signal });
        state.textContent = "live";
        await readEvents(res.body, (ev) => {
          if (ev.event === "done") {
            finished = JSON.parse(ev.data || "{}");
            return true;
          }
          if (ev.id) after = ev.id;
          if (ev.event === "event") add(JSON.parse(ev.data));
          return false;
        });
      } catch (err) {
        if (signal.aborted || isAbort(err)) return;
        if (err.status && err.status < 500) {
          state.textContent = `event stream refused: ${describe(err)}`;
          return;
        }
        state.textContent = "disconnected; reconnecting…";
      }
      if (finished) {
        state.textContent = `stream ended: job ${finished.status}`;
        state.setAttribute("data-done", finished.status);
        if (finished.status !== shownStatus && finished.status !== "deleted") render(); // refresh
        return;
      }
      await sleep(2000, signal);
    }
  }

  // -- start ------------------------------------------------------------------------------------

  document.getElementById("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("key-input");
    saveKey(input.value);
    input.value = "";
    render();
  });
  document.getElementById("key-forget").addEventListener("click", () => { saveKey(""); render(); });
  window.addEventListener("hashchange", render);
  saveKey(apiKey);
  render();
})();
