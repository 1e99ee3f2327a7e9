// The HILT playground: plain JavaScript against the server's own OpenAI-compatible API, no build step.
// It streams with fetch + a ReadableStream (server-sent events), and Stop aborts the fetch, which closes the
// connection: the server cancels the request in the engine at once.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "completion", model: null, controller: null, chat: [] };
const SETTINGS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stops", "system"];
const MAX_STOP = 4;  // the server's limit (OpenAI's)

// --- settings: sliders show their value, everything but the key is remembered ---

function showValue(id) {
  const out = $(id + "-value");
  if (out) out.textContent = $(id).value;
}

function restoreSettings() {
  const saved = JSON.parse(localStorage.getItem("hilt-settings") || "{}");
  for (const id of SETTINGS) {
    if (id in saved) $(id).value = saved[id];
    $(id).addEventListener("input", () => { showValue(id); saveSettings(); });
    showValue(id);
  }
  $("api_key").value = sessionStorage.getItem("hilt-key") || "";
  $("api_key").addEventListener("input", () => {
    sessionStorage.setItem("hilt-key", $("api_key").value);
    loadModel();
  });
}

function saveSettings() {
  const values = {};
  for (const id of SETTINGS) values[id] = $(id).value;
  localStorage.setItem("hilt-settings", JSON.stringify(values));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// One stop string per line, so that any text (a comma, spaces) can be one; \n, \t and \\ stand for a newline,
// a tab and a backslash. Throws with a message past the server's limit rather than dropping any.
function stopStrings() {
  const unescape = (line) => line.replace(/\\([nt\\])/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
  const stops = $("stops").value.split("\n").filter((line) => line !== "").map(unescape);
  if (stops.length > MAX_STOP) {
    throw new Error(`stop: at most ${MAX_STOP} stop strings, one per line; there are ${stops.length}`);
  }
  return stops;
}

function samplingBody() {
  const body = {
    model: state.model ? state.model.id : undefined,
    max_tokens: parseInt($("max_tokens").value, 10),
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  if ($("top_k").value !== "") body.top_k = parseInt($("top_k").value, 10);
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  const stops = stopStrings();
  if (stops.length) body.stop = stops;
  return body;
}

// --- the model: name and architecture in the header ---

function describe(info) {
  const a = info.architecture;
  const parts = [`d_model ${a.d_model}`, `${a.n_layers} layers`, `${a.n_heads} heads`];
  if (a.n_layers_ilt > 0) {
    parts.push(`ILT ${a.ilt_kind ? a.ilt_kind + " " : ""}${a.n_layers_ilt}\u00d7${a.ilt_dim}`);
  } else {
    parts.push("no ILT");
  }
  parts.push(`${(info.parameters / 1e6).toFixed(1)}M params`, `context ${info.max_model_len}`);
  parts.push(`${info.dtype} on ${info.device}`);
  return parts.join(" \u00b7 ");
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 503) {
      $("model-name").textContent = "loading the model\u2026";
      setTimeout(loadModel, 1000);
      return;
    }
    if (!response.ok) {
      $("model-name").textContent = "model unavailable";
      showError(await errorMessage(response));
      return;
    }
    const card = (await response.json()).data[0];
    state.model = card;
    $("model-name").textContent = card.id;
    $("arch").textContent = describe(card.hilt);
    $("max_tokens").max = card.max_model_len;
    showValue("max_tokens");
    hideError();
  } catch (e) {
    $("model-name").textContent = "server unreachable";
    setTimeout(loadModel, 2000);
  }
}

// --- errors: the server's own message, in a banner ---

async function errorMessage(response) {
  let text = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error && body.error.message) text = `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON: keep the status line */ }
  if (response.status === 401) text += " \u2014 enter the server's API key in the settings";
  if (response.status === 503 && response.headers.get("Retry-After")) {
    text += ` (retry in ${response.headers.get("Retry-After")} s)`;
  }
  return text;
}

function showError(text) { $("error").textContent = text; $("error").hidden = false; }
function hideError() { $("error").hidden = true; }

// --- streaming ---

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function resetStats() {
  for (const id of ["ttft", "tps", "prompt-tokens", "tokens"]) $(id).textContent = "\u2013";
}

// Reads server-sent events from a fetch response; calls onEvent with each parsed data payload.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function run(url, body, target) {
  hideError();
  resetStats();
  setBusy(true);
  state.controller = new AbortController();
  const sent = performance.now();
  let first = null;
  let last = null;
  let tokens = 0;
  let finish = null;
  const stats = () => {
    $("tokens").textContent = tokens;
    if (first !== null) $("ttft").textContent = `${Math.round(first - sent)} ms`;
    if (tokens > 1 && last > first) $("tps").textContent = ((tokens - 1) / ((last - first) / 1000)).toFixed(1);
  };
  $("status").textContent = "waiting\u2026";
  target.classList.add("streaming");
  try {
    const response = await fetch(url, {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) {
      showError(await errorMessage(response));
      $("status").textContent = "refused";
      return "refused";
    }
    $("status").textContent = "streaming\u2026";
    await readEvents(response, (chunk) => {
      if (chunk.error) { showError(chunk.error.message); return; }
      if (chunk.usage) {
        $("prompt-tokens").textContent = chunk.usage.prompt_tokens;
        tokens = chunk.usage.completion_tokens;
      }
      for (const choice of chunk.choices || []) {
        // logprobs are asked for so that every token arrives as its own event: exact live counts
        const lp = choice.logprobs;
        const n = lp ? (lp.tokens ? lp.tokens.length : lp.content.length) : 0;
        if (n) {
          const now = performance.now();
          if (first === null) first = now;
          last = now;
          tokens += n;
        }
        const text = choice.text !== undefined ? choice.text : (choice.delta && choice.delta.content) || "";
        if (text) target.append(text);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      stats();
      target.scrollTop = target.scrollHeight;
    });
    $("status").textContent = finish ? `done (${finish === "length" ? "max tokens" : "stop"})` : "done";
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
      return "stopped";
    }
    showError(`connection failed: ${e.message}`);
    $("status").textContent = "error";
    return "error";
  } finally {
    target.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
    stats();
  }
  return finish || "done";
}

// --- the two modes ---

function placeholder(element, text) {
  const span = document.createElement("span");
  span.className = "placeholder";
  span.textContent = text;
  element.replaceChildren(span);
}

async function sendCompletion() {
  const prompt = $("prompt").value;
  const body = { ...samplingBody(), prompt, logprobs: 0 };
  const output = $("output");
  const echo = document.createElement("span");
  echo.className = "prompt-echo";
  echo.textContent = prompt;
  const generated = document.createElement("span");
  generated.className = "generated";
  output.replaceChildren(echo, generated);
  const outcome = await run("/v1/completions", body, generated);
  if (outcome === "refused" || outcome === "error") {
    // nothing was generated: the pane shows why, not the prompt as if it were output (the prompt stays in its box)
    const refused = document.createElement("span");
    refused.className = "refused";
    refused.textContent = $("error").textContent;
    output.replaceChildren(refused);
  }
}

function addMessage(role, text) {
  const log = $("chat-log");
  if (log.querySelector(".placeholder")) log.replaceChildren();
  const msg = document.createElement("div");
  msg.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  msg.append(label, body);
  log.append(msg);
  log.scrollTop = log.scrollHeight;
  return body;
}

async function sendChat() {
  const text = $("prompt").value.trim();
  if (!text) return;
  const system = $("system").value.trim();
  // the system prompt is read at each send, so an edit applies to the whole conversation from then on
  const turn = { role: "user", content: text };
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.chat, turn];
  const body = { ...samplingBody(), messages, logprobs: true, top_logprobs: 0 };
  const asked = addMessage("user", text);
  $("prompt").value = "";
  const reply = addMessage("assistant", "");
  reply.parentElement.classList.add("streaming");
  const outcome = await run("/v1/chat/completions", body, reply);
  reply.parentElement.classList.remove("streaming");
  if (outcome === "refused" || outcome === "error") {
    // the turn did not happen: take it off the log and give the text back for another try
    asked.parentElement.remove();
    reply.parentElement.remove();
    $("prompt").value = text;
    return;
  }
  state.chat = [...state.chat, turn, { role: "assistant", content: reply.textContent }];  // a stopped reply counts
}

function send() {
  if (state.controller) return;
  try {
    stopStrings();
  } catch (e) {  // a setting the server would refuse: say so before sending anything
    showError(e.message);
    $("status").textContent = "not sent";
    return;
  }
  if (state.mode === "chat") sendChat(); else sendCompletion();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function setMode(mode) {
  state.mode = mode;
  for (const m of ["completion", "chat"]) {
    const tab = $("mode-" + m);
    tab.classList.toggle("active", m === mode);
    tab.setAttribute("aria-selected", String(m === mode));
  }
  $("output").hidden = mode === "chat";
  $("chat-log").hidden = mode !== "chat";
  $("system-box").hidden = mode !== "chat";
  $("prompt").placeholder = mode === "chat" ? "Say something, then Ctrl+Enter" : "Write a prompt, then Ctrl+Enter";
  if (mode === "chat" && !state.chat.length) placeholder($("chat-log"), "Chat with the model. It is a base model: the conversation is written as a transcript (see docs/serving.md).");
  $("prompt").focus();
}

function clear() {
  stop();
  state.chat = [];
  placeholder($("output"), "The model's text appears here.");
  placeholder($("chat-log"), "A new conversation.");
  resetStats();
  hideError();
  $("status").textContent = "idle";
}

document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); }
  if (e.key === "Escape") stop();
});
$("send").addEventListener("click", send);
$("stop").addEventListener("click", stop);
$("clear").addEventListener("click", clear);
$("mode-completion").addEventListener("click", () => setMode("completion"));
$("mode-chat").addEventListener("click", () => setMode("chat"));
restoreSettings();
loadModel();
