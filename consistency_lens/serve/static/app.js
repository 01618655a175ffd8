// The lens viewer page: every text node is built with textContent, never parsed as HTML, so no text
// from a user or a model can become markup.
"use strict";

const state = { lenses: [], results: {}, pos: null, pinned: false, samples: {}, abort: null, timer: null };
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path, body, signal) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  };
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function shownLenses() {
  const names = [$("lens").value];
  if ($("compare").value && $("compare").value !== $("lens").value) names.push($("compare").value);
  return names;
}

function updateUrl() {
  const params = new URLSearchParams();
  params.set("text", $("text").value);
  params.set("lens", $("lens").value);
  if ($("compare").value) params.set("compare", $("compare").value);
  if (state.pos !== null) params.set("pos", String(state.pos));
  const url = `${location.pathname}?${params.toString()}`;
  history.replaceState(null, "", url);
  $("permalink").href = url;
  $("permalink").hidden = false;
}

async function explain() {
  const text = $("text").value;
  const names = shownLenses();
  $("status").textContent = "explaining…";
  $("status").className = "muted";
  const started = performance.now();
  try {
    const answers = await Promise.all(names.map((lens) => api("/api/explain", { text, lens })));
    state.results = {};
    for (const answer of answers) state.results[answer.lens] = answer.rows;
    state.samples = {};
    render(names);
    $("status").textContent = `${answers[0].rows.length} tokens in ${((performance.now() - started) / 1000).toFixed(1)} s`;
    if (state.pos !== null && answers[0].rows.some((r) => r.position === state.pos)) {
      select(state.pos, true);
    } else {
      state.pos = null;
      hidePopup(true);
    }
    updateUrl();
  } catch (err) {
    $("status").textContent = err.message;
    $("status").className = "error";
  }
}

function render(names) {
  const panes = $("panes");
  panes.replaceChildren();
  const top = Math.max(1e-6, ...names.flatMap((n) => state.results[n].map((r) => r.kl)));
  for (const name of names) {
    const info = state.lenses.find((l) => l.name === name);
    const pane = el("section", "pane");
    pane.dataset.lens = name;
    pane.append(el("h2", "", `${name} (${info.model}, block ${info.layer})`));
    const flow = el("div", "flow");
    for (const row of state.results[name]) {
      const span = el("span", "tok", row.token);
      span.dataset.pos = String(row.position);
      span.style.background = `rgba(230, 80, 60, ${(0.08 + 0.6 * row.kl / top).toFixed(2)})`;
      span.title = "";
      span.addEventListener("mouseenter", () => { if (!state.pinned) show(row.position, span); });
      span.addEventListener("mouseleave", () => { if (!state.pinned) hidePopup(false); });
      span.addEventListener("click", () => select(row.position, true, span));
      flow.append(span);
    }
    pane.append(flow);
    panes.append(pane);
  }
}

function select(pos, pin, span) {
  state.pos = pos;
  state.pinned = pin;
  document.querySelectorAll(".tok.selected").forEach((s) => s.classList.remove("selected"));
  document.querySelectorAll(`.tok[data-pos="${pos}"]`).forEach((s) => s.classList.add("selected"));
  show(pos, span || document.querySelector(`.tok[data-pos="${pos}"]`));
  updateUrl();
}

function hidePopup(force) {
  if (force) state.pinned = false;
  $("popup").hidden = true;
}

function topTable(row) {
  const table = el("table", "top");
  const head = el("tr");
  for (const h of ["M's next token", "p", "with Â patched in", "p"]) head.append(el("th", "", h));
  table.append(head);
  for (let i = 0; i < row.top_model.length; i++) {
    const tr = el("tr");
    tr.append(el("td", "top-model", JSON.stringify(row.top_model[i][0])));
    tr.append(el("td", "num", row.top_model[i][1].toFixed(3)));
    tr.append(el("td", "top-lens", JSON.stringify(row.top_lens[i][0])));
    tr.append(el("td", "num", row.top_lens[i][1].toFixed(3)));
    table.append(tr);
  }
  return table;
}

