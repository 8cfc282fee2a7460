// The page: who you are, the tabs, the prompt form and your queue.
import { api, follow, identity, imageSrc } from "./api.js";
import { fillForm, setupGallery } from "./gallery.js";
import { setupOperator } from "./operator.js";

const $ = (selector, root = document) => root.querySelector(selector);
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const jobs = new Map(); // id -> { job, step, total, preview, card }
let stopFollowing = null;

export function notify(message, kind = "error") {
  const box = $("#notice");
  box.textContent = message;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => { box.hidden = true; }, kind === "error" ? 8000 : 3000);
}

// -- tabs -------------------------------------------------------------------------------

const tabs = ["create", "gallery", "operator"];
const onShow = {};

function showTab(name) {
  if (!tabs.includes(name)) name = "create";
  for (const tab of tabs) {
    const selected = tab === name;
    $(`#tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`#${tab}`).hidden = !selected;
  }
  if (onShow[name]) onShow[name]();
}

export function switchTo(name) {
  if (location.hash !== `#${name}`) history.pushState(null, "", `#${name}`);
  showTab(name);
}

// -- identity ---------------------------------------------------------------------------

function setupIdentity() {
  const user = $("#user");
  if (!identity.user) identity.user = `guest-${Math.random().toString(36).slice(2, 7)}`;
  user.value = identity.user;
  $("#token").value = identity.token;
  user.addEventListener("change", () => {
    const value = user.value.trim();
    if (!value) { user.value = identity.user; return; }
    identity.user = value;
    reattach();
  });
  $("#identity").addEventListener("submit", (event) => {
    event.preventDefault();
    identity.token = $("#token").value.trim();
    $("#token-box").open = false;
    boot();
  });
}

// -- the form ---------------------------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function requestFromForm() {
  const form = $("#generate");
  const value = (name) => form.elements[name].value.trim();
  const [width, height] = value("size").split("x").map(Number);
  const steps = Number(value("steps"));
  const body = {
    prompt: value("prompt"),
    negative_prompt: value("negative_prompt"),
    width, height, steps,
    batch_size: Number(value("batch_size")) || 1,
    cfg_scale: Number(value("cfg_scale")),
    user_id: identity.user,
    preview_every: Math.max(1, Math.round(steps / 10)),
  };
  for (const name of ["model", "backend", "scheduler"]) if (value(name)) body[name] = value(name);
  if (value("seed") !== "") body.seed = Number(value("seed"));
  const file = form.elements.init_image.files[0];
  if (file) {
    body.init_image = await readFile(file);
    body.strength = Number(value("strength"));
  }
  return body;
}

async function submit(body) {
  const status = $("#submit-status");
  status.textContent = "Sending…";
  try {
    const job = await api("/v1/jobs", { method: "POST", body });
    status.textContent = "";
    track(job);
    return job;
  } catch (error) {
    status.textContent = "";
    notify(error.message);
    return null;
  }
}

function setupForm() {
  $("#generate").addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("#submit");
    button.disabled = true;
    try {
      await submit(await requestFromForm());
    } finally {
      button.disabled = false;
    }
  });
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#generate").requestSubmit();
  });
}

async function loadChoices() {
  const models = await api("/v1/models");
  let backends = models.backends.map((b) => ({ name: b.name }));
  try {
    const fleet = await api("/v1/backends"); // the fleet's view, where the server has it
    const list = Array.isArray(fleet) ? fleet : fleet.backends;
    if (Array.isArray(list) && list.length) backends = list.map((b) => ({ name: b.name }));
  } catch { /* older servers: /v1/models names the backends */ }
  const backendSelect = $("#backend");
  backendSelect.replaceChildren(new Option("any", ""), ...backends.map((b) => new Option(b.name, b.name)));
  $("#backend-field").hidden = backends.length < 2;
  const names = [...new Set(models.models.filter((m) => (m.kind || "pipeline") === "pipeline").map((m) => m.name))];
  for (const select of [$("#model"), $("#g-model")]) {
    const keep = select.value;
    select.replaceChildren(new Option(select.id === "model" ? "default" : "any", ""), ...names.map((n) => new Option(n, n)));
    select.value = keep;
  }
  return names;
}

// -- my queue ---------------------------------------------------------------------------

