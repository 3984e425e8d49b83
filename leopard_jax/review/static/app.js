// The review page. The server is the only source of truth: a decision is shown as done
// only after the server answers that it is committed to disk.
"use strict";

const $ = (id) => document.getElementById(id);

const page = {
  view: null,        // the server's answer for the current anchor
  focus: 0,          // selected candidate card
  edges: false,      // show edge images instead of crops
  marks: new Map(),  // candidate index -> decision kind made on this view
  history: [],       // ids of decisions this tab made, for undo
  busy: false,
};

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let payload = null;
  try { payload = await response.json(); } catch (e) { payload = null; }
  if (!response.ok) {
    throw new Error((payload && payload.error) || `${method} ${path}: HTTP ${response.status}`);
  }
  return payload;
}

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = kind || "";
}

function setProgress(progress) {
  $("progress-text").textContent = `Reviewed ${progress.reviewed} of ${progress.total}`;
  $("progress-bar").max = progress.total;
  $("progress-bar").value = progress.reviewed;
}

function imageUrl(image) {
  return page.edges && image.edge_url ? image.edge_url : image.crop_url;
}

function describe(image) {
  const parts = [image.key];
  if (image.identity) parts.push(`label ${image.identity}`);
  if (image.flank) parts.push(image.flank);
  return parts.join(" · ");
}

