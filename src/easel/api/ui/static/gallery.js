// Past results with their parameters: filtered, paginated, opened, reused.
import { api, identity, imageSrc, pngText } from "./api.js";

const $ = (selector, root = document) => root.querySelector(selector);
const PAGE = 24;
let context = null;
let cursor = null; // the oldest job id shown: the next page starts after it
let current = null; // { job, image } in the dialog
let latest = 0; // the newest load: an older answer arriving late is dropped

function day(value, end) {
  if (!value) return undefined;
  const date = new Date(`${value}T00:00:00`);
  if (end) date.setDate(date.getDate() + 1);
  return date.getTime() / 1000;
}

function infotextOf(request, image) {
  const fields = [
    `Steps: ${request.steps}`, `Sampler: ${request.scheduler || "default"}`,
    `CFG scale: ${request.cfg_scale}`, `Seed: ${image.seed}`, `Size: ${image.width}x${image.height}`,
  ];
  if (request.model) fields.push(`Model: ${request.model}`);
  const lines = [request.prompt];
  if (request.negative_prompt) lines.push(`Negative prompt: ${request.negative_prompt}`);
  lines.push(fields.join(", "));
  return lines.join("\n");
}

async function load(reset) {
  if (reset) cursor = null;
  const form = $("#gallery-filter");
  const value = (name) => form.elements[name].value.trim();
  const query = {
    state: "succeeded", limit: PAGE, q: value("q"), model: value("model"),
    since: day(value("since"), false), until: day(value("until"), true), before: cursor || undefined,
  };
  if (value("mine") === "me") query.user_id = identity.user;
  const mine = ++latest;
  let page;
  try {
    page = (await api("/v1/jobs", { query })).jobs;
  } catch (error) {
    context.notify(error.message);
    return;
  }
  if (mine !== latest) return;
  const grid = $("#gallery-grid");
  grid.replaceChildren();
  for (const job of page) {
    job.images.forEach((image, i) => {
      const li = document.createElement("li");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "tile";
      open.setAttribute("aria-label", `Open "${job.request.prompt}" (seed ${image.seed})`);
      const img = document.createElement("img");
      img.alt = "";
      img.loading = "lazy";
      img.width = image.width;
      img.height = image.height;
      imageSrc(image.url).then((src) => { img.src = src; });
      const caption = document.createElement("span");
      caption.className = "caption";
      caption.textContent = job.request.prompt;
      open.append(img, caption);
      open.addEventListener("click", () => show(job, image, i));
      li.append(open);
      grid.append(li);
    });
  }
  $("#gallery-empty").hidden = page.length > 0;
  $("#g-first").disabled = cursor === null;
  cursor = page.length === PAGE ? page[page.length - 1].id : cursor;
  $("#g-next").disabled = page.length < PAGE;
}

async function show(job, image) {
  current = { job, image };
  const dialog = $("#detail");
  $("#detail-title").textContent = job.request.prompt;
  const img = $("#detail-image");
  img.alt = job.request.prompt;
  img.src = await imageSrc(image.url);
  $("#detail-download").href = img.src;
  $("#detail-download").download = `easel-${job.id}-${image.index}.png`;
  const info = $("#detail-info");
  info.value = infotextOf(job.request, image);
  const params = $("#detail-params");
  const r = job.request;
  const rows = {
    Model: r.model || "default", Backend: job.backend, Size: `${image.width}×${image.height}`,
    Steps: r.steps, Scheduler: r.scheduler || "default", "CFG scale": r.cfg_scale, Seed: image.seed,
    Kind: r.kind, User: r.user_id, Created: new Date(job.created_at * 1000).toLocaleString(),
  };
  params.replaceChildren(...Object.entries(rows).flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    return [dt, dd];
  }));
  if (!dialog.open) dialog.showModal();
  const text = await pngText(image.url); // the file's own infotext, when it has one
  if (text && current && current.image === image) info.value = text;
}

// Put a request's settings in the prompt form (seed of the image shown, batch of one).
export function fillForm(request, seed = request.seed) {
  const form = $("#generate");
  const set = (name, value) => { form.elements[name].value = value ?? ""; };
  set("prompt", request.prompt);
  set("negative_prompt", request.negative_prompt);
  $("#negative-box").open = Boolean(request.negative_prompt);
  const size = `${request.width}x${request.height}`;
  if (![...form.elements.size.options].some((o) => o.value === size)) {
    form.elements.size.append(new Option(`${request.width} × ${request.height}`, size));
  }
  set("size", size);
  set("steps", request.steps);
  set("scheduler", request.scheduler);
  set("seed", seed);
  set("batch_size", request.batch_size || 1);
  set("cfg_scale", request.cfg_scale);
  for (const name of ["model", "backend"]) {
    const select = form.elements[name];
    const value = request[name] || "";
    if (value && ![...select.options].some((o) => o.value === value)) select.append(new Option(value, value));
    select.value = value;
  }
  if (context) context.switchTo("create");
  $("#prompt").focus();
}

export function setupGallery(ctx) {
  context = ctx;
  $("#gallery-filter").addEventListener("submit", (event) => { event.preventDefault(); load(true); });
  $("#g-first").addEventListener("click", () => load(true));
  $("#g-next").addEventListener("click", () => load(false));
  $("#detail-use").addEventListener("click", () => {
    $("#detail").close();
    fillForm({ ...current.job.request, batch_size: 1 }, current.image.seed);
  });
  $("#detail-copy").addEventListener("click", () => {
    context.copyParameters({ ...current.job.request, seed: current.image.seed, batch_size: 1 });
  });
  return () => load(true);
}