function describe(entry) {
  const { job } = entry;
  switch (job.state) {
    case "queued": {
      const parts = ["Queued"];
      if (job.position !== null && job.position !== undefined) {
        parts.push(job.position === 0 ? "next in line" : `position ${job.position + 1}`);
      }
      if (job.eta_seconds) parts.push(`about ${Math.ceil(job.eta_seconds)} s`);
      return parts.join(" · ");
    }
    case "running":
      return entry.total ? `Running · step ${entry.step} of ${entry.total}` : "Running";
    case "succeeded": {
      const clips = (job.audio || []).length;
      if (clips) return `Done · ${clips} clip${clips === 1 ? "" : "s"}`;
      return `Done · ${job.images.length} image${job.images.length === 1 ? "" : "s"}`;
    }
    case "failed":
      return `Failed · ${job.error ? job.error.message : "unknown error"}`;
    default:
      return "Cancelled";
  }
}

function button(label, text, onClick, className = "") {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

function resubmit(job, sameSeed) {
  const request = { ...job.request, user_id: identity.user };
  if (!sameSeed) delete request.seed;
  return submit(request);
}

export async function copyParameters(request) {
  const { init_image: _image, mask_image: _mask, ...rest } = request;
  const text = JSON.stringify(rest, null, 2);
  try {
    await navigator.clipboard.writeText(text);
    notify("Parameters copied", "info");
  } catch {
    window.prompt("Copy the parameters:", text);
  }
}

function buildCard(entry) {
  const { job } = entry;
  const li = document.createElement("li");
  li.className = "job";
  li.dataset.id = job.id;
  li.innerHTML = `
    <div class="thumbs"></div>
    <div class="body">
      <p class="prompt"></p>
      <p class="meta muted"></p>
      <p class="status" role="status"></p>
      <progress max="1" value="0" hidden></progress>
      <div class="actions"></div>
    </div>`;
  $(".prompt", li).textContent = job.request.prompt;
  const r = job.request;
  $(".meta", li).textContent = `${r.width}×${r.height} · ${r.steps} steps · seed ${r.seed ?? "random"}` +
    `${r.model ? ` · ${r.model}` : ""} · ${job.backend}`;
  $("progress", li).setAttribute("aria-label", `Progress of "${r.prompt.slice(0, 40)}"`);
  entry.card = li;
  return li;
}

function renderCard(entry) {
  const { job } = entry;
  const li = entry.card || buildCard(entry);
  li.dataset.state = job.state;
  li.dataset.previews = String(entry.previews || 0); // previews seen live, for people and tests
  $(".status", li).textContent = describe(entry);
  const bar = $("progress", li);
  bar.hidden = job.state !== "running";
  if (entry.total) { bar.max = entry.total; bar.value = entry.step; }
  const thumbs = $(".thumbs", li);
  const clips = job.audio || [];
  if (job.state === "succeeded" && clips.length) {
    // sound (txt2audio, txt2speech): a player per clip, fetched with the token like images
    if (thumbs.dataset.kind !== "result") {
      thumbs.dataset.kind = "result";
      thumbs.replaceChildren();
      clips.forEach(async (clip, i) => {
        const audio = document.createElement("audio");
        audio.controls = true;
        audio.preload = "metadata";
        audio.className = "result-audio";
        audio.setAttribute("aria-label", `Clip ${i + 1}: ${job.request.prompt}`);
        thumbs.append(audio);
        audio.src = await imageSrc(clip.url);
      });
    }
  } else if (job.state === "succeeded" && job.images.length) {
    if (thumbs.dataset.kind !== "result") {
      thumbs.dataset.kind = "result";
      thumbs.replaceChildren();
      job.images.forEach(async (image, i) => {
        const img = document.createElement("img");
        img.alt = `Result ${i + 1}: ${job.request.prompt}`;
        img.className = "result";
        img.width = image.width;
        img.height = image.height;
        thumbs.append(img);
        img.src = await imageSrc(image.url);
      });
    }
  } else if (entry.preview) {
    let img = $("img.preview", thumbs);
    if (!img) {
      thumbs.replaceChildren();
      img = document.createElement("img");
      img.className = "preview";
      img.alt = `Preview of "${job.request.prompt}"`;
      thumbs.append(img);
    }
    thumbs.dataset.kind = "preview";
    img.src = `data:image/jpeg;base64,${entry.preview}`;
  } else if (!thumbs.firstChild) {
    const box = document.createElement("div");
    box.className = "placeholder";
    box.setAttribute("aria-hidden", "true");
    thumbs.append(box);
  }
  const actions = $(".actions", li);
  const key = `${job.state}:${job.images.length}:${clips.length}`;
  if (actions.dataset.key !== key) {
    actions.dataset.key = key;
    const short = job.request.prompt.slice(0, 40);
    const items = [];
    if (!FINAL.has(job.state)) {
      items.push(button(`Cancel "${short}"`, "Cancel", () => cancel(job.id), "danger"));
    }
    items.push(button(`Run "${short}" again with the same seed`, "Same seed", () => resubmit(job, true)));
    items.push(button(`Run "${short}" again with a new seed`, "New seed", () => resubmit(job, false)));
    items.push(button(`Copy the parameters of "${short}"`, "Copy", () => copyParameters(job.request)));
    items.push(button(`Put the settings of "${short}" in the form`, "Edit", () => fillForm(job.request)));
    job.images.forEach((image, i) => {
      const a = document.createElement("a");
      a.className = "button";
      a.textContent = job.images.length > 1 ? `Download ${i + 1}` : "Download";
      a.download = `easel-${job.id}-${i}.png`;
      a.href = image.url;
      a.setAttribute("aria-label", `Download image ${i + 1} of "${short}"`);
      items.push(a);
      imageSrc(image.url).then((src) => { a.href = src; });
    });
    clips.forEach((clip, i) => {
      const a = document.createElement("a");
      a.className = "button";
      a.textContent = clips.length > 1 ? `Download ${i + 1}` : "Download";
      a.download = `easel-${job.id}-${i}.${clip.path.split(".").pop()}`;
      a.href = clip.url;
      a.setAttribute("aria-label", `Download clip ${i + 1} of "${short}"`);
      items.push(a);
      imageSrc(clip.url).then((src) => { a.href = src; });
    });
    actions.replaceChildren(...items);
  }
  return li;
}

function render() {
  const list = $("#my-jobs");
  const ordered = [...jobs.values()].sort((a, b) => (a.job.id < b.job.id ? 1 : -1));
  ordered.forEach((entry, i) => {
    const li = renderCard(entry);
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
  });
  $("#queue-empty").hidden = jobs.size > 0;
}

function track(job) {
  if (job.request.user_id !== identity.user) return; // another user's (a shared token)
  const entry = jobs.get(job.id) || { step: 0, total: 0, preview: null };
  entry.job = job;
  jobs.set(job.id, entry);
  render();
}

async function refresh(id) {
  try {
    track(await api(`/v1/jobs/${id}`));
  } catch (error) {
    if (error.status === 404) { jobs.get(id)?.card?.remove(); jobs.delete(id); render(); }
  }
}

async function cancel(id) {
  try {
    track(await api(`/v1/jobs/${id}`, { method: "DELETE" }));
    refresh(id);
  } catch (error) {
    notify(error.message);
  }
}

function onEvent(event) {
  if (event.user_id !== identity.user) return;
  const entry = jobs.get(event.job_id);
  if (!entry) { refresh(event.job_id); return; }
  const { job } = entry;
  if (event.type === "progress") {
    if (!FINAL.has(job.state)) job.state = "running";
    entry.step = event.step;
    entry.total = event.total;
    if (event.preview) {
      entry.preview = event.preview;
      entry.previews = (entry.previews || 0) + 1;
    }
    renderCard(entry);
  } else if (event.type === "started") {
    job.state = "running";
    renderCard(entry);
  } else {
    refresh(event.job_id); // queued again, ended, uploaded: the record says it all
  }
}

async function reattach() {
  if (stopFollowing) stopFollowing();
  jobs.clear();
  $("#my-jobs").replaceChildren();
  const user = identity.user;
  stopFollowing = follow(user, onEvent);
  try {
    const { jobs: mine } = await api("/v1/jobs", { query: { user_id: user, limit: 30 } });
    if (user !== identity.user) return;
    for (const job of mine) if (!jobs.has(job.id)) track(job);
    // queued jobs: ask where they stand now
    for (const job of mine) if (job.state === "queued") refresh(job.id);
  } catch (error) {
    if (error.status !== 401 && error.status !== 403) notify(error.message); // boot says it
  }
  render();
}

// where queued jobs stand changes as others finish: ask again now and then
setInterval(() => {
  if (document.hidden) return;
  for (const entry of jobs.values()) if (entry.job.state === "queued") refresh(entry.job.id);
}, 2000);

async function boot() {
  const queue = reattach(); // the queue and the form's choices load side by side
  try {
    await loadChoices();
    document.body.dataset.ready = "true";
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      $("#token-box").open = true;
      $("#token").focus();
      notify("This server needs a service token: enter it under Token.");
    } else {
      notify(error.message);
    }
  }
  await queue;
}

setupIdentity();
setupForm();
onShow.gallery = setupGallery({ notify, switchTo, copyParameters });
onShow.operator = setupOperator({ notify });
window.addEventListener("popstate", () => showTab(location.hash.slice(1)));
window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
showTab(location.hash.slice(1));
boot();
