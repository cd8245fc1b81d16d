// The chat page: attach an image, ask, read the answer as it streams from this server's
// /v1/chat/completions, and see the grounding boxes of the answer drawn over the image.
// Plain browser JavaScript, no libraries: the server sends this file as it is.
"use strict";

// One colour per label, in the order labels appear (the same list as grounding.PALETTE).
const PALETTE = ["rgb(230,25,75)", "rgb(60,180,75)", "rgb(0,130,200)", "rgb(245,130,48)",
                 "rgb(145,30,180)", "rgb(70,240,240)", "rgb(240,50,230)", "rgb(128,128,0)"];
const MARKER = /(<\|(?:object_ref|box|quad)_(?:start|end)\|>)/;
const KEY_STORE = "qwen2vl-api-key";

const $ = (id) => document.getElementById(id);
const chat = {
  messages: [],       // the conversation as the API takes it
  pending: null,      // a data: URL attached and not yet sent
  model: null,        // the served model's id (from /v1/models)
  controller: null,   // aborts the reply being streamed
};

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) {
  $("status").textContent = text;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (response.status === 401) {
      $("model").textContent = "this server needs an API key";
      chat.model = null;
      return;
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    chat.model = (await response.json()).data[0].id;
    $("model").textContent = chat.model;
  } catch (e) {
    $("model").textContent = "cannot reach the server";
  }
}

// ------------------------------------------------------------------ the image
function showImage(url) {
  const picture = $("picture");
  clearBoxes();
  picture.src = url;
  $("stage").hidden = false;
  $("clear-image").hidden = false;
}

function attach(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    addError(`${file.name} is not an image`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    chat.pending = reader.result;
    showImage(reader.result);
    setStatus(`attached ${file.name}`);
  };
  reader.onerror = () => addError(`cannot read ${file.name}`);
  reader.readAsDataURL(file);
}

function clearBoxes() {
  $("overlay").replaceChildren();
}

function colourOf(colours, label) {
  const key = label ?? "";
  if (!colours.has(key)) colours.set(key, PALETTE[colours.size % PALETTE.length]);
  return colours.get(key);
}

// boxes: the reply's `boxes` field, [x1, y1, x2, y2] in pixels of the image as sent; placed in
// percent of its natural size, so they follow the image however large it is shown.
function drawBoxes(boxes, colours) {
  clearBoxes();
  const picture = $("picture");
  const width = picture.naturalWidth, height = picture.naturalHeight;
  if (!width || !height) return 0;
  let drawn = 0;
  for (const entry of boxes) {
    if (!entry.box) continue;
    const [x1, y1, x2, y2] = entry.box;
    const box = document.createElement("div");
    box.className = "box";
    box.style.setProperty("--colour", colourOf(colours, entry.label));
    box.style.left = `${(100 * x1) / width}%`;
    box.style.top = `${(100 * y1) / height}%`;
    box.style.width = `${(100 * (x2 - x1)) / width}%`;
    box.style.height = `${(100 * (y2 - y1)) / height}%`;
    if (y1 / height < 0.08) box.classList.add("low");  // no room above: the label goes inside
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.label ?? "box";
    box.append(label);
    $("overlay").append(box);
    drawn += 1;
  }
  return drawn;
}

// ------------------------------------------------------------------ the conversation
function addItem(kind) {
  const li = document.createElement("li");
  li.className = kind;
  $("log").append(li);
  li.scrollIntoView({block: "end"});
  return li;
}

function addError(text) {
  addItem("error").textContent = text;
  setStatus("error");
}

// The answer with its markup shown for a reader: labels marked in their box's colour, the
// model's coordinates small and grey. A marker still to come leaves the text as it is so far.
// -> the labels' colours (made afresh each time: a label still streaming is not one yet).
function renderReply(li, text) {
  const colours = new Map();
  li.replaceChildren();
  let mode = "text";
  for (const piece of text.split(MARKER)) {
    if (MARKER.test(piece)) {
      mode = piece.includes("_start") ? (piece.includes("object_ref") ? "ref" : "coords") : "text";
      continue;
    }
    if (!piece) continue;
    if (mode === "ref") {
      const span = document.createElement("span");
      span.className = "ref";
      span.style.setProperty("--colour", colourOf(colours, piece.trim()));
      span.textContent = piece;
      li.append(span);
    } else if (mode === "coords") {
      const span = document.createElement("span");
      span.className = "coords";
      span.textContent = piece;
      li.append(span);
    } else {
      li.append(document.createTextNode(piece));
    }
  }
  return colours;
}

async function ask(question) {
  const content = [];
  const user = addItem("user");
  if (chat.pending) {
    content.push({type: "image_url", image_url: {url: chat.pending}});
    const thumb = document.createElement("img");
    thumb.src = chat.pending;
    thumb.alt = "attached image";
    user.append(thumb);
    chat.pending = null;
  }
  content.push({type: "text", text: question});
  user.append(document.createTextNode(question));
  chat.messages.push({role: "user", content});

  const li = addItem("assistant");
  let colours = new Map(), text = "", boxes = [], finish = null;
  chat.controller = new AbortController();
  $("ask").disabled = true;
  $("stop").disabled = false;
  setStatus("waiting");
  try {
    const body = {messages: chat.messages, stream: true};
    if (chat.model) body.model = chat.model;
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: chat.controller.signal});
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices) {
            if (choice.delta.content) {
              text += choice.delta.content;
              colours = renderReply(li, text);
              setStatus("streaming");
            }
            if (choice.delta.boxes) boxes = choice.delta.boxes;
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    chat.messages.push({role: "assistant", content: text});
    const drawn = drawBoxes(boxes, colours);
    li.dataset.boxes = String(drawn);
    setStatus(`done (${finish ?? "ended"}, ${drawn} ${drawn === 1 ? "box" : "boxes"})`);
  } catch (e) {
    chat.messages.pop();  // the question was not answered: it is not part of the conversation
    if (e.name === "AbortError") {
      setStatus("stopped");
    } else {
      addError(String(e.message || e));
    }
  } finally {
    chat.controller = null;
    $("ask").disabled = false;
    $("stop").disabled = true;
  }
}

// ------------------------------------------------------------------ wiring
function start() {
  $("key").value = sessionStorage.getItem(KEY_STORE) ?? "";
  $("key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("key").value.trim());
    loadModel();
  });
  $("file").addEventListener("change", () => attach($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    attach(e.dataTransfer.files[0]);
  });
  $("clear-image").addEventListener("click", () => {
    chat.pending = null;
    clearBoxes();
    $("stage").hidden = true;
    $("clear-image").hidden = true;
    $("file").value = "";
  });
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const question = $("question").value.trim();
    if (!question || chat.controller) return;
    $("question").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.messages = [];
    $("log").replaceChildren();
    clearBoxes();
    setStatus("idle");
  });
  loadModel();
}

start();
