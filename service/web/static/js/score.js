// Score tab: POST /score per file (resize=true with the chosen fit, input_image=true, heatmap where the model has one),
// shown as the model saw it, with the outlier badge and the score on the calibration distribution.
import { postForm } from "./api.js";
import { colourText, eachLimited, extentText, facts, fileSource, fillSelect, fmt, h, peakText, pngURL } from "./ui.js";

const $ = (id) => document.getElementById(id);
const panel = $("panel-score");
const modelSel = $("score-model");
const typeSel = $("score-type");
const labelSel = $("score-label");
const fitSel = $("score-fit");
const heatBox = $("score-heatmap");
const results = $("score-results");
let models = new Map();
let files = []; // every file dropped so far, scored again when the model or score type changes
let run = 0;

export function init() {
  fileSource($("score-drop"), $("score-files"), panel, (added) => {
    files = files.concat(added);
    scoreAll(added, false);
  });
  modelSel.addEventListener("change", () => {
    controls();
    scoreAll(files, true);
  });
  typeSel.addEventListener("change", () => scoreAll(files, true));
  labelSel.addEventListener("change", () => scoreAll(files, true));
  fitSel.addEventListener("change", () => scoreAll(files, true));
  heatBox.addEventListener("change", () => results.classList.toggle("no-heat", !heatBox.checked));
}

export function show(list) {
  models = new Map(list.map((m) => [m.name, m]));
  fillSelect(modelSel, list.map((m) => ({ value: m.name })));
  controls();
}

function controls() {
  const m = models.get(modelSel.value);
  if (!m) return;
  fillSelect(typeSel, m.score_types.map((t) => ({ value: t, label: t === m.default_score_type ? `${t} (default)` : t })));
  typeSel.value = m.default_score_type;
  $("score-label-wrap").hidden = !m.conditional;
  fillSelect(labelSel, [{ value: "", label: "none: p(x), calibrated" }, ...(m.classes || []).map((c) => ({ value: c }))]);
}

/** Heatmaps need per-pixel terms: autoregressive models, and for a conditional one a label. */
function heatmapFor(m, label) {
  return m.kind === "autoregressive" && (!m.conditional || label !== "");
}

async function scoreAll(list, replace) {
  const m = models.get(modelSel.value);
  if (!m || !list.length) return;
  const id = ++run;
  if (replace) results.replaceChildren();
  const label = m.conditional ? labelSel.value : "";
  const options = { score_type: typeSel.value, label, fit: fitSel.value, heatmap: heatmapFor(m, label), input_image: true };
  const items = list.map((file) => {
    const li = h("li", { class: "result", "aria-busy": "true" }, h("h3", {}, file.name || "pasted image"), h("p", { class: "hint" }, "scoring…"));
    results.append(li);
    return { file, li };
  });
  // one request per file, so that one refused file leaves the others scored
  await eachLimited(items, 4, async ({ file, li }) => {
    let answer;
    try {
      answer = await postForm("score?resize=true", { model: m.name, ...options }, [file]);
    } catch (error) {
      if (id !== run && replace) return;
      li.classList.add("refused");
      li.replaceChildren(li.firstChild, h("p", { class: "error" }, `Refused${error.status ? ` (${error.status})` : ""}: ${error.message}`));
      li.setAttribute("aria-busy", "false");
      return;
    }
    render(li, m, answer.score_type, answer.results[0], label);
  });
}

function badge(r) {
  if (r.is_outlier === true) return h("span", { class: "badge out" }, "outlier");
  if (r.is_outlier === false) return h("span", { class: "badge in" }, "in distribution");
  return h("span", { class: "badge none" }, "no threshold");
}

function render(li, m, scoreType, r, label) {
  const view = h("div", { class: "view" });
  if (r.input_image) view.append(h("img", { src: pngURL(r.input_image), alt: "the image as the model saw it" }));
  if (r.heatmap) heatOverlay(r.heatmap).then((c) => view.append(c));
  const cal = ((m.calibration || {}).scores || {})[scoreType];
  const info = h(
    "div",
    { class: "info" },
    h("p", {}, badge(r)),
    facts([
      ["bits/dim", fmt(r.bits_per_dim)],
      [scoreType, fmt(r.score)],
      ["threshold", r.threshold === null ? null : fmt(r.threshold)],
      ["percentile", r.percentile === null ? null : `${r.percentile.toFixed(1)}`],
      ["converted", r.resized ? `yes, to ${m.shape.join("×")}` : "no"],
      ["colour", colourText(r.colour)],
      ["brightest pixel", peakText(r.peak)],
      ["object spans", extentText(r.extent)],
      ["label", label || null],
    ]),
  );
  if (r.percentile !== null && cal && cal.quantiles) {
    info.append(
      histogram(cal.quantiles, r.score, r.threshold, r.percentile),
      h("p", { class: "hist-caption" }, `the calibration scores${m.calibration.n ? ` (${m.calibration.n} images)` : ""}; dashed: threshold`),
    );
  }
  else if (label) info.append(h("p", { class: "hint" }, "p(x|y) for a label has no calibration: no threshold, no percentile."));
  if (r.explanation !== undefined && r.explanation !== null) {
    info.append(isDose(r.explanation) ? doseExplanation(r.explanation) : explanation(r.explanation));
  }
  li.replaceChildren(li.firstChild, view, info);
  li.dataset.outlier = String(r.is_outlier);
  li.setAttribute("aria-busy", "false");
}

/** True for the dose score's explanation (per statistic: value, p_value, contribution, crossed). */
function isDose(e) {
  return typeof e === "object" && Array.isArray(e.decided_by) && typeof e.statistics === "object" && e.statistics !== null;
}

