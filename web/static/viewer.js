/* iepnode web viewer: vanilla JS + canvas, no build step, no third-party code.
 *
 * Frames arrive as raw little-endian values (int16 / float32 modality values, or
 * rgb8) from {api}/instances/{uid}/frames/{n}.raw with their header in
 * X-Frame-Info; windowing happens here, with DICOM's linear function and the same
 * rounding as iepnode/rendering.py window_linear, so a canvas pixel equals the
 * server's reference. The first image is drawn as soon as its frame arrives; the
 * rest of the series loads around the current image (nearest first, 4 at a time).
 */
(function () {
  "use strict";
  const api = document.body.dataset.api;
  const $ = (id) => document.getElementById(id);
  const stage = $("vw-stage"), canvas = $("vw-canvas"), imageCanvas = $("vw-image");
  const ctx = canvas.getContext("2d"), ictx = imageCanvas.getContext("2d");
  const slider = $("vw-slider"), pos = $("vw-pos"), status = $("vw-status");
  const PARALLEL = 4, CACHE_BYTES = 384 << 20;

  const state = {
    manifest: null, study: null, series: null, stack: [], index: 0,
    window: null, userWindow: false, tool: "window",
    view: { scale: 1, x: 0, y: 0, fitted: true },
    cine: null, drawn: null, shown: -1, opened: new Set(),
  };
  const cache = new Map(); // key -> {info, data, bytes}; insertion order = age
  let cacheBytes = 0;
  const inflight = new Map(); // key -> Promise

  // -- windowing (keep in step with iepnode/rendering.py window_linear) ----------------
  function windowValue(v, c, w) {
    if (w <= 1) return v > c - 0.5 ? 255 : 0;
    const y = Math.floor(((v - (c - 0.5)) / (w - 1) + 0.5) * 255 + 0.5);
    return y < 0 ? 0 : y > 255 ? 255 : y;
  }
  let lut = null, lutKey = "";
  function int16Lut(c, w, invert) {
    const key = c + "," + w + "," + invert;
    if (key === lutKey) return lut;
    lut = new Uint8Array(65536);
    for (let i = 0; i < 65536; i++) {
      const y = windowValue(i - 32768, c, w);
      lut[i] = invert ? 255 - y : y;
    }
    lutKey = key;
    return lut;
  }

  // -- loading ------------------------------------------------------------------------
  const keyOf = (item, full) => item.uid + "/" + item.frame + (full ? "/full" : "");
  // Frames larger than the screen come reduced first (a power of two >= its longest side).
  const screenMax = () => {
    const side = Math.max(canvas.width, canvas.height, 256);
    return Math.min(16384, 2 ** Math.ceil(Math.log2(side)));
  };
  function remember(key, entry) {
    cache.set(key, entry);
    cacheBytes += entry.bytes;
    for (const [k, old] of cache) {
      if (cacheBytes <= CACHE_BYTES) break;
      if (k === key) continue;
      cache.delete(k);
      cacheBytes -= old.bytes;
    }
  }
  function load(item, full) {
    const key = keyOf(item, full);
    if (cache.has(key)) return Promise.resolve(cache.get(key));
    if (inflight.has(key)) return inflight.get(key);
    const url = `${api}/instances/${encodeURIComponent(item.uid)}/frames/${item.frame + 1}.raw` +
      (full ? "" : `?max=${screenMax()}`);
    const promise = fetch(url, { credentials: "same-origin" }).then(async (r) => {
      if (!r.ok) throw new Error((await r.text()) || r.statusText);
      const info = JSON.parse(r.headers.get("X-Frame-Info"));
      const buffer = await r.arrayBuffer();
      const data = info.dtype === "int16" ? new Int16Array(buffer)
        : info.dtype === "float32" ? new Float32Array(buffer) : new Uint8Array(buffer);
      const entry = { info, data, bytes: buffer.byteLength };
      remember(key, entry);
      return entry;
    }).finally(() => inflight.delete(key));
    inflight.set(key, promise);
    return promise;
  }
  let pumpToken = 0;
  function prefetch() { // nearest images first, PARALLEL requests at a time
    const token = ++pumpToken, stack = state.stack, start = state.index;
    const order = [];
    for (let d = 1; d < stack.length; d++) {
      if (start + d < stack.length) order.push(start + d);
      if (start - d >= 0) order.push(start - d);
    }
    let next = 0;
    const worker = () => {
      while (next < order.length && token === pumpToken) {
        const item = stack[order[next++]];
        if (cache.has(keyOf(item))) continue;
        return load(item).catch(() => null).then(() => {
          updatePos();
          if (token === pumpToken) return worker();
        });
      }
      return null;
    };
    for (let i = 0; i < PARALLEL; i++) worker();
  }

  // -- drawing ------------------------------------------------------------------------
  function resize() {
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(stage.clientWidth * ratio));
    canvas.height = Math.max(1, Math.round(stage.clientHeight * ratio));
    if (state.view.fitted) fit(); else paint();
  }
  function fit() {
    const info = state.drawn && state.drawn.info;
    state.view = { scale: 1, x: 0, y: 0, fitted: true };
    if (info) state.view.scale = Math.min(canvas.width / info.full_columns, canvas.height / info.full_rows);
    paint();
  }
  function paint() { // the windowed image onto the screen with zoom and pan
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!state.drawn) return;
    const { info } = state.drawn, v = state.view;
    const w = info.full_columns * v.scale, h = info.full_rows * v.scale; // reduced or not
    ctx.imageSmoothingEnabled = v.scale < 4;
    ctx.drawImage(imageCanvas, (canvas.width - w) / 2 + v.x, (canvas.height - h) / 2 + v.y, w, h);
    corners();
  }
  function render(entry) { // values -> windowed RGBA on the image canvas
    const { info, data } = entry;
    if (imageCanvas.width !== info.columns || imageCanvas.height !== info.rows) {
      imageCanvas.width = info.columns;
      imageCanvas.height = info.rows;
    }
    const image = ictx.createImageData(info.columns, info.rows);
    const out = image.data, n = info.rows * info.columns;
    if (info.dtype === "rgb8") {
      for (let i = 0, j = 0; i < n; i++, j += 3) {
        out[4 * i] = data[j]; out[4 * i + 1] = data[j + 1]; out[4 * i + 2] = data[j + 2];
        out[4 * i + 3] = 255;
      }
    } else {
      const [w, c] = [state.window.width, state.window.center];
      const invert = !!info.invert;
      if (info.dtype === "int16") {
        const table = int16Lut(c, w, invert);
        for (let i = 0; i < n; i++) {
          const y = table[data[i] + 32768];
          out[4 * i] = out[4 * i + 1] = out[4 * i + 2] = y; out[4 * i + 3] = 255;
        }
      } else if (info.dtype === "uint8" && info.window && info.window[1] === 256 && !state.userWindow) {
        for (let i = 0; i < n; i++) { // VOI LUT already applied on the server
          const y = invert ? 255 - data[i] : data[i];
          out[4 * i] = out[4 * i + 1] = out[4 * i + 2] = y; out[4 * i + 3] = 255;
        }
      } else {
        for (let i = 0; i < n; i++) {
          let y = windowValue(data[i], c, w);
          if (invert) y = 255 - y;
          out[4 * i] = out[4 * i + 1] = out[4 * i + 2] = y; out[4 * i + 3] = 255;
        }
      }
    }
    ictx.putImageData(image, 0, 0);
    const first = !state.drawn;
    state.drawn = entry;
    if (first || state.view.fitted) fit(); else paint();
  }
  function show(index) {
    if (!state.stack.length) return;
    index = Math.max(0, Math.min(state.stack.length - 1, index));
    state.index = index;
    slider.value = String(index + 1);
    updatePos();
    const item = state.stack[index];
    const entry = cache.get(keyOf(item, true)) || cache.get(keyOf(item));
    const draw = (e) => {
      if (state.stack[state.index] !== item) return;
      if (e.info.frames > item.frames) expand(item, e.info.frames); // large series: not listed
      if (e.info.factor > 1) { // reduced: the full frame follows in the background
        load(item, true).then((full) => {
          if (state.stack[state.index] === item && state.drawn === e) render(full);
        }, () => null);
      }
      if (!state.userWindow || !state.window) {
        const win = e.info.window || [128, 256];
        state.window = { center: win[0], width: win[1] };
      }
      status.textContent = "";
      state.shown = index;
      render(e);
    };
    if (entry) { draw(entry); } else {
      if (!state.drawn) status.textContent = "Loading…";
      load(item).then(draw, (err) => { status.textContent = "This image cannot be shown: " + err.message; });
    }
    prefetch();
  }

  function expand(item, frames) { // the manifest counted one frame; the image has more
    const at = state.stack.indexOf(item);
    const more = [];
    for (let f = 0; f < frames; f++) more.push(f === item.frame ? item : { uid: item.uid, frame: f, frames });
    item.frames = frames;
    state.stack.splice(at, 1, ...more);
    state.index = at + item.frame;
    slider.max = String(state.stack.length);
    $("vw-cine").disabled = state.stack.length < 2;
  }

  // -- text ---------------------------------------------------------------------------
  function corners() {
    const m = state.manifest, p = m.patient, st = state.study, se = state.series;
    $("vw-tl").textContent = [p.name, p.birth_date && "Born " + p.birth_date,
      p.id && "ID " + p.id].filter(Boolean).join("\n");
    $("vw-tr").textContent = [st.date, st.description, se && ("Series " + (se.number || "?") + " " +
      (se.description || se.modality || ""))].filter(Boolean).join("\n");
    const item = state.stack[state.index];
    $("vw-bl").textContent = `Image ${state.index + 1} / ${state.stack.length}` +
      (item && item.frames > 1 ? `\nFrame ${item.frame + 1} / ${item.frames}` : "");
    const win = state.window, info = state.drawn && state.drawn.info;
    $("vw-br").textContent = (info && info.dtype !== "rgb8" && win
      ? `W ${Math.round(win.width)}  L ${Math.round(win.center)}\n` : "") +
      `Zoom ${Math.round(state.view.scale / (window.devicePixelRatio || 1) * 100)}%`;
  }
  function updatePos() {
    let loaded = 0;
    for (const item of state.stack) if (cache.has(keyOf(item))) loaded++;
    pos.textContent = `${state.index + 1} / ${state.stack.length}` +
      (loaded < state.stack.length ? ` (loaded ${loaded})` : "");
  }

  // -- studies and series -------------------------------------------------------------
  function openSeries(series) {
    stopCine();
    state.series = series;
    state.stack = [];
    for (const inst of series.instances) {
      for (let f = 0; f < inst.frames; f++) state.stack.push({ uid: inst.uid, frame: f, frames: inst.frames });
    }
    state.userWindow = false;
    state.drawn = null;
    state.shown = -1;
    slider.max = String(Math.max(1, state.stack.length));
    for (const b of document.querySelectorAll(".vw-series button")) {
      b.classList.toggle("on", b.dataset.uid === series.uid);
    }
    $("vw-cine").disabled = state.stack.length < 2;
    show(0);
  }
  function openStudy(study) {
    state.study = study;
    if (!state.opened.has(study.uid)) { // one audit event per study opened
      state.opened.add(study.uid);
      fetch(`${api}/opened?study=${encodeURIComponent(study.uid)}`, { credentials: "same-origin" });
    }
    const nav = $("vw-series");
    nav.textContent = "";
    for (const series of study.series) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.uid = series.uid;
      const mid = series.instances[Math.floor(series.instances.length / 2)];
      const img = document.createElement("img");
      img.alt = "";
      img.loading = "lazy";
      img.src = `${api}/instances/${encodeURIComponent(mid.uid)}/thumbnail.jpg?frames=${mid.frames}`;
      const label = document.createElement("span");
      label.textContent = `${series.modality} ${series.number || ""} ${series.description || ""}` +
        `\n${series.frames} image${series.frames === 1 ? "" : "s"}`;
      button.append(img, label);
      button.addEventListener("click", () => openSeries(series));
      nav.append(button);
    }
    if (study.series.length) openSeries(study.series[0]);
    else { state.stack = []; state.drawn = null; paint(); status.textContent = "No images in this study."; }
  }

  // -- interaction --------------------------------------------------------------------
  function setWindow(center, width) {
    state.window = { center, width: Math.max(1, width) };
    state.userWindow = true;
    if (state.drawn) render(state.drawn);
  }
  function zoomAt(factor, cx, cy) {
    const v = state.view;
    const scale = Math.max(0.05, Math.min(40, v.scale * factor));
    const real = scale / v.scale; // keep the point under (cx, cy) still
    const ox = cx - canvas.width / 2, oy = cy - canvas.height / 2;
    v.x = ox - (ox - v.x) * real; v.y = oy - (oy - v.y) * real;
    v.scale = scale; v.fitted = false;
    paint();
  }
  function resetAll() {
    stopCine();
    state.userWindow = false;
    if (state.drawn) {
      const win = state.drawn.info.window || [128, 256];
      state.window = { center: win[0], width: win[1] };
      render(state.drawn);
    }
    fit();
  }
  function startCine() {
    if (state.stack.length < 2) return;
    $("vw-cine").classList.add("on");
    let last = 0;
    const step = (t) => {
      if (!state.cine) return;
      if (t - last >= 100) { // 10 images a second; waits for frames still loading
        const next = (state.index + 1) % state.stack.length;
        if (cache.has(keyOf(state.stack[next]))) { show(next); last = t; }
      }
      state.cine = requestAnimationFrame(step);
    };
    state.cine = requestAnimationFrame(step);
  }
  function stopCine() {
    if (state.cine) cancelAnimationFrame(state.cine);
    state.cine = null;
    $("vw-cine").classList.remove("on");
  }

  const pointers = new Map();
  let drag = null;
  stage.addEventListener("pointerdown", (e) => {
    stage.focus();
    stage.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    const tool = e.button === 2 || e.shiftKey ? "pan" : e.button === 1 || e.ctrlKey ? "zoom" : state.tool;
    drag = { tool, x: e.clientX, y: e.clientY, index: state.index, acc: 0 };
    e.preventDefault();
  });
  stage.addEventListener("pointermove", (e) => {
    if (!pointers.has(e.pointerId)) return;
    const prev = pointers.get(e.pointerId);
    pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    const ratio = window.devicePixelRatio || 1;
    if (pointers.size === 2) { // pinch: zoom about the middle, and pan with it
      const [a, b] = [...pointers.values()];
      const other = [...pointers.entries()].find(([id]) => id !== e.pointerId)[1];
      const before = Math.hypot(prev.x - other.x, prev.y - other.y);
      const after = Math.hypot(a.x - b.x, a.y - b.y);
      const rect = canvas.getBoundingClientRect();
      state.view.x += (e.clientX - prev.x) * ratio / 2;
      state.view.y += (e.clientY - prev.y) * ratio / 2;
      if (before > 0) {
        zoomAt(after / before, ((a.x + b.x) / 2 - rect.left) * ratio, ((a.y + b.y) / 2 - rect.top) * ratio);
      }
      return;
    }
    if (!drag) return;
    const dx = e.clientX - prev.x, dy = e.clientY - prev.y;
    if (drag.tool === "window" && state.window && state.drawn && state.drawn.info.dtype !== "rgb8") {
      const base = state.drawn.info.window ? state.drawn.info.window[1] : 256;
      const k = Math.max(0.05, base / 300);
      setWindow(state.window.center + dy * k, state.window.width + dx * k);
    } else if (drag.tool === "pan" || (drag.tool === "window" && state.drawn)) {
      state.view.x += dx * ratio; state.view.y += dy * ratio; state.view.fitted = false;
      paint();
    } else if (drag.tool === "zoom") {
      const rect = canvas.getBoundingClientRect();
      zoomAt(Math.exp(-dy / 150), (drag.x - rect.left) * ratio, (drag.y - rect.top) * ratio);
    } else if (drag.tool === "scroll") {
      drag.acc += dy;
      const steps = Math.trunc(drag.acc / 8);
      if (steps) { drag.acc -= steps * 8; show(state.index + steps); }
    }
  });
  const release = (e) => {
    pointers.delete(e.pointerId);
    if (!pointers.size) drag = null;
  };
  stage.addEventListener("pointerup", release);
  stage.addEventListener("pointercancel", release);
  stage.addEventListener("contextmenu", (e) => e.preventDefault());
  stage.addEventListener("wheel", (e) => {
    e.preventDefault();
    if (e.ctrlKey) { // trackpad pinch, or ctrl + wheel: zoom
      const rect = canvas.getBoundingClientRect(), ratio = window.devicePixelRatio || 1;
      zoomAt(Math.exp(-e.deltaY / 200), (e.clientX - rect.left) * ratio, (e.clientY - rect.top) * ratio);
      return;
    }
    stopCine();
    show(state.index + (e.deltaY > 0 ? 1 : e.deltaY < 0 ? -1 : 0));
  }, { passive: false });
  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLSelectElement || e.target instanceof HTMLInputElement) return;
    const moves = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 10, PageUp: -10 };
    if (e.key in moves) { stopCine(); show(state.index + moves[e.key]); }
    else if (e.key === "Home") show(0);
    else if (e.key === "End") show(state.stack.length - 1);
    else if (e.key === " ") { if (state.cine) stopCine(); else startCine(); }
    else if (e.key === "r") resetAll();
    else if (e.key === "f") fit();
    else return;
    e.preventDefault();
  });
  slider.addEventListener("input", () => { stopCine(); show(Number(slider.value) - 1); });
  for (const b of document.querySelectorAll("[data-tool]")) {
    b.addEventListener("click", () => {
      state.tool = b.dataset.tool;
      for (const o of document.querySelectorAll("[data-tool]")) o.classList.toggle("on", o === b);
    });
  }
  for (const b of document.querySelectorAll("[data-preset]")) {
    b.addEventListener("click", () => {
      if (b.dataset.preset === "auto") { resetWindow(); return; }
      const [w, c] = b.dataset.preset.split(",").map(Number);
      setWindow(c, w);
    });
  }
  function resetWindow() {
    state.userWindow = false;
    if (!state.drawn) return;
    const win = state.drawn.info.window || [128, 256];
    state.window = { center: win[0], width: win[1] };
    render(state.drawn);
  }
  $("vw-fit").addEventListener("click", fit);
  $("vw-reset").addEventListener("click", resetAll);
  $("vw-cine").addEventListener("click", () => (state.cine ? stopCine() : startCine()));
  $("vw-study").addEventListener("change", (e) => {
    openStudy(state.manifest.studies[Number(e.target.value)]);
  });
  window.addEventListener("resize", resize);

  // For tests and for people who script the page: read-only hooks.
  window.iepViewer = {
    get index() { return state.index; },
    get count() { return state.stack.length; },
    get window() { return state.window && { ...state.window }; },
    get current() { return state.drawn && state.drawn.info; },
    get shown() { return state.shown; }, // index of the image on the canvas
    get loaded() { let n = 0; for (const it of state.stack) if (cache.has(keyOf(it))) n++; return n; },
    show, setWindow,
  };

  // -- start --------------------------------------------------------------------------
  fetch(`${api}/manifest.json`, { credentials: "same-origin" }).then((r) => {
    if (!r.ok) throw new Error(r.status === 410 ? "These images are no longer available." : "The images could not be loaded.");
    return r.json();
  }).then((manifest) => {
    state.manifest = manifest;
    const select = $("vw-study");
    manifest.studies.forEach((s, i) => {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = [s.date, s.modalities, s.description].filter(Boolean).join(" · ") || "Study";
      select.append(option);
    });
    select.disabled = manifest.studies.length < 2;
    resize();
    if (manifest.studies.length) openStudy(manifest.studies[0]);
    else status.textContent = "No images to show.";
  }).catch((err) => { status.textContent = err.message; });
})();
