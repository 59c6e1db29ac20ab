// Calls to the genserve API. Every URL is relative to the page ("models", not "/models"), so the page
// works behind a reverse proxy that serves the app under a prefix such as /genserve/.

const KEY_STORE = "genserve.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

/** An error the API answered: its status and its own `detail`, as text. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

const listeners = new Set();
/** Call fn(error) whenever a request is refused for its key (401). */
export function onUnauthorized(fn) {
  listeners.add(fn);
}

/** The API's `detail` as one line of text (FastAPI's list of field errors included). */
export function detailText(body, status) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  }
  return `HTTP ${status}`;
}

function headers(extra) {
  const h = new Headers(extra || {});
  const key = apiKey();
  if (key) h.set("X-API-Key", key);
  return h;
}

/** The absolute URL of an API path, for curl commands shown to people. */
export function absolute(path) {
  return new URL(path, document.baseURI).href;
}

/** fetch(path) with the key; resolves to the Response if ok, else throws ApiError with the API's detail. */
export async function call(path, { method = "GET", body, accept, signal, contentType } = {}) {
  const h = headers();
  if (accept) h.set("Accept", accept);
  if (contentType) h.set("Content-Type", contentType);
  const response = await fetch(path, { method, body, headers: h, signal });
  if (response.ok) return response;
  let parsed = null;
  try {
    parsed = await response.json();
  } catch {
    parsed = null;
  }
  const error = new ApiError(response.status, detailText(parsed, response.status));
  if (response.status === 401) listeners.forEach((fn) => fn(error));
  throw error;
}

export async function getJSON(path) {
  return (await call(path)).json();
}

export async function postJSON(path, data, options = {}) {
  return call(path, { ...options, method: "POST", body: JSON.stringify(data), contentType: "application/json" });
}

/** POST multipart form fields and files; resolves to the parsed JSON. */
export async function postForm(path, fields, files, options = {}) {
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) if (v !== null && v !== undefined && v !== "") form.append(k, String(v));
  for (const f of files) form.append("files", f, f.name || "pasted.png");
  return (await call(path, { ...options, method: "POST", body: form })).json();
}

/** Server-Sent Events from a streamed response: calls onEvent(name, data) per event until the end. */
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // a keep-alive comment
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}
