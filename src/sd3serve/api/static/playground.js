// The sd3serve playground: one request form, generation through the v2 API, history in local storage.
// Fields, limits and presets come from /playground/config.json (built from the server's request schema).
// A start image makes it an image-to-image request; adapters come from GET /v1/loras; while a request runs, the
// live previews of its event stream (?preview=true) are shown.
"use strict";

const FIELDS = ["prompt", "negative_prompt", "aspect_ratio", "width", "height", "steps", "guidance_scale", "seed",
  "sampler", "scheduler", "batch_size", "image_format", "image_quality", "base64"];
const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
const POLL_MS = 250;
const HISTORY_KEY = "sd3serve.history";
const KEY_KEY = "sd3serve.apiKey";
const HISTORY_MAX = 30;
const THUMB_PX = 160;
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];
const IMAGE_PLACEHOLDER = "<base64 of input.png>";  // the snippets read the start image from a file

const $ = (id) => document.getElementById(id);
let config = null;
let lastBody = null;
let codeLang = "curl";
let objectUrls = [];
let initImage = null;  // the start image: { b64, name, width, height }, or null for text-to-image
let adapters = [];  // the names GET /v1/loras gave for the key

// --- fields ------------------------------------------------------------------------------------------------

// How each request field is shown (its limits and choices come from the config): the control (a number input
// unless named), a hint after the label, and what sets it apart.
const FIELD_VIEWS = {
  prompt: { control: "textarea", rows: 3, box: "wide" },
  negative_prompt: { control: "textarea", rows: 2, box: "wide", hint: "(used when guidance > 1)" },
  aspect_ratio: { control: "select" },
  width: { note: "size-note" },
  height: { note: "size-note" },
  steps: {},
  guidance_scale: { step: "0.1", inputmode: "decimal" },
  seed: { box: "seed", hint: "(-1: random)", button: { id: "random-seed", text: "Random", title: "Draw a random seed" } },
  sampler: { control: "select" },
  scheduler: { control: "select" },
  batch_size: {},
  image_format: { control: "select" },
  image_quality: { hint: "(jpeg, webp)" },
  base64: { control: "checkbox", label: "Base64 in the response" },
};

function element(tag, attributes, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) if (value !== undefined) el.setAttribute(name, value);
  el.append(...children);
  return el;
}

// One field's markup: label, control and the message line its errors go to.
function fieldBox(name, view) {
  const control = view.control || "number", input = control === "number" || control === "checkbox";
  const words = name.replaceAll("_", " "), text = view.label || words[0].toUpperCase() + words.slice(1);
  const el = element(input ? "input" : control, {
    id: name, "data-field": name, type: input ? control : undefined, rows: view.rows, step: view.step,
    inputmode: control === "number" ? view.inputmode || "numeric" : undefined,
    "aria-describedby": [`${name}-error`, view.note].filter(Boolean).join(" "),
  });
  const hint = view.hint ? [" ", element("span", { class: "hint" }, view.hint)] : [];
  const label = control === "checkbox"
    ? element("label", { class: "inline", for: name }, el, ` ${text}`)
    : element("label", { for: name }, text, ...hint);
  const button = view.button && element("button", { type: "button", id: view.button.id, title: view.button.title },
    view.button.text);
  const shown = control === "checkbox" ? [] : [button ? element("div", { class: "with-button" }, el, button) : el];
  const error = element("p", { id: `${name}-error`, class: "error", "aria-live": "polite" });
  return element("div", { class: view.box ? `field ${view.box}` : "field" }, label, ...shown, error);
}

// The request fields, in FIELDS order: the wide ones above the grid, the size note after the height.
function buildFields() {
  const grid = $("request-grid");
  for (const name of FIELDS) {
    const view = FIELD_VIEWS[name], box = fieldBox(name, view);
    if (view.box === "wide") grid.before(box);
    else grid.append(box);
    if (name === "height") grid.append(element("p", { id: "size-note", class: "hint wide" }));
  }
}

