// Tessera playground: images and a question go to POST /v1/chat/completions with
// `stream: true`; the answer is shown as its deltas arrive, then the grounding boxes
// of the closing chunk (`choices[0].delta.groundings`, pixels of the last image) are
// drawn over that image.
//
// `window.tesseraPlayground.showResponse(completion)` renders a whole (non-stream)
// chat completion, groundings included, the same way.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    model: $("model"),
    drop: $("drop"),
    files: $("images"),
    thumbs: $("thumbs"),
    question: $("question"),
    grounding: $("grounding"),
    ref: $("ref"),
    maxTokens: $("max-tokens"),
    temperature: $("temperature"),
    prompt: $("prompt-preview"),
    send: $("send"),
    stop: $("stop"),
    stage: $("stage"),
    preview: $("preview"),
    boxes: $("boxes"),
    noImage: $("no-image"),
    legend: $("legend"),
    answer: $("answer"),
    status: $("status"),
    state: $("state"),
    finish: $("finish"),
    usage: $("usage"),
    error: $("error"),
  };

  const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#9a6324"];
  const MARKUP = /(<\|(?:\/?ref|\/?det|grounding)\|>)/;

  const state = {
    model: null,
    images: [], // {name, url, width, height}
    shown: -1, // index of the image in the preview
    groundings: [],
    text: "",
    controller: null,
  };

  // ---- Images ----------------------------------------------------------------

  function readImage(file) {
    return new Promise((resolve, reject) => {
      if (!file.type.startsWith("image/")) {
        reject(new Error(`${file.name} is not an image (${file.type || "unknown type"}); ` +
          "pick a PNG, JPEG, WebP, GIF or BMP file"));
        return;
      }
      const reader = new FileReader();
      reader.onerror = () => reject(new Error(`cannot read ${file.name}: ${reader.error}`));
      reader.onload = () => {
        const img = new Image();
        img.onload = () => resolve({
          name: file.name, url: reader.result, width: img.naturalWidth, height: img.naturalHeight,
        });
        img.onerror = () => reject(new Error(`${file.name} cannot be decoded as an image`));
        img.src = reader.result;
      };
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    clearError();
    const results = await Promise.allSettled(Array.from(files).map(readImage));
    const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
    for (const r of results) {
      if (r.status === "fulfilled") state.images.push(r.value);
    }
    imagesChanged();
    if (failed.length) showError(failed.join("\n"));
  }

  function imagesChanged() {
    setGroundings([]);
    renderThumbs();
    showImage(state.images.length - 1);
    updatePrompt();
  }

  function renderThumbs() {
    el.thumbs.replaceChildren(...state.images.map((image, i) => {
      const li = document.createElement("li");
      li.className = "thumb";
      li.dataset.index = String(i);
      if (i === state.images.length - 1) li.classList.add("target");
      if (i === state.shown) li.classList.add("shown");
      const img = document.createElement("img");
      img.src = image.url;
      img.alt = image.name;
      img.title = "Show this image";
      img.addEventListener("click", () => showImage(i));
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = image.name;
      const size = document.createElement("span");
      size.className = "size";
      size.textContent = `${image.width}×${image.height}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${image.name}`);
      remove.addEventListener("click", () => {
        state.images.splice(i, 1);
        imagesChanged();
      });
      li.append(img, name, size, remove);
      return li;
    }));
  }

  function showImage(index) {
    state.shown = index;
    const image = state.images[index];
    el.stage.hidden = !image;
    el.noImage.hidden = Boolean(image);
    if (image) {
      if (el.preview.src !== image.url) el.preview.src = image.url;
    } else {
      el.preview.removeAttribute("src");
    }
    for (const li of el.thumbs.children) {
      li.classList.toggle("shown", Number(li.dataset.index) === index);
    }
    drawBoxes();
  }

  // ---- Groundings ------------------------------------------------------------

  function setGroundings(groundings) {
    state.groundings = Array.isArray(groundings) ? groundings : [];
    const target = state.groundings.find((g) => Number.isInteger(g.image_index));
    if (target && target.image_index < state.images.length) showImage(target.image_index);
    else drawBoxes();
  }

  // Boxes are placed in percent of the image's natural size, so they follow the
  // displayed size of the image whatever it is.
  function drawBoxes() {
    el.boxes.replaceChildren();
    el.legend.replaceChildren(...state.groundings.map((g, gi) => {
      const li = document.createElement("li");
      li.style.setProperty("--c", PALETTE[gi % PALETTE.length]);
      const n = (g.boxes || []).length;
      li.textContent = `${g.label || "(no label)"} · ${n} box${n === 1 ? "" : "es"}`;
      li.dataset.label = g.label || "";
      return li;
    }));
    const width = el.preview.naturalWidth;
    const height = el.preview.naturalHeight;
    if (state.shown < 0 || !el.preview.complete || !width || !height) return;
    state.groundings.forEach((g, gi) => {
      const index = Number.isInteger(g.image_index) ? g.image_index : state.images.length - 1;
      if (index !== state.shown) return;
      for (const b of g.boxes || []) {
        const box = document.createElement("div");
        box.className = "box";
        box.dataset.label = g.label || "";
        box.dataset.grounding = String(gi);
        box.style.setProperty("--c", PALETTE[gi % PALETTE.length]);
        box.style.left = `${(100 * b.x1) / width}%`;
        box.style.top = `${(100 * b.y1) / height}%`;
        box.style.width = `${(100 * (b.x2 - b.x1)) / width}%`;
        box.style.height = `${(100 * (b.y2 - b.y1)) / height}%`;
        if (b.y1 < 0.06 * height) box.classList.add("label-inside");
        const label = document.createElement("span");
        label.className = "label";
        label.textContent = g.label || "(no label)";
        box.append(label);
        el.boxes.append(box);
      }
    });
  }

  // ---- Answer and status -----------------------------------------------------

  // The raw answer, its grounding markup set in its own spans; the text content is
  // exactly the answer.
  function renderAnswer() {
    const nodes = [];
    let inside = null;
    for (const piece of state.text.split(MARKUP)) {
      if (!piece) continue;
      const span = document.createElement("span");
      span.textContent = piece;
      if (MARKUP.test(piece)) {
        span.className = "tag";
        inside = piece === "<|ref|>" ? "ref" : piece === "<|det|>" ? "det" : null;
      } else if (inside) {
        span.className = inside;
      } else {
        nodes.push(document.createTextNode(piece));
        continue;
      }
      nodes.push(span);
    }
    el.answer.replaceChildren(...nodes);
  }

  function setState(name, text) {
    el.status.dataset.state = name;
    el.state.textContent = text;
  }

  function showFinish(reason) {
    el.finish.dataset.reason = reason;
    el.finish.textContent = `finish: ${reason}`;
  }

  function showUsage(usage) {
    el.usage.dataset.completionTokens = String(usage.completion_tokens);
    el.usage.dataset.promptTokens = String(usage.prompt_tokens);
    el.usage.textContent =
      `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`;
  }

  function resetAnswer() {
    state.text = "";
    renderAnswer();
    setGroundings([]);
    delete el.finish.dataset.reason;
    el.finish.textContent = "";
    delete el.usage.dataset.completionTokens;
    delete el.usage.dataset.promptTokens;
    el.usage.textContent = "";
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  // ---- Request ---------------------------------------------------------------

  function promptText() {
    let text = el.question.value.trim();
    const phrase = el.ref.value.trim();
    if (phrase) text = `${text ? `${text} ` : ""}<|ref|>${phrase}<|/ref|>.`;
    if (el.grounding.checked) text = `<|grounding|>${text}`;
    return text;
  }

  function updatePrompt() {
    el.prompt.textContent = "<image>\n".repeat(state.images.length) + promptText();
  }

  function buildRequest() {
    const maxTokens = Number(el.maxTokens.value);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      throw new Error("Max tokens must be a whole number of at least 1.");
    }
    const text = promptText();
    if (!text && state.images.length === 0) {
      throw new Error("Type a question or pick an image first.");
    }
    const content = [];
    for (const image of state.images) {
      content.push({ type: "image_url", image_url: { url: image.url } });
      content.push({ type: "text", text: "\n" });
    }
    if (text) content.push({ type: "text", text });
    const body = {
      model: state.model,
      messages: [{ role: "user", content }],
      max_tokens: maxTokens,
      stream: true,
      stream_options: { include_usage: true },
    };
    if (el.temperature.value.trim() !== "") {
      const temperature = Number(el.temperature.value);
      if (!Number.isFinite(temperature) || temperature < 0) {
        throw new Error("Temperature must be a number of at least 0 (0 is greedy).");
      }
      body.temperature = temperature;
    }
    return body;
  }

  async function errorOf(response) {
    const text = await response.text();
    try {
      const message = JSON.parse(text).error.message;
      if (message) return `${message} (HTTP ${response.status})`;
    } catch (_) { /* not an OpenAI error body */ }
    return `HTTP ${response.status} ${response.statusText}: ${text.slice(0, 500)}`;
  }

  // Calls `onData` with each server-sent event's JSON; true when `[DONE]` came.
  async function readEvents(body, onData) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += value;
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) {
        const data = event.split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return true;
        onData(JSON.parse(data));
      }
    }
  }

  function onChunk(chunk) {
    if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
    if (chunk.usage) showUsage(chunk.usage);
    const choice = (chunk.choices || [])[0];
    if (!choice) return;
    const delta = choice.delta || {};
    if (typeof delta.content === "string" && delta.content) {
      state.text += delta.content;
      hook.chunks += 1;
      renderAnswer();
    }
    if (delta.groundings) setGroundings(delta.groundings);
    if (choice.finish_reason) showFinish(choice.finish_reason);
  }

  // The API key of a server started with --api-key-file: asked for on the first 401,
  // kept for this tab only, sent as `Authorization: Bearer`.
  const KEY_ITEM = "tessera-api-key";

  async function apiFetch(url, options = {}) {
    for (let attempt = 0; ; attempt += 1) {
      const key = sessionStorage.getItem(KEY_ITEM);
      const headers = Object.assign({}, options.headers || {});
      if (key) headers.authorization = `Bearer ${key}`;
      const response = await fetch(url, Object.assign({}, options, { headers }));
      if (response.status !== 401 || attempt > 0) return response;
      const entered = window.prompt("This server needs an API key:");
      if (!entered) return response;
      sessionStorage.setItem(KEY_ITEM, entered.trim());
    }
  }

  async function loadModel() {
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw new Error(`cannot list the served model: ${await errorOf(response)}`);
    const models = await response.json();
    state.model = models.data[0].id;
    el.model.textContent = state.model;
    el.model.dataset.id = state.model;
    return state.model;
  }

  async function send() {
    if (state.controller) return;
    clearError();
    let body;
    try {
      if (!state.model) await loadModel();
      body = buildRequest();
    } catch (e) {
      showError(e.message);
      return;
    }
    hook.lastRequest = body;
    hook.chunks = 0;
    resetAnswer();
    showImage(state.images.length - 1);
    setState("streaming", "Generating…");
    const controller = new AbortController();
    state.controller = controller;
    el.send.disabled = true;
    el.stop.disabled = false;
    try {
      const response = await apiFetch("/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorOf(response));
      const complete = await readEvents(response.body, onChunk);
      if (!complete) throw new Error("the server closed the stream before it finished");
      setState("done", "Done.");
    } catch (e) {
      if (e.name === "AbortError") {
        setState("stopped", "Stopped.");
      } else {
        setState("error", "Failed.");
        showError(e.message);
      }
    } finally {
      state.controller = null;
      el.send.disabled = false;
      el.stop.disabled = true;
    }
  }

  // Renders a whole `chat.completion` (or an OpenAI error body) as if it had streamed.
  function showResponse(completion) {
    clearError();
    resetAnswer();
    if (completion && completion.error) {
      setState("error", "Failed.");
      showError(completion.error.message);
      return;
    }
    const choice = completion.choices[0];
    state.text = choice.message.content || "";
    renderAnswer();
    setGroundings(choice.message.groundings || []);
    if (choice.finish_reason) showFinish(choice.finish_reason);
    if (completion.usage) showUsage(completion.usage);
    setState("done", "Done.");
  }

  const hook = { showResponse, lastRequest: null, chunks: 0 };
  window.tesseraPlayground = hook;

  // ---- Wiring ----------------------------------------------------------------

  el.files.addEventListener("change", () => {
    const files = Array.from(el.files.files);
    el.files.value = "";
    addFiles(files);
  });
  el.drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    el.drop.classList.add("over");
  });
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.drop.addEventListener("drop", (e) => {
    e.preventDefault();
    el.drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  el.drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      el.files.click();
    }
  });
  // A file dropped outside the drop zone must not replace the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  document.addEventListener("paste", (e) => {
    const files = Array.from(e.clipboardData.files).filter((f) => f.type.startsWith("image/"));
    if (files.length) addFiles(files);
  });
  el.preview.addEventListener("load", drawBoxes);
  for (const input of [el.question, el.ref, el.grounding]) {
    input.addEventListener("input", updatePrompt);
  }
  el.question.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      send();
    }
  });
  el.send.addEventListener("click", send);
  el.stop.addEventListener("click", () => state.controller && state.controller.abort());

  updatePrompt();
  loadModel().catch((e) => {
    el.model.textContent = "unavailable";
    showError(`${e.message}. Is the server still loading? Reload to try again.`);
  });
})();
