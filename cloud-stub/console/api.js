// The operator API as the console uses it: JSON requests carrying the bearer token, and the
// event stream (GET /api/v1/events) read with fetch() and a stream reader when a token is set
// (so it travels in the Authorization header, never in the URL), or with EventSource when the
// API is open.

const TOKEN_KEY = "cloud-stub.token";

/** The token kept for this browser tab, or "" when none. */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Raised for a 401: the page asks for the token again. */
export class Unauthorized extends Error {}

/** An answer of the API: HTTP status, headers and the JSON body (null when none). */
export class Answer {
  constructor(status, headers, body) {
    this.status = status;
    this.headers = headers;
    this.body = body;
  }
  get ok() {
    return this.status >= 200 && this.status < 300;
  }
  /** The coded error of a failed answer: {code, message}. */
  get error() {
    const b = this.body || {};
    return { code: b.code || `http_${this.status}`, message: b.message || "" };
  }
}

/**
 * One request. `body` is sent as JSON when given; `headers` adds headers (If-Match).
 * A 401 throws Unauthorized; every other status is returned.
 */
export async function request(method, path, { body, headers = {} } = {}) {
  const h = { Accept: "application/json", ...headers };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  if (body !== undefined) h["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers: h,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  if (res.status === 401) throw new Unauthorized(await res.text());
  const text = await res.text();
  let parsed = null;
  if (text) {
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = { code: `http_${res.status}`, message: text };
    }
  }
  return new Answer(res.status, res.headers, parsed);
}

export const get = (path) => request("GET", path);

const dev = (id) => `/api/v1/devices/${encodeURIComponent(id)}`;
const gw = (id) => `/api/v1/gateways/${encodeURIComponent(id)}`;

export const api = {
  gateways: () => get("/api/v1/gateways"),
  gatewayConfig: (id) => get(`${gw(id)}/config`),
  patchGatewayConfig: (id, patch) => request("PATCH", `${gw(id)}/config`, { body: patch }),
  devices: () => get("/api/v1/devices"),
  device: (id) => get(dev(id)),
  twin: (id) => get(`${dev(id)}/twin`),
  patchDesired: (id, patch, version) =>
    request("PATCH", `${dev(id)}/twin/desired`, {
      body: patch,
      headers: { "If-Match": `"${version}"` },
    }),
  messages: (id, status) =>
    get(`${dev(id)}/messages${status ? `?status=${encodeURIComponent(status)}` : ""}`),
  send: (id, payload, ttlSeconds) =>
    request("POST", `${dev(id)}/messages`, { body: { payload, ttl_seconds: ttlSeconds } }),
  purge: (id) => request("DELETE", `${dev(id)}/messages`),
  invoke: (id, method, params, timeoutSeconds) =>
    request("POST", `${dev(id)}/methods/${encodeURIComponent(method)}`, {
      body: { params, timeout_seconds: timeoutSeconds },
    }),
};

/** Event names the stream carries. */
export const EVENT_KINDS = ["ready", "lagged", "gateway", "device", "twin", "message", "rpc", "gateway_config"];

/**
 * Follows GET /api/v1/events until `stop()` is called: `onEvent(name, data)` for every event,
 * `onState("live" | "connecting")` as the connection comes and goes, `onUnauthorized()` when
 * the token is refused. A dropped stream is opened again after a backoff; its `ready` event
 * tells the page to reload what it shows, since changes in between were not seen.
 */
export function follow({ onEvent, onState, onUnauthorized }) {
  let stopped = false;
  let source = null;
  let abort = null;
  let retry = 500;
  let timer = null;

  const deliver = (name, raw) => {
    let data = null;
    try {
      data = raw ? JSON.parse(raw) : null;
    } catch {
      return;
    }
    if (name === "ready") {
      retry = 500;
      onState("live");
    }
    onEvent(name, data);
  };

  const again = () => {
    if (stopped) return;
    onState("connecting");
    timer = setTimeout(open, retry);
    retry = Math.min(retry * 2, 10000);
  };

  const viaEventSource = () => {
    source = new EventSource("/api/v1/events");
    for (const name of EVENT_KINDS) {
      source.addEventListener(name, (e) => deliver(name, e.data));
    }
    // EventSource reconnects by itself; its next `ready` says the stream is back.
    source.onerror = () => onState("connecting");
  };

  const viaFetch = async () => {
    abort = new AbortController();
    try {
      const res = await fetch("/api/v1/events", {
        headers: { Accept: "text/event-stream", Authorization: `Bearer ${token()}` },
        signal: abort.signal,
        cache: "no-store",
      });
      if (res.status === 401) {
        onUnauthorized();
        return;
      }
      if (!res.ok || !res.body) throw new Error(`event stream: HTTP ${res.status}`);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let name = "message";
      let data = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (line === "") {
            if (data.length) deliver(name, data.join("\n"));
            name = "message";
            data = [];
          } else if (line.startsWith(":")) {
            // keep-alive comment
          } else {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") name = val;
            else if (field === "data") data.push(val);
          }
        }
      }
    } catch (e) {
      if (stopped) return;
      console.debug("event stream dropped", e);
    }
    again();
  };

  const open = () => {
    if (stopped) return;
    onState("connecting");
    if (token()) viaFetch();
    else viaEventSource();
  };

  open();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      if (source) source.close();
      if (abort) abort.abort();
    },
  };
}
