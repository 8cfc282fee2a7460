// The operator's view: the whole line by tier and user, backends, workers, failures.
import { api, identity } from "./api.js";

const $ = (selector, root = document) => root.querySelector(selector);
let context = null;
let timer = null;

function item(text, detail) {
  const li = document.createElement("li");
  const strong = document.createElement("strong");
  strong.textContent = text;
  li.append(strong);
  if (detail) {
    const span = document.createElement("span");
    span.className = "muted";
    span.textContent = ` ${detail}`;
    li.append(span);
  }
  return li;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

async function move(job, to) {
  try {
    await api(`/v1/jobs/${job.id}/move`, { method: "POST", body: { to } });
    context.notify(`Moved to the ${to} of tier ${job.tier}`, "info");
  } catch (error) {
    context.notify(error.message);
  }
  refresh();
}

async function backends(queue) {
  const speed = {};
  for (const a of queue.averages) (speed[a.backend] ||= []).push(a);
  let fleet = null;
  try {
    const reply = await api("/v1/backends");
    fleet = Array.isArray(reply) ? reply : reply.backends;
  } catch { /* servers without a fleet view: /v1/models */ }
  const models = await api("/v1/models");
  const list = fleet || models.backends;
  return list.map((b) => {
    const loaded = (b.models || models.models.filter((m) => m.backend === b.name))
      .filter((m) => typeof m === "string" || m.loaded)
      .map((m) => (typeof m === "string" ? m : m.name));
    const measured = (speed[b.name] || [])
      .map((a) => `${a.seconds_per_image.toFixed(2)} s/image at ${a.width}×${a.height}, ${a.steps} steps`);
    const state = b.state || b.health || (b.default ? "default" : "up");
    const parts = [`· ${typeof state === "string" ? state : JSON.stringify(state)}`];
    if (loaded.length) parts.push(`· loaded: ${loaded.join(", ")}`);
    if (measured.length) parts.push(`· ${measured[0]}`);
    return item(b.name, parts.join(" "));
  });
}

async function refresh() {
  if ($("#operator").hidden) return;
  try {
    const [queue, line, workers, failed] = await Promise.all([
      api("/v1/queue"),
      api("/v1/queue/jobs", { query: { user_id: identity.user } }),
      api("/v1/workers"),
      api("/v1/jobs", { query: { state: "failed", limit: 10 } }),
    ]);
    const tiers = Object.entries(queue.tiers).map(([t, n]) => `tier ${t}: ${n}`).join(", ");
    const users = Object.entries(queue.users).map(([u, n]) => `${u}: ${n}`).join(", ");
    $("#op-counts").textContent = `${queue.running} running, ${queue.queued} queued` +
      `${tiers ? ` (${tiers})` : ""}${users ? ` · by user: ${users}` : ""}`;
    const rows = line.jobs.map((job) => {
      const tr = document.createElement("tr");
      tr.dataset.id = job.id;
      tr.dataset.state = job.state;
      const position = job.state === "running" ? "▶" : String((job.position ?? 0) + 1);
      tr.append(cell(position), cell(String(job.tier)), cell(job.user_id), cell(job.state));
      const prompt = cell(job.prompt ?? "hidden");
      if (job.prompt === null) prompt.className = "muted";
      tr.append(prompt, cell(`${job.width}×${job.height}, ${job.steps}`));
      const actions = document.createElement("td");
      if (job.state === "queued") {
        for (const [to, text] of [["front", "↑ Front"], ["back", "↓ Back"]]) {
          const b = document.createElement("button");
          b.type = "button";
          b.textContent = text;
          b.setAttribute("aria-label", `Move ${job.user_id}'s job ${job.id.slice(-6)} to the ${to}`);
          b.addEventListener("click", () => move(job, to));
          actions.append(b);
        }
      }
      tr.append(actions);
      return tr;
    });
    $("#op-line tbody").replaceChildren(...rows);
    $("#op-backends").replaceChildren(...(await backends(queue)));
    $("#op-workers").replaceChildren(...(workers.workers.length ? workers.workers.map((w) => item(
      w.id,
      `· ${w.backend} on ${w.host} · ${w.current_jobs.length ? `running ${w.current_jobs.length}` : "idle"}` +
      `${w.heartbeat_age_seconds != null ? ` · beat ${w.heartbeat_age_seconds.toFixed(1)} s ago` : ""}`,
    )) : [item("No worker listed", "")]));
    $("#op-failures").replaceChildren(...(failed.jobs.length ? failed.jobs.map((job) => item(
      `${job.request.user_id}: ${job.error ? job.error.code : "failed"}`,
      `· ${job.error ? job.error.message : ""} · ${new Date((job.finished_at || job.created_at) * 1000).toLocaleTimeString()}`,
    )) : [item("None", "")]));
  } catch (error) {
    context.notify(error.message);
  }
}

export function setupOperator(ctx) {
  context = ctx;
  return () => {
    refresh();
    clearInterval(timer);
    timer = setInterval(refresh, 2000);
  };
}