function fieldSpec(name) { return config.fields[name]; }

function setupFields() {
  for (const name of FIELDS) {
    const el = $(name), spec = fieldSpec(name);
    if (el.tagName === "SELECT") {
      for (const value of spec.enum) {
        const size = name === "aspect_ratio" ? config.aspect_ratios[value] : null;
        el.add(new Option(size ? `${value} (${size[0]}×${size[1]})` : value, value));
      }
    } else if (el.type === "number") {
      if ("minimum" in spec) el.min = spec.minimum;
      if ("maximum" in spec) el.max = spec.maximum;
    } else if ("maxLength" in spec) {
      el.maxLength = spec.maxLength;
    }
    el.addEventListener("change", () => { validateField(name); updateSize(); });
  }
  resetFields();
}

function resetFields() {
  for (const name of FIELDS) setValue(name, fieldSpec(name).default);
  setValue("prompt", config.example_prompt);
  updateSize();
  for (const name of FIELDS) showFieldError(name, "");
}

function setValue(name, value) {
  const el = $(name);
  if (el.type === "checkbox") el.checked = Boolean(value);
  else el.value = value === undefined || value === null ? "" : String(value);
}

function readValue(name) {
  const el = $(name), spec = fieldSpec(name);
  if (el.type === "checkbox") return el.checked;
  if (spec.type === "integer" || spec.type === "number") return el.value.trim() === "" ? NaN : Number(el.value);
  return el.value;
}

// The same rules as the server (api/schemas.py); the server checks again and its message is shown as it is.
function fieldError(name, value) {
  const spec = fieldSpec(name);
  const range = `from ${spec.minimum} to ${spec.maximum}`;
  if (spec.type === "integer" && (!Number.isInteger(value) || value < spec.minimum || value > spec.maximum)) {
    return name === "seed" ? `${name}: an integer ${range} (-1: a random seed)` : `${name}: an integer ${range}`;
  }
  if (spec.type === "number" && (!Number.isFinite(value) || value < spec.minimum || value > spec.maximum)) {
    return `${name}: a number ${range}`;
  }
  if (spec.type === "string" && spec.enum === undefined) {
    if (name === "prompt" && value.trim() === "") return "prompt: required; describe the picture";
    if (spec.maxLength !== undefined && value.length > spec.maxLength) {
      return `${name}: at most ${spec.maxLength} characters (now ${value.length})`;
    }
  }
  if (spec.enum !== undefined && !spec.enum.includes(value)) return `${name}: one of ${spec.enum.join(", ")}`;
  return "";
}

function showFieldError(name, message) {
  $(`${name}-error`).textContent = message;
  if (message) $(name).setAttribute("aria-invalid", "true");
  else $(name).removeAttribute("aria-invalid");
}

function validateField(name) {
  const message = fieldError(name, readValue(name));
  showFieldError(name, message);
  return message;
}

// The exact JSON body this form sends (every field, as the hosted page's examples do), or null if invalid.
function readBody() {
  const body = {};
  let firstBad = null;
  for (const name of FIELDS) {
    if (validateField(name) && firstBad === null) firstBad = name;
    body[name] = readValue(name);
  }
  if (firstBad !== null) { $(firstBad).focus(); return null; }
  const bad = addImageAndAdapters(body);
  $("loras-error").textContent = bad;
  return bad ? null : body;
}

// The start image (without width and height: the picture follows the image), its strength, and the adapters
// ticked; "" or what is wrong.
function addImageAndAdapters(body) {
  if (initImage) {
    if (!config.aspect_ratios[body.aspect_ratio]) { delete body.width; delete body.height; }
    body.image = initImage.b64;
    body.strength = Number($("strength").value);
  }
  const loras = [];
  for (const row of document.querySelectorAll("#loras .lora")) {
    const on = row.querySelector("input[type=checkbox]"), scale = Number(row.querySelector("input[type=number]").value);
    if (!on.checked) continue;
    if (!Number.isFinite(scale) || scale < -4 || scale > 4) return `loras: the scale of ${on.value} is a number from -4 to 4`;
    loras.push({ name: on.value, scale });
  }
  if (loras.length > config.max_loras) return `loras: at most ${config.max_loras} adapters at once`;
  if (loras.length) body.loras = loras;
  return "";
}

