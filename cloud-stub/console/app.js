// The console's entry: asks for the token when the API wants one, follows the event stream,
// and shows the page the location hash names (#/, #/devices/{id}/{twin|messages|methods},
// #/gateways/{id}/config).

import { api, follow, setToken, token, Unauthorized } from "./api.js";
import { DevicePage, FleetPage, h, Reloader } from "./views.js";
import { GatewayConfigPage } from "./gateway.js";

const main = document.getElementById("main");
const live = document.getElementById("live");
const logout = document.getElementById("logout");

let page = null;
let stream = null;
const reloader = new Reloader(failed);

function setLive(state) {
  live.dataset.state = state;
  live.textContent = { live: "live", connecting: "connecting…", off: "not connected" }[state] || state;
}

/** A request was refused for its token: forget it and ask again. */
function failed(e) {
  if (e instanceof Unauthorized) {
    askToken(token() ? "The token was refused." : "");
    return;
  }
  console.error(e);
}

function route() {
  const parts = (location.hash.replace(/^#\/?/, "") || "").split("/").filter(Boolean).map(decodeURIComponent);
  reloader.cancel();
  if (parts[0] === "devices" && parts[1]) {
    const tab = ["twin", "messages", "methods"].includes(parts[2]) ? parts[2] : "twin";
    page = new DevicePage(main, reloader, parts[1], tab);
    document.title = `${parts[1]} · ${tab} · cloud-stub`;
  } else if (parts[0] === "gateways" && parts[1]) {
    page = new GatewayConfigPage(main, reloader, parts[1]);
    document.title = `${parts[1]} · configuration · cloud-stub`;
  } else {
    page = new FleetPage(main, reloader);
    document.title = "Fleet · cloud-stub";
  }
  page.load().catch(failed);
}

function onEvent(name, data) {
  if (page) page.onEvent(name, data);
}

function startStream() {
  if (stream) stream.stop();
  stream = follow({
    onEvent,
    onState: setLive,
    onUnauthorized: () => askToken("The token was refused."),
  });
}

function askToken(why) {
  if (stream) stream.stop();
  stream = null;
  setToken("");
  setLive("off");
  reloader.cancel();
  logout.hidden = true;
  const input = h("input", { type: "password", autocomplete: "current-password", testid: "login-token", "aria-label": "API token", required: true });
  const error = h("p", { class: "notice notice-error", testid: "login-error", role: "alert", hidden: !why }, why || "");
  const form = h(
    "form",
    {
      class: "card login",
      testid: "login",
      onsubmit: async (e) => {
        e.preventDefault();
        setToken(input.value.trim());
        if (await start()) return;
        error.hidden = false;
        error.textContent = "The token was refused.";
      },
    },
    h("h1", {}, "Sign in"),
    h("p", {}, "This cloud stub requires its API token (", h("code", {}, "--api-token"), "). It is kept for this browser tab only."),
    h("label", {}, "API token ", input),
    h("div", { class: "actions" }, h("button", { type: "submit", testid: "login-submit" }, "Open console")),
    error,
  );
  main.replaceChildren(form);
  input.focus();
}

/** Checks the token (or that none is needed) and shows the page; false when refused. */
async function start() {
  try {
    const a = await api.gateways();
    if (!a.ok) throw new Error(`HTTP ${a.status}`);
  } catch (e) {
    if (e instanceof Unauthorized) {
      setToken("");
      if (!main.querySelector('[data-testid="login"]')) askToken("");
      return false;
    }
    main.replaceChildren(h("p", { class: "notice notice-error" }, `cannot reach the stub: ${e.message}`));
    return true;
  }
  logout.hidden = !token();
  startStream();
  route();
  return true;
}

window.addEventListener("hashchange", () => {
  if (stream) route();
});
logout.addEventListener("click", () => askToken(""));
start();