/** The dose explanation: what refused the image, then every statistic, largest share of the score first. */
function doseExplanation(e) {
  const box = h("details", { class: "explanation", open: true }, h("summary", {}, "Explanation"));
  const verdict = e.decided_by.length ? `refused by ${e.decided_by.join(", ")}` : "no statistic over the threshold";
  box.append(h("p", { class: "decided" }, verdict, h("span", { class: "hint" }, ` · most extreme: ${e.most_extreme}`)));
  const head = h("tr", {}, ...["statistic", "value", "p", "share"].map((t) => h("th", { scope: "col" }, t)));
  const body = h("tbody");
  const rows = Object.entries(e.statistics).sort((a, b) => b[1].contribution - a[1].contribution);
  for (const [name, st] of rows) {
    body.append(
      h(
        "tr",
        { class: st.crossed ? "crossed" : null, title: `${st.tail} tail` },
        h("td", {}, name),
        h("td", { class: "num" }, fmt(st.value)),
        h("td", { class: "num" }, st.p_value.toExponential(1)),
        h("td", { class: "num" }, fmt(st.contribution, 2)),
      ),
    );
  }
  box.append(h("table", { class: "stats" }, h("thead", {}, head), body));
  return box;
}

/** The API's explanation, whatever its shape: text, or its keys and values. */
function explanation(e) {
  const box = h("details", { class: "explanation", open: true }, h("summary", {}, "Explanation"));
  if (typeof e !== "object") box.append(h("p", {}, String(e)));
  else box.append(facts(Object.entries(e).map(([k, v]) => [k, typeof v === "object" && v !== null ? JSON.stringify(v) : fmt(v)])));
  return box;
}

// A dark-to-yellow colour ramp (as in "inferno"), 5 stops, interpolated: per-pixel NLL 0 .. C ln(levels).
const RAMP = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

function rampColor(t) {
  const x = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2);
  const f = x - i;
  return RAMP[i].map((a, k) => Math.round(a + f * (RAMP[i + 1][k] - a)));
}

/** The heatmap PNG (grey = NLL) recoloured onto a canvas laid over the image. */
async function heatOverlay(b64) {
  const img = new Image();
  img.src = pngURL(b64);
  await img.decode();
  const c = h("canvas", { class: "heat", width: img.naturalWidth, height: img.naturalHeight, "aria-label": "per-pixel NLL heatmap", role: "img" });
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, c.width, c.height);
  for (let p = 0; p < data.data.length; p += 4) {
    // the colour and its opacity both rise with the NLL: where the model expected the pixel, the image shows
    const t = data.data[p] / 255;
    const [r, g, b] = rampColor(t);
    data.data.set([r, g, b, Math.round(255 * Math.min(1, 0.15 + 1.1 * t))], p);
  }
  ctx.putImageData(data, 0, 0);
  return c;
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

/**
 * Density of the calibration scores drawn from their quantiles q_0..q_K (each interval holds 1/K of
 * them), between the 1st and 99th percentile with a margin; the threshold dashed, the score a line.
 */
export function histogram(quantiles, score, threshold, percentile) {
  const q = [...quantiles].sort((a, b) => a - b);
  const K = q.length - 1;
  let lo = q[Math.min(1, K)];
  let hi = q[Math.max(K - 1, 0)];
  if (threshold !== null) hi = Math.max(hi, threshold);
  const pad = 0.12 * (hi - lo || 1);
  lo -= pad;
  hi += pad;
  const W = 260;
  const H = 50;
  const B = 26;
  const width = (hi - lo) / B;
  const mass = new Array(B).fill(0);
  for (let i = 0; i < K; i++) {
    const a = q[i];
    const b = q[i + 1];
    for (let j = 0; j < B; j++) {
      const x0 = lo + j * width;
      const x1 = x0 + width;
      const overlap = Math.min(b, x1) - Math.max(a, x0);
      if (overlap > 0) mass[j] += b > a ? overlap / (b - a) / K : 0;
      else if (b === a && a >= x0 && a < x1) mass[j] += 1 / K;
    }
  }
  const top = Math.max(...mass) || 1;
  const x = (v) => ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo)) * W;
  const label = `score ${fmt(score)} at percentile ${percentile.toFixed(1)} of the calibration scores` + (threshold === null ? "" : `; threshold ${fmt(threshold)}`);
  const svg = s("svg", { class: "hist", viewBox: `0 0 ${W} ${H + 16}`, role: "img", "aria-label": label });
  svg.append(s("title", {}));
  svg.firstChild.textContent = label;
  mass.forEach((v, j) => {
    const bh = (v / top) * H;
    svg.append(s("rect", { class: "bar", x: (j * W) / B + 0.5, y: H - bh, width: W / B - 1, height: bh }));
  });
  if (threshold !== null) svg.append(s("line", { class: "thr", x1: x(threshold), x2: x(threshold), y1: 0, y2: H }));
  const sx = x(score);
  svg.append(s("line", { class: "score", x1: sx, x2: sx, y1: 0, y2: H + 4 }));
  const beyond = score > hi ? " →" : score < lo ? "← " : "";
  const t = s("text", { x: Math.min(Math.max(sx, 30), W - 30), y: H + 14, "text-anchor": "middle" });
  t.textContent = score > hi ? `${fmt(score, 2)}${beyond}` : score < lo ? `${beyond}${fmt(score, 2)}` : `p${percentile.toFixed(0)}`;
  svg.append(t);
  return svg;
}
