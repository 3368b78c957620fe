/*
 * The Loom console (docs/console.md). Everything it shows comes from the
 * gateway's documented routes (docs/openapi.json), called with the token the
 * operator pasted, kept in this tab's sessionStorage. Every value is put into
 * the page as text (textContent, never innerHTML), so data holding markup
 * shows as the characters it holds.
 */
"use strict";

const TOKEN_KEY = "loom.token";
const REFRESH_MS = 3000;

/* ---- small helpers ------------------------------------------------------------- */

function $(id) {
  return document.getElementById(id);
}

/* el("td", {class: "mono"}, "text", child, ...): an element; strings become
 * text nodes, attributes are set one by one. */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "onclick" || k === "onsubmit" || k === "onchange") e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/* Replaces the children of e: arrays are spread, null and undefined dropped. */
function fill(e, ...children) {
  e.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
}

/* True when an automatic refresh brought the same data as the last render
 * of page: then the page is left as it is (no flicker, nothing replaced
 * under the operator's pointer). */
function unchanged(page, mode, data) {
  const key = JSON.stringify(data);
  const same = mode === "auto" && page.lastData === key;
  page.lastData = key;
  return same;
}

function text(v) {
  if (v === undefined || v === null) return "";
  return typeof v === "string" ? v : JSON.stringify(v);
}

function json(v) {
  return el("pre", {}, v === undefined || v === null ? "null" : JSON.stringify(v, null, 2));
}

