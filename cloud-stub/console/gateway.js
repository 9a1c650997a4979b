// The gateway's own twin (#/gateways/{id}/config): the configuration the cloud desires for a
// gateway, what the gateway reports it made of it, what it runs, and a merge patch to change
// the desired half. Reloaded on the gateway's `gateway_config` events.

import { api } from "./api.js";
import { badge, guarded, h, notice, pretty, time } from "./views.js";

/** Badge kinds of the remote states a gateway reports. */
const STATE_KIND = { applied: "ok", refused: "bad", rolled_back: "bad", none: "muted" };

/** Badge kinds of a reload's outcomes. */
const RELOAD_KIND = { applied: "ok", applied_partly: "warn", unchanged: "muted", invalid: "bad", failed: "bad" };

/** "a, b" or "—". */
const list = (xs) => (xs && xs.length ? xs.join(", ") : "—");

export class GatewayConfigPage {
  constructor(root, reloader, id) {
    this.root = root;
    this.reloader = reloader;
    this.id = id;
    this.view = null;
    this.build();
  }

  build() {
    this.facts = h("div", { class: "facts", testid: "gwconfig-facts" });
    this.status = h("div", { class: "slot" });
    this.desiredDoc = h("pre", { class: "doc", testid: "gwconfig-desired" });
    this.reported = h("div", { testid: "gwconfig-reported" });
    this.running = h("div", { testid: "gwconfig-running" });
    this.patchText = h("textarea", {
      rows: 6,
      spellcheck: "false",
      testid: "gwconfig-patch",
      "aria-label": "configuration merge patch",
      placeholder: '{"devices": {"agv-9": {"kind": "http", "profile": "agv", "base_url": "http://127.0.0.1:9009"}}}',
    });
    this.patchButton = h("button", { type: "submit", testid: "gwconfig-submit" }, "Send");
    this.patchResult = h("div", { class: "slot", testid: "gwconfig-result" });
    this.root.replaceChildren(
      h("nav", { class: "crumbs" }, h("a", { href: "#/", testid: "back-to-fleet" }, "Fleet"), " / ", this.id, " / configuration"),
      h("div", { class: "device-head" }, h("h1", {}, `${this.id} configuration`), this.facts),
      this.status,
      h(
        "div",
        { class: "side-by-side" },
        h("section", { class: "card" }, h("h2", {}, "Desired"), this.desiredDoc),
        h("section", { class: "card" }, h("h2", {}, "Reported"), this.reported),
      ),
      h("section", { class: "card" }, h("h2", {}, "Running"), this.running),
      h(
        "form",
        { class: "card", onsubmit: (e) => { e.preventDefault(); this.submit(); } },
        h("h2", {}, "Change desired"),
        h("p", { class: "muted" },
          "A JSON merge patch of the sections devices, profiles, serial_ports and cloud: a key sets an entry, null removes it. The stub checks its structure; the gateway checks it against its own limits ([remote_config]) and reports what it made of it above."),
        this.patchText,
        h("div", { class: "actions" }, this.patchButton),
        this.patchResult,
      ),
    );
  }

  async load() {
    await guarded(this.status, async () => {
      const a = await api.gatewayConfig(this.id);
      if (!a.ok) {
        this.status.replaceChildren(notice("error", `${a.error.code}: ${a.error.message}`, "gwconfig-error-load"));
        return;
      }
      this.status.replaceChildren();
      this.view = a.body;
      this.render();
    });
  }

  onEvent(name, data) {
    switch (name) {
      case "ready":
      case "lagged":
        this.reloader.schedule("gwconfig", () => this.load());
        break;
      case "gateway_config":
        if (data && data.gateway === this.id) this.reloader.schedule("gwconfig", () => this.load());
        break;
      default:
    }
  }

