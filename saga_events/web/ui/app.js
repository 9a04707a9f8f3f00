// The saga-events dashboard: a client of GET /api/v1/watch and GET /health.
// Everything shown comes from publishers and is untrusted text: it is only ever
// put on the page with textContent / text nodes, never parsed as HTML.
"use strict";

(() => {
  const MAX_CHANGES = 50;
  const HEALTH_EVERY_MS = 5000;

  const view = new Map(); // "service\u0000id" -> instance (the REST API's shape)
  const changes = []; // newest first: {time, kind, inst}
  let renderQueued = false;

  const $ = (id) => document.getElementById(id);

  // Build an element; children are nodes or strings (strings become text nodes).
  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function setBadge(id, text, tone) {
    const node = $(id);
    node.textContent = text;
    node.className = "badge" + (tone ? " " + tone : "");
  }

  const keyOf = (inst) => inst.service_name + "\u0000" + inst.service_id;

  function matches(inst, needle) {
    if (!needle) return true;
    const hay = [inst.service_name, inst.service_id, inst.service_url, ...inst.capabilities];
    for (const [k, v] of Object.entries(inst.metadata || {})) hay.push(k, v);
    return hay.some((s) => String(s).toLowerCase().includes(needle));
  }

  // UTC, to the second: the same in every operator's browser and in the logs.
  function timeText(iso) {
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toISOString().slice(0, 19).replace("T", " ") + "Z";
  }

  function metadataCell(metadata) {
    const cell = el("td", "meta");
    const entries = Object.entries(metadata || {}).sort(([a], [b]) => (a < b ? -1 : 1));
    if (!entries.length) cell.append(el("span", "muted", "—"));
    for (const [k, v] of entries) {
      cell.append(el("div", "kv", el("span", "k", k), el("span", "v", v)));
    }
    return cell;
  }

  // "draining (by X: reason)" for an operator's drain; text only (textContent).
  function stateText(inst) {
    if (!inst.draining) return "live";
    if (!inst.drained_by) return "draining";
    return "draining (by " + inst.drained_by +
      (inst.drain_reason ? ": " + inst.drain_reason : "") + ")";
  }

  function instanceRow(inst) {
    const row = el(
      "tr",
      inst.draining ? "draining" : "",
      el("td", "id", inst.service_id),
      el("td", "url", inst.service_url),
      el("td", "caps", ...(inst.capabilities.length
        ? inst.capabilities.map((c) => el("span", "cap", c))
        : [el("span", "muted", "—")])),
      metadataCell(inst.metadata),
      el("td", "state", el("span", inst.draining ? "badge warn" : "badge ok",
        stateText(inst))),
      el("td", "when", timeText(inst.registered_at)),
    );
    row.dataset.key = inst.service_name + "/" + inst.service_id;
    return row;
  }

  function render() {
    renderQueued = false;
    const needle = $("filter").value.trim().toLowerCase();
    const byService = new Map();
    let total = 0;
    let draining = 0;
    for (const inst of view.values()) {
      total += 1;
      if (inst.draining) draining += 1;
      if (!matches(inst, needle)) continue;
      if (!byService.has(inst.service_name)) byService.set(inst.service_name, []);
      byService.get(inst.service_name).push(inst);
    }
    const names = [...byService.keys()].sort();
    const services = new Set([...view.values()].map((i) => i.service_name)).size;
    const shown = names.reduce((n, name) => n + byService.get(name).length, 0);
    let counts = `${services} service${services === 1 ? "" : "s"} · ${total} instance${total === 1 ? "" : "s"}`;
    if (draining) counts += ` · ${draining} draining`;
    if (needle) counts += ` · showing ${shown}`;
    $("counts").textContent = counts;

    const container = el("div");
    for (const name of names) {
      const insts = byService.get(name).sort((a, b) => (a.service_id < b.service_id ? -1 : 1));
      const details = el("details", "service");
      details.open = true;
      details.dataset.service = name;
      details.append(el("summary", "", el("span", "name", name),
        el("span", "count", `${insts.length} instance${insts.length === 1 ? "" : "s"}`)));
      const head = el("tr", "", ...["Instance", "URL", "Capabilities", "Metadata", "State",
        "Registered at"].map((h) => el("th", "", h)));
      head.querySelectorAll("th").forEach((th) => th.setAttribute("scope", "col"));
      details.append(el("table", "", el("thead", "", head), el("tbody", "", ...insts.map(instanceRow))));
      container.append(details);
    }
    // Keep which services the user folded.
    const closed = new Set([...$("services").querySelectorAll("details.service:not([open])")]
      .map((d) => d.dataset.service));
    container.querySelectorAll("details.service").forEach((d) => {
      if (closed.has(d.dataset.service)) d.open = false;
    });
    $("services").replaceChildren(...container.children);
    $("empty").hidden = names.length > 0;
    $("empty").textContent = total && !names.length ? "Nothing matches the filter." : "No live instances.";
  }

  function queueRender() {
    if (!renderQueued) {
      renderQueued = true;
      requestAnimationFrame(render);
    }
  }

  function noteChange(kind, text) {
    changes.unshift({ time: new Date(), kind, text });
    changes.length = Math.min(changes.length, MAX_CHANGES);
    $("changes").replaceChildren(...changes.map((c) => el("li", "change " + c.kind,
      el("time", "", c.time.toLocaleTimeString()), el("span", "kind", c.kind),
      el("span", "what", c.text))));
  }

  function showStale(stale) {
    setBadge("stale", stale ? "view: stale" : "view: current", stale ? "bad" : "ok");
  }

  function connect() {
    const source = new EventSource("/api/v1/watch");
    source.addEventListener("open", () => setBadge("conn", "live", "ok"));
    source.addEventListener("error", () => setBadge("conn", "reconnecting", "warn"));
    source.addEventListener("snapshot", (e) => {
      const body = JSON.parse(e.data);
      view.clear();
      for (const insts of Object.values(body.services)) {
        for (const inst of insts) view.set(keyOf(inst), inst);
      }
      showStale(body.stale);
      noteChange("snapshot", `${body.count} instance${body.count === 1 ? "" : "s"}`);
      queueRender();
    });
    for (const kind of ["added", "updated", "removed"]) {
      source.addEventListener(kind, (e) => {
        const inst = JSON.parse(e.data);
        if (kind === "removed") view.delete(keyOf(inst));
        else view.set(keyOf(inst), inst);
        noteChange(kind, `${inst.service_name}/${inst.service_id} ${inst.service_url}`);
        queueRender();
      });
    }
    source.addEventListener("stale", () => { showStale(true); noteChange("stale", "view lags Redis"); });
    source.addEventListener("current", () => { showStale(false); noteChange("current", "view current"); });
    source.addEventListener("overflow", (e) => {
      noteChange("overflow", JSON.parse(e.data).reason);
    });
  }

  async function pollHealth() {
    try {
      const r = await fetch("/health", { headers: { Accept: "application/json" } });
      const h = await r.json();
      setBadge("health", "health: " + h.status, h.status === "ok" ? "ok" : h.status === "degraded" ? "warn" : "bad");
      const reg = h.registrar || {};
      $("registrar").textContent = `registrar ${reg.rid} · ${reg.subscribed ? "subscribed" : "not subscribed"}` +
        ` · Redis ${h.redis && h.redis.ok ? h.redis.latency_ms + " ms" : "down"}`;
    } catch (err) {
      setBadge("health", "health: unreachable", "bad");
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const filter = $("filter");
    filter.addEventListener("input", queueRender);
    filter.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { filter.value = ""; queueRender(); }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "/" && document.activeElement !== filter) { e.preventDefault(); filter.focus(); }
    });
    render();
    connect();
    pollHealth();
    setInterval(pollHealth, HEALTH_EVERY_MS);
  });
})();
