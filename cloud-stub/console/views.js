// The console's pages. Each page loads what it shows through the operator API, and reloads
// only the part an event names. Nothing here polls: changes arrive on the event stream.

import { api, Unauthorized } from "./api.js";

// ---------------------------------------------------------------------------------------
// Small DOM helpers (text only: nothing from the API is ever parsed as HTML)

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "testid") el.dataset.testid = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const pad = (n, w = 2) => String(n).padStart(w, "0");

/** Local wall-clock time of unix milliseconds, "—" for none. */
export function clock(ms) {
  if (!ms) return "—";
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return today ? time : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

function fullTime(ms) {
  return ms ? new Date(ms).toISOString() : "";
}

export function time(ms, testid) {
  return h("time", { datetime: fullTime(ms) || undefined, title: fullTime(ms), testid }, clock(ms));
}

/** "+12 ms", "+3.4 s" between two instants. */
function after(from, to) {
  if (!from || !to) return "";
  const d = to - from;
  return d < 1000 ? `+${d} ms` : `+${(d / 1000).toFixed(1)} s`;
}

export function badge(text, kind, testid) {
  return h("span", { class: `badge badge-${kind}`, testid }, text);
}

export function json(v) {
  return v === undefined ? "—" : JSON.stringify(v);
}

export function pretty(v) {
  return JSON.stringify(v, null, 2);
}

export function notice(kind, text, testid) {
  return h("p", { class: `notice notice-${kind}`, testid, role: kind === "error" ? "alert" : "status" }, text);
}

/** Runs `fn` and shows an API or network failure in `slot` instead of throwing. */
export async function guarded(slot, fn) {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof Unauthorized) throw e;
    slot.replaceChildren(notice("error", `cannot reach the stub: ${e.message}`));
    return undefined;
  }
}

/** Coalesces bursts of events into one reload per key. */
export class Reloader {
  constructor(onError) {
    this.pending = new Map();
    this.onError = onError;
  }
  schedule(key, fn) {
    if (this.pending.has(key)) return;
    this.pending.set(
      key,
      setTimeout(async () => {
        this.pending.delete(key);
        try {
          await fn();
        } catch (e) {
          this.onError(e);
        }
      }, 30),
    );
  }
  cancel() {
    for (const t of this.pending.values()) clearTimeout(t);
    this.pending.clear();
  }
}

const OPEN_STATUSES = ["queued", "delivered"];

/** Device rows the fleet page shows at most; a filter narrows a larger fleet. */
const MAX_ROWS = 500;

/** Runs async jobs with at most `limit` in flight, so a big fleet never floods the stub. */
class Limiter {
  constructor(limit) {
    this.limit = limit;
    this.running = 0;
    this.queue = [];
  }
  run(job) {
    return new Promise((resolve, reject) => {
      this.queue.push({ job, resolve, reject });
      this.next();
    });
  }
  next() {
    while (this.running < this.limit && this.queue.length) {
      const { job, resolve, reject } = this.queue.shift();
      this.running += 1;
      job()
        .then(resolve, reject)
        .finally(() => {
          this.running -= 1;
          this.next();
        });
    }
  }
}

// ---------------------------------------------------------------------------------------
// Fleet page: gateways and devices, filterable

export class FleetPage {
  constructor(root, reloader) {
    this.root = root;
    this.reloader = reloader;
    this.gateways = [];
    this.devices = [];
    this.pending = new Map(); // device -> open message count
    this.delta = new Map(); // device -> properties out of sync
    this.limiter = new Limiter(6);
    this.filterText = sessionStorage.getItem("cloud-stub.filter") || "";
    this.filterState = sessionStorage.getItem("cloud-stub.state") || "all";
    this.build();
  }

