// Sample tab: POST /sample/stream, read as Server-Sent Events: a progress bar per row, partial
// images as they form, the result. Cancel aborts the fetch; the server then drops the work and frees
// the sampling slot.
import { absolute, call, readEvents } from "./api.js";
import { fillSelect, fmt, gridPNG, h, pngURL } from "./ui.js";

const $ = (id) => document.getElementById(id);
const form = $("sample-form");
const modelSel = $("sample-model");
const labelSel = $("sample-label");
const go = $("sample-go");
const cancel = $("sample-cancel");
const progress = $("sample-progress");
const status = $("sample-status");
const grid = $("sample-grid");
const download = $("sample-download");
let models = new Map();
let controller = null;

export function init() {
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    draw();
  });
  cancel.addEventListener("click", () => controller && controller.abort());
  modelSel.addEventListener("change", controls);
}

export function show(list) {
  models = new Map(list.map((m) => [m.name, m]));
  fillSelect(modelSel, list.map((m) => ({ value: m.name })));
  controls();
}

function controls() {
  const m = models.get(modelSel.value);
  $("sample-label-wrap").hidden = !(m && m.conditional);
  if (m && m.conditional) fillSelect(labelSel, (m.classes || []).map((c) => ({ value: c })));
}

function request() {
  const m = models.get(modelSel.value);
  const body = { model: modelSel.value, n: Number($("sample-n").value) };
  const seed = $("sample-seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  const t = Number($("sample-temperature").value);
  if ($("sample-temperature").value !== "" && t !== 1) body.temperature = t;
  if (m && m.conditional) body.label = labelSel.value;
  return body;
}

function curl(body) {
  const key = $("api-key").value ? " -H \"X-API-Key: $GENSERVE_API_KEY\"" : "";
  return (
    `curl -s${key} -X POST ${absolute("sample")} -H 'Content-Type: application/json' -H 'Accept: image/png' \\\n` +
    `     -d '${JSON.stringify(body)}' -o grid.png`
  );
}

function setImages(pngs, bits) {
  const n = pngs.length;
  grid.style.gridTemplateColumns = `repeat(${Math.ceil(Math.sqrt(n))}, 1fr)`;
  if (grid.children.length !== n) {
    grid.replaceChildren(...pngs.map((_, i) => h("figure", {}, h("img", { alt: `sample ${i + 1}` }))));
  }
  pngs.forEach((p, i) => {
    const fig = grid.children[i];
    fig.firstChild.src = pngURL(p);
    const cap = fig.querySelector("figcaption");
    if (bits) {
      const text = `${fmt(bits[i], 2)} b/d`;
      if (cap) cap.textContent = text;
      else fig.append(h("figcaption", {}, text));
    }
  });
}

async function draw() {
  const body = request();
  controller = new AbortController();
  go.disabled = true;
  cancel.disabled = false;
  download.hidden = true;
  $("sample-repro").hidden = true;
  grid.replaceChildren();
  progress.value = 0;
  progress.max = 1;
  status.textContent = "waiting for a sampling slot…";
  let done = false;
  try {
    const response = await call("sample/stream?partial_every=2", {
      method: "POST",
      body: JSON.stringify(body),
      contentType: "application/json",
      accept: "text/event-stream",
      signal: controller.signal,
    });
    await readEvents(response, (name, data) => {
      if (name === "start") {
        progress.max = data.rows;
        status.textContent = `0 / ${data.rows} rows`;
        $("sample-seed-out").textContent = String(data.seed);
        $("sample-curl").textContent = curl({ ...body, seed: data.seed });
        $("sample-repro").hidden = false;
      } else if (name === "progress") {
        progress.value = data.rows_done;
        status.textContent = `${data.rows_done} / ${data.rows} rows`;
      } else if (name === "partial") {
        setImages(data.images, null);
      } else if (name === "result") {
        done = true;
        progress.value = progress.max;
        setImages(data.images, data.bits_per_dim);
        const mean = data.bits_per_dim ? `, mean ${fmt(data.bits_per_dim.reduce((a, b) => a + b, 0) / data.bits_per_dim.length)} bits/dim` : "";
        status.textContent = `done: ${data.images.length} images, seed ${data.seed}${mean}`;
        offerDownload(data);
      } else if (name === "error") {
        done = true;
        status.textContent = `failed (${data.status}): ${data.detail}`;
      }
    });
    if (!done) status.textContent = "the stream ended before the result";
  } catch (error) {
    status.textContent = error.name === "AbortError" ? "cancelled: the server stopped drawing" : `refused (${error.status ?? "network"}): ${error.message}`;
  } finally {
    go.disabled = false;
    cancel.disabled = true;
    controller = null;
  }
}

async function offerDownload(result) {
  const blob = await gridPNG(result.images.map(pngURL));
  if (download.href) URL.revokeObjectURL(download.href);
  download.href = URL.createObjectURL(blob);
  download.download = `${result.model}-seed${result.seed}.png`;
  download.hidden = false;
}
