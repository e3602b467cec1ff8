// Conveyor dashboard: live updates over /api/events/ws and JSON actions.
// Plain ES module, no dependencies. The server renders every page; when an
// event that concerns the page arrives, the page's #live region is fetched
// again and swapped in (debounced), so the markup has one source: the templates.

const body = document.body;
const csrf = () => body.dataset.csrf || "";
const live = (body.dataset.live || "").trim();
// Busy systems send many events: the overview (every event concerns it)
// re-renders at most every 2 s, other pages every 0.5 s.
const MIN_REFRESH_MS = Number(body.dataset.minRefresh || 500);
const MAX_BACKOFF_MS = 10000;

// -- which events concern this page ------------------------------------------------------
function globToRegExp(glob) {
  const escaped = glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*");
  return new RegExp("^" + escaped + "$");
}

function matcher(spec) {
  if (!spec) return null;
  if (spec === "*") return () => true;
  if (spec.startsWith("job:")) {
    const id = spec.slice(4);
    return (e) => e.job_id === id;
  }
  if (spec.startsWith("wf:")) {
    const id = spec.slice(3);
    return (e) => {
      const holder = document.querySelector("[data-jobs]");
      const jobs = new Set((holder ? holder.dataset.jobs : "").split(",").filter(Boolean));
      return (e.job_id && jobs.has(e.job_id)) || JSON.stringify(e).includes(id);
    };
  }
  const patterns = spec.split(",").map((p) => globToRegExp(p.trim())).filter(Boolean);
  return (e) => patterns.some((re) => re.test(e.type));
}

const concerns = matcher(live);

// -- the connection indicator -------------------------------------------------------------
const conn = document.getElementById("conn");
const banner = document.getElementById("banner");

function setState(state, text) {
  if (!conn) return;
  conn.dataset.state = state;
  conn.querySelector(".conn-text").textContent = text;
  if (banner) banner.hidden = state !== "lost";
}

// -- refreshing the live region --------------------------------------------------------------
let refreshTimer = null;
let refreshing = false;
let dirty = false;
let lastRefresh = 0;
// The newest event this page reacted to: a refresh that brings data read before
// it (the overview shares one read between viewers for a second) asks again.
let wantedId = 0;
// A few tries only: event ids that went back (a fresh database behind a restart)
// must not keep the page refreshing.
let staleTries = 0;

function scheduleRefresh() {
  dirty = true;
  if (refreshTimer || refreshing) return;
  const wait = Math.max(0, lastRefresh + MIN_REFRESH_MS - Date.now());
  refreshTimer = setTimeout(refresh, wait);
}

async function refresh() {
  refreshTimer = null;
  if (!dirty) return;
  dirty = false;
  refreshing = true;
  lastRefresh = Date.now();
  try {
    const response = await fetch(location.href, {
      headers: { "X-Dashboard-Refresh": "1" },
      cache: "no-store",
      credentials: "same-origin",
    });
    if (response.redirected && new URL(response.url).pathname === "/ui/login") {
      location.href = response.url;
      return;
    }
    if (!response.ok) return;
    const doc = new DOMParser().parseFromString(await response.text(), "text/html");
    const readAt = Number(doc.body && doc.body.dataset.after);
    if (Number.isFinite(readAt) && readAt < wantedId && staleTries < 3) {
      staleTries += 1;
      dirty = true;
    } else {
      staleTries = 0;
      if (Number.isFinite(readAt) && readAt < wantedId) wantedId = readAt;
    }
    const fresh = doc.getElementById("live");
    const current = document.getElementById("live");
    if (!fresh || !current) return;
    const checked = new Set(
      [...current.querySelectorAll("input[name=ids]:checked")].map((i) => i.value),
    );
    const focused = document.activeElement && document.activeElement.id;
    current.replaceChildren(...fresh.childNodes);
    for (const input of current.querySelectorAll("input[name=ids]")) {
      input.checked = checked.has(input.value);
    }
    if (focused) document.getElementById(focused)?.focus();
    updateSelection();
    body.dataset.refreshed = String(Number(body.dataset.refreshed || 0) + 1);
  } catch (err) {
    // The server is away: the socket's reconnect refreshes once it is back.
  } finally {
    refreshing = false;
    if (dirty) scheduleRefresh();
  }
}

// -- the event stream, resumed from the last id seen ------------------------------------------
let after = body.dataset.after;
let attempts = 0;
let socket = null;

