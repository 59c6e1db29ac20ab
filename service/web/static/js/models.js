// Models tab: a card per served model, with samples drawn by POST /sample (Accept: image/png).
import { absolute, call } from "./api.js";
import { facts, fmt, h, pct } from "./ui.js";

const cards = document.getElementById("model-cards");
let generation = 0; // a newer list (a new key) stops an older one's sample requests

export function init() {}

/** "2.797 bits/dim (exact)" or "3.290 bits/dim (IWAE k=128, a bound)". */
export function testBits(model) {
  const m = model.metrics || {};
  if (typeof m.test_bits_per_dim !== "number") return null;
  const how = model.exact_likelihood ? "exact" : `${(m.test_estimator || "estimate").split(" (")[0]}, a bound`;
  const elbo = typeof m.test_elbo_bits_per_dim === "number" ? `; ELBO ${fmt(m.test_elbo_bits_per_dim)}` : "";
  const data = m.test_data ? ` on ${m.test_data}` : "";
  return `${fmt(m.test_bits_per_dim)} bits/dim (${how}${elbo})${data}`;
}

function calibrationFacts(model) {
  const cal = model.calibration;
  if (!cal) return [["calibration", "none: /score gives scores without a threshold"]];
  const name = cal.default_score || model.default_score_type;
  const s = (cal.scores || {})[name] || {};
  return [
    ["score type", name],
    ["target FPR", typeof cal.target_fpr === "number" ? pct(cal.target_fpr) : null],
    [
      "observed FPR",
      typeof s.fpr_on_calibration === "number" ? `${pct(s.fpr_on_calibration, 2)} on ${cal.data || "calibration"}` : null,
    ],
    ["threshold", typeof s.threshold === "number" ? `${fmt(s.threshold)} (${s.units || "bits/dim"})` : null],
    ["calibrated on", cal.n ? `${cal.n} images` : null],
  ];
}

function curls(model) {
  const url = (p) => absolute(p);
  const key = document.getElementById("api-key").value ? " -H \"X-API-Key: $GENSERVE_API_KEY\"" : "";
  const label = model.conditional ? `, "label": ${JSON.stringify((model.classes || ["0"])[0])}` : "";
  const lines = [
    `curl -s${key} ${url(`models/${model.name}`)}`,
    `curl -s${key} -X POST ${url("sample")} -H 'Content-Type: application/json' -H 'Accept: image/png' ` +
      `-d '{"model": "${model.name}", "n": 16, "seed": 0${label}}' -o grid.png`,
    `curl -s${key} -X POST '${url("score")}?resize=true' -F model=${model.name} -F files=@image.png`,
  ];
  if (model.conditional) lines.push(`curl -s${key} -X POST '${url("classify")}?resize=true' -F model=${model.name} -F files=@image.png`);
  if (model.kind === "vae") lines.push(`curl -s${key} -X POST '${url("encode")}?resize=true' -F model=${model.name} -F files=@image.png`);
  return lines.join("\n");
}

function card(model) {
  const samples = h("div", { class: "samples", role: "img", "aria-label": `samples from ${model.name}` });
  const el = h(
    "article",
    { class: "card", "data-model": model.name },
    h("h3", {}, model.name),
    facts([
      ["kind", model.kind + (model.conditional ? ", class-conditional" : "")],
      ["architecture", model.architecture],
      ["dataset", model.dataset],
      ["image", `${model.shape.join("×")}, ${model.levels} levels`],
      ["test", testBits(model)],
      ...calibrationFacts(model),
      ["devices", model.devices.join(", ")],
    ]),
    samples,
    h(
      "details",
      {},
      h("summary", {}, "API calls"),
      h("p", {}, h("a", { href: `models/${model.name}` }, `GET models/${model.name}`), " · ", h("a", { href: "docs" }, "/docs")),
      h("pre", { tabindex: "0" }, curls(model)),
    ),
  );
  return { el, samples };
}

/** Samples for a card: 16 with seed 0, or one per class for a class-conditional model. */
async function drawSamples(model, box, gen) {
  const labels = model.conditional ? (model.classes || []).slice(0, 16) : [null];
  const n = model.conditional ? 1 : 16;
  box.replaceChildren(h("p", { class: "hint" }, "drawing samples…"));
  const imgs = [];
  await Promise.all(
    labels.map(async (label, i) => {
      const body = { model: model.name, n, seed: 0 };
      if (label !== null) body.label = label;
      const r = await call("sample", {
        method: "POST",
        body: JSON.stringify(body),
        contentType: "application/json",
        accept: "image/png",
      });
      imgs[i] = { url: URL.createObjectURL(await r.blob()), label };
    }),
  );
  if (gen !== generation) return;
  if (model.conditional) {
    box.replaceChildren(...imgs.map((s) => h("figure", {}, h("img", { src: s.url, alt: `sample of ${s.label}` }), h("figcaption", {}, s.label))));
    box.style.gridTemplateColumns = `repeat(${Math.min(imgs.length, 5)}, 1fr)`;
  } else {
    box.replaceChildren(h("img", { src: imgs[0].url, alt: `16 samples from ${model.name}, seed 0` }));
    box.style.gridTemplateColumns = "1fr";
  }
}

let pending = []; // cards whose samples are still to draw, once the tab shows

export function show(list) {
  ++generation;
  cards.setAttribute("aria-busy", "false");
  if (!list.length) {
    cards.replaceChildren(h("p", {}, "No models to show."));
    pending = [];
    return;
  }
  pending = list.map((m) => ({ model: m, ...card(m) }));
  cards.replaceChildren(...pending.map((c) => c.el));
  if (!document.getElementById("panel-models").hidden) activate();
}

/** The tab is showing: draw the samples of its cards, one model at a time, so that opening the page
 * does not queue every model's sampling at once (and another tab opened first draws nothing). */
export async function activate() {
  const gen = generation;
  const todo = pending;
  pending = [];
  for (const c of todo) {
    if (gen !== generation) return;
    try {
      await drawSamples(c.model, c.samples, gen);
    } catch (error) {
      c.samples.replaceChildren(h("p", { class: "error" }, `samples: ${error.message}`));
    }
  }
}
