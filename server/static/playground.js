// Amulet Serve playground: runs the chosen columns (base, pref, la, amulet) as parallel streamed requests
// to the server's own /v1/chat/completions, the same public API any client uses. No build step, no
// dependencies; the strict Content-Security-Policy of the page allows only this file and the stylesheet.
"use strict";

const API_KEY_STORAGE = "amulet-playground-api-key";
const METHODS = ["base", "pref", "la", "amulet"];
const TITLES = { base: "base (no preference)", pref: "pref (preference prompt)", la: "la (Linear Alignment)", amulet: "amulet" };

const $ = (id) => document.getElementById(id);

const state = {
  model: null, // from GET /v1/models; requests leave `model` out until it is known
  turns: [], // finished turns: {user, replies: {method: text}}
  columns: new Map(), // method -> column elements and the last request body
  controller: null, // AbortController of the running streams
  profiles: new Map(), // id -> stored preference profile (GET /v1/preference_profiles)
};

// ---- settings -> request -------------------------------------------------------------------------------

function numberOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function preferenceRows() {
  return [...document.querySelectorAll(".preference-row")]
    .map((row) => ({ text: row.querySelector(".pref-text").value.trim(), weight: Number(row.querySelector(".pref-weight").value || 1) }))
    .filter((row) => row.text !== "");
}

function preferenceFor(method) {
  const rows = preferenceRows();
  const preference = { text: rows.length === 1 ? rows[0].text : rows.map((row) => row.text), method };
  if (rows.length > 1 && rows.some((row) => row.weight !== 1)) preference.weights = rows.map((row) => row.weight);
  const negative = $("negative").value.trim();
  if (negative !== "" && (method === "amulet" || method === "la")) preference.negative = negative;
  const strength = numberOrNull("strength");
  if (strength !== null && (method === "amulet" || method === "la")) preference.coefficient = strength;
  const plausibility = numberOrNull("plausibility");
  if (plausibility !== null && method !== "base") preference.plausibility = plausibility;
  const placement = $("placement").value;
  if (placement !== "") preference.placement = placement; // left out: the server's --preference-placement
  return preference;
}

/** The conversation as this column has seen it: its own earlier replies, then the new message. */
function messagesFor(method, user) {
  const messages = [];
  const system = $("system").value.trim();
  if (system !== "") messages.push({ role: "system", content: system });
  for (const turn of state.turns) {
    messages.push({ role: "user", content: turn.user });
    const reply = turn.replies[method] ?? Object.values(turn.replies)[0];
    messages.push({ role: "assistant", content: reply });
  }
  messages.push({ role: "user", content: user });
  return messages;
}

function requestBody(method, user) {
  const body = {};
  if (state.model !== null) body.model = state.model;
  body.messages = messagesFor(method, user);
  if (method !== "base") body.preference = preferenceFor(method);
  body.temperature = numberOrNull("temperature") ?? 0;
  body.max_tokens = numberOrNull("max-tokens") ?? 128;
  const seed = numberOrNull("seed");
  if (seed !== null) body.seed = seed;
  body.stream = true;
  body.stream_options = { include_usage: true };
  return body;
}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key !== "") headers.Authorization = `Bearer ${key}`;
  return headers;
}

// ---- copy as curl / Python ---------------------------------------------------------------------------

function apiUrl() {
  return `${window.location.origin}/v1/chat/completions`;
}

function shellQuote(text) {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

function asCurl(body) {
  const lines = [`curl -sN ${apiUrl()}`, `  -H "Content-Type: application/json"`];
  if ($("api-key").value.trim() !== "") lines.push(`  -H "Authorization: Bearer $AMULET_API_KEY"`);
  lines.push(`  -d ${shellQuote(JSON.stringify(body, null, 2))}`);
  return lines.join(" \\\n") + "\n";
}

/** ``value`` as a Python literal (JSON's strings are valid Python strings). */
function pythonLiteral(value, indent = "") {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value !== "object") return JSON.stringify(value);
  const inner = indent + "    ";
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return `[\n${value.map((item) => inner + pythonLiteral(item, inner)).join(",\n")},\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (entries.length === 0) return "{}";
  return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pythonLiteral(v, inner)}`).join(",\n")},\n${indent}}`;
}

function asPython(body) {
  const { preference, stream, stream_options: streamOptions, ...standard } = body;
  const args = Object.entries(standard).map(([k, v]) => `    ${k}=${pythonLiteral(v, "    ")},`);
  args.push(`    stream=${pythonLiteral(stream)},`, `    stream_options=${pythonLiteral(streamOptions, "    ")},`);
  if (preference !== undefined) args.push(`    extra_body=${pythonLiteral({ preference }, "    ")},`);
  if (!("model" in standard)) args.unshift(`    model=client.models.list().data[0].id,`);
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(`${window.location.origin}/v1`)}, api_key=os.environ.get("AMULET_API_KEY", "unused"))`,
    "stream = client.chat.completions.create(",
    ...args,
    ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "print()",
    "",
  ].join("\n");
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1500);
  } catch {
    $("copy-text").value = text; // no clipboard (not a secure context, or refused): show it to copy by hand
    $("copy-dialog").showModal();
    $("copy-text").select();
  }
}

