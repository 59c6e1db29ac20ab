// The page: tabs, the API key field, the model list every tab shares.
import { apiKey, getJSON, onUnauthorized, setApiKey } from "./api.js";
import * as classify from "./classify.js";
import * as models from "./models.js";
import * as sample from "./sample.js";
import * as score from "./score.js";

const TABS = ["models", "score", "sample", "classify"];
const banner = document.getElementById("banner");
const keyInput = document.getElementById("api-key");

function showBanner(text) {
  banner.textContent = text;
  banner.hidden = false;
}

function select(name, focus = false) {
  if (!TABS.includes(name)) name = "models";
  for (const t of TABS) {
    const tab = document.getElementById(`tab-${t}`);
    const on = t === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    document.getElementById(`panel-${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "models") models.activate();
}

// Tabs as the WAI-ARIA pattern: click, or arrows / Home / End to move between them.
const tablist = document.getElementById("tabs");
tablist.addEventListener("click", (e) => {
  const tab = e.target.closest("[role=tab]");
  if (tab) select(tab.id.slice(4));
});
tablist.addEventListener("keydown", (e) => {
  const i = TABS.indexOf(document.activeElement.id.slice(4));
  const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: TABS.length - 1 };
  if (i < 0 || !(e.key in moves)) return;
  e.preventDefault();
  select(TABS[(moves[e.key] + TABS.length) % TABS.length], true);
});
window.addEventListener("hashchange", () => select(location.hash.slice(1)));

onUnauthorized((error) => {
  const had = apiKey() ? "The API key in the field was refused" : "This server needs an API key";
  showBanner(
    `${had} (401: ${error.detail}). Type a key into the "API key" field at the top: ` +
      "it is kept for this browser tab only and sent as X-API-Key.",
  );
  keyInput.focus();
});

async function load() {
  const tabs = [models, score, sample, classify];
  try {
    const list = (await getJSON("models")).models;
    banner.hidden = true;
    for (const t of tabs) t.show(list);
    performance.mark("genserve-models");
  } catch (error) {
    for (const t of tabs) t.show([]);
    if (error.status !== 401) showBanner(`Could not list the models: ${error.message}`);
  }
}

keyInput.value = apiKey();
document.getElementById("key-form").addEventListener("submit", (e) => e.preventDefault());
keyInput.addEventListener("change", () => {
  setApiKey(keyInput.value.trim());
  load();
});

for (const t of [models, score, sample, classify]) t.init();
select(location.hash.slice(1));
load();