function show(pos, anchor) {
  const popup = $("popup");
  popup.replaceChildren();
  const names = Object.keys(state.results);
  const text = $("text").value;
  for (const name of names) {
    const rows = state.results[name];
    const index = rows.findIndex((r) => r.position === pos);
    if (index < 0) continue;
    const row = rows[index];
    const block = el("div", "lens-block");
    block.dataset.lens = name;
    block.append(el("h3", "", `${name} · position ${pos}`));
    const context = el("div", "context");
    const start = Math.max(0, index - 40);
    context.append(document.createTextNode((start > 0 ? "…" : "") + rows.slice(start, index).map((r) => r.token).join("")));
    context.append(el("mark", "", row.token));
    block.append(context);
    const greedy = el("div");
    greedy.append(el("b", "", "explanation: "), el("span", "expl greedy", JSON.stringify(row.explanation)));
    block.append(greedy);
    block.append(el("div", "scores", `KL ${row.kl.toFixed(3)} · cosine ${row.cosine.toFixed(3)}`));
    const samples = el("div", "samples");
    samples.append(el("b", "", "sampled: "));
    const list = el("span", "sample-list muted", "…");
    samples.append(list);
    block.append(samples);
    block.append(topTable(row));
    popup.append(block);
    loadSamples(name, text, pos, list);
  }
  const box = anchor.getBoundingClientRect();
  popup.style.left = `${Math.max(8, Math.min(window.scrollX + box.left, window.scrollX + document.documentElement.clientWidth - 580))}px`;
  popup.style.top = `${window.scrollY + box.bottom + 6}px`;
  popup.hidden = false;
}

function fillSamples(list, samples) {
  list.className = "sample-list";
  list.replaceChildren(...samples.map((s, i) => {
    const item = el("span", "expl sample", `${JSON.stringify(s.explanation)} (KL ${s.kl.toFixed(2)})`);
    return i ? [document.createTextNode(" · "), item] : [item];
  }).flat());
}

function loadSamples(lens, text, pos, list) {
  const key = JSON.stringify([lens, text, pos]);
  if (state.samples[key]) { fillSamples(list, state.samples[key]); return; }
  // Hovering across tokens: only the last one asks the server; a dropped request is never run.
  clearTimeout(state.timer);
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  state.timer = setTimeout(async () => {
    try {
      const data = await api("/api/samples", { text, lens, position: pos, num: 3 }, abort.signal);
      state.samples[key] = data.samples;
      for (const node of document.querySelectorAll(`#popup .lens-block[data-lens="${CSS.escape(lens)}"] .sample-list`)) {
        fillSamples(node, data.samples);
      }
    } catch (err) {
      if (err.name !== "AbortError") list.textContent = err.message;
    }
  }, 150);
}

async function init() {
  const info = await api("/api/lenses");
  state.lenses = info.lenses;
  for (const lens of info.lenses) {
    $("lens").append(el("option", "", lens.name));
    $("compare").append(el("option", "", lens.name));
  }
  const params = new URLSearchParams(location.search);
  const known = (name) => info.lenses.some((l) => l.name === name);
  $("lens").value = known(params.get("lens")) ? params.get("lens") : info.default;
  if (known(params.get("compare"))) $("compare").value = params.get("compare");
  if (params.has("text")) $("text").value = params.get("text");
  if (params.has("pos") && /^\d+$/.test(params.get("pos"))) state.pos = Number(params.get("pos"));
  $("form").addEventListener("submit", (event) => { event.preventDefault(); explain(); });
  $("lens").addEventListener("change", explain);
  $("compare").addEventListener("change", explain);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") hidePopup(true); });
  if (params.has("text")) explain();
}

init().catch((err) => { $("status").textContent = err.message; $("status").className = "error"; });