// ---- columns ------------------------------------------------------------------------------------------

function selectedMethods() {
  return [...document.querySelectorAll('input[name="column"]:checked')].map((box) => box.value);
}

function column(method) {
  let col = state.columns.get(method);
  if (col === undefined) {
    const node = $("column-template").content.firstElementChild.cloneNode(true);
    node.dataset.method = method;
    node.querySelector(".column-title").textContent = TITLES[method];
    col = {
      node,
      thread: node.querySelector(".thread"),
      answer: node.querySelector(".answer"),
      error: node.querySelector(".error"),
      stats: node.querySelector(".stats"),
      body: null,
    };
    const copyCurl = node.querySelector(".copy-curl");
    const copyPython = node.querySelector(".copy-python");
    copyCurl.addEventListener("click", () => copy(asCurl(col.body ?? requestBody(method, $("user").value)), copyCurl));
    copyPython.addEventListener("click", () => copy(asPython(col.body ?? requestBody(method, $("user").value)), copyPython));
    state.columns.set(method, col);
  }
  return col;
}

function showColumns(methods) {
  const results = $("results");
  results.replaceChildren(...methods.map((method) => column(method).node));
  for (const method of methods) renderThread(method);
}

function renderThread(method) {
  const col = column(method);
  col.thread.replaceChildren();
  for (const turn of state.turns) {
    const user = document.createElement("p");
    user.className = "turn-user";
    user.textContent = turn.user;
    const reply = document.createElement("p");
    reply.className = "turn-reply";
    reply.textContent = turn.replies[method] ?? "";
    col.thread.append(user, reply);
  }
}

function showError(col, message) {
  col.error.textContent = message;
  col.error.hidden = false;
  col.node.dataset.state = "error";
}

/** The API's own message of a failed answer (OpenAI's error object), with the HTTP status. */
async function errorMessage(response) {
  try {
    const payload = await response.json();
    if (payload && payload.error && payload.error.message) return `${response.status}: ${payload.error.message}`;
  } catch {
    // not JSON: fall through to the status line
  }
  return `${response.status}: ${response.statusText || "request failed"}`;
}

/** Streams one column's answer; resolves to its text when it completed, null otherwise. */
async function runColumn(method, body, signal) {
  const col = column(method);
  col.body = body;
  col.answer.textContent = "";
  col.error.hidden = true;
  col.stats.textContent = "waiting…";
  col.node.dataset.state = "running";
  const started = performance.now();
  let firstAt = null;
  let usage = null;
  let coefficient = null;
  try {
    const response = await fetch(apiUrl(), { method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal });
    if (!response.ok) {
      showError(col, await errorMessage(response));
      col.stats.textContent = "";
      return null;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) {
            showError(col, chunk.error.message);
            return null;
          }
          if (chunk.preference && chunk.preference.coefficient != null) coefficient = chunk.preference.coefficient;
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (firstAt === null) firstAt = performance.now();
            col.answer.textContent += delta.content;
            col.stats.textContent = "streaming…";
          }
        }
      }
    }
  } catch (error) {
    if (signal.aborted) {
      col.stats.textContent = "stopped";
      col.node.dataset.state = "stopped";
    } else {
      showError(col, `The request failed: ${error.message}`);
    }
    return null;
  }
  const ended = performance.now();
  const tokens = usage ? usage.completion_tokens : null;
  const parts = [];
  if (tokens !== null) parts.push(`${tokens} tokens`);
  if (firstAt !== null) parts.push(`first token ${Math.round(firstAt - started)} ms`);
  if (tokens !== null && tokens > 1 && firstAt !== null && ended > firstAt) {
    parts.push(`${((tokens - 1) / ((ended - firstAt) / 1000)).toFixed(1)} tokens/s`);
  }
  if (coefficient !== null) parts.push(`A = ${Number(coefficient).toFixed(4)}`);
  col.stats.textContent = parts.join(" · ");
  col.node.dataset.state = "done";
  return col.answer.textContent;
}

// ---- run / stop / conversation ------------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

async function run(event) {
  event.preventDefault();
  if (state.controller !== null) return;
  const user = $("user").value.trim();
  const methods = selectedMethods();
  if (user === "") return setStatus("Type a message first.");
  if (methods.length === 0) return setStatus("Choose at least one column.");
  if (methods.some((m) => m !== "base") && preferenceRows().length === 0) {
    return setStatus("Give a preference for the pref, la and amulet columns.");
  }
  showColumns(methods);
  const controller = new AbortController();
  state.controller = controller;
  $("run").disabled = true;
  $("stop").disabled = false;
  setStatus("Running…");
  const answers = await Promise.all(methods.map((method) => runColumn(method, requestBody(method, user), controller.signal)));
  state.controller = null;
  $("run").disabled = false;
  $("stop").disabled = true;
  if (answers.every((answer) => answer !== null)) {
    state.turns.push({ user, replies: Object.fromEntries(methods.map((method, i) => [method, answers[i]])) });
    $("user").value = "";
    setStatus("Done. Write the next message to go on, or start a new conversation.");
  } else {
    setStatus(controller.signal.aborted ? "Stopped." : "Some columns failed; fix the settings and run again.");
  }
}