function when(t) {
  if (!t) return "";
  const d = new Date(t);
  return isNaN(d) ? t : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function status(s) {
  return el("span", {class: "status-" + (s || "pending")}, s || "pending");
}

function cmdLink(id) {
  return el("a", {href: "#/command/" + encodeURIComponent(id), class: "mono"}, id);
}

function storyLink(id, label) {
  return el("a", {href: "#/story/" + encodeURIComponent(id)}, label || "story");
}

function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function setStatus(msg, isError) {
  const s = $("status");
  s.textContent = msg;
  s.className = isError ? "error" : "";
}

/* ---- the API ------------------------------------------------------------------- */

class ApiError extends Error {
  constructor(status, body) {
    const e = body && body.error;
    super(e ? `${e.code}: ${e.message}` : `HTTP ${status}`);
    this.status = status;
    this.code = e && e.code;
  }
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const opts = {method, headers: {Authorization: "Bearer " + token}, cache: "no-store"};
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  let data = null;
  try {
    data = await res.json();
  } catch (e) {
    data = null;
  }
  if (res.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("The token was refused: " + ((data && data.error && data.error.message) || "401"));
    throw new ApiError(res.status, data);
  }
  if (!res.ok && res.status !== 202) throw new ApiError(res.status, data);
  return data;
}

/* ---- pages --------------------------------------------------------------------- */

const pages = {};
let current = null; /* {name, arg, refresh} */
let timer = null;

/* Samples of the consumers' summed applied rate for the overview's chart:
 * [{t, applied}] (commands applied per second, from GET /v1/consumers). */
const samples = [];

function sampleConsumers(list) {
  const applied = list.consumers.reduce((a, c) => a + ((c.per_s && c.per_s.applied) || 0), 0);
  samples.push({t: Date.now(), applied});
  while (samples.length > 61) samples.shift();
}

function drawChart(canvas) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const pts = samples.map((x) => x.applied);
  const max = Math.max(1, ...pts);
  ctx.strokeStyle = "#e3e6ea";
  ctx.beginPath();
  ctx.moveTo(0, h - 0.5);
  ctx.lineTo(w, h - 0.5);
  ctx.stroke();
  ctx.strokeStyle = "#1d7a3a";
  ctx.lineWidth = 2;
  ctx.beginPath();
  pts.forEach((v, i) => {
    const x = pts.length > 1 ? (i / (pts.length - 1)) * (w - 4) + 2 : 2;
    const y = h - 4 - (v / max) * (h - 20);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#44505c";
  ctx.font = "11px sans-serif";
  ctx.fillText(`commands applied per second (max ${max.toFixed(1)}, last ${pts.length ? pts[pts.length - 1].toFixed(1) : "0"})`, 6, 12);
}

/* Who owns a partition: the node's id (short) and role. */
function owner(p) {
  return el("span", {class: "mono", title: p.node + (p.node_url ? " " + p.node_url : "")},
    String(p.node).slice(0, 8) + " (" + p.node_role + ")");
}

pages.overview = {
  title: "Overview",
  async render(root) {
    const [nodes, counts, cons] = await Promise.all([
      api("GET", "/v1/nodes"), api("GET", "/v1/commands:counts"), api("GET", "/v1/consumers")]);
    sampleConsumers(cons);
    const n = (k) => (counts[k] === undefined ? "?" : counts[k] + (counts.capped ? "+" : ""));
    const card = (label, k, href) =>
      el("a", {class: "card", href, id: "count-" + k}, el("div", {class: "n"}, n(k)), el("div", {}, label));
    const canvas = el("canvas", {id: "applied-chart", width: 640, height: 140});
    const rate = (c, k) => (c.per_s && typeof c.per_s[k] === "number" ? c.per_s[k].toFixed(1) : "…");
    const parts = [];
    for (const c of cons.consumers) for (const p of c.partitions) parts.push([c, p]);
    fill(root, 
      el("h1", {}, "Overview"),
      el("div", {class: "cards"},
        card("stuck (retrying)", "retrying", "#/commands?status=retrying"),
        card("parked", "parked", "#/commands?status=parked"),
        card("rejected", "rejected", "#/commands?status=rejected")),
      canvas,
      el("h2", {}, "Nodes"),
      table(["node", "role", "url", "version", "started", "heartbeat age", "state"],
        nodes.nodes.map((x) =>
          el("tr", {class: "node-row"},
            el("td", {class: "mono"}, x.id), el("td", {}, x.role), el("td", {class: "mono"}, x.url),
            el("td", {}, x.version), el("td", {}, when(x.started_at)),
            el("td", {}, (x.heartbeat_age_ms / 1000).toFixed(1) + " s"),
            el("td", {class: x.stale ? "stale" : ""}, x.stale ? "STALE" : "alive")))),
      el("h2", {}, "Consumers"),
      cons.consumers.length
        ? table(["consumer", "nodes", "applied/s", "rejected/s", "retried/s", "partitions", "lag", "retrying partitions"],
            cons.consumers.map((c) =>
              el("tr", {class: "consumer-row", "data-consumer": c.name},
                el("td", {class: "mono"}, c.name), el("td", {}, text(c.nodes.length)),
                el("td", {}, rate(c, "applied")), el("td", {}, rate(c, "rejected")),
                el("td", {}, rate(c, "retried")), el("td", {}, text(c.partitions.length)),
                el("td", {}, text(c.lag)), el("td", {}, text(c.retrying_partitions)))))
        : el("p", {class: "note"}, "No live worker runs a consumer."),
      el("h2", {}, "Partitions"),
      parts.length
        ? table(["consumer", "partition", "owner node", "lag", "state"],
            parts.map(([c, p]) =>
              el("tr", {class: "partition-row"},
                el("td", {class: "mono"}, c.name), el("td", {class: "mono"}, p.topic + "[" + p.partition + "]"),
                el("td", {}, owner(p)), el("td", {}, p.lag === null ? "…" : text(p.lag)),
                el("td", {class: p.retrying ? "stale" : ""}, p.retrying ? "retrying" : "flowing"))))
        : el("p", {class: "note"}, "No partition is assigned."),
      el("p", {class: "note"},
        "Each worker reports its consumers with its heartbeat (every 5 s): rates are over its last interval, lag as measured every 5 s."));
    drawChart(canvas);
  },
};

function commandsQuery(arg) {
  const q = new URLSearchParams(arg || "");
  return q;
}

pages.commands = {
  title: "Commands",
  cursors: [],
  async render(root, arg, mode) {
    const q = commandsQuery(arg);
    if (mode === "nav") this.cursors = [];
    const cursor = this.cursors.length ? this.cursors[this.cursors.length - 1] : null;
    if (mode === "auto" && cursor) return; /* a later page stays as it is */
    const params = new URLSearchParams();
    for (const k of ["status", "consumer", "type", "key", "ray_id", "from", "to"]) {
      if (q.get(k)) params.set(k, k === "from" || k === "to" ? new Date(q.get(k)).toISOString() : q.get(k));
    }
    params.set("limit", "50");
    if (cursor) params.set("cursor", cursor);
    const data = await api("GET", "/v1/commands?" + params.toString());
    if (unchanged(this, mode, data)) return;
    if (!root.querySelector("form.filters")) fill(root, el("h1", {}, "Commands"), this.form(q), el("div", {id: "list"}));
    const list = root.querySelector("#list");
    fill(list, 
      table(["id", "type", "consumer", "status", "attempts", "key", "received", "last error"],
        data.commands.map((c) =>
          el("tr", {class: "command-row", "data-id": c.id},
            el("td", {}, cmdLink(c.id)), el("td", {}, c.type), el("td", {class: "mono"}, c.consumer),
            el("td", {}, status(c.status)), el("td", {}, text(c.attempts)),
            el("td", {class: "mono"}, text(c.stream_id)), el("td", {}, when(c.received_at)),
            el("td", {}, text(c.last_error))))),
      el("div", {class: "bar"},
        el("span", {class: "note"}, `${data.commands.length} shown, page ${this.cursors.length + 1}`),
        this.cursors.length ? el("button", {id: "first-page", type: "button", onclick: () => { this.cursors = []; refresh("page"); }}, "First page") : null,
        data.next_cursor ? el("button", {id: "next-page", type: "button", onclick: () => { this.cursors.push(data.next_cursor); refresh("page"); }}, "Next page") : null));
  },
  form(q) {
    const input = (name, label, type) =>
      el("label", {}, label, el("input", {name, type: type || "text", value: q.get(name) || ""}));
    const sel = el("select", {name: "status"}, ["", "applied", "rejected", "retrying", "parked", "expired", "conflict"]
      .map((s) => el("option", {value: s, selected: q.get("status") === s}, s || "any")));
    return el("form", {class: "filters", id: "filters", onsubmit: (ev) => {
      ev.preventDefault();
      const f = new FormData(ev.target);
      const out = new URLSearchParams();
      for (const [k, v] of f.entries()) if (v) out.set(k, v);
      location.hash = "#/commands?" + out.toString();
    }},
    el("label", {}, "status", sel), input("consumer", "consumer"), input("type", "type"),
    input("key", "key"), input("ray_id", "ray id"),
    input("from", "received from", "datetime-local"), input("to", "received before", "datetime-local"),
    el("button", {type: "submit", id: "apply-filters"}, "Filter"));
  },
};

async function steer(id, action) {
  const verb = action === "park" ? "Park" : "Replay";
  const what = action === "park"
    ? `Park command ${id}? Its consumer stops retrying it and its partition moves on. It is kept and can be replayed.`
    : `Replay command ${id}? It is published again to its topic and applied once more by the consumers that parked or rejected it.`;
  if (!window.confirm(what)) return;
  steerNote = {id, text: `${verb}: sent…`, cls: "note"};
  refresh("page");
  try {
    const r = await api("POST", `/v1/commands/${encodeURIComponent(id)}/${action}?wait=10s`, {});
    steerNote = {id, text: `${verb}: ${r.status || "accepted"} (command ${r.command_id})`, cls: ""};
  } catch (e) {
    steerNote = {id, text: `${verb} failed: ${e.message}`, cls: "error"};
  }
  refresh("page");
}

/* The answer of the last park or replay, shown on its command's page. */
let steerNote = null;

pages.command = {
  title: "Command",
  async render(root, id, mode) {
    const c = await api("GET", "/v1/commands/" + encodeURIComponent(id));
    if (unchanged(this, mode, [c, steerNote])) return;
    const rows = c.consumers || [];
    const canPark = rows.some((r) => r.status === "retrying");
    const canReplay = rows.some((r) => r.status === "parked" || r.status === "rejected");
    const note = steerNote && steerNote.id === c.command_id ? steerNote : null;
    fill(root, 
      el("h1", {}, "Command ", el("span", {class: "mono"}, c.command_id)),
      el("div", {class: "bar"},
        el("span", {}, "status ", status(c.status)),
        storyLink(c.command_id, "Open its story"),
        el("button", {id: "park", type: "button", class: "danger", disabled: !canPark, onclick: () => steer(c.command_id, "park")}, "Park"),
        el("button", {id: "replay", type: "button", disabled: !canReplay, onclick: () => steer(c.command_id, "replay")}, "Replay"),
        el("span", {id: "steer-result", class: note ? note.cls : ""}, note ? note.text : "")),
      rows.map((r) =>
        el("div", {class: "consumer-row"},
          el("h2", {}, "Consumer ", el("span", {class: "mono"}, r.consumer), " ", status(r.status)),
          table(["type", "attempts", "key", "topic / partition / offset", "ray id", "caused by", "received", "updated"],
            el("tr", {},
              el("td", {}, r.type), el("td", {}, text(r.attempts)), el("td", {class: "mono"}, text(r.stream_id)),
              el("td", {class: "mono"}, `${r.topic} / ${r.partition} / ${r.offset}`),
              el("td", {class: "mono"}, r.ray_id ? el("a", {href: "#/story?ray=" + encodeURIComponent(r.ray_id)}, r.ray_id) : ""),
              el("td", {}, r.causation_id ? cmdLink(r.causation_id) : ""),
              el("td", {}, when(r.received_at)), el("td", {}, when(r.updated_at)))),
          r.last_error ? el("div", {}, el("h2", {}, "Last error"), el("pre", {class: "last-error"}, r.last_error)) : null,
          el("h2", {}, "Result"), json(r.result),
          el("h2", {}, "Envelope headers"),
          r.headers ? json(r.headers) : el("p", {class: "note"}, "Not kept once a command is applied."),
          el("h2", {}, "Data"),
          r.data !== null && r.data !== undefined ? el("pre", {class: "command-data"}, JSON.stringify(r.data, null, 2))
            : el("p", {class: "note"}, "Not kept once a command is applied."))));
  },
};

/* The story: one tree per root, children by causation id. */
/* The HTTP request that published the story's first command, as the
 * gateway recorded it (method, path, token name, time), or nothing. */
function httpRequest(data) {
  const c = data.commands.find((x) => x.request && typeof x.request === "object");
  if (!c) return null;
  const r = c.request;
  const str = (v) => (typeof v === "string" ? v : "");
  return el("span", {class: "http-request"},
    el("strong", {class: "mono"}, str(r.method) + " " + str(r.path)),
    r.principal ? [" by ", el("span", {class: "mono"}, str(r.principal))] : null,
    el("span", {class: "note"}, " " + when(str(r.at)) + (r.route ? " (route " + str(r.route) + ")" : "")));
}

function storyTree(data, focus) {
  const byParent = new Map();
  const ids = new Set(data.commands.map((c) => c.id));
  for (const c of data.commands) {
    const p = c.causation_id && ids.has(c.causation_id) ? c.causation_id : "";
    if (!byParent.has(p)) byParent.set(p, []);
    byParent.get(p).push({kind: "command", c});
  }
  for (const o of data.outbox || []) {
    const p = o.causation_id || "";
    if (!byParent.has(p)) byParent.set(p, []);
    byParent.get(p).push({kind: "outbox", c: o});
  }
  const seen = new Set();
  function node(item) {
    const c = item.c;
    if (item.kind === "outbox")
      return el("li", {}, el("div", {class: "node story-node", "data-id": c.id},
        el("span", {class: "kind"}, "follow-up"), el("span", {class: "mono"}, c.id), " ", c.type, " ",
        status("pending"), el("span", {class: "note"}, ` in the outbox for ${c.topic} since ${when(c.created_at)}`)));
    if (seen.has(c.id)) return null;
    seen.add(c.id);
    const kids = byParent.get(c.id) || [];
    return el("li", {},
      el("div", {class: "node story-node" + (c.id === focus ? " focus" : ""), "data-id": c.id},
        el("span", {class: "kind"}, c.causation_id && ids.has(c.causation_id) ? "follow-up command" : "command"),
        el("strong", {}, c.type), " ", cmdLink(c.id), " ",
        el("span", {class: "note"}, when(c.received_at)),
        el("div", {}, c.consumers.map((r) =>
          el("div", {class: "story-consumer"}, el("span", {class: "mono"}, r.consumer), " ", status(r.status),
            r.attempts > 1 ? ` after ${r.attempts} attempts` : "", r.last_error ? el("span", {class: "error"}, " — " + r.last_error) : "",
            el("span", {class: "note"}, " " + when(r.updated_at))))),
        c.events.length
          ? el("ul", {class: "events"}, c.events.map((e) =>
              el("li", {class: "story-event"}, el("span", {class: "kind"}, "event"), e.type, " on ",
                el("span", {class: "mono"}, `${e.stream_id} v${e.version}`), el("span", {class: "note"}, " " + when(e.recorded_at)))))
          : null),
      kids.length ? el("ul", {class: "tree"}, kids.map(node)) : null);
  }
  const roots = byParent.get("") || [];
  const rays = [...new Set(data.commands.map((c) => c.ray_id).filter(Boolean))];
  return el("ul", {class: "tree root"},
    el("li", {},
      el("div", {class: "node", id: "story-request"}, el("span", {class: "kind"}, "request"),
        httpRequest(data),
        rays.length ? [" ray ", rays.map((r) => el("a", {href: "#/story?ray=" + encodeURIComponent(r), class: "mono"}, r))]
          : "no ray id (published outside the gateway)"),
      el("ul", {class: "tree"}, roots.map(node))));
}

pages.story = {
  title: "Story",
  async render(root, arg, mode) {
    let id = null, ray = null;
    if (arg && arg.startsWith("?")) ray = new URLSearchParams(arg).get("ray");
    else if (arg) id = arg;
    const form = el("form", {class: "filters", id: "story-form", onsubmit: (ev) => {
      ev.preventDefault();
      const v = ev.target.elements.q.value.trim();
      const kind = ev.target.elements.kind.value;
      if (v) location.hash = kind === "ray" ? "#/story?ray=" + encodeURIComponent(v) : "#/story/" + encodeURIComponent(v);
    }},
    el("label", {}, "look up", el("select", {name: "kind"},
      el("option", {value: "id", selected: !ray}, "command id"), el("option", {value: "ray", selected: !!ray}, "ray id"))),
    el("label", {}, "id", el("input", {name: "q", size: 40, value: id || ray || ""})),
    el("button", {type: "submit"}, "Show story"));
    if (!id && !ray) {
      fill(root, el("h1", {}, "A command's story"), form,
        el("p", {class: "note"}, "From a command id or the ray id of a request: what it caused, the events it emitted and the follow-up commands it published, with each one's status."));
      return;
    }
    const data = await api("GET", id ? `/v1/commands/${encodeURIComponent(id)}/story` : `/v1/rays/${encodeURIComponent(ray)}/story`);
    if (unchanged(this, mode, data)) return;
    fill(root, el("h1", {}, "Story of ", el("span", {class: "mono"}, id || "ray " + ray)), form,
      data.truncated ? el("p", {class: "error"}, "Only the first 1000 commands and 2000 events are shown.") : null,
      storyTree(data, id));
  },
};

pages.messages = {
  title: "Messages",
  async render(root, arg) {
    const form = el("form", {class: "filters", id: "message-form", onsubmit: (ev) => {
      ev.preventDefault();
      const v = ev.target.elements.id.value.trim();
      if (v) location.hash = "#/messages/" + encodeURIComponent(v);
    }}, el("label", {}, "message id", el("input", {name: "id", size: 40, value: arg || ""})),
    el("button", {type: "submit"}, "Look up"));
    let body = el("p", {class: "note"}, "Look up a stored message (a CloudEvent) by its id.");
    if (arg) {
      try {
        const m = await api("GET", "/v1/messages/" + encodeURIComponent(arg));
        body = el("div", {},
          table(["id", "type", "source", "time"], el("tr", {},
            el("td", {class: "mono"}, text(m.id)), el("td", {}, text(m.type)), el("td", {}, text(m.source)), el("td", {}, text(m.time)))),
          el("h2", {}, "CloudEvent"), el("pre", {id: "message-event"}, JSON.stringify(m, null, 2)));
      } catch (e) {
        body = el("p", {class: "error"}, e.message);
      }
    }
    fill(root, el("h1", {}, "Messages"), form, body);
  },
};

pages.registry = {
  title: "Registry",
  async render(root) {
    const [defs, inst] = await Promise.all([api("GET", "/v1/registry/definitions"), api("GET", "/v1/registry/instances?limit=200")]);
    fill(root, el("h1", {}, "Registry"),
      el("h2", {}, "Definitions"),
      table(["id", "name", "version", "definition"], defs.definitions.map((d) =>
        el("tr", {}, el("td", {class: "mono"}, text(d.id)), el("td", {}, text(d.name)), el("td", {}, text(d.version)),
          el("td", {}, el("pre", {}, JSON.stringify(d, null, 2)))))),
      el("h2", {}, "Instances"),
      table(["id", "slug", "url", "tags", "status", "updated", "last heartbeat", "registered"], inst.instances.map((i) =>
        el("tr", {}, el("td", {class: "mono"}, text(i.id)), el("td", {}, text(i.slug)), el("td", {class: "mono"}, text(i.url)),
          el("td", {}, (i.tags || []).map(text).join(", ")),
          el("td", {}, status(i.status)), el("td", {}, when(i.updated_at)), el("td", {}, when(i.last_heartbeat)),
          el("td", {}, when(i.registered_at))))),
      inst.next_cursor ? el("p", {class: "note"}, "The first 200 instances are shown.") : null);
  },
};

/* ---- routing, refresh, login ----------------------------------------------------------- */

function parseHash() {
  const h = location.hash.replace(/^#\/?/, "");
  const m = h.match(/^([a-z]+)(?:\/(.*)|(\?.*))?$/);
  if (!m || !pages[m[1]]) return {name: "overview", arg: null};
  return {name: m[1], arg: m[2] !== undefined ? decodeURIComponent(m[2]) : m[3] || null};
}

let rendering = false;
let pending = null; /* a refresh asked for while one ran */
/* mode: "nav" (the address changed), "page" (a button of the page), "auto". */
async function refresh(mode) {
  if (!sessionStorage.getItem(TOKEN_KEY)) return;
  if (rendering) {
    if (mode !== "auto") pending = mode || "page";
    return;
  }
  const {name, arg} = parseHash();
  const page = pages[name];
  const root = $("page");
  const fresh = !current || current.name !== name || current.arg !== arg;
  if (fresh) fill(root);
  current = {name, arg};
  for (const a of document.querySelectorAll("#nav a"))
    a.classList.toggle("active", a.dataset.page === name || (name === "command" && a.dataset.page === "commands"));
  document.title = "Loom console: " + page.title;
  rendering = true;
  try {
    await page.render(root, arg, fresh ? "nav" : mode || "page");
    setStatus("updated " + new Date().toLocaleTimeString());
  } catch (e) {
    if (e.status !== 401) {
      if (fresh) fill(root, el("h1", {}, page.title), el("p", {class: "error", id: "page-error"}, e.message));
      setStatus(e.message, true);
    }
  } finally {
    rendering = false;
    if (pending) {
      const m = pending;
      pending = null;
      refresh(m);
    }
  }
}

function showLogin(msg) {
  $("login").hidden = false;
  $("page").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login-error").textContent = msg || "";
  current = null;
}

async function login() {
  const t = $("token").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  try {
    await api("GET", "/v1/nodes");
  } catch (e) {
    if (e.status !== 401) {
      $("login-error").textContent = e.status === 403
        ? "This token lacks the scope nodes:read; the console needs nodes:read and commands:read (commands:admin to park and replay)."
        : e.message;
      if (e.status !== 403) sessionStorage.removeItem(TOKEN_KEY);
    }
    if (e.status !== 403) return;
  }
  $("token").value = "";
  start();
}

function start() {
  $("login").hidden = true;
  $("page").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = "signed in";
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-button").addEventListener("click", login);
  $("token").addEventListener("keydown", (e) => {
    if (e.key === "Enter") login();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin();
  });
  window.addEventListener("hashchange", () => refresh());
  if (sessionStorage.getItem(TOKEN_KEY)) start();
  else showLogin();
  timer = setInterval(() => {
    if (!document.hidden && current && current.name !== "messages" && current.name !== "registry") refresh("auto");
  }, REFRESH_MS);
});