function updateSize() {
  const preset = config.aspect_ratios[$("aspect_ratio").value];
  for (const name of ["width", "height"]) $(name).disabled = Boolean(preset) || initImage !== null;
  let [w, h] = preset || [Number($("width").value), Number($("height").value)];
  const m = config.size_multiple;
  let note = preset ? `The preset sets ${w}×${h}.`
    : (w % m || h % m) ? `Sizes are rounded down to a multiple of ${m}: ${w - w % m}×${h - h % m}.` : "";
  if (initImage && !preset) {
    note = `The picture takes the start image's size (${initImage.width}×${initImage.height}, scaled into the limits, `
      + `rounded down to a multiple of ${m}).`;
  }
  $("size-note").textContent = note;
}

// --- the API -------------------------------------------------------------------------------------------------

class ApiError extends Error {}

async function api(method, path, key, body) {
  const headers = { "x-api-key": key };
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!r.ok && r.status !== 422) {  // 422: a FAILED task, answered with its body
    let message = r.statusText;
    try { message = (await r.json()).error || message; } catch (e) { /* not JSON */ }
    throw new ApiError(`${r.status}: ${message}`);
  }
  return r;
}

const statusPath = (id) => `/v2/requests/${encodeURIComponent(id)}/status`;
const resultPath = (id) => `/v2/requests/${encodeURIComponent(id)}`;
const imagePath = (id, i) => `/v2/requests/${encodeURIComponent(id)}/images/${i}`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Progress: from the server's event stream where it has one (config.paths.events), else by polling.
async function follow(id, key) {
  if (config.paths.events) {
    try {
      const final = await followEvents(id, key);
      if (final) return final;
    } catch (e) { /* fall back to polling */ }
  }
  for (;;) {
    const status = await (await api("GET", statusPath(id), key)).json();
    showProgress(status);
    if (TERMINAL.has(status.status)) return status;
    await sleep(POLL_MS);
  }
}

// Server-sent events (queued, progress {step, steps}, then completed, failed or cancelled), read as the status
// bodies polling would give; fetch (not EventSource) so that the key goes in a header.
const EVENT_STATUS = {
  queued: () => ({ status: "QUEUED" }),
  progress: (data) => ({ status: "PROCESSING", progress: { step: data.step, steps: data.steps }, preview: data.preview }),
  completed: () => ({ status: "COMPLETED" }),
  failed: (data) => ({ status: "FAILED", error: data.error }),
  cancelled: (data) => ({ status: "CANCELLED", error: data.error }),
};

async function followEvents(id, key) {
  const r = await fetch(`${config.paths.events.replace("{task_id}", encodeURIComponent(id))}?preview=true`,
    { headers: { "x-api-key": key, accept: "text/event-stream" } });
  if (!r.ok || !r.body) return null;
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;  // the stream ended early: polling says how the task ended
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const field = (name) => lines.filter((l) => l.startsWith(`${name}:`)).map((l) => l.slice(name.length + 1).trim());
      const toStatus = EVENT_STATUS[field("event")[0] || "message"];
      if (!toStatus) continue;  // a comment (keep-alive) or an event this page does not know
      let data = {};
      try { data = JSON.parse(field("data").join("\n") || "{}"); } catch (e) { continue; }
      const status = toStatus(data);
      showProgress(status);
      if (TERMINAL.has(status.status)) { reader.cancel(); return status; }
    }
  }
}