function zoomable(img, image) {
  img.dataset.crop = image.crop_url;
  img.dataset.edge = image.edge_url || image.crop_url;
  img.src = imageUrl(image);
  img.title = "click to zoom";
  return img;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderCandidate(image, rank) {
  const card = el("li", "card");
  card.dataset.index = image.index;
  card.addEventListener("click", () => select(rank));
  const head = el("div", "card-head");
  head.append(el("span", "rank", String(rank + 1)));
  const calibrated = image.probability !== null && image.probability !== undefined;
  const score = el("span", "score", calibrated
    ? `P(same) ${image.probability.toFixed(2)}`
    : `cosine ${image.score.toFixed(3)}`);
  score.title = calibrated
    ? `calibrated probability that this is the anchor's individual (deep embedding and ${image.inliers} verified spot-pattern matches)`
    : "cosine similarity to the anchor (1 = identical embedding)";
  head.append(score);
  const bar = el("div", "bar");
  const fill = el("div", "fill");
  fill.style.width = `${Math.max(0, calibrated ? image.probability : image.score) * 100}%`;
  bar.append(fill);
  const img = zoomable(el("img"), image);
  img.alt = `candidate ${rank + 1}`;
  const caption = el("div", "caption", describe(image));
  if (calibrated) {
    const pair = el("img", "pair");
    pair.src = image.pair_url;
    pair.alt = `${image.inliers} verified correspondences between the anchor and candidate ${rank + 1}`;
    pair.title = pair.alt;
    caption.append(pair);
  }
  const buttons = el("div", "buttons");
  const match = el("button", "match", "Match");
  match.type = "button";
  match.append(" ", el("kbd", "", "M"));
  match.addEventListener("click", (e) => { e.stopPropagation(); select(rank); decide("match"); });
  const noMatch = el("button", "no-match", "No match");
  noMatch.type = "button";
  noMatch.append(" ", el("kbd", "", "N"));
  noMatch.addEventListener("click", (e) => { e.stopPropagation(); select(rank); decide("no_match"); });
  buttons.append(match, noMatch);
  const mark = el("div", "mark");
  card.append(head, bar, img, caption, buttons, mark);
  return card;
}

function render() {
  const view = page.view;
  $("anchor-title").textContent = `#${view.anchor.index}`;
  zoomable($("anchor-img"), view.anchor);
  $("anchor-caption").textContent = describe(view.anchor) + (view.reviewed ? " · reviewed" : "");
  const same = $("same-list");
  same.replaceChildren(...view.same_individual.map((image) => {
    const fig = el("figure", "thumb");
    fig.dataset.index = image.index;
    const img = zoomable(el("img"), image);
    img.alt = image.key;
    fig.append(img, el("figcaption", "", `${image.key} (${image.score.toFixed(2)})`));
    return fig;
  }));
  $("same-count").textContent = String(view.same_individual.length);
  $("candidates").replaceChildren(...view.candidates.map(renderCandidate));
  $("no-candidates").hidden = view.candidates.length > 0;
  setProgress(view.progress);
  page.marks.forEach((kind, index) => markCard(index, kind));
  select(Math.min(page.focus, Math.max(0, view.candidates.length - 1)));
}

function markCard(index, kind) {
  const card = document.querySelector(`.card[data-index="${index}"]`);
  if (!card) return;
  card.classList.remove("matched", "rejected");
  card.dataset.decision = kind || "";
  if (kind) card.classList.add(kind === "match" ? "matched" : "rejected");
  card.querySelector(".mark").textContent = kind === "match" ? "✓ match saved" : kind ? "✗ no match saved" : "";
}

function select(rank) {
  const cards = document.querySelectorAll(".card");
  if (!cards.length) return;
  page.focus = Math.max(0, Math.min(rank, cards.length - 1));
  cards.forEach((card, i) => card.classList.toggle("focused", i === page.focus));
}

async function load(index) {
  page.view = await api("GET", `/api/anchor/${index}`);
  page.marks = new Map();
  page.focus = 0;
  history.replaceState(null, "", `#anchor=${index}`);
  $("done").hidden = true;
  document.querySelector("main").hidden = false;
  render();
}

function showDone(progress) {
  if (progress) setProgress(progress);
  page.view = null;
  document.querySelector("main").hidden = true;
  $("done").hidden = false;
  history.replaceState(null, "", "#done");
}

async function guarded(action) {
  if (page.busy) return;
  page.busy = true;
  document.body.classList.add("busy");
  try {
    await action();
  } catch (error) {
    setStatus(`Not saved: ${error.message}`, "error");
  } finally {
    page.busy = false;
    document.body.classList.remove("busy");
  }
}

function decide(kind) {
  return guarded(async () => {
    if (!page.view || !page.view.candidates.length) return;
    const candidate = page.view.candidates[page.focus];
    setStatus("saving…", "pending");
    const result = await api("POST", "/api/decide",
      { anchor: page.view.anchor.index, candidate: candidate.index, decision: kind });
    page.history.push(result.decision.id);
    page.marks.set(candidate.index, kind);
    markCard(candidate.index, kind);
    setProgress(result.progress);
    setStatus(`Saved: ${kind === "match" ? "match" : "no match"} ${page.view.anchor.key} – ${candidate.key}`, "ok");
    const next = page.view.candidates.findIndex((c, i) => i > page.focus && !page.marks.has(c.index));
    if (next >= 0) select(next);
  });
}

function nextAnchor() {
  return guarded(async () => {
    if (!page.view) return;
    const result = await api("POST", "/api/next", { anchor: page.view.anchor.index });
    page.history.push(result.decision.id);
    setStatus(`Saved: anchor ${page.view.anchor.key} reviewed`, "ok");
    if (result.next === null) showDone(result.progress); else await load(result.next);
  });
}

function undo() {
  return guarded(async () => {
    const id = page.history.length ? page.history[page.history.length - 1] : undefined;
    const result = await api("POST", "/api/undo", id === undefined ? {} : { id });
    if (id !== undefined) page.history.pop();
    const d = result.undone;
    setStatus(`Undone: ${d.kind.replace("_", " ")} ${d.anchor}${d.candidate ? " – " + d.candidate : ""}`, "ok");
    const target = d.anchor_index;
    if (target === null || target === undefined) return;
    const keep = page.view && page.view.anchor.index === target ? new Map(page.marks) : new Map();
    await load(target);
    if (d.candidate_index !== null) keep.delete(d.candidate_index);
    page.marks = keep;
    render();
  });
}

function toggleEdges(on) {
  page.edges = on;
  $("edge-toggle").checked = on;
  document.querySelectorAll("img[data-crop]").forEach((img) => {
    img.src = on ? img.dataset.edge : img.dataset.crop;
  });
}

function openZoom(src) {
  $("zoom-img").src = src;
  $("zoom").hidden = false;
}

function closeZoom() {
  $("zoom").hidden = true;
}

function onKey(event) {
  if (event.target instanceof HTMLInputElement && event.target.type !== "checkbox") return;
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
    event.preventDefault();
    undo();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (key === "Escape") { closeZoom(); return; }
  if (/^[1-9]$/.test(key)) { select(Number(key) - 1); return; }
  const actions = {
    m: () => decide("match"), n: () => decide("no_match"), u: undo, ArrowRight: nextAnchor,
    e: () => toggleEdges(!page.edges),
    ArrowDown: () => select(page.focus + 1), ArrowUp: () => select(page.focus - 1),
    z: () => {
      if (!$("zoom").hidden) { closeZoom(); return; }
      const card = document.querySelectorAll(".card")[page.focus];
      openZoom((card ? card.querySelector("img") : $("anchor-img")).src);
    },
  };
  const action = actions[key.length === 1 ? key.toLowerCase() : key];
  if (action) { event.preventDefault(); action(); }
}

async function start() {
  $("next-btn").addEventListener("click", nextAnchor);
  $("undo-btn").addEventListener("click", undo);
  $("edge-toggle").addEventListener("change", (e) => toggleEdges(e.target.checked));
  $("zoom").addEventListener("click", closeZoom);
  document.addEventListener("click", (e) => {
    if (e.target instanceof HTMLImageElement && e.target.dataset.crop) openZoom(e.target.src);
  });
  document.addEventListener("keydown", onKey);
  try {
    const state = await api("GET", "/api/state");
    setProgress(state.progress);
    if (state.conflicts.length) {
      $("conflicts").hidden = false;
      $("conflicts").textContent = `${state.conflicts.length} "no match" decision(s) contradict confirmed links ` +
        "(see conflicts.csv after export).";
    }
    const asked = /^#anchor=(\d+)$/.exec(location.hash);
    const index = asked && Number(asked[1]) < state.progress.total ? Number(asked[1]) : state.current;
    if (index === null) showDone(state.progress); else await load(index);
    document.body.dataset.ready = "1";
  } catch (error) {
    setStatus(`Cannot load: ${error.message}`, "error");
  }
}

start();
