/* racm3 Studio. Plain JavaScript against the public API only (/v1/..., /knn-service,
 * /admin/...), so everything it does can also be done with curl. No dependencies. */
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  const state = {
    info: null,
    imageSize: [32, 32], // (height, width) of the model's images, from /v1/info
    partialImages: 0, // > 0 when the server streams partial images
    capImage: null, // {b64, img}
    edit: null, // {b64, img, w, h, mask: Uint8Array, box: [x0,y0,x1,y1] | null, painted: bool}
    memQuery: null, // {b64, img}
    pending: [], // documents to add: {file, url, caption}
  };

  // --- DOM -----------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const fmt = {
    score: (x) => (typeof x === "number" && isFinite(x) ? x.toFixed(3) : "–"),
    secs: (ms) => `${(ms / 1000).toFixed(1)} s`,
    int: (x) => (typeof x === "number" ? x.toLocaleString("en-US") : "–"),
  };

  function pngUrl(b64) {
    return `data:image/png;base64,${b64}`;
  }

  function pxImage(b64, alt, attrs = {}) {
    return el("img", { class: "px", src: pngUrl(b64), alt, draggable: "false", ...attrs });
  }

  function bindRange(id) {
    const input = $(`#${id}`);
    const out = $(`#${id}-out`);
    const show = () => { if (out) out.textContent = input.value; };
    input.addEventListener("input", show);
    show();
    return input;
  }

  function numberOrNull(id) {
    const raw = $(`#${id}`).value.trim();
    if (raw === "") return null;
    const x = Number(raw);
    return Number.isFinite(x) ? x : null;
  }

  // --- the API ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor({ status = 0, type = "", message = "", param = null, code = null, retryAfter = null }) {
      super(message);
      Object.assign(this, { status, type, param, code, retryAfter });
    }

    static async from(response) {
      let err = {};
      try {
        const body = await response.json();
        err = (body && body.error) || {};
      } catch (_) {
        err = {};
      }
      return new ApiError({
        status: response.status,
        type: err.type || "",
        message: err.message || response.statusText || `HTTP ${response.status}`,
        param: err.param || null,
        code: err.code || null,
        retryAfter: response.headers.get("Retry-After"),
      });
    }
  }

  /** A readable title and detail for any failure: API errors, network errors, our own. */
  function describe(err) {
    if (!(err instanceof ApiError)) {
      return { title: "Something went wrong in the page", detail: String((err && err.message) || err) };
    }
    const m = err.message;
    const retry = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : " Try again in a moment.";
    switch (err.status) {
      case 0: return { title: "Cannot reach the server", detail: m };
      case -1: return { title: m, detail: "" };
      case 401: return { title: "API key needed", detail: `${m}. Enter the key in the box at the top right.` };
      case 403: return { title: "Not allowed with this API key", detail: m };
      case 404: return { title: "Not found", detail: m };
      case 409: return { title: "Not done: the memory refused it", detail: m };
      case 413: return { title: "Too large", detail: m };
      case 422: return { title: "The request was not valid", detail: err.param ? `${m} (field: ${err.param})` : m };
      case 429: return { title: "The server is busy", detail: `${m}.${retry}` };
      case 503: return { title: "A service is unavailable", detail: `${m}.${retry}` };
      case 504: return { title: "The request timed out", detail: m };
      default: return { title: `The server answered ${err.status}`, detail: m };
    }
  }

  const userError = (message) => new ApiError({ status: -1, message });

  function apiKey() {
    return $("#api-key").value.trim();
  }

  async function call(path, { method = "POST", json, form, signal } = {}) {
    const headers = {};
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form) {
      body = form;
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body, signal });
    } catch (e) {
      if (e && e.name === "AbortError") throw e;
      throw new ApiError({ status: 0, message: `${path}: ${e.message || e}` });
    }
    if (!response.ok) throw await ApiError.from(response);
    return response;
  }

  const callJson = async (path, options) => (await call(path, options)).json();

  // --- panel chrome: errors, progress ----------------------------------------------------

  function showError(panel, err) {
    const box = $(".alert", panel);
    const { title, detail } = describe(err);
    box.replaceChildren(
      el("div", {}, el("b", { text: title }), detail ? el("span", { class: "detail", text: detail }) : null),
      el("button", { type: "button", class: "close", title: "Dismiss", onclick: () => { box.hidden = true; } }, "×"),
    );
    box.hidden = false;
  }

  function clearError(panel) {
    $(".alert", panel).hidden = true;
  }

  /** An indeterminate bar with a running clock; `set(done, total)` makes it determinate. */
  function startProgress(panel, label) {
    const root = $(".progress", panel);
    const bar = $(".bar", root);
    const fill = $(".bar i", root);
    const text = $(".progress-text", root);
    const t0 = performance.now();
    let note = "";
    bar.classList.remove("determinate");
    fill.style.width = "";
    const tick = () => { text.textContent = `${label}${note} · ${fmt.secs(performance.now() - t0)}`; };
    tick();
    const timer = setInterval(tick, 100);
    root.hidden = false;
    return {
      set(done, total, what) {
        bar.classList.add("determinate");
        fill.style.width = `${Math.max(4, Math.min(100, (100 * done) / Math.max(1, total)))}%`;
        note = what ? ` · ${what}` : "";
        tick();
      },
      stop() {
        clearInterval(timer);
        root.hidden = true;
        return performance.now() - t0;
      },
    };
  }

  async function busy(button, work) {
    button.disabled = true;
    try {
      return await work();
    } finally {
      button.disabled = false;
    }
  }

  // --- images ------------------------------------------------------------------------------

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(userError("This file is not an image the browser can open."));
      img.src = src;
    });
  }

  function readAsDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(userError(`Could not read ${file.name}.`));
      reader.readAsDataURL(file);
    });
  }

  async function imageFromFile(file) {
    if (!file) throw userError("Choose an image first.");
    const url = await readAsDataUrl(file);
    const img = await loadImage(url);
    return { b64: url.slice(url.indexOf(",") + 1), img };
  }

  async function imageFromB64(b64) {
    return { b64, img: await loadImage(pngUrl(b64)) };
  }

  /** The image at the model's native size (centre square crop, then resized). */
  function toNative(img) {
    const [h, w] = state.imageSize;
    const canvas = el("canvas", { width: w, height: h });
    const ctx = canvas.getContext("2d");
    const side = Math.min(img.naturalWidth, img.naturalHeight);
    const sx = (img.naturalWidth - side) / 2;
    const sy = (img.naturalHeight - side) / 2;
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(img, sx, sy, side, side, 0, 0, w, h);
    return canvas;
  }

  function canvasB64(canvas) {
    const url = canvas.toDataURL("image/png");
    return url.slice(url.indexOf(",") + 1);
  }

  function drawPreview(canvas, img) {
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0);
    canvas.hidden = false;
  }

  /** A drop zone: click to choose, drop, or paste while it has focus. */
  function dropzone(zone, input, onFiles) {
    zone.addEventListener("click", (e) => {
      if (e.target.closest("button")) return;
      input.click();
    });
    zone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
    });
    input.addEventListener("change", () => {
      if (input.files.length) onFiles(Array.from(input.files));
      input.value = "";
    });
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      const files = Array.from(e.dataTransfer.files || []).filter((f) => f.type.startsWith("image/"));
      if (files.length) onFiles(files);
    });
    zone.addEventListener("paste", (e) => {
      const files = Array.from(e.clipboardData.files || []);
      if (files.length) onFiles(files);
    });
  }

  function neighbourCard(n) {
    return el("div", { class: "neighbour", "data-testid": "neighbour", title: `document #${n.id}` },
      n.thumbnail ? pxImage(n.thumbnail, n.caption || `document ${n.id}`) : el("div", { class: "px" }),
      el("div", {},
        el("div", { class: "caption", text: n.caption || "(no caption)" }),
        el("div", { class: "score", text: `score ${fmt.score(n.score)} · #${n.id}` })));
  }

  function neighbourList(neighbours, emptyText) {
    if (!neighbours || !neighbours.length) {
      return el("div", { class: "neighbours none", text: emptyText });
    }
    return el("div", { class: "neighbours" }, neighbours.map(neighbourCard));
  }

  // --- server state: /v1/info, the memory pill ------------------------------------------------

  function streamingFrom(info) {
    // Advertised as a limit (max partial images) or a flag; OpenAI allows up to 3.
    const g = info.generator || {};
    const l = info.limits || {};
    const n = l.max_partial_images ?? g.max_partial_images ?? info.max_partial_images;
    if (typeof n === "number") return Math.max(0, Math.min(3, n));
    const flag = [g.streaming, info.streaming, l.streaming].find((v) => v !== undefined);
    if (flag === true) return 3;
    if (flag && typeof flag === "object" && typeof flag.partial_images === "number") {
      return Math.max(0, Math.min(3, flag.partial_images));
    }
    return 0;
  }

  function setPill(stateName, text) {
    const pill = $("#memory-pill");
    pill.dataset.state = stateName;
    $("#memory-pill-text").textContent = text;
  }

  async function refreshInfo() {
    const info = await callJson("/v1/info", { method: "GET" });
    state.info = info;
    const size = info.generator && info.generator.image_size;
    if (Array.isArray(size) && size.length === 2) state.imageSize = size.map(Number);
    state.partialImages = streamingFrom(info);
    $("#gen-stream-note").textContent = state.partialImages
      ? `Partial images stream in as they form (${state.partialImages} per image).`
      : "This server answers when an image is done; a progress bar shows meanwhile.";
    const mem = info.memory || {};
    if (serving(info)) {
      setPill("ready", `memory ${mem.version} · ${fmt.int(mem.documents)} docs`);
    } else {
      setPill("loading", mem.state === "ready" ? "loading the model" : `memory ${mem.state || "loading"}`);
    }
    const maxK = Math.min(16, (info.limits && info.limits.max_k) ?? 8);
    for (const id of ["gen-k", "cap-k", "edit-k"]) $(`#${id}`).max = String(maxK);
    renderStats(mem);
    return info;
  }

  /** Both the memory and the model loaded (a remote generator may not say: then assume so). */
  function serving(info) {
    const memState = (info.memory || {}).state;
    const genState = (info.generator || {}).state;
    return memState === "ready" && (genState === undefined || genState === "ready");
  }

  let waiting = null; // one wait at a time, however often the key changes

  function waitUntilReady() {
    waiting = waiting || pollUntilReady().finally(() => { waiting = null; });
    return waiting;
  }

  async function pollUntilReady() {
    const banner = $("#server-banner");
    for (let attempt = 0; ; attempt++) {
      try {
        const info = await refreshInfo();
        if (serving(info)) {
          banner.hidden = true;
          return info;
        }
        const states = [["memory", info.memory], ["model", info.generator]]
          .map(([name, part]) => `${name}: ${(part && part.state) || "starting"}`).join(", ");
        banner.textContent = `The server is still loading (${states})… this page will be ready in a moment.`;
      } catch (err) {
        const { title, detail } = describe(err);
        banner.textContent = `${title}: ${detail}`;
        setPill("error", err.status === 401 ? "API key needed" : "unreachable");
        if (err.status === 401) return null;
      }
      banner.hidden = false;
      await new Promise((r) => setTimeout(r, Math.min(5000, 800 + attempt * 400)));
    }
  }

  function flashPill() {
    const pill = $("#memory-pill");
    pill.classList.add("flash");
    setTimeout(() => pill.classList.remove("flash"), 1600);
  }

  // --- tabs ------------------------------------------------------------------------------------

  function showPanel(name) {
    for (const tab of $$(".tabs [role=tab]")) {
      const on = tab.dataset.panel === name;
      tab.setAttribute("aria-selected", String(on));
      $(`#panel-${tab.dataset.panel}`).hidden = !on;
    }
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  }

  // --- Generate --------------------------------------------------------------------------------

  function randomSeed() {
    return Math.floor(Math.random() * 2 ** 31);
  }

  function shot(b64, label, score, { testid = "generated", alt = label } = {}) {
    const img = pxImage(b64, alt);
    return el("figure", { class: "shot", "data-testid": testid },
      img,
      el("figcaption", {},
        el("span", { title: "ranking score: CLIP similarity to the prompt (with retrieval, plus agreement with the retrieved images)",
          text: score === undefined || score === null ? label : `${label} · ${fmt.score(score)}` }),
        el("span", { class: "actions" },
          el("button", { type: "button", class: "mini", title: "Caption this image", onclick: () => sendToCaption(b64) }, "Caption"),
          el("button", { type: "button", class: "mini", title: "Edit this image", onclick: () => sendToEdit(b64) }, "Edit"))));
  }

  /** The column of retrieved documents, beside the images made with them. */
  function retrievedSide(k) {
    const neighbours = el("div", { class: "neighbours none", text: "retrieving…" });
    const side = el("section", { class: "side retrieved", "data-testid": "side-retrieved" },
      el("div", { class: "side-title" },
        el("span", { class: "tag", text: "Retrieved" }),
        el("small", { text: `K = ${k}` })),
      neighbours);
    return { side, neighbours, body: side };
  }

  function runSide(kind, k, n) {
    const withMemory = kind === "with";
    const images = el("div", { class: `images${n <= 2 ? " few" : ""}` },
      Array.from({ length: n }, () => el("div", { class: "shot pending" })));
    const side = el("section", { class: `side ${kind}`, "data-testid": `side-${kind}` },
      el("div", { class: "side-title" },
        el("span", { class: "tag", text: withMemory ? "With memory" : "Without memory" }),
        el("small", { text: withMemory ? `the ${k} document${k === 1 ? "" : "s"} in context` : "same seed, nothing retrieved" })),
      images);
    return { side, images, body: side };
  }

  function renderSide(view, result, kind) {
    const label = kind === "with" ? "with memory" : "without memory";
    view.images.replaceChildren(...result.data.map((d, i) =>
      shot(d.b64_json, `#${i + 1}`, d.score, { alt: `image ${i + 1} ${label}` })));
  }

  function sideError(view, err) {
    const { title, detail } = describe(err);
    view.body.querySelector(".images, .neighbours")
      .replaceWith(el("div", { class: "neighbours none", text: `${title}: ${detail}` }));
  }

  async function generate(event) {
    event.preventDefault();
    const panel = $("#panel-generate");
    clearError(panel);
    const prompt = $("#gen-prompt").value;
    const n = Number($("#gen-n").value);
    const k = Number($("#gen-k").value);
    const compare = $("#gen-compare").checked;
    const useMemory = $("#gen-memory").checked;
    let seed = numberOrNull("gen-seed");
    if (seed === null) seed = randomSeed();
    const body = {
      prompt,
      n,
      seed,
      guidance_scale: Number($("#gen-guidance").value),
      temperature: numberOrNull("gen-temperature") ?? 1,
      response_format: "b64_json",
      return_neighbours: true,
    };
    const candidates = numberOrNull("gen-candidates");
    if (candidates !== null) body.num_candidates = Math.max(candidates, n);
    const topK = numberOrNull("gen-top-k");
    if (topK !== null) body.top_k = topK;
    const topP = numberOrNull("gen-top-p");
    if (topP !== null) body.top_p = topP;
    const arms = compare ? ["with", "without"] : [useMemory ? "with" : "without"];

    const views = Object.fromEntries(arms.map((kind) => [kind, runSide(kind, k, n)]));
    const retrieved = arms.includes("with") ? retrievedSide(k) : null;
    const sides = [retrieved, ...arms.map((a) => views[a])].filter(Boolean);
    const facts = el("span", { class: "facts", text: `seed ${seed} · ${n} image${n > 1 ? "s" : ""} · guidance ${body.guidance_scale} · K ${k}` });
    const card = el("article", { class: "card run", "data-testid": "run" },
      el("header", { class: "run-head" },
        el("span", { class: "prompt", text: `“${prompt}”` }),
        facts,
        el("button", { type: "button", class: "mini", onclick: () => { $("#gen-seed").value = seed; } }, "reuse this seed")),
      el("div", { class: "compare", style: `grid-template-columns: ${retrieved ? "200px " : ""}repeat(${arms.length}, minmax(0, 1fr))` },
        sides.map((v) => v.side)));
    const runs = $("#gen-runs");
    $(".empty", runs)?.remove();
    for (const old of $$(".run", runs)) old.classList.add("old");
    runs.prepend(card);
    for (const extra of $$(".run", runs).slice(6)) extra.remove();

    const what = arms.length === 2 ? `Generating ${n}+${n} images, with and without memory` : `Generating ${n} image${n > 1 ? "s" : ""}`;
    const progress = startProgress(panel, what);
    const partials = { done: 0, total: arms.length * n * state.partialImages };
    const onPartial = () => {
      partials.done += 1;
      progress.set(partials.done, partials.total, `partial image ${partials.done}/${partials.total}`);
    };
    await busy($("#gen-submit"), async () => {
      const outcomes = await Promise.allSettled(arms.map((kind) => {
        const armBody = { ...body, retrieval: kind === "with" ? { enabled: true, k } : { enabled: false } };
        return generateOne(armBody, views[kind], onPartial);
      }));
      const ms = progress.stop();
      const errors = [];
      outcomes.forEach((o, i) => {
        const kind = arms[i];
        if (o.status === "fulfilled") {
          renderSide(views[kind], o.value, kind);
          if (kind === "with") {
            retrieved.neighbours.replaceWith(neighbourList(o.value.neighbours, "No document passed the retrieval rules."));
          }
        } else {
          errors.push(o.reason);
          sideError(views[kind], o.reason);
          if (kind === "with") sideError(retrieved, o.reason);
        }
      });
      if (errors.length === outcomes.length) {
        card.remove();
        if (!$(".run", runs)) runs.append(emptyGenerate());
        showError(panel, errors[0]);
        return;
      }
      if (errors.length) showError(panel, errors[0]);
      const version = outcomes.map((o) => o.value && o.value.memory_version).find(Boolean);
      facts.textContent += ` · ${fmt.secs(ms)}${version ? ` · memory ${version}` : ""}`;
    });
  }

  function emptyGenerate() {
    return el("div", { class: "empty" }, el("h3", { text: "See the memory at work" }),
      el("p", { text: "Write a prompt and press Generate." }));
  }

  /** One generation request; streams partial images when the server offers them. */
  async function generateOne(body, view, onPartial) {
    if (state.partialImages > 0) {
      try {
        return await generateStreaming(body, view, onPartial);
      } catch (err) {
        const refused = err instanceof ApiError && err.status === 422 && /stream|partial/.test(`${err.param} ${err.message}`);
        if (!refused) throw err;
        state.partialImages = 0; // this server does not stream after all: ask plainly
      }
    }
    return callJson("/v1/images/generations", { json: body });
  }

  async function generateStreaming(body, view, onPartial) {
    const response = await call("/v1/images/generations", {
      json: { ...body, stream: true, partial_images: state.partialImages },
    });
    if (!(response.headers.get("Content-Type") || "").includes("text/event-stream")) {
      return response.json();
    }
    const result = { data: [], seed: body.seed, neighbours: null, memory_version: null };
    let next = 0; // completed images without an index arrive in order
    for await (const event of sseEvents(response)) {
      const d = event.data;
      const type = d.type || event.event;
      if (d.neighbours) result.neighbours = d.neighbours;
      if (d.memory_version) result.memory_version = d.memory_version;
      if (typeof d.seed === "number") result.seed = d.seed;
      if (type === "image_generation.partial_image") {
        const i = d.image_index ?? d.index ?? 0;
        const slot = view.images.children[i];
        if (slot) {
          slot.replaceWith(el("figure", { class: "shot partial", "data-testid": "partial" },
            pxImage(d.b64_json, `forming image ${i + 1}`),
            el("figcaption", { text: `forming… ${(d.partial_image_index ?? 0) + 1}/${body.partial_images ?? state.partialImages}` })));
        }
        onPartial();
      } else if (type === "image_generation.completed") {
        const i = d.image_index ?? d.index ?? next;
        next = i + 1;
        result.data[i] = { b64_json: d.b64_json, score: d.score ?? null };
      } else if (type === "error" || d.error) {
        const e = d.error || d;
        throw new ApiError({ status: e.status || 500, type: e.type, message: e.message || "stream failed", param: e.param, code: e.code });
      }
    }
    result.data = result.data.filter(Boolean);
    if (!result.data.length) throw new ApiError({ status: 502, message: "the stream ended without an image" });
    if (!result.neighbours && body.retrieval && body.retrieval.enabled) {
      // The stream's events carry images only: ask for the same neighbours (cached).
      const found = await callJson("/v1/retrieve", {
        json: { text: body.prompt, k: Math.max(1, body.retrieval.k), strategy: "rag", return_thumbnails: true },
      });
      result.neighbours = found.data;
      result.memory_version = result.memory_version || found.memory_version;
    }
    return result;
  }

  /** Server-sent events from a fetch response: {event, data} with data parsed as JSON. */
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const parse = (chunk) => {
      let event = "message";
      const data = [];
      for (const line of chunk.split(/\r?\n/)) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length || data.join("") === "[DONE]") return null;
      return { event, data: JSON.parse(data.join("\n")) };
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const event = parse(chunk);
        if (event) yield event;
      }
    }
    const last = buffer.trim() ? parse(buffer) : null;
    if (last) yield last;
  }

  // --- samples from the memory ------------------------------------------------------------------

  const SAMPLE_QUERIES = ["a big red circle", "a small blue square on the right", "a green triangle",
    "a yellow star on the left", "the flag of", "a purple circle above a square"];

  async function memorySample() {
    const text = SAMPLE_QUERIES[Math.floor(Math.random() * SAMPLE_QUERIES.length)];
    const found = await callJson("/v1/retrieve", { json: { text, k: 16, strategy: "knn", return_thumbnails: true } });
    const usable = found.data.filter((d) => d.thumbnail);
    if (!usable.length) throw userError("The memory returned no image to use.");
    return usable[Math.floor(Math.random() * usable.length)];
  }

  async function addFlagChips() {
    try {
      const found = await callJson("/v1/retrieve", { json: { text: "the flag of", k: 24, strategy: "knn", return_thumbnails: false } });
      const names = new Set();
      for (const d of found.data) {
        const m = /the flag of ([A-Z][\w-]+)/.exec(d.caption || "");
        if (m) names.add(m[1]);
        if (names.size >= 2) break;
      }
      for (const name of names) addChip(`the flag of ${name}`);
    } catch (_) {
      // Examples are a convenience; the panel works without them.
    }
  }

  function addChip(text) {
    $("#gen-chips").append(el("button", { type: "button", onclick: () => { $("#gen-prompt").value = text; } }, text));
  }

  // --- Caption & classify ------------------------------------------------------------------------

  async function setCaptionImage(source) {
    const panel = $("#panel-caption");
    clearError(panel);
    state.capImage = source;
    drawPreview($("#cap-preview"), source.img);
    $("#cap-drop .drop-text").textContent = `${source.img.naturalWidth}×${source.img.naturalHeight} · drop another to replace`;
    showPanel("caption");
    await captionNow();
  }

  async function captionNow() {
    const panel = $("#panel-caption");
    clearError(panel);
    if (!state.capImage) { showError(panel, userError("Choose an image first: drop one, or take one from the memory.")); return; }
    const n = Number($("#cap-n").value);
    const body = {
      image: state.capImage.b64,
      n,
      num_candidates: Math.max(n, 4),
      return_neighbours: true,
      retrieval: { k: Number($("#cap-k").value) },
    };
    const progress = startProgress(panel, "Writing captions");
    await busy($("#cap-submit"), async () => {
      try {
        const r = await callJson("/v1/images/captions", { json: body });
        const ms = progress.stop();
        $("#cap-list").replaceChildren(...r.data.map((c, i) =>
          el("li", { "data-testid": "caption" },
            el("span", { class: "rank", text: `${i + 1}.` }),
            el("span", { class: "text", text: c.text }),
            el("span", { class: "score", title: "log-likelihood under the model", text: fmt.score(c.score) }))));
        $("#cap-meta").textContent = `seed ${r.seed} · ${fmt.secs(ms)}${r.memory_version ? ` · memory ${r.memory_version}` : ""} · scores are log-likelihoods`;
        $("#cap-neighbours").replaceChildren(neighbourList(r.neighbours, "Retrieval is off (K = 0)."));
        $("#cap-empty").hidden = true;
        $("#cap-output").hidden = false;
      } catch (err) {
        progress.stop();
        showError(panel, err);
      }
    });
  }

  async function classifyNow() {
    const panel = $("#panel-caption");
    clearError(panel);
    if (!state.capImage) { showError(panel, userError("Choose an image first: drop one, or take one from the memory.")); return; }
    const labels = $("#cls-labels").value.split("\n").map((s) => s.trim()).filter(Boolean);
    const progress = startProgress(panel, `Scoring ${labels.length} labels`);
    await busy($("#cls-submit"), async () => {
      try {
        const r = await callJson("/v1/images/classify", {
          json: { image: state.capImage.b64, labels, retrieval: { k: Number($("#cap-k").value) } },
        });
        progress.stop();
        const entries = Object.entries(r.scores);
        const top = Math.max(...entries.map(([, s]) => s));
        const weights = entries.map(([, s]) => Math.exp(s - top));
        const total = weights.reduce((a, b) => a + b, 0);
        const rows = entries
          .map(([label, s], i) => ({ label, s, p: weights[i] / total }))
          .sort((a, b) => b.p - a.p);
        $("#cls-bars").replaceChildren(...rows.map((row) =>
          el("div", { class: `barrow${row.label === r.label ? " best" : ""}`, "data-testid": "label-score", title: `log-likelihood ${fmt.score(row.s)}` },
            el("span", { class: "label", text: row.label }),
            el("span", { class: "pct", text: `${(100 * row.p).toFixed(1)}%` }),
            el("div", { class: "track" }, el("div", { class: "fill", style: `width:${(100 * row.p).toFixed(1)}%` })))));
        $("#cls-card").hidden = false;
        $("#cap-empty").hidden = true;
        $("#cap-output").hidden = false;
      } catch (err) {
        progress.stop();
        showError(panel, err);
      }
    });
  }

  async function sendToCaption(b64) {
    try {
      await setCaptionImage(await imageFromB64(b64));
    } catch (err) {
      showError($("#panel-caption"), err);
    }
  }

  // --- Edit & infill -----------------------------------------------------------------------------

  const OVERLAY = "rgba(25, 161, 135, 0.45)";

  async function setEditImage(source, note = "") {
    const panel = $("#panel-edit");
    clearError(panel);
    const [h, w] = state.imageSize;
    const resized = source.img.naturalWidth !== w || source.img.naturalHeight !== h;
    const canvas = resized ? toNative(source.img) : null;
    const b64 = resized ? canvasB64(canvas) : source.b64;
    const img = resized ? await loadImage(pngUrl(b64)) : source.img;
    state.edit = { b64, img, w, h, mask: new Uint8Array(w * h), box: null, painted: false };
    $("#edit-size").textContent = resized
      ? `(resized from ${source.img.naturalWidth}×${source.img.naturalHeight} to the model's ${w}×${h})`
      : `(${w}×${h}${note})`;
    $("#edit-empty").hidden = true;
    $("#edit-output").hidden = false;
    $("#edit-outputs").replaceChildren();
    $("#edit-context").replaceChildren();
    $("#edit-results-label").hidden = true;
    // A first box so that one click on Infill already shows something: the right half.
    setBox([Math.floor(w / 2), 0, w, h]);
    showPanel("edit");
  }

  function setBox(box) {
    const e = state.edit;
    e.mask.fill(0);
    const [x0, y0, x1, y1] = box;
    for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) e.mask[y * e.w + x] = 1;
    e.box = box;
    e.painted = false;
    drawEditor();
  }

  function drawEditor(liveBox = null) {
    const e = state.edit;
    const canvas = $("#edit-canvas");
    const scale = Math.max(1, Math.floor(256 / Math.max(e.w, e.h)));
    canvas.width = e.w * scale;
    canvas.height = e.h * scale;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(e.img, 0, 0, canvas.width, canvas.height);
    ctx.fillStyle = OVERLAY;
    for (let y = 0; y < e.h; y++) {
      for (let x = 0; x < e.w; x++) if (e.mask[y * e.w + x]) ctx.fillRect(x * scale, y * scale, scale, scale);
    }
    const box = liveBox || (e.painted ? null : e.box);
    if (box) {
      ctx.strokeStyle = "#ffffff";
      ctx.lineWidth = 2;
      ctx.setLineDash([6, 4]);
      ctx.strokeRect(box[0] * scale + 1, box[1] * scale + 1, (box[2] - box[0]) * scale - 2, (box[3] - box[1]) * scale - 2);
    }
  }

  function editCell(event) {
    const e = state.edit;
    const rect = $("#edit-canvas").getBoundingClientRect();
    const x = Math.floor(((event.clientX - rect.left) / rect.width) * e.w);
    const y = Math.floor(((event.clientY - rect.top) / rect.height) * e.h);
    return [Math.max(0, Math.min(e.w - 1, x)), Math.max(0, Math.min(e.h - 1, y))];
  }

  function paint([cx, cy]) {
    const e = state.edit;
    const r = Number($("#edit-brush").value) / 2;
    for (let y = Math.floor(cy - r); y <= Math.ceil(cy + r); y++) {
      for (let x = Math.floor(cx - r); x <= Math.ceil(cx + r); x++) {
        if (x < 0 || y < 0 || x >= e.w || y >= e.h) continue;
        if ((x - cx) ** 2 + (y - cy) ** 2 <= r * r + 0.5) e.mask[y * e.w + x] = 1;
      }
    }
  }

  function setupEditor() {
    const canvas = $("#edit-canvas");
    let drag = null;
    const tool = () => $("input[name=edit-tool]:checked").value;
    for (const radio of $$("input[name=edit-tool]")) {
      radio.addEventListener("change", () => { $("#edit-brush-field").hidden = tool() !== "brush"; });
    }
    canvas.addEventListener("pointerdown", (event) => {
      if (!state.edit) return;
      canvas.setPointerCapture(event.pointerId);
      const cell = editCell(event);
      if (tool() === "box") {
        drag = { start: cell };
      } else {
        const e = state.edit;
        if (!e.painted) { e.mask.fill(0); e.box = null; e.painted = true; }
        drag = { brush: true };
        paint(cell);
        drawEditor();
      }
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!drag) return;
      const cell = editCell(event);
      if (drag.brush) { paint(cell); drawEditor(); return; }
      drawEditor(boxFrom(drag.start, cell));
    });
    const end = (event) => {
      if (!drag) return;
      if (!drag.brush) setBox(boxFrom(drag.start, editCell(event)));
      drag = null;
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", () => { drag = null; drawEditor(); });
    $("#edit-clear").addEventListener("click", () => {
      if (!state.edit) return;
      state.edit.mask.fill(0);
      state.edit.box = null;
      state.edit.painted = true;
      drawEditor();
    });
  }

  function boxFrom([ax, ay], [bx, by]) {
    return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx) + 1, Math.max(ay, by) + 1];
  }

  function maskB64() {
    const e = state.edit;
    const canvas = el("canvas", { width: e.w, height: e.h });
    const ctx = canvas.getContext("2d");
    const pixels = ctx.createImageData(e.w, e.h);
    for (let i = 0; i < e.mask.length; i++) {
      // OpenAI's convention (a canvas PNG always has alpha): transparent = regenerate
      pixels.data.set(e.mask[i] ? [0, 0, 0, 0] : [255, 255, 255, 255], i * 4);
    }
    ctx.putImageData(pixels, 0, 0);
    return canvasB64(canvas);
  }

  async function infillNow(event) {
    event.preventDefault();
    const panel = $("#panel-edit");
    clearError(panel);
    const e = state.edit;
    if (!e) { showError(panel, userError("Choose an image first: drop one, or take one from the memory.")); return; }
    if (!e.mask.some(Boolean)) { showError(panel, userError("Mark the area to regenerate first: drag a box or paint over the image.")); return; }
    const n = Number($("#edit-n").value);
    const prompt = $("#edit-prompt").value.trim();
    const seed = numberOrNull("edit-seed") ?? randomSeed();
    const body = {
      image: e.b64,
      n,
      seed,
      guidance_scale: Number($("#edit-guidance").value),
      return_neighbours: true,
      retrieval: { k: Number($("#edit-k").value) },
    };
    if (prompt) body.prompt = prompt;
    if (e.box && !e.painted) body.box = e.box;
    else body.mask = maskB64();
    const progress = startProgress(panel, `Infilling ${n} result${n > 1 ? "s" : ""}`);
    await busy($("#edit-submit"), async () => {
      try {
        const r = await callJson("/v1/images/infill", { json: body });
        const ms = progress.stop();
        $("#edit-results-label").hidden = false;
        $("#edit-results-label").textContent = prompt ? `Results for “${prompt}”` : "Results, infilled from the context";
        $("#edit-outputs").replaceChildren(...r.data.map((d, i) =>
          shot(d.b64_json, `result ${i + 1}`, d.score, { testid: "infilled" })));
        $("#edit-context").replaceChildren(
          el("p", { class: "panel-label", text: "Retrieved from memory" }),
          neighbourList(r.neighbours, "Retrieval is off (K = 0)."),
          el("p", { class: "meta", text: `seed ${r.seed} · ${fmt.secs(ms)}${r.memory_version ? ` · memory ${r.memory_version}` : ""}` }));
      } catch (err) {
        progress.stop();
        showError(panel, err);
      }
    });
  }

  async function sendToEdit(b64) {
    try {
      await setEditImage(await imageFromB64(b64));
    } catch (err) {
      showError($("#panel-edit"), err);
    }
  }

  // --- Memory --------------------------------------------------------------------------------------

  function renderStats(mem) {
    const index = mem.index || {};
    const gen = (state.info && state.info.generator) || {};
    const model = gen.decoder
      ? `${(gen.manifest && gen.manifest.name) || "bundle"} · ${gen.decoder}${gen.decoder_params ? ` ${(gen.decoder_params / 1e6).toFixed(2)}M` : ""} · ${gen.device || ""}`
      : null;
    const rows = [
      ["version", mem.version, "version"],
      ["documents", fmt.int(mem.documents)],
      ["index", index.factory || index.type || "–"],
      ["vectors", mem.embedding_dim ? `${mem.embedding_dim}-d CLIP` : "–"],
      ["parent", mem.parent || "–"],
      ["built", mem.created ? String(mem.created).replace("T", " ").slice(0, 16) : "–"],
      ["model", model],
    ];
    $("#mem-stats").replaceChildren(...rows.map(([k, v, cls]) => el("div", {},
      el("dt", { text: k }), el("dd", { class: cls || null, "data-testid": `stat-${k.replace(" ", "-")}`, text: v ?? "–" }))));
  }

  async function searchMemory(event, highlight = []) {
    if (event) event.preventDefault();
    const panel = $("#panel-memory");
    clearError(panel);
    const text = $("#mem-text").value.trim();
    if (!text && !state.memQuery) {
      showError(panel, userError("Type some text or drop an image to search the memory."));
      return;
    }
    const body = { k: Number($("#mem-k").value), strategy: $("#mem-strategy").value, return_thumbnails: true };
    if (text) body.text = text;
    if (state.memQuery) body.image = state.memQuery.b64;
    const progress = startProgress(panel, "Searching");
    await busy($("#mem-search"), async () => {
      try {
        const r = await callJson("/v1/retrieve", { json: body });
        const ms = progress.stop();
        const fresh = new Set(highlight);
        $("#mem-tiles").replaceChildren(...r.data.map((d) => {
          const isNew = fresh.has(d.id);
          return el("div", { class: `tile${isNew ? " new" : ""}`, "data-testid": "memory-result", title: `document #${d.id}` },
            d.thumbnail ? pxImage(d.thumbnail, d.caption || `document ${d.id}`) : null,
            isNew ? el("span", { class: "badge", text: "new" }) : null,
            el("div", { class: "caption", text: d.caption || "(no caption)" }),
            el("div", { class: "score" }, el("span", { text: fmt.score(d.score) }), el("span", { text: `#${d.id}` })));
        }));
        const what = [text && `“${text}”`, state.memQuery && "the image"].filter(Boolean).join(" + ");
        $("#mem-meta").textContent = `${r.data.length} documents for ${what} · memory ${r.memory_version} · ${fmt.secs(ms)}`;
        $("#mem-empty").hidden = true;
      } catch (err) {
        progress.stop();
        showError(panel, err);
      }
    });
  }

  async function setMemQuery(source) {
    state.memQuery = source;
    if (source) drawPreview($("#mem-query-preview"), source.img);
    else $("#mem-query-preview").hidden = true;
    $("#mem-query-clear").hidden = !source;
  }

  function captionFromName(name) {
    return name.replace(/\.[^.]+$/, "").replace(/[_-]+/g, " ").replace(/\s+/g, " ").trim();
  }

  function renderPending() {
    const list = $("#add-list");
    list.replaceChildren(...state.pending.map((doc, i) => {
      const input = el("input", { type: "text", value: doc.caption, placeholder: "caption for this image",
        "aria-label": `caption for ${doc.file.name}`, "data-testid": "pending-caption" });
      input.addEventListener("input", () => { doc.caption = input.value; });
      return el("li", {},
        el("img", { class: "px", src: doc.url, alt: doc.file.name }),
        input,
        el("button", { type: "button", class: "mini", title: "Remove", onclick: () => { state.pending.splice(i, 1); renderPending(); } }, "×"));
    }));
    $("#add-submit").disabled = state.pending.length === 0;
  }

  async function addPending(files) {
    for (const file of files) {
      try {
        const { img } = await imageFromFile(file);
        state.pending.push({ file, url: img.src, caption: captionFromName(file.name) });
      } catch (err) {
        showError($("#panel-memory"), err);
      }
    }
    renderPending();
  }

  async function addDocuments(event) {
    event.preventDefault();
    const panel = $("#panel-memory");
    clearError(panel);
    if (!state.pending.length) return;
    const form = new FormData();
    for (const doc of state.pending) {
      form.append("image", doc.file, doc.file.name);
      form.append("caption", doc.caption);
    }
    const n = state.pending.length;
    const progress = startProgress(panel, `Adding ${n} document${n > 1 ? "s" : ""}: embedding, indexing, publishing`);
    await busy($("#add-submit"), async () => {
      try {
        const r = await callJson("/admin/documents", { form });
        progress.stop();
        const firstCaption = state.pending[0].caption;
        state.pending = [];
        renderPending();
        const notice = $("#mem-notice");
        notice.replaceChildren(
          el("span", { class: "versions", "data-testid": "version-change", text: `${r.previous_version} → ${r.memory_version}` }),
          ` · ${fmt.int(r.documents)} documents (+${r.added}), served now. `,
          el("span", { text: "The new documents are marked below." }));
        notice.hidden = false;
        window.scrollTo({ top: 0, behavior: "smooth" });
        await refreshInfo();
        flashPill();
        $("#mem-text").value = firstCaption;
        await setMemQuery(null);
        await searchMemory(null, r.ids);
      } catch (err) {
        progress.stop();
        showError(panel, err);
      }
    });
    renderPending(); // nothing left to add: the button stays disabled
  }

  async function reloadMemory() {
    const panel = $("#panel-memory");
    clearError(panel);
    await busy($("#mem-reload"), async () => {
      try {
        const r = await callJson("/admin/reload");
        const notice = $("#mem-notice");
        notice.replaceChildren(
          el("span", { class: "versions", text: r.changed ? `${r.previous_version} → ${r.memory_version}` : r.memory_version }),
          r.changed ? ` · now serving ${fmt.int(r.documents)} documents.` : " is already the newest published version.");
        notice.hidden = false;
        await refreshInfo();
        if (r.changed) flashPill();
      } catch (err) {
        showError(panel, err);
      }
    });
  }

  // --- wiring ----------------------------------------------------------------------------------------

  function wire() {
    for (const id of ["gen-n", "gen-guidance", "gen-k", "cap-n", "cap-k", "edit-n", "edit-guidance", "edit-k", "edit-brush", "mem-k"]) bindRange(id);
    for (const tab of $$(".tabs [role=tab]")) tab.addEventListener("click", () => showPanel(tab.dataset.panel));
    const initial = location.hash.slice(1);
    showPanel(["generate", "caption", "edit", "memory"].includes(initial) ? initial : "generate");

    const key = $("#api-key");
    key.value = sessionStorage.getItem("racm3.apiKey") || "";
    key.addEventListener("change", () => {
      sessionStorage.setItem("racm3.apiKey", key.value.trim());
      waitUntilReady();
    });

    // Generate
    for (const p of ["a big red circle on the left", "a small blue square", "a green triangle above a yellow circle"]) addChip(p);
    $("#gen-form").addEventListener("submit", generate);
    $("#gen-prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("#gen-form").requestSubmit(); }
    });
    $("#gen-seed-dice").addEventListener("click", () => { $("#gen-seed").value = randomSeed(); });
    const syncMemory = () => { $("#gen-memory").disabled = $("#gen-compare").checked; };
    $("#gen-compare").addEventListener("change", syncMemory);
    syncMemory();

    // Caption & classify
    dropzone($("#cap-drop"), $("#cap-file"), async ([file]) => {
      try { await setCaptionImage(await imageFromFile(file)); } catch (err) { showError($("#panel-caption"), err); }
    });
    $("#cap-sample").addEventListener("click", async () => {
      try { await setCaptionImage(await imageFromB64((await memorySample()).thumbnail)); } catch (err) { showError($("#panel-caption"), err); }
    });
    $("#cap-form").addEventListener("submit", (e) => { e.preventDefault(); captionNow(); });
    $("#cls-submit").addEventListener("click", classifyNow);

    // Edit & infill
    dropzone($("#edit-drop"), $("#edit-file"), async ([file]) => {
      try { await setEditImage(await imageFromFile(file)); } catch (err) { showError($("#panel-edit"), err); }
    });
    $("#edit-sample").addEventListener("click", async () => {
      try {
        const doc = await memorySample();
        await setEditImage(await imageFromB64(doc.thumbnail), ` · “${doc.caption}”`);
      } catch (err) { showError($("#panel-edit"), err); }
    });
    setupEditor();
    $("#edit-form").addEventListener("submit", infillNow);

    // Memory
    $("#mem-search-form").addEventListener("submit", searchMemory);
    dropzone($("#mem-drop"), $("#mem-file"), async ([file]) => {
      try { await setMemQuery(await imageFromFile(file)); } catch (err) { showError($("#panel-memory"), err); }
    });
    $("#mem-query-clear").addEventListener("click", () => setMemQuery(null));
    dropzone($("#add-drop"), $("#add-files"), addPending);
    $("#mem-add-form").addEventListener("submit", addDocuments);
    $("#mem-reload").addEventListener("click", reloadMemory);
  }

  wire();
  waitUntilReady().then((info) => { if (info) addFlagChips(); });
})();