// The picture as it forms: a small JPEG of the current x0 estimate, one pixel per latent cell.
function showPreview(preview) {
  if (!preview) return;
  $("live-preview").src = `data:${preview.media_type};base64,${preview.image}`;
  $("live-caption").textContent = `Live preview after step ${preview.step}`;
  $("live").hidden = false;
}

function showProgress(status) {
  showPreview(status.preview);
  const bar = $("progress"), phase = $("phase"), p = status.progress;
  if (status.status === "QUEUED") { bar.removeAttribute("value"); phase.textContent = "Queued…"; return; }
  if (status.status === "PROCESSING" && p && p.steps) {
    bar.max = p.steps + 1;  // the last part is the decode
    bar.value = p.step;
    phase.textContent = p.step < p.steps ? `Step ${p.step} of ${p.steps}…` : "Decoding…";
    return;
  }
  if (status.status === "PROCESSING") { bar.removeAttribute("value"); phase.textContent = "Starting…"; return; }
  bar.max = 1;
  bar.value = status.status === "COMPLETED" ? 1 : 0;
  phase.textContent = { COMPLETED: "Done.", CANCELLED: "Cancelled." }[status.status] || "Failed.";
}

async function refreshCredits() {
  const key = $("api-key").value.trim();
  if (!key) { $("credits").textContent = ""; return; }
  try {
    const r = await api("GET", config.paths.credits, key);
    $("credits").textContent = `Credits: ${(await r.json()).credits}`;
  } catch (e) {
    $("credits").textContent = `This key was not accepted (${e.message}).`;
  }
}

// --- generate ------------------------------------------------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  showError("");
  const body = readBody();
  if (body === null) { showError("Some fields are out of range: see the messages under them."); return; }
  const key = $("api-key").value.trim();
  if (!key) { showError("Enter an API key first."); $("api-key").focus(); return; }
  rememberKey();
  showCode(body);
  setBusy(true);
  const started = performance.now();
  $("live").hidden = true;
  try {
    const submitted = await api("POST", body.image ? config.paths.img2img_v2 : config.paths.v2, key, body);
    const task = await submitted.json();
    const cost = submitted.headers.get("x-cost");
    showProgress(task);
    const final = await follow(task.request_id, key);
    const result = await (await api("GET", resultPath(task.request_id), key)).json();
    if (final.status !== "COMPLETED" || result.status !== "COMPLETED") {
      const how = final.status === "CANCELLED" ? "was cancelled" : "failed";
      throw new ApiError(`the generation ${how}: ${result.error || final.error || "no reason given"}`);
    }
    const blobs = await loadImages(task.request_id, result, body, key);
    const remaining = await creditsNow(key);
    showResult({ id: task.request_id, blobs, seed: result.seed, cost, remaining, body,
      seconds: result.metrics.inference_time, wall: (performance.now() - started) / 1000 });
  } catch (e) {
    showError(e instanceof ApiError ? e.message : `Could not reach the server: ${e.message}`);
    $("progress").value = 0;
    $("phase").textContent = "Failed.";
  } finally {
    $("live").hidden = true;
    setBusy(false);
  }
}

async function creditsNow(key) {
  const r = await api("GET", config.paths.credits, key);
  const credits = (await r.json()).credits;
  $("credits").textContent = `Credits: ${credits}`;
  return credits;
}

function base64Blob(b64, type) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