  render() {
    const v = this.view;
    const r = v.reported;
    this.facts.replaceChildren(
      h("span", { testid: "gwconfig-sync", "data-in-sync": String(v.in_sync) },
        badge(v.in_sync ? "in sync" : "out of sync", v.in_sync ? "ok" : "warn")),
      h("span", {}, "desired version ", h("strong", { testid: "gwconfig-desired-version" }, v.desired.version)),
      h("span", {}, "reported about ", h("strong", { testid: "gwconfig-reported-version" }, r ? r.remote.version : "—")),
    );
    this.desiredDoc.textContent = pretty(v.desired.config);
    if (!r) {
      this.reported.replaceChildren(h("p", { class: "empty" }, "The gateway has not reported its configuration yet."));
      this.running.replaceChildren(h("p", { class: "empty" }, "Nothing reported yet."));
      return;
    }
    this.reported.replaceChildren(this.remote(r.remote, v.desired.version), this.reload(r.last_reload), this.identity(r));
    const sections = Object.entries(r.running || {});
    this.running.replaceChildren(
      ...(sections.length
        ? sections.map(([name, section]) =>
          h(
            "details",
            { testid: `gwconfig-running-${name}` },
            h("summary", {}, name, h("span", { class: "muted" }, ` (${Object.keys(section || {}).length})`)),
            h("pre", { class: "doc" }, pretty(section)),
          ))
        : [h("p", { class: "empty" }, "No running section reported.")]),
    );
  }

  /** What became of the remote configuration: state, version, when, and every problem. */
  remote(m, desired) {
    const probation = m.state === "applied" && m.probation;
    const label = probation ? "applied on probation" : m.state;
    return h(
      "div",
      {},
      h(
        "p",
        {},
        "remote configuration ",
        h("span", { testid: "gwconfig-state", "data-state": m.state, "data-probation": String(!!m.probation) },
          badge(label, probation ? "warn" : STATE_KIND[m.state] || "info")),
        ` version ${m.version} · `,
        time(m.at_ms),
        m.version < desired ? h("span", { class: "muted" }, ` · not yet about desired version ${desired}`) : null,
      ),
      m.enabled ? null : h("p", { class: "reason" }, "This gateway takes no remote configuration ([remote_config] enabled = false)."),
      m.problems && m.problems.length
        ? h("ul", { class: "problems", testid: "gwconfig-problems" }, ...m.problems.map((p) => h("li", {}, p)))
        : null,
    );
  }

  /** The last reload (SIGHUP or remote) and what it changed. */
  reload(l) {
    if (!l) return h("p", { class: "muted", testid: "gwconfig-reload" }, "No reload since the gateway started.");
    const rows = [
      ["added", l.added],
      ["removed", l.removed],
      ["replaced", l.replaced],
      ["restart needed", l.restart_needed],
    ];
    return h(
      "div",
      { testid: "gwconfig-reload", "data-outcome": l.outcome },
      h("p", {}, "last reload ", badge(l.outcome, RELOAD_KIND[l.outcome] || "info"), " ", time(l.at_ms)),
      h("dl", { class: "pairs" }, ...rows.flatMap(([k, xs]) => [h("dt", {}, k), h("dd", { testid: `gwconfig-reload-${k.replace(" ", "_")}` }, list(xs))])),
      l.error ? h("p", { class: "reason" }, l.error) : null,
      l.problems && l.problems.length ? h("ul", { class: "problems" }, ...l.problems.map((p) => h("li", {}, p))) : null,
    );
  }

  identity(r) {
    return h(
      "dl",
      { class: "pairs" },
      h("dt", {}, "fingerprint"), h("dd", { class: "mono", testid: "gwconfig-fingerprint" }, r.fingerprint),
      h("dt", {}, "software"), h("dd", {}, r.software),
      h("dt", {}, "boot id"), h("dd", { class: "mono" }, r.boot_id),
    );
  }

  async submit() {
    let patch;
    try {
      patch = JSON.parse(this.patchText.value);
    } catch (e) {
      this.patchResult.replaceChildren(notice("error", `not JSON: ${e.message}`, "gwconfig-error"));
      return;
    }
    this.patchButton.disabled = true;
    try {
      const a = await api.patchGatewayConfig(this.id, patch);
      if (a.ok) {
        this.patchResult.replaceChildren(
          notice("ok", `desired version ${a.body.desired.version} sent; the gateway checks it and reports back.`, "gwconfig-ok"),
        );
        this.patchText.value = "";
        this.view = a.body;
        this.render();
      } else {
        this.patchResult.replaceChildren(notice("error", `${a.error.code}: ${a.error.message}`, "gwconfig-error"));
      }
    } finally {
      this.patchButton.disabled = false;
    }
  }
}
