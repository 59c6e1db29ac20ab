// Small DOM helpers shared by the tabs.

/** h("p", {class: "x"}, "text", child) -> element. Attributes starting with "on" are listeners. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

/** <dl> from [[term, value], ...]; null values are left out. */
export function facts(rows, cls = "facts") {
  const dl = h("dl", { class: cls });
  for (const [term, value] of rows) {
    if (value === null || value === undefined) continue;
    dl.append(h("dt", {}, term), h("dd", {}, value));
  }
  return dl;
}

/** The colour check of an uploaded file (null where the model has none), in words. */
export function colourText(c) {
  if (c === null || c === undefined) return null;
  const share = `${(100 * c.fraction).toFixed(1)}% of pixels in colour`;
  return c.crossed ? `${share}: refused, the model was trained on grayscale images` : `${share} (gray enough)`;
}

/** The peak check of an image (null where the model has none), in words. */
export function peakText(c) {
  if (c === null || c === undefined) return null;
  const seen = `${c.level} of 255`;
  return c.crossed ? `${seen}: refused, every training image reaches ${c.min_level}` : `${seen} (bright enough)`;
}

/** The extent check of an image (null where the model has none), in words. */
export function extentText(c) {
  if (c === null || c === undefined) return null;
  const seen = `${c.pixels} pixels`;
  return c.crossed ? `${seen}: refused, every training image spans ${c.min_extent}` : `${seen} (fills the frame)`;
}

export function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}

export function pct(x, digits = 1) {
  return `${(100 * x).toFixed(digits)}%`;
}

/** Fill a <select> with options [{value, label}], keeping the current choice where it still exists. */
export function fillSelect(select, options) {
  const keep = select.value;
  select.replaceChildren(...options.map((o) => h("option", { value: o.value }, o.label ?? o.value)));
  if (options.some((o) => o.value === keep)) select.value = keep;
}

export function pngURL(base64) {
  return `data:image/png;base64,${base64}`;
}

/**
 * Files from a drop zone, its file input and paste (anywhere on the page while its panel shows):
 * calls onFiles([File]) each time. The zone is a focusable group: Enter or Space opens the picker.
 */
export function fileSource(zone, input, panel, onFiles) {
  input.addEventListener("change", () => {
    if (input.files.length) onFiles([...input.files]);
    input.value = "";
  });
  zone.addEventListener("keydown", (e) => {
    if (e.target === zone && (e.key === "Enter" || e.key === " ")) {
      e.preventDefault();
      input.click();
    }
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const files = [...(e.dataTransfer?.files || [])];
    if (files.length) onFiles(files);
  });
  document.addEventListener("paste", (e) => {
    if (panel.hidden) return;
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) {
      e.preventDefault();
      onFiles(files);
    }
  });
}

/** Run async fn over items, at most `limit` at a time. */
export async function eachLimited(items, limit, fn) {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

export function loadImage(src) {
  const img = new Image();
  img.src = src;
  return img.decode().then(() => img);
}

/**
 * The images as one PNG grid laid out as POST /sample with Accept: image/png lays it out
 * (near-square, rows first, 2 px black padding, native size); resolves to a Blob.
 */
export async function gridPNG(srcs, padding = 2) {
  const imgs = await Promise.all(srcs.map(loadImage));
  const n = imgs.length;
  const cols = Math.ceil(Math.sqrt(n));
  const rows = Math.ceil(n / cols);
  const w = imgs[0].naturalWidth;
  const hgt = imgs[0].naturalHeight;
  const canvas = document.createElement("canvas");
  canvas.width = padding + cols * (w + padding);
  canvas.height = padding + rows * (hgt + padding);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  imgs.forEach((img, i) => {
    const r = Math.floor(i / cols);
    const k = i % cols;
    ctx.drawImage(img, padding + k * (w + padding), padding + r * (hgt + padding));
  });
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}