async function loadImages(id, result, body, key) {
  if (body.base64) {  // decoded here: the page's CSP allows fetch() from this server only, not of data: URLs
    return result.output.map((b64) => base64Blob(b64, `image/${body.image_format}`));
  }
  return Promise.all(result.output.map((_, i) => api("GET", imagePath(id, i), key).then((r) => r.blob())));
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("generate").textContent = busy ? "Generating…" : "Generate";
  $("form").setAttribute("aria-busy", String(busy));
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function extension(format) { return format === "jpeg" ? "jpg" : format; }

function showResult(r) {
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls = [];
  const box = $("images");
  box.replaceChildren();
  r.blobs.forEach((blob, i) => {
    const url = URL.createObjectURL(blob);
    objectUrls.push(url);
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = `Generated image ${i + 1} of ${r.blobs.length}: ${r.body.prompt} (seed ${r.seed + i})`;
    img.className = "result";
    const caption = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = url;
    link.download = `sd3serve-${r.seed + i}.${extension(r.body.image_format)}`;
    link.textContent = `Download (seed ${r.seed + i})`;
    caption.append(link);
    figure.append(img, caption);
    box.append(figure);
    if (i === 0) img.addEventListener("load", () => addHistory(r, img), { once: true });
  });
  $("info-seed").textContent = r.blobs.length > 1 ? `${r.seed} (image i: seed + i)` : String(r.seed);
  $("info-cost").textContent = `${r.cost} credit${r.cost === "1" ? "" : "s"}`;
  $("info-time").textContent = `${r.seconds.toFixed(2)} s (${r.wall.toFixed(2)} s in all)`;
  $("info-credits").textContent = String(r.remaining);
  $("info-id").textContent = r.id;
  $("info").hidden = false;
}

// --- code snippets -------------------------------------------------------------------------------------------

function pyLiteral(value, indent = "") {
  if (value === true) return "True";
  if (value === false) return "False";
  if (value === null) return "None";
  if (typeof value === "object") {
    const inner = indent + "    ";
    const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pyLiteral(v, inner)},`);
    return `{\n${items.join("\n")}\n${indent}}`;
  }
  return JSON.stringify(value);  // a JSON string or number is a Python literal too
}

const shellQuote = (text) => `'${text.replace(/'/g, "'\\''")}'`;