function connect() {
  if (after === undefined || !concerns) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  // The server filters what it can (a job's own events, event type patterns),
  // so a busy system does not stream every event to every open page.
  const query = new URLSearchParams({ after });
  if (live.startsWith("job:")) query.set("job_id", live.slice(4));
  else if (live !== "*" && !live.startsWith("wf:")) query.set("types", live);
  const url = `${proto}//${location.host}/api/events/ws?${query}`;
  socket = new WebSocket(url);
  let opened = false;
  socket.addEventListener("open", () => {
    opened = true;
    const reconnected = attempts > 0;
    attempts = 0;
    setState("live", "live");
    if (reconnected) scheduleRefresh(); // catch up on what a restart may have hidden
  });
  socket.addEventListener("message", (msg) => {
    let data;
    try {
      data = JSON.parse(msg.data);
    } catch {
      return;
    }
    if (!Array.isArray(data)) return;
    let wanted = false;
    for (const e of data) {
      if (typeof e.id === "number") after = String(Math.max(Number(after), e.id));
      if (concerns(e)) {
        wanted = true;
        if (typeof e.id === "number") wantedId = Math.max(wantedId, e.id);
      }
    }
    body.dataset.after = after;
    if (wanted) scheduleRefresh();
  });
  socket.addEventListener("close", (ev) => {
    socket = null;
    if (ev.code === 4401 || ev.code === 4403) {
      setState("lost", "signed out");
      if (banner) banner.textContent = "Your session ended: reload the page to log in again.";
      return;
    }
    attempts += 1;
    setState(opened || attempts > 1 ? "lost" : "connecting", "reconnecting");
    const delay = Math.min(MAX_BACKOFF_MS, 250 * 2 ** Math.min(attempts, 6));
    setTimeout(connect, delay * (0.75 + Math.random() * 0.5));
  });
}

// -- actions ---------------------------------------------------------------------------------
const flash = document.getElementById("flash");

function say(text, kind = "ok") {
  if (!flash) return;
  flash.textContent = text;
  flash.dataset.kind = kind;
  flash.hidden = false;
}

async function post(url, payload) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: JSON.stringify(payload),
    credentials: "same-origin",
  });
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = { error: `HTTP ${response.status}` };
  }
  return { ok: response.ok, data };
}

function summary(data) {
  const parts = [];
  if (data.done) parts.push(`${Object.keys(data.done).length} done`);
  if (data.errors && Object.keys(data.errors).length) {
    parts.push(`${Object.keys(data.errors).length} refused: ${Object.values(data.errors)[0]}`);
  }
  for (const key of ["retried", "purged", "replayed"]) {
    if (key in data) parts.push(`${data[key]} ${key}`);
  }
  if (data.status) parts.push(`now ${data.status}`);
  return parts.join("; ") || "Done";
}

async function runAction(button, url, payload) {
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  button.disabled = true;
  try {
    const { ok, data } = await post(url, payload);
    say(ok ? summary(data) : data.error || "Refused", ok && !Object.keys(data.errors || {}).length ? "ok" : "error");
    dirty = true;
    scheduleRefresh();
  } catch {
    say("The server did not answer; try again", "error");
  } finally {
    button.disabled = false;
  }
}

function selectedIds() {
  return [...document.querySelectorAll("form[data-bulk] input[name=ids]:checked")].map((i) => i.value);
}

function updateSelection() {
  const count = document.querySelector("[data-selected-count]");
  if (count) count.textContent = `${selectedIds().length} selected`;
}

document.addEventListener("click", (ev) => {
  const target = ev.target instanceof Element ? ev.target : null;
  if (!target) return;
  const single = target.closest("button[data-action]");
  if (single) {
    const payload = {};
    if (single.dataset.ids) payload.ids = single.dataset.ids.split(",");
    if (single.dataset.id) payload.id = single.dataset.id;
    if ("jobType" in single.dataset) payload.job_type = single.dataset.jobType || null;
    runAction(single, single.dataset.action, payload);
    return;
  }
  const bulk = target.closest("button[data-bulk-action]");
  if (bulk) {
    const ids = selectedIds();
    if (!ids.length) {
      say("Select jobs first (the checkboxes in the first column)", "error");
      return;
    }
    runAction(bulk, bulk.dataset.bulkAction, { ids });
    return;
  }
  if (target.closest("button[data-logout]")) {
    post("/ui/logout", {}).then(() => (location.href = "/ui/login"));
  }
});

document.addEventListener("change", (ev) => {
  const target = ev.target;
  if (!(target instanceof HTMLInputElement)) return;
  if (target.matches("[data-select-all]")) {
    for (const input of document.querySelectorAll("form[data-bulk] input[name=ids]")) {
      input.checked = target.checked;
    }
  }
  updateSelection();
});

document.addEventListener("submit", async (ev) => {
  const form = ev.target;
  if (!(form instanceof HTMLFormElement)) return;
  if (form.matches("[data-bulk]")) {
    ev.preventDefault();
    return;
  }
  if (!form.matches("[data-login]")) return;
  ev.preventDefault();
  const error = form.querySelector("[data-login-error]");
  const { ok, data } = await post("/ui/login", {
    key: form.elements.namedItem("key").value,
    next: form.dataset.next,
  });
  if (ok) {
    location.href = data.next || "/";
  } else if (error) {
    error.textContent = data.error || "Refused";
    error.hidden = false;
  }
});

if (concerns) {
  setState("connecting", "connecting");
  connect();
} else {
  setState("idle", "static page");
}