  build() {
    this.gatewayBody = h("tbody", { testid: "gateways" });
    this.deviceBody = h("tbody", { testid: "devices" });
    this.count = h("span", { class: "muted", testid: "device-count" });
    const text = h("input", {
      type: "search",
      placeholder: "filter: id, gateway, kind, reason",
      value: this.filterText,
      testid: "filter-text",
      "aria-label": "filter devices",
      oninput: (e) => {
        this.filterText = e.target.value;
        sessionStorage.setItem("cloud-stub.filter", this.filterText);
        this.renderDevices();
      },
    });
    const state = h(
      "select",
      {
        testid: "filter-state",
        "aria-label": "online or offline",
        onchange: (e) => {
          this.filterState = e.target.value;
          sessionStorage.setItem("cloud-stub.state", this.filterState);
          this.renderDevices();
        },
      },
      h("option", { value: "all" }, "all devices"),
      h("option", { value: "online" }, "online"),
      h("option", { value: "offline" }, "offline"),
    );
    state.value = this.filterState;
    this.status = h("div", { class: "slot" });
    this.root.replaceChildren(
      h("h1", {}, "Fleet"),
      this.status,
      h(
        "section",
        { class: "card" },
        h("h2", {}, "Gateways"),
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            {},
            h(
              "thead",
              {},
              h("tr", {}, h("th", {}, "gateway"), h("th", {}, "state"), h("th", {}, "boot id"),
                h("th", {}, "software"), h("th", {}, "last seen"), h("th", { class: "num" }, "devices")),
            ),
            this.gatewayBody,
          ),
        ),
      ),
      h(
        "section",
        { class: "card" },
        h("div", { class: "card-head" }, h("h2", {}, "Devices"), this.count,
          h("div", { class: "filters" }, text, state)),
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            {},
            h(
              "thead",
              {},
              h("tr", {}, h("th", {}, "device"), h("th", {}, "gateway"), h("th", {}, "kind"),
                h("th", {}, "state"), h("th", { class: "num" }, "pending messages"),
                h("th", { class: "num" }, "twin out of sync")),
            ),
            this.deviceBody,
          ),
        ),
      ),
    );
  }

  async load() {
    await guarded(this.status, async () => {
      const [g, d] = await Promise.all([api.gateways(), api.devices()]);
      if (!g.ok || !d.ok) {
        const e = (g.ok ? d : g).error;
        this.status.replaceChildren(notice("error", `${e.code}: ${e.message}`));
        return;
      }
      this.status.replaceChildren();
      this.gateways = g.body;
      this.devices = d.body;
      this.pending.clear();
      this.delta.clear();
      this.renderGateways();
      await this.renderDevices();
    });
  }

  /** Loads the counts of the rows shown that lack them. */
  async loadCounts(ids) {
    await Promise.all(
      ids.flatMap((id) => [
        this.pending.has(id) ? null : this.limiter.run(() => this.loadPending(id)),
        this.delta.has(id) ? null : this.limiter.run(() => this.loadDelta(id)),
      ]),
    );
  }

  async loadPending(id) {
    const answers = await Promise.all(OPEN_STATUSES.map((s) => api.messages(id, s)));
    if (answers.every((a) => a.ok)) {
      this.pending.set(id, answers.reduce((n, a) => n + a.body.length, 0));
      this.renderCounts(id);
    }
  }

  async loadDelta(id) {
    const t = await api.twin(id);
    if (t.ok) {
      this.delta.set(id, t.body.delta);
      this.renderCounts(id);
    }
  }

  async loadDevice(id) {
    const d = await api.device(id);
    if (d.ok) {
      const i = this.devices.findIndex((x) => x.id === id);
      if (i >= 0) this.devices[i] = d.body;
      else this.devices.push(d.body);
      this.renderDevices();
    } else {
      this.reloader.schedule("fleet", () => this.load());
    }
  }

  onEvent(name, data) {
    switch (name) {
      case "ready":
      case "lagged":
      case "gateway":
        this.reloader.schedule("fleet", () => this.load());
        break;
      case "device":
        this.reloader.schedule(`device:${data.device}`, () => this.loadDevice(data.device));
        break;
      case "twin":
        this.reloader.schedule(`delta:${data.device}`, () => this.loadDelta(data.device));
        break;
      case "message":
        this.reloader.schedule(`pending:${data.device}`, () => this.loadPending(data.device));
        break;
      default:
    }
  }

  renderGateways() {
    if (!this.gateways.length) {
      this.gatewayBody.replaceChildren(
        h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No gateway has connected yet.")),
      );
      return;
    }
    this.gatewayBody.replaceChildren(
      ...this.gateways.map((g) =>
        h(
          "tr",
          { testid: `gateway-row-${g.id}`, "data-online": String(g.online) },
          h(
            "td",
            {},
            h("a", { href: `#/gateways/${encodeURIComponent(g.id)}/config`, testid: `gateway-link-${g.id}`, title: "configuration" },
              h("strong", {}, g.id)),
          ),
          h(
            "td",
            {},
            badge(g.online ? "online" : "offline", g.online ? "ok" : "bad", `gateway-status-${g.id}`),
            g.store_error ? h("div", { class: "reason" }, `store failing: ${g.store_error}`) : null,
          ),
          h("td", { class: "mono" }, g.boot_id || "—"),
          h("td", {}, g.software || "—"),
          h("td", {}, time(g.last_seen_ms)),
          h("td", { class: "num" }, g.devices.length),
        ),
      ),
    );
  }

  matches(d) {
    if (this.filterState === "online" && !d.online) return false;
    if (this.filterState === "offline" && d.online) return false;
    const q = this.filterText.trim().toLowerCase();
    if (!q) return true;
    return [d.id, d.gateway, d.kind, d.offline_reason || ""].some((s) => s.toLowerCase().includes(q));
  }

  renderDevices() {
    const matching = this.devices.filter((d) => this.matches(d));
    const shown = matching.slice(0, MAX_ROWS);
    this.count.textContent =
      matching.length > shown.length
        ? `first ${shown.length} of ${matching.length} matching (${this.devices.length} in all): filter to narrow`
        : `${shown.length} of ${this.devices.length}`;
    if (!shown.length) {
      this.deviceBody.replaceChildren(
        h("tr", {}, h("td", { colspan: 6, class: "empty" },
          this.devices.length ? "No device matches the filter." : "No device declared yet.")),
      );
      return;
    }
    this.deviceBody.replaceChildren(
      ...shown.map((d) =>
        h(
          "tr",
          { testid: `device-row-${d.id}`, "data-online": String(d.online) },
          h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.id)}/twin`, testid: `device-link-${d.id}` }, d.id)),
          h("td", {}, d.gateway),
          h("td", {}, d.kind),
          h(
            "td",
            {},
            badge(d.online ? "online" : "offline", d.online ? "ok" : "bad", `device-status-${d.id}`),
            d.online ? null : h("div", { class: "reason", testid: `device-reason-${d.id}` }, d.offline_reason || ""),
          ),
          h("td", { class: "num", testid: `device-pending-${d.id}` }),
          h("td", { class: "num", testid: `device-delta-${d.id}` }),
        ),
      ),
    );
    for (const d of shown) this.renderCounts(d.id);
    return this.loadCounts(shown.map((d) => d.id)).catch((e) => this.reloader.onError(e));
  }

  renderCounts(id) {
    const p = this.deviceBody.querySelector(`[data-testid="device-pending-${CSS.escape(id)}"]`);
    if (p) p.textContent = this.pending.has(id) ? String(this.pending.get(id)) : "…";
    const t = this.deviceBody.querySelector(`[data-testid="device-delta-${CSS.escape(id)}"]`);
    if (t) {
      const delta = this.delta.get(id);
      t.replaceChildren(
        delta === undefined
          ? "…"
          : delta.length
            ? h("span", { class: "delta", title: delta.join(", ") }, `${delta.length}: ${delta.join(", ")}`)
            : "0",
      );
    }
  }
}

// ---------------------------------------------------------------------------------------
// Device page: header, and a tab each for the twin, messages and methods

export class DevicePage {
  constructor(root, reloader, id, tab) {
    this.root = root;
    this.reloader = reloader;
    this.id = id;
    this.tab = tab;
    this.device = null;
    this.twin = null;
    this.messages = [];
    this.calls = [];
    this.build();
  }

  build() {
    const tabs = [
      ["twin", "Twin"],
      ["messages", "Messages"],
      ["methods", "Methods"],
    ];
    this.head = h("div", { class: "device-head", testid: "device-head" });
    this.status = h("div", { class: "slot" });
    this.body = h("div", { class: "tab-body", testid: `tab-${this.tab}-body` });
    this.root.replaceChildren(
      h("nav", { class: "crumbs" }, h("a", { href: "#/", testid: "back-to-fleet" }, "Fleet"), " / ", this.id),
      this.head,
      h(
        "div",
        { class: "tabs", role: "tablist" },
        ...tabs.map(([key, label]) =>
          h(
            "a",
            {
              href: `#/devices/${encodeURIComponent(this.id)}/${key}`,
              class: key === this.tab ? "tab active" : "tab",
              role: "tab",
              "aria-selected": String(key === this.tab),
              testid: `tab-${key}`,
            },
            label,
          ),
        ),
      ),
      this.status,
      this.body,
    );
    if (this.tab === "twin") this.buildTwin();
    else if (this.tab === "messages") this.buildMessages();
    else this.buildMethods();
  }

  async load() {
    await guarded(this.status, async () => {
      await this.loadDevice();
      if (this.tab === "twin") await this.loadTwin();
      else if (this.tab === "messages") await this.loadMessages();
    });
  }

  async loadDevice() {
    const d = await api.device(this.id);
    if (!d.ok) {
      this.device = null;
      this.head.replaceChildren(h("h1", {}, this.id), notice("error", `${d.error.code}: ${d.error.message}`, "device-error"));
      return;
    }
    this.device = d.body;
    const dev = d.body;
    this.head.replaceChildren(
      h("h1", {}, dev.id),
      h(
        "div",
        { class: "facts" },
        h("span", {}, "gateway ", h("strong", {}, dev.gateway)),
        h("span", {}, "kind ", h("strong", {}, dev.kind)),
        h(
          "span",
          { testid: "device-presence", "data-online": String(dev.online) },
          badge(dev.online ? "online" : "offline", dev.online ? "ok" : "bad"),
          dev.online ? null : h("span", { class: "reason" }, ` ${dev.offline_reason || ""}`),
        ),
        h("span", {}, "last seen ", time(dev.last_seen_ms)),
      ),
    );
    if (this.tab === "methods" && !this.methodsBuilt) this.fillMethods();
  }

  onEvent(name, data) {
    const mine = data && data.device === this.id;
    switch (name) {
      case "ready":
      case "lagged":
        this.reloader.schedule("device-page", () => this.load());
        break;
      case "gateway":
        this.reloader.schedule("device-head", () => this.loadDevice());
        break;
      case "device":
        if (mine) this.reloader.schedule("device-head", () => this.loadDevice());
        break;
      case "twin":
        if (mine && this.tab === "twin") this.reloader.schedule("twin", () => this.loadTwin());
        break;
      case "message":
        if (mine && this.tab === "messages") this.reloader.schedule("messages", () => this.loadMessages());
        break;
      case "rpc":
        if (mine) this.noteCall(data);
        break;
      default:
    }
  }

  // --- twin -----------------------------------------------------------------------------

  buildTwin() {
    this.versions = h("div", { class: "versions" });
    this.twinRows = h("tbody", { testid: "twin-rows" });
    this.desiredDoc = h("pre", { class: "doc", testid: "desired-doc" });
    this.reportedDoc = h("pre", { class: "doc", testid: "reported-doc" });
    this.patchText = h("textarea", {
      rows: 5,
      spellcheck: "false",
      testid: "desired-patch",
      "aria-label": "desired merge patch",
      placeholder: '{"maxSpeed": 30}',
    });
    this.patchResult = h("div", { class: "slot", testid: "desired-result" });
    this.patchButton = h("button", { type: "submit", testid: "desired-submit" }, "Apply to desired");
    const form = h(
      "form",
      { class: "card", onsubmit: (e) => { e.preventDefault(); this.submitPatch(); } },
      h("h2", {}, "Change desired"),
      h("p", { class: "muted" },
        "A JSON merge patch: keys set a value, null deletes one. It is sent with If-Match on the version shown, so a change made meanwhile by someone else is never overwritten."),
      this.patchText,
      h("div", { class: "actions" }, this.patchButton, h("span", { class: "muted", testid: "patch-base" })),
      this.patchResult,
    );
    this.body.replaceChildren(
      h(
        "section",
        { class: "card" },
        h("div", { class: "card-head" }, h("h2", {}, "Properties"), this.versions),
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { class: "twin" },
            h(
              "thead",
              {},
              h("tr", {}, h("th", {}, "property"), h("th", {}, "desired"), h("th", {}, "reported"),
                h("th", {}, "apply state"), h("th", {}, "desired set"), h("th", {}, "reported at")),
            ),
            this.twinRows,
          ),
        ),
      ),
      h(
        "div",
        { class: "side-by-side" },
        h("section", { class: "card" }, h("h2", {}, "Desired"), this.desiredDoc),
        h("section", { class: "card" }, h("h2", {}, "Reported"), this.reportedDoc),
      ),
      form,
    );
  }

  async loadTwin() {
    const t = await api.twin(this.id);
    if (!t.ok) {
      this.status.replaceChildren(notice("error", `${t.error.code}: ${t.error.message}`));
      return;
    }
    this.twin = t.body;
    this.renderTwin();
  }

  renderTwin() {
    const t = this.twin;
    this.versions.replaceChildren(
      h("span", {}, "desired version ", h("strong", { testid: "desired-version" }, t.desired_version)),
      h("span", {}, "reported version ", h("strong", { testid: "reported-version" }, t.reported_version)),
      h("span", { testid: "delta-count", class: t.delta.length ? "delta" : "muted" },
        t.delta.length ? `${t.delta.length} out of sync` : "in sync"),
    );
    const el = this.body.querySelector('[data-testid="patch-base"]');
    if (el) el.textContent = `based on desired version ${t.desired_version}`;
    const declared = (this.device && this.device.twin_properties) || [];
    const props = [...new Set([...Object.keys(t.desired), ...Object.keys(t.reported), ...Object.keys(t.apply)])].sort();
    if (!props.length) {
      this.twinRows.replaceChildren(
        h("tr", {}, h("td", { colspan: 6, class: "empty" },
          `Nothing desired or reported yet.${declared.length ? ` Declared properties: ${declared.join(", ")}.` : ""}`)),
      );
    } else {
      this.twinRows.replaceChildren(...props.map((p) => this.twinRow(t, p)));
    }
    this.desiredDoc.textContent = pretty(t.desired);
    this.reportedDoc.textContent = pretty(t.reported);
  }

  twinRow(t, p) {
    const inDelta = t.delta.includes(p);
    const a = t.apply[p];
    let state;
    if (!a) {
      state = p in t.desired ? badge("pending", "warn") : h("span", { class: "muted" }, "reported only");
    } else {
      const kind = { applied: "ok", different: "warn", refused: "bad", pending: "info" }[a.state] || "info";
      const stale = p in t.desired && a.desired_version < t.desired_version;
      state = h(
        "div",
        {},
        badge(a.state, kind),
        a.attempts ? h("span", { class: "muted" }, ` ${a.attempts} attempts`) : null,
        h("span", { class: "muted" }, ` v${a.desired_version}`),
        stale ? h("span", { class: "muted" }, " (older version)") : null,
        a.reason ? h("div", { class: "reason" }, a.reason) : null,
        h("div", { class: "muted small" }, time(a.at_ms)),
      );
    }
    return h(
      "tr",
      { testid: `twin-row-${p}`, class: inDelta ? "in-delta" : "", "data-delta": String(inDelta), "data-state": a ? a.state : "" },
      h("td", {}, h("strong", {}, p), inDelta ? h("span", { class: "delta-mark", title: "desired and reported differ" }, " ≠") : null),
      h("td", { class: "mono", testid: `twin-desired-${p}` }, p in t.desired ? json(t.desired[p]) : "—"),
      h("td", { class: "mono", testid: `twin-reported-${p}` }, p in t.reported ? json(t.reported[p]) : "—"),
      h("td", { testid: `twin-state-${p}` }, state),
      h("td", {}, time(t.desired_updated_ms[p])),
      h("td", {}, time(t.reported_updated_ms[p])),
    );
  }

  async submitPatch() {
    let patch;
    try {
      patch = JSON.parse(this.patchText.value);
    } catch (e) {
      this.patchResult.replaceChildren(notice("error", `not JSON: ${e.message}`, "desired-error"));
      return;
    }
    if (!patch || typeof patch !== "object" || Array.isArray(patch)) {
      this.patchResult.replaceChildren(notice("error", "the patch must be a JSON object", "desired-error"));
      return;
    }
    const version = this.twin ? this.twin.desired_version : 0;
    this.patchButton.disabled = true;
    try {
      const a = await api.patchDesired(this.id, patch, version);
      if (a.ok) {
        this.patchResult.replaceChildren(
          notice("ok", `desired version ${a.body.desired_version} committed; the gateway applies it and reports back.`, "desired-ok"),
        );
        this.patchText.value = "";
        await this.loadTwin();
      } else if (a.status === 412) {
        await this.loadTwin();
        this.patchResult.replaceChildren(
          notice("error",
            `Someone else changed the desired twin since you loaded version ${version}; it is now version ${this.twin ? this.twin.desired_version : "?"} (reloaded above). Check it and apply your change again.`,
            "desired-conflict"),
        );
      } else {
        this.patchResult.replaceChildren(notice("error", `${a.error.code}: ${a.error.message}`, "desired-error"));
      }
    } finally {
      this.patchButton.disabled = false;
    }
  }

  // --- messages -------------------------------------------------------------------------

  buildMessages() {
    this.payloadText = h("textarea", {
      rows: 2,
      spellcheck: "false",
      testid: "message-payload",
      "aria-label": "message payload",
      value: '{"command": "RESTART"}',
    });
    this.ttlInput = h("input", { type: "number", min: 1, max: 172800, value: 60, testid: "message-ttl", "aria-label": "TTL in seconds" });
    this.sendResult = h("div", { class: "slot", testid: "message-result" });
    this.commandPick = h("span", { class: "commands" });
    this.openList = h("div", { class: "messages", testid: "message-queue" });
    this.historyList = h("div", { class: "messages", testid: "message-history" });
    const form = h(
      "form",
      { class: "card", onsubmit: (e) => { e.preventDefault(); this.sendMessage(); } },
      h("h2", {}, "Send a command"),
      h("p", { class: "muted small" },
        "Queued until the device is reachable, dropped unexecuted when its TTL passes, executed at most once."),
      h("div", { class: "row" }, h("label", { class: "grow" }, "payload", this.payloadText)),
      h(
        "div",
        { class: "actions" },
        h("label", {}, "TTL (s) ", this.ttlInput),
        h("button", { type: "submit", testid: "message-send" }, "Send"),
      ),
      h(
        "div",
        { class: "actions" },
        this.commandPick,
        h("button", { type: "button", class: "danger", testid: "message-purge", onclick: () => this.purge() }, "Purge open messages"),
      ),
      this.sendResult,
    );
    this.body.replaceChildren(
      h("div", { class: "side-by-side" }, form, h("section", { class: "card" }, h("h2", {}, "Queue"), this.openList)),
      h("section", { class: "card" }, h("h2", {}, "History"), this.historyList),
    );
  }

  async loadMessages() {
    if (this.device) {
      this.commandPick.replaceChildren(
        ...this.device.commands.map((c) =>
          h("button", {
            type: "button",
            class: "chip",
            title: "fill the payload",
            onclick: () => { this.payloadText.value = JSON.stringify({ command: c }); },
          }, c),
        ),
      );
    }
    const m = await api.messages(this.id);
    if (!m.ok) {
      this.status.replaceChildren(notice("error", `${m.error.code}: ${m.error.message}`));
      return;
    }
    this.messages = m.body;
    const open = this.messages.filter((x) => OPEN_STATUSES.includes(x.status));
    const done = this.messages.filter((x) => !OPEN_STATUSES.includes(x.status)).reverse();
    this.openList.replaceChildren(...(open.length ? open.map((x) => this.messageCard(x)) : [h("p", { class: "empty" }, "No open message.")]));
    this.historyList.replaceChildren(...(done.length ? done.map((x) => this.messageCard(x)) : [h("p", { class: "empty" }, "No finished message yet.")]));
  }

  messageCard(m) {
    const final = !OPEN_STATUSES.includes(m.status);
    const kind = { completed: "ok", queued: "info", delivered: "info", rejected: "bad", failed: "bad", expired: "warn", may_have_run: "warn", purged: "muted" }[m.status] || "info";
    const steps = [
      ["queued", m.enqueued_at_ms, m.enqueued_at_ms],
      ["sent", m.sent_at_ms, m.enqueued_at_ms],
      ["delivered", m.delivered_at_ms, m.sent_at_ms],
      [final ? m.status : "finished", m.finished_at_ms, m.delivered_at_ms || m.sent_at_ms || m.enqueued_at_ms],
    ];
    return h(
      "article",
      { class: `message ${final ? "final" : "open"}`, testid: `message-${m.id}`, "data-status": m.status },
      h(
        "header",
        {},
        badge(m.status, kind, `message-status-${m.id}`),
        h("code", { class: "payload" }, json(m.payload)),
        h("span", { class: "muted small mono", title: m.id }, m.id.slice(0, 8)),
      ),
      h(
        "ol",
        { class: "timeline", testid: `message-timeline-${m.id}` },
        ...steps.map(([name, at, from], i) =>
          h(
            "li",
            { class: at ? "done" : "todo", "data-step": i === 3 ? "finished" : name, "data-done": String(!!at) },
            h("span", { class: "step" }, name),
            h("span", { class: "when" }, at ? clock(at) : "—"),
            h("span", { class: "muted small" }, i && at ? after(from, at) : ""),
          ),
        ),
      ),
      m.reason || m.device_status
        ? h("p", { class: "reason", testid: `message-reason-${m.id}` },
          [m.reason, m.device_status ? `device status ${m.device_status}` : null].filter(Boolean).join("; "))
        : null,
      h("p", { class: "muted small" }, final ? "" : `expires ${clock(m.expires_at_ms)}`),
    );
  }

  async sendMessage() {
    let payload;
    try {
      payload = JSON.parse(this.payloadText.value);
    } catch (e) {
      this.sendResult.replaceChildren(notice("error", `payload is not JSON: ${e.message}`, "message-error"));
      return;
    }
    const ttl = Number(this.ttlInput.value);
    const a = await api.send(this.id, payload, ttl);
    if (a.ok) {
      this.sendResult.replaceChildren(
        notice("ok", `queued as ${a.body.id.slice(0, 8)}, expires ${clock(a.body.expires_at_ms)}`, "message-queued"),
      );
      this.sendResult.dataset.id = a.body.id;
      await this.loadMessages();
    } else {
      this.sendResult.replaceChildren(notice("error", `${a.error.code}: ${a.error.message}`, "message-error"));
    }
  }

  async purge() {
    const a = await api.purge(this.id);
    this.sendResult.replaceChildren(
      a.ok ? notice("ok", `${a.body.purged} open messages purged`, "message-purged") : notice("error", `${a.error.code}: ${a.error.message}`, "message-error"),
    );
    await this.loadMessages();
  }

  // --- methods --------------------------------------------------------------------------

  buildMethods() {
    this.methodSelect = h("select", { testid: "method-select", "aria-label": "method", onchange: () => this.renderParams() });
    this.paramsBox = h("div", { class: "params", testid: "method-params" });
    this.timeoutInput = h("input", { type: "number", min: 1, max: 300, step: "any", value: 5, testid: "method-timeout", "aria-label": "timeout in seconds" });
    this.callButton = h("button", { type: "submit", testid: "method-call" }, "Call");
    this.callResult = h("div", { class: "slot result", testid: "method-result" });
    this.callLog = h("ol", { class: "call-log", testid: "rpc-log" });
    this.body.replaceChildren(
      h(
        "div",
        { class: "side-by-side" },
        h(
          "form",
          { class: "card", novalidate: true, onsubmit: (e) => { e.preventDefault(); this.callMethod(); } },
          h("h2", {}, "Call a method"),
          h("p", { class: "muted" }, "Synchronous: the device answers within the timeout, or the call fails with a coded error. Nothing is queued or retried."),
          h("label", {}, "method ", this.methodSelect),
          this.paramsBox,
          h("div", { class: "actions" }, h("label", {}, "timeout (s) ", this.timeoutInput), this.callButton),
        ),
        h("section", { class: "card" }, h("h2", {}, "Result"), this.callResult),
      ),
      h("section", { class: "card" }, h("h2", {}, "Calls to this device"), this.callLog),
    );
    this.callResult.replaceChildren(h("p", { class: "empty" }, "No call yet."));
    this.callLog.replaceChildren();
  }

  fillMethods() {
    const methods = (this.device && this.device.methods) || [];
    this.methodsBuilt = true;
    const wanted = sessionStorage.getItem(`cloud-stub.method.${this.id}`);
    this.methodSelect.replaceChildren(...methods.map((m) => h("option", { value: m.name }, m.name)));
    if (wanted && methods.some((m) => m.name === wanted)) this.methodSelect.value = wanted;
    this.renderParams();
  }

  method() {
    return ((this.device && this.device.methods) || []).find((m) => m.name === this.methodSelect.value);
  }

  renderParams() {
    const m = this.method();
    if (!m) {
      this.paramsBox.replaceChildren(h("p", { class: "empty" }, "This device declares no method."));
      return;
    }
    sessionStorage.setItem(`cloud-stub.method.${this.id}`, m.name);
    const entries = Object.entries(m.params || {});
    if (!entries.length) {
      this.paramsBox.replaceChildren(h("p", { class: "muted" }, "No parameters."));
      return;
    }
    this.paramsBox.replaceChildren(
      ...entries.map(([name, spec]) => {
        const testid = `param-${name}`;
        let input;
        switch (spec.type) {
          case "number":
          case "integer":
            input = h("input", { type: "number", step: spec.type === "integer" ? 1 : "any", min: spec.min, max: spec.max, testid, name });
            break;
          case "string":
            input = h("input", { type: "text", testid, name });
            break;
          case "bool":
            input = h("input", { type: "checkbox", testid, name });
            break;
          default:
            input = h("textarea", { rows: 2, spellcheck: "false", testid, name, placeholder: spec.type === "array" ? "[]" : "{}" });
        }
        input.dataset.type = spec.type;
        const range = [spec.min !== undefined ? `min ${spec.min}` : null, spec.max !== undefined ? `max ${spec.max}` : null].filter(Boolean).join(", ");
        return h(
          "label",
          { class: "param" },
          h("span", { class: "param-name" }, name, spec.required ? h("span", { class: "required", title: "required" }, " *") : null),
          input,
          h("span", { class: "muted small" }, [spec.type, spec.required ? "required" : "optional", range].filter(Boolean).join(" · ")),
        );
      }),
    );
  }

  /** The params the form holds: empty optional fields are left out. */
  readParams() {
    const m = this.method();
    const params = {};
    for (const [name, spec] of Object.entries((m && m.params) || {})) {
      const input = this.paramsBox.querySelector(`[name="${CSS.escape(name)}"]`);
      if (!input) continue;
      if (spec.type === "bool") {
        params[name] = input.checked;
        continue;
      }
      const raw = input.value.trim();
      if (raw === "") continue;
      if (spec.type === "number" || spec.type === "integer") {
        const n = Number(raw);
        params[name] = Number.isNaN(n) ? raw : n;
      } else if (spec.type === "string") {
        params[name] = input.value;
      } else {
        try {
          params[name] = JSON.parse(raw);
        } catch {
          throw new Error(`${name} is not JSON`);
        }
      }
    }
    return params;
  }

  async callMethod() {
    const m = this.method();
    if (!m) return;
    let params;
    try {
      params = this.readParams();
    } catch (e) {
      this.callResult.replaceChildren(notice("error", e.message, "method-error"));
      return;
    }
    const timeout = Number(this.timeoutInput.value) || 5;
    this.callButton.disabled = true;
    this.callResult.dataset.outcome = "";
    this.callResult.replaceChildren(h("p", { class: "muted" }, `calling ${m.name}…`));
    const started = performance.now();
    try {
      const a = await api.invoke(this.id, m.name, params, timeout);
      const ms = Math.round(performance.now() - started);
      if (a.ok) {
        this.callResult.dataset.outcome = "ok";
        this.callResult.replaceChildren(
          h("p", {}, badge("ok", "ok", "method-outcome"), ` ${m.name} answered in `, h("strong", { testid: "method-elapsed" }, `${ms} ms`), ` · device status ${a.body.status}`),
          h("pre", { class: "doc", testid: "method-output" }, pretty(a.body.result)),
        );
      } else {
        const e = a.error;
        this.callResult.dataset.outcome = e.code;
        this.callResult.replaceChildren(
          h("p", {}, badge(e.code, "bad", "method-error-code"), ` after `, h("strong", { testid: "method-elapsed" }, `${ms} ms`), ` · HTTP ${a.status}`),
          h("p", { class: "reason", testid: "method-error-message" }, e.message),
          a.body && a.body.detail !== undefined ? h("pre", { class: "doc" }, pretty(a.body.detail)) : null,
        );
      }
    } finally {
      this.callButton.disabled = false;
    }
  }

  noteCall(data) {
    if (!this.callLog) return;
    this.calls.unshift({ ...data, at: Date.now() });
    this.calls.length = Math.min(this.calls.length, 20);
    this.callLog.replaceChildren(
      ...this.calls.map((c) =>
        h("li", {}, time(c.at), " ", h("strong", {}, c.method), " ",
          badge(c.outcome, c.outcome === "ok" ? "ok" : "bad"), h("span", { class: "muted" }, ` ${c.ms} ms`)),
      ),
    );
  }
}