function snippets(request) {
  const base = window.location.origin;
  const img2img = request.image !== undefined;
  const body = img2img ? { ...request, image: IMAGE_PLACEHOLDER } : request;
  const readImage = img2img ? ['data["image"] = base64.b64encode(open("input.png", "rb").read()).decode()'] : [];
  const sync = body.batch_size === 1 || body.base64;  // one v1 response body holds one image
  const paths = img2img ? [config.paths.img2img_v1, config.paths.img2img_v2] : [config.paths.v1, config.paths.v2];
  const url = `${base}${sync ? paths[0] : paths[1]}`;
  const ext = extension(body.image_format);
  const json = JSON.stringify(body, null, 2);
  if (sync) {
    return {
      curl: `curl -X POST ${shellQuote(url)} \\\n  -H "x-api-key: $SD3SERVE_API_KEY" -H 'content-type: application/json' \\\n`
        + `  -d ${shellQuote(JSON.stringify(body))}` + (body.base64 ? "" : ` \\\n  -o out.${ext}`),
      python: [
        "import base64, os", "", "import requests", "",
        `url = ${JSON.stringify(url)}`, `data = ${pyLiteral(body)}`, ...readImage, "",
        'r = requests.post(url, json=data, headers={"x-api-key": os.environ["SD3SERVE_API_KEY"]})',
        "r.raise_for_status()",
        ...(body.base64
          ? ['for i, b64 in enumerate(r.json()["images"]):', `    open(f"out-{i}.${ext}", "wb").write(base64.b64decode(b64))`]
          : [`open("out.${ext}", "wb").write(r.content)`]),
        'print("seed", r.headers["x-seed-value"], "credits left", r.headers["x-remaining-credits"])',
      ].join("\n"),
      javascript: [
        "const axios = require('axios');", "const fs = require('fs');", "",
        `const url = ${JSON.stringify(url)};`, `const data = ${json};`, "",
        "(async function () {", "  try {",
        "    const response = await axios.post(url, data, {",
        "      headers: { 'x-api-key': process.env.SD3SERVE_API_KEY },",
        ...(body.base64
          ? ["    });", `    response.data.images.forEach((b64, i) => fs.writeFileSync(\`out-\${i}.${ext}\`, Buffer.from(b64, 'base64')));`]
          : ["      responseType: 'arraybuffer',  // the body is the image", "    });", `    fs.writeFileSync('out.${ext}', response.data);`]),
        "    console.log('credits left:', response.headers['x-remaining-credits']);",
        "  } catch (error) {",
        "    console.error('Error:', error.response ? Buffer.from(error.response.data).toString() : error.message);",
        "  }", "})();",
      ].join("\n"),
    };
  }
  return {  // several images without base64: the v2 API, one URL per image
    curl: [
      `curl -s -X POST ${shellQuote(url)} \\`, '  -H "x-api-key: $SD3SERVE_API_KEY" -H \'content-type: application/json\' \\',
      `  -d ${shellQuote(JSON.stringify(body))}`,
      "# then poll status_url until COMPLETED, read response_url, and fetch each URL of \"output\" with the same header",
    ].join("\n"),
    python: [
      "import base64, os, time", "", "import requests", "",
      'H = {"x-api-key": os.environ["SD3SERVE_API_KEY"]}', `data = ${pyLiteral(body)}`, ...readImage,
      `task = requests.post(${JSON.stringify(url)}, headers=H, json=data).json()`,
      'while requests.get(task["status_url"], headers=H).json()["status"] not in ("COMPLETED", "FAILED"):',
      "    time.sleep(0.5)",
      'for i, image_url in enumerate(requests.get(task["response_url"], headers=H).json()["output"]):',
      `    open(f"out-{i}.${ext}", "wb").write(requests.get(image_url, headers=H).content)`,
    ].join("\n"),
    javascript: [
      "const axios = require('axios');", "const fs = require('fs');", "",
      "const headers = { 'x-api-key': process.env.SD3SERVE_API_KEY };", `const data = ${json};`, "",
      "(async function () {",
      `  const task = (await axios.post(${JSON.stringify(url)}, data, { headers })).data;`,
      "  let status;",
      "  do {", "    await new Promise((r) => setTimeout(r, 500));",
      "    status = (await axios.get(task.status_url, { headers, validateStatus: () => true })).data.status;",
      "  } while (status !== 'COMPLETED' && status !== 'FAILED');",
      "  const result = (await axios.get(task.response_url, { headers })).data;",
      "  for (const [i, url] of result.output.entries()) {",
      "    const image = await axios.get(url, { headers, responseType: 'arraybuffer' });",
      `    fs.writeFileSync(\`out-\${i}.${ext}\`, image.data);`,
      "  }", "})();",
    ].join("\n"),
  };
}

function showCode(body) {
  lastBody = body;
  $("code-text").textContent = snippets(body)[codeLang];
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.lang === codeLang));
  }
}

async function copyCode() {
  const text = $("code-text").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard API (plain http on another host): select the text instead
    const range = document.createRange();
    range.selectNodeContents($("code-text"));
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    document.execCommand("copy");
  }
  $("copy").textContent = "Copied";
  setTimeout(() => { $("copy").textContent = "Copy"; }, 1500);
}

// --- history (this browser's local storage) ------------------------------------------------------------------

function loadHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_KEY)) || []; } catch (e) { return []; }
}