function stop() {
  if (state.controller !== null) state.controller.abort();
}

function newConversation() {
  stop();
  state.turns = [];
  for (const col of state.columns.values()) {
    col.answer.textContent = "";
    col.stats.textContent = "";
    col.error.hidden = true;
    col.body = null;
    col.thread.replaceChildren();
  }
  setStatus("New conversation.");
}

function addPreferenceRow(text = "", weight = 1) {
  const row = $("preference-template").content.firstElementChild.cloneNode(true);
  row.querySelector(".pref-text").value = text;
  row.querySelector(".pref-weight").value = String(weight);
  row.querySelector(".remove-preference").addEventListener("click", () => {
    if (document.querySelectorAll(".preference-row").length > 1) row.remove();
    else row.querySelector(".pref-text").value = "";
  });
  $("preferences").append(row);
  return row;
}

// ---- stored preference profiles (/v1/preference_profiles) -------------------------------------------------

/** The form's fields from a profile's preference (a string, a list, or the object form). */
function fillFromPreference(preference) {
  const spec = typeof preference === "string" || Array.isArray(preference) ? { text: preference } : preference;
  const items = Array.isArray(spec.text) ? spec.text : [spec.text];
  $("preferences").replaceChildren();
  items.forEach((item, i) => {
    const text = typeof item === "string" ? item : item.text;
    const own = typeof item === "string" ? null : item.weight;
    addPreferenceRow(text, own ?? spec.weights?.[i] ?? 1);
  });
  $("negative").value = spec.negative ?? "";
  $("strength").value = spec.coefficient ?? "";
  $("plausibility").value = spec.plausibility ?? "";
  $("placement").value = spec.placement ?? "";
}

async function loadProfiles(selected = "") {
  try {
    const response = await fetch("/v1/preference_profiles", { headers: apiHeaders() });
    if (!response.ok) {
      setStatus(`Profiles: ${await errorMessage(response)}`);
      return;
    }
    state.profiles = new Map((await response.json()).data.map((profile) => [profile.id, profile]));
    const options = [...state.profiles.values()].map((profile) => new Option(profile.name, profile.id));
    $("profile").replaceChildren(new Option("none", ""), ...options);
    $("profile").value = state.profiles.has(selected) ? selected : "";
  } catch (error) {
    setStatus(`The server did not answer: ${error.message}`);
  }
}

function pickProfile() {
  const profile = state.profiles.get($("profile").value);
  if (profile === undefined) return;
  fillFromPreference(profile.preference);
  $("profile-name").value = profile.name;
  setStatus(`Profile ${profile.name} loaded.`);
}

async function saveProfile() {
  const name = $("profile-name").value.trim();
  if (preferenceRows().length === 0) return setStatus("Give a preference to save.");
  if (name === "") return setStatus("Give the profile a name.");
  const preference = preferenceFor("amulet");
  delete preference.method; // the columns pick the method
  const response = await fetch("/v1/preference_profiles", {
    method: "POST", headers: apiHeaders(), body: JSON.stringify({ name, preference }),
  });
  if (!response.ok) return setStatus(`Saving the profile: ${await errorMessage(response)}`);
  const profile = await response.json();
  await loadProfiles(profile.id);
  setStatus(`Profile ${profile.name} saved.`);
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: apiHeaders() });
    if (!response.ok) {
      setStatus(`Models: ${await errorMessage(response)}`);
      return;
    }
    const models = await response.json();
    state.model = models.data[0].id;
    setStatus(`Model: ${state.model}`);
  } catch (error) {
    setStatus(`The server did not answer: ${error.message}`);
  }
}

function init() {
  $("api-key").value = sessionStorage.getItem(API_KEY_STORAGE) ?? "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(API_KEY_STORAGE, $("api-key").value.trim());
    loadModel();
    loadProfiles();
  });
  $("profile").addEventListener("change", pickProfile);
  $("refresh-profiles").addEventListener("click", () => loadProfiles($("profile").value));
  $("save-profile").addEventListener("click", saveProfile);
  addPreferenceRow("concise");
  $("add-preference").addEventListener("click", () => addPreferenceRow().querySelector(".pref-text").focus());
  $("settings").addEventListener("submit", run);
  $("stop").addEventListener("click", stop);
  $("new-conversation").addEventListener("click", newConversation);
  $("user").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("settings").requestSubmit();
  });
  for (const box of document.querySelectorAll('input[name="column"]')) {
    box.addEventListener("change", () => { if (state.controller === null) showColumns(selectedMethods()); });
  }
  showColumns(selectedMethods().filter((m) => METHODS.includes(m)));
  loadModel();
  loadProfiles();
}

document.addEventListener("DOMContentLoaded", init);
