// Classify tab: POST /classify per file for a class-conditional model; p(y|x) as bars, and the
// refused badge where p(x) fails the calibrated outlier test.
import { postForm } from "./api.js";
import { colourText, eachLimited, extentText, fileSource, fillSelect, fmt, h, pct, peakText } from "./ui.js";

const $ = (id) => document.getElementById(id);
const panel = $("panel-classify");
const modelSel = $("classify-model");
const results = $("classify-results");

export function init() {
  fileSource($("classify-drop"), $("classify-files"), panel, classifyAll);
}

export function show(list) {
  const conditional = list.filter((m) => m.conditional);
  fillSelect(modelSel, conditional.map((m) => ({ value: m.name })));
  modelSel.disabled = !conditional.length;
  const note = $("classify-none");
  if (note) note.remove();
  if (!conditional.length && list.length) {
    modelSel.closest("form").after(h("p", { id: "classify-none", class: "hint" }, "No class-conditional model is served, so nothing can classify."));
  }
}

async function classifyAll(files) {
  const model = modelSel.value;
  if (!model) return;
  const items = files.map((file) => {
    const li = h("li", { class: "result", "aria-busy": "true" }, h("h3", {}, file.name || "pasted image"), h("p", { class: "hint" }, "classifying…"));
    results.append(li);
    return { file, li };
  });
  await eachLimited(items, 4, async ({ file, li }) => {
    try {
      const answer = await postForm("classify?resize=true", { model }, [file]);
      render(li, file, answer.results[0]);
    } catch (error) {
      li.classList.add("refused");
      li.replaceChildren(li.firstChild, h("p", { class: "error" }, `Refused${error.status ? ` (${error.status})` : ""}: ${error.message}`));
    }
    li.setAttribute("aria-busy", "false");
  });
}

function render(li, file, r) {
  const thumb = h("img", { class: "thumb", src: URL.createObjectURL(file), alt: "the uploaded image" });
  let verdict;
  if (r.rejected) verdict = h("span", { class: "badge out" }, "refused: unlike the training data");
  else verdict = h("span", { class: "badge in" }, `${r.predicted} (${pct(r.probability)})`);
  const entries = Object.entries(r.posterior);
  const best = Math.max(...entries.map(([, p]) => p));
  const bars = h("div", { class: "bars", role: "list", "aria-label": "p(y|x) per class" });
  for (const [name, p] of entries) {
    const fill = h("div", { class: "fill" });
    fill.style.width = `${(100 * p).toFixed(2)}%`;
    const row = [h("span", { role: "listitem" }, name), h("div", { class: "track", "aria-hidden": "true" }, fill), h("span", { class: "num" }, pct(p))];
    if (p === best) row.forEach((el) => el.classList.add("best"));
    bars.append(...row);
  }
  const info = h(
    "div",
    { class: "info" },
    h("p", {}, verdict),
    h("p", { class: "hint" }, `bits/dim ${fmt(r.bits_per_dim)} · score ${fmt(r.score)}` + (r.threshold === null ? "" : ` (threshold ${fmt(r.threshold)}, percentile ${fmt(r.percentile, 1)})`)),
  );
  const colour = colourText(r.colour);
  if (colour) info.append(h("p", { class: "hint colour" }, colour));
  const peak = peakText(r.peak);
  if (peak && r.peak.crossed) info.append(h("p", { class: "hint colour" }, `brightest pixel ${peak}`));
  const extent = extentText(r.extent);
  if (extent && r.extent.crossed) info.append(h("p", { class: "hint colour" }, `object spans ${extent}`));
  li.dataset.rejected = String(r.rejected);
  li.replaceChildren(li.firstChild, thumb, info, bars);
}