function addHistory(r, img) {
  const canvas = document.createElement("canvas");
  const scale = THUMB_PX / Math.max(img.naturalWidth, img.naturalHeight);
  canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  const { image, ...body } = r.body;  // the start image stays out of local storage
  const entry = { time: new Date().toISOString(), id: r.id, body, seed: r.seed, cost: r.cost,
    seconds: r.seconds, images: r.blobs.length, thumb: canvas.toDataURL("image/jpeg", 0.8),
    size: [img.naturalWidth, img.naturalHeight], img2img: image !== undefined };
  const history = [entry, ...loadHistory()].slice(0, HISTORY_MAX);
  try { localStorage.setItem(HISTORY_KEY, JSON.stringify(history)); } catch (e) { /* storage full: keep going */ }
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const entry of loadHistory()) {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.src = entry.thumb;
    img.alt = "";
    const text = document.createElement("div");
    const prompt = document.createElement("p");
    prompt.textContent = entry.body.prompt;
    const meta = document.createElement("p");
    meta.className = "hint";
    const [w, h] = entry.size || [entry.body.width, entry.body.height];
    const kind = entry.img2img ? ` · image-to-image, strength ${entry.body.strength}` : "";
    const loras = entry.body.loras ? ` · ${entry.body.loras.map((l) => `${l.name} ${l.scale}`).join(", ")}` : "";
    meta.textContent = `seed ${entry.seed} · ${w}×${h} · ${entry.body.steps} steps${kind}${loras} · `
      + `${entry.cost} credit(s) · ${new Date(entry.time).toLocaleString()}`;
    const use = document.createElement("button");
    use.type = "button";
    use.textContent = "Use these settings";
    use.addEventListener("click", () => {
      for (const name of FIELDS) if (name in entry.body) setValue(name, entry.body[name]);
      setValue("seed", entry.seed);
      if ("strength" in entry.body) $("strength").value = entry.body.strength;
      const named = new Set((entry.body.loras || []).map((l) => l.name));
      for (const c of document.querySelectorAll("#loras input[type=checkbox]")) c.checked = named.has(c.value);
      updateSize();
      showCode(readBody() || entry.body);
      window.scrollTo({ top: 0, behavior: "smooth" });
    });
    text.append(prompt, meta, use);
    item.append(img, text);
    list.append(item);
  }
}

// --- start ---------------------------------------------------------------------------------------------------

function rememberKey() {
  if ($("remember-key").checked) localStorage.setItem(KEY_KEY, $("api-key").value.trim());
  else localStorage.removeItem(KEY_KEY);
}

async function start() {
  buildFields();
  try {
    config = await (await fetch("/playground/config.json")).json();
  } catch (e) {
    showError(`Could not load the playground's settings: ${e.message}`);
    return;
  }
  setupFields();
  setupImg2Img();
  if (config.prompt_grammar) {
    $("grammar").textContent = config.prompt_grammar;
    $("demo-note").hidden = false;
  }
  const saved = localStorage.getItem(KEY_KEY);
  if (saved) { $("api-key").value = saved; $("remember-key").checked = true; refreshCredits(); }
  loadAdapters(saved || "");
  $("api-key").addEventListener("change", refreshCredits);
  $("api-key").addEventListener("change", () => loadAdapters($("api-key").value.trim()));
  $("remember-key").addEventListener("change", rememberKey);
  $("form").addEventListener("submit", generate);
  $("reset").addEventListener("click", () => { resetFields(); showCode(readBody()); });
  $("random-seed").addEventListener("click", () => {
    setValue("seed", Math.floor(Math.random() * (fieldSpec("seed").maximum + 1)));
    validateField("seed");
  });
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => { codeLang = tab.dataset.lang; showCode(lastBody || readBody()); });
  }
  $("copy").addEventListener("click", copyCode);
  $("clear-history").addEventListener("click", () => { localStorage.removeItem(HISTORY_KEY); renderHistory(); });
  $("form").addEventListener("input", () => { const body = readBodyQuietly(); if (body) showCode(body); });
  $("form").addEventListener("change", () => { const body = readBodyQuietly(); if (body) showCode(body); });
  showCode(readBody());
  renderHistory();
  document.body.dataset.ready = "true";
  watchReadiness();
}

// While the server loads its model (/readyz: 503 loading), say so; generation works once it is ready.
async function watchReadiness() {
  for (;;) {
    let status = "unreachable";
    try { status = (await (await fetch("/readyz")).json()).status; } catch (e) { /* try again */ }
    if (status === "ready") {
      if ($("phase").dataset.loading) { $("phase").textContent = "Ready."; delete $("phase").dataset.loading; }
      return;
    }
    $("phase").dataset.loading = "true";
    $("phase").textContent = status === "loading" ? "The model is still loading…" : `Server ${status}: waiting…`;
    await sleep(2000);
  }
}

