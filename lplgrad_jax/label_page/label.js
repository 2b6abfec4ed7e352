// The labeling page: shows the query, sends each answer to the server, which writes the CSV.
"use strict";

let state = null;     // the server's view: {classes, items, answered, total, ...}
let current = 0;      // index of the selected photo
const undoStack = []; // [{id, before}]: answers given on this page, newest last
const $ = (id) => document.getElementById(id);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function load() {
  const response = await fetch("/api/state", {cache: "no-store"});
  state = await response.json();
  if (state.mode === "predictions") {  // read-only: no classes to give, nothing to continue
    for (const id of ["buttons", "done", "help"]) $(id).hidden = true;
  }
  buildButtons();
  buildGrid();
  const firstOpen = state.items.findIndex((item) => !item.valid);
  select(firstOpen >= 0 ? firstOpen : 0, false);
  render();
}

// A class named by one digit has that digit as its key (digit classes "0"-"9" would be
// confusing otherwise); the other classes take the free digits in order, 1 to 9 then 0.
let keyOf = new Map();

function assignKeys() {
  keyOf = new Map();
  state.classes.forEach((name) => {
    if (/^[0-9]$/.test(name) && ![...keyOf.values()].includes(name)) keyOf.set(name, name);
  });
  const free = [..."1234567890"].filter((key) => ![...keyOf.values()].includes(key));
  state.classes.forEach((name) => {
    if (!keyOf.has(name) && free.length) keyOf.set(name, free.shift());
  });
}

function classKey(name) {
  return keyOf.get(name) || "";
}

function buildButtons() {
  const box = $("buttons");
  box.replaceChildren();
  if (state.mode === "predictions") return;
  assignKeys();
  const add = (key, text, action, name) => {
    const button = document.createElement("button");
    button.type = "button";
    if (name) button.dataset.label = name;
    if (key) {
      button.dataset.key = key;
      const kbd = document.createElement("kbd");
      kbd.textContent = key;
      button.append(kbd);
    }
    button.append(text);
    button.addEventListener("click", action);
    box.append(button);
  };
  state.classes.forEach((name) => add(classKey(name), name, () => answer(name), name));
  add("s", state.skip, () => answer(state.skip), state.skip);
  add("u", "undo", undo);
}

function buildGrid() {
  const grid = $("grid");
  grid.replaceChildren();
  state.items.forEach((item, k) => {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.id = item.id;
    const frame = document.createElement("div");
    frame.className = "frame";
    if (item.image) {
      const img = document.createElement("img");
      img.src = `/photo/${item.id}`;
      img.alt = item.file;
      img.addEventListener("load", () => {  // small photos: crisp pixels when enlarged
        if (img.naturalWidth < 120) img.classList.add("small");
      });
      frame.append(img);
    } else {
      const note = document.createElement("div");
      note.className = "missing";
      note.textContent = "photo not readable in the campaign's folder";
      frame.append(note);
    }
    const caption = document.createElement("figcaption");
    caption.className = "caption";
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = `id ${item.id}`;
    const badge = document.createElement("span");
    badge.className = "badge";
    caption.append(id, badge);
    const file = document.createElement("div");
    file.className = "file";
    file.textContent = item.file.split(/[\\/]/).pop();  // the file name; its path on hover
    file.title = item.file;
    card.append(frame, caption, file);
    card.addEventListener("click", () => select(k));
    grid.append(card);
  });
}

function renderPredictions() {
  $("title").textContent = `${state.total} predictions, least confident first`;
  $("csv").textContent = state.csv;
  document.querySelectorAll(".card").forEach((card, k) => {
    const item = state.items[k];
    const badge = card.querySelector(".badge");
    badge.textContent = `${item.label} ${(100 * item.confidence).toFixed(0)}%`;
    badge.className = "badge answered";
    card.dataset.label = item.label;
    card.classList.toggle("selected", k === current);
  });
}

function render() {
  if (state.mode === "predictions") {
    renderPredictions();
    return;
  }
  $("title").textContent = `Round ${state.round}: label ${state.total} photos`;
  $("progress").textContent = `${state.answered} / ${state.total} labeled`;
  $("bar").max = state.total;
  $("bar").value = state.answered;
  $("csv").textContent = state.csv;
  $("stale").hidden = state.pending;
  document.querySelectorAll(".card").forEach((card, k) => {
    const item = state.items[k];
    const badge = card.querySelector(".badge");
    badge.textContent = item.label || "unlabeled";
    badge.className = "badge" + (!item.label ? "" : !item.valid ? " invalid"
        : item.label === state.skip ? " skip" : " answered");
    if (item.label && !item.valid) badge.title = "not a class name: choose one";
    card.dataset.label = item.valid ? item.label : "";
    card.classList.toggle("selected", k === current);
  });
  const selected = state.items[current];
  document.querySelectorAll(".buttons button[data-label]").forEach((button) =>
    button.classList.toggle("current", !!selected && selected.valid &&
                            button.dataset.label === selected.label));
  const complete = state.answered === state.total;
  $("done").classList.toggle("complete", complete);
  $("done-title").textContent = complete
      ? `Done: all ${state.total} photos answered.`
      : `${state.total - state.answered} photos still to label.`;
  $("command").textContent = state.command;
}

function select(k, scroll = true) {
  if (!state || !state.items.length) return;
  current = Math.max(0, Math.min(state.items.length - 1, k));
  render();
  if (scroll) {
    document.querySelectorAll(".card")[current].scrollIntoView({block: "nearest"});
  }
}

async function send(id, label) {
  const response = await fetch("/api/label", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({id, label})});
  const body = await response.json();
  if (!response.ok) {
    showError(body.error || `the server answered ${response.status}`);
    return false;
  }
  showError("");
  state = body;
  return true;
}

async function answer(label) {
  const item = state.items[current];
  const before = item.valid ? item.label : "";
  if (!(await send(item.id, label))) return;
  undoStack.push({id: item.id, before});
  // Next: the first unanswered photo after this one, else simply the next one.
  const open = state.items.findIndex((it, k) => k > current && !it.valid);
  select(open >= 0 ? open : current + 1);
}

async function undo() {
  const last = undoStack.pop();
  if (!last) return;
  if (!(await send(last.id, last.before))) {
    undoStack.push(last);
    return;
  }
  select(state.items.findIndex((it) => it.id === last.id));
}

document.addEventListener("keydown", (event) => {
  if (!state || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  const labeling = state.mode === "label";
  const named = labeling ? state.classes.find((name) => keyOf.get(name) === key) : undefined;
  if (!labeling && !key.startsWith("Arrow")) {
    return;
  } else if (named !== undefined) {
    answer(named);
  } else if (key === "s" || key === "S") {
    answer(state.skip);
  } else if (key === "u" || key === "U" || key === "Backspace") {
    undo();
  } else if (key === "ArrowRight" || key === "ArrowDown") {
    select(current + 1);
  } else if (key === "ArrowLeft" || key === "ArrowUp") {
    select(current - 1);
  } else {
    return;
  }
  event.preventDefault();
});

document.addEventListener("DOMContentLoaded", () => {
  $("copy").addEventListener("click", () => navigator.clipboard.writeText(state.command));
  load().catch((e) => showError(`cannot load the query: ${e}`));
});
