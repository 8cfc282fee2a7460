// easel's public API, as the page uses it: REST with the service token, the events
// websocket, images fetched with the token when auth is on.

const USER_KEY = "easel.user";
const TOKEN_KEY = "easel.token";

export const identity = {
  get user() { return localStorage.getItem(USER_KEY) || ""; },
  set user(value) { localStorage.setItem(USER_KEY, value); },
  get token() { return localStorage.getItem(TOKEN_KEY) || ""; },
  set token(value) {
    if (value) localStorage.setItem(TOKEN_KEY, value);
    else localStorage.removeItem(TOKEN_KEY);
  },
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (identity.token) h.Authorization = `Bearer ${identity.token}`;
  return h;
}

export async function api(path, { method = "GET", body, query } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v !== undefined && v !== null && v !== "") params.set(k, v);
    }
    const text = params.toString();
    if (text) url += `?${text}`;
  }
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(url, init);
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const err = data && data.error ? data.error : {};
    let message = err.message || `${response.status} ${response.statusText}`;
    if (Array.isArray(data && data.detail)) message = data.detail.map((d) => d.msg).join("; ");
    throw new ApiError(response.status, err.code || "error", message);
  }
  return data;
}

const blobs = new Map();

// An image the page can show: the plain URL, or with a token a blob URL fetched with it.
export async function imageSrc(url) {
  if (!identity.token) return url;
  if (!blobs.has(url)) {
    blobs.set(url, fetch(url, { headers: headers() }).then(async (r) => {
      if (!r.ok) throw new ApiError(r.status, "image", `image: ${r.status}`);
      return URL.createObjectURL(await r.blob());
    }));
  }
  return blobs.get(url);
}

// The PNG's own infotext (A1111's ``parameters`` text chunk), read from the file.
export async function pngText(url, keyword = "parameters") {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) return null;
  const bytes = new Uint8Array(await response.arrayBuffer());
  const view = new DataView(bytes.buffer);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  let at = 8;
  while (at + 8 <= bytes.length) {
    const length = view.getUint32(at);
    const type = latin1.decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    if (type === "tEXt" || type === "iTXt") {
      const nul = data.indexOf(0);
      if (latin1.decode(data.subarray(0, nul)) === keyword) {
        if (type === "tEXt") return latin1.decode(data.subarray(nul + 1));
        // iTXt: keyword\0 flag method \0 language \0 translated \0 text (uncompressed)
        let rest = data.subarray(nul + 3);
        for (let i = 0; i < 2; i += 1) rest = rest.subarray(rest.indexOf(0) + 1);
        return utf8.decode(rest);
      }
    }
    if (type === "IEND") break;
    at += 12 + length;
  }
  return null;
}

// Follow events of one user; reconnects and resumes after the last event id seen.
export function follow(userId, onEvent, onState = () => {}) {
  let last = null;
  let socket = null;
  let stopped = false;
  let delay = 500;
  const open = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const query = new URLSearchParams({ user_id: userId });
    if (last !== null) query.set("after", last);
    if (identity.token) query.set("token", identity.token);
    socket = new WebSocket(`${scheme}://${location.host}/v1/events?${query}`);
    socket.onopen = () => { delay = 500; onState(true); };
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      last = event.id;
      onEvent(event);
    };
    socket.onclose = () => {
      onState(false);
      if (!stopped) setTimeout(open, delay);
      delay = Math.min(delay * 2, 8000);
    };
  };
  open();
  return () => { stopped = true; if (socket) socket.close(); };
}