// The code follows the form as it is typed, without showing errors while typing.
function readBodyQuietly() {
  const body = {};
  for (const name of FIELDS) {
    const value = readValue(name);
    if (fieldError(name, value)) return null;
    body[name] = value;
  }
  return addImageAndAdapters(body) ? null : body;
}

// --- start image and adapters --------------------------------------------------------------------------------

function setupImg2Img() {
  const spec = config.img2img_fields.strength, range = $("strength");
  range.min = spec.minimum;
  range.max = spec.maximum;
  range.step = "0.05";
  range.value = spec.default;
  const show = () => { $("strength-value").textContent = Number(range.value).toFixed(2); };
  range.addEventListener("input", show);
  show();
  $("init-image").addEventListener("change", () => loadInitImage($("init-image").files[0]));
  $("clear-image").addEventListener("click", () => { $("init-image").value = ""; setInitImage(null); });
}

function loadInitImage(file) {
  $("init-image-error").textContent = "";
  if (!file) { setInitImage(null); return; }
  if (!IMAGE_TYPES.includes(file.type)) {
    $("init-image-error").textContent = "image: a PNG, JPEG or WebP file";
    setInitImage(null);
    return;
  }
  if (file.size > config.max_image_bytes) {
    $("init-image-error").textContent = `image: at most ${config.max_image_bytes} bytes (this one has ${file.size})`;
    setInitImage(null);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const url = reader.result;
    const probe = new Image();
    probe.onload = () => setInitImage({ b64: url.slice(url.indexOf(",") + 1), name: file.name,
      width: probe.naturalWidth, height: probe.naturalHeight, url });
    probe.onerror = () => { $("init-image-error").textContent = "image: this file cannot be read as an image"; };
    probe.src = url;
  };
  reader.readAsDataURL(file);
}

function setInitImage(image) {
  initImage = image;
  $("init-box").hidden = !image;
  $("init-thumb").src = image ? image.url : "";
  $("strength").disabled = !image;
  document.body.dataset.initImage = image ? "ready" : "";
  updateSize();
  const body = readBodyQuietly();
  if (body) showCode(body);
}

// The adapters this key may name, as a checkbox and a scale each.
async function loadAdapters(key) {
  const box = $("loras");
  if (!key) { $("loras-hint").textContent = "(enter a key to list them)"; return; }
  let names;
  try {
    names = (await (await api("GET", config.paths.loras, key)).json()).loras.map((l) => l.name);
  } catch (e) {
    $("loras-hint").textContent = `(could not list them: ${e.message})`;
    return;
  }
  if (names.join("\n") === adapters.join("\n") && box.childElementCount) return;  // the same: keep the choices
  adapters = names;
  const ticked = new Set(selectedAdapters());
  box.replaceChildren();
  $("loras-hint").textContent = adapters.length ? `(at most ${config.max_loras})` : "(this server has none)";
  for (const name of adapters) {
    const row = document.createElement("div");
    row.className = "lora";
    const label = document.createElement("label");
    label.className = "inline";
    const check = document.createElement("input");
    check.type = "checkbox";
    check.value = name;
    check.id = `lora-${name}`;
    check.checked = ticked.has(name);
    label.append(check, ` ${name}`);
    const scale = document.createElement("input");
    scale.type = "number";
    scale.min = "-4";
    scale.max = "4";
    scale.step = "0.1";
    scale.value = "1";
    scale.setAttribute("aria-label", `Scale of ${name}`);
    row.append(label, scale);
    box.append(row);
  }
  document.body.dataset.adapters = String(adapters.length);
}

function selectedAdapters() {
  return Array.from(document.querySelectorAll("#loras input[type=checkbox]:checked"), (c) => c.value);
}

start();
