// workbench view: plays a video's pixel frames beside the current chunk's per-head attention maps.
// Data comes from the server's JSON (workbench/view/server.py). Frame arithmetic is the server's:
// meta.pixel_to_latent[t] is the latent frame pixel frame t shows, and state.chunks lists each chunk's
// query frames as the store (or the live rollout) labelled them. Nothing here counts frames itself.
"use strict";

const $ = (id) => document.getElementById(id);
const V = {
  meta: null, state: null, attn: null,   // server answers
  sample: null, layer: null, step: null, head: "all", scale: "video",
  t: 0, playing: false, frames: [], framesLoaded: 0, timer: null, poller: null,
};
window.viewer = V;  // for tests and the curious: V.setTime(t), V.current()

// ---------------------------------------------------------------- colour
const VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884", "#44bf70",
                 "#7ad151", "#bddf26", "#fde725"].map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
function viridis(x) {
  x = Math.min(1, Math.max(0, x)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + f * (VIRIDIS[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}
const LOG_FLOOR = 1e-4;
function scaleTop() {  // the value at the top of the colour scale, the same for every time of the video
  if (V.scale === "video") return V.attn && V.attn.vmax ? V.attn.vmax : 1;
  return 1;
}
function unitOf(v) {
  if (V.scale === "log") return (Math.log10(Math.max(v, LOG_FLOOR)) - Math.log10(LOG_FLOOR)) / -Math.log10(LOG_FLOOR);
  return v / scaleTop();
}

// ---------------------------------------------------------------- data
async function api(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}
function q(params) { return new URLSearchParams(params).toString(); }
function showError(err) { const e = $("error"); e.hidden = !err; e.textContent = err ? String(err.message || err) : ""; }

function fill(select, items, value) {
  const old = select.value;
  select.innerHTML = "";
  for (const [v, text] of items) { const o = document.createElement("option"); o.value = v; o.textContent = text; select.appendChild(o); }
  select.value = value !== undefined ? value : (items.some(([v]) => String(v) === old) ? old : items[0][0]);
}

function shorten(text, n) {  // at most n characters, cut at a word, "…" where cut
  if (text.length <= n) return text;
  const cut = text.slice(0, n - 1), space = cut.lastIndexOf(" ");
  return `${space > n / 2 ? cut.slice(0, space) : cut}…`;
}
function fillSamples() {
  fill($("sample"), V.meta.samples.map((s) => [s.sample, `${s.sample} · seed ${s.seed} · ${shorten(s.prompt, 48)}`]),
       V.sample || V.meta.samples[0].sample);
  Array.from($("sample").options).forEach((o, i) => { o.title = V.meta.samples[i].prompt; });  // whole, on hover
}

async function init() {
  V.meta = await api("/api/meta");
  if (V.meta.waiting) {  // workbench view --wait, before the run writes anything: ask again in a second
    showError(`waiting for ${V.meta.waiting} (the run has not started writing yet); this page reloads itself`);
    setTimeout(() => location.reload(), 1000);
    return;
  }
  const m = V.meta;
  $("source-name").textContent = `· ${m.name}`;
  if (!m.samples.length) { showError("no sample yet: waiting for the first chunk"); }
  fill($("layer"), m.layers.map((l) => [l, `${l}`]));
  fill($("step"), m.steps.map((s) => [s.step, s.label]));
  fill($("head"), [["all", "all heads"], ...m.heads.map((h) => [h, `head ${h}`])]);
  $("time").max = m.pixel_frames - 1;
  $("follow-label").hidden = !m.live;
  V.layer = Number($("layer").value); V.step = Number($("step").value);
  if (m.samples.length) { fillSamples(); await selectSample($("sample").value); }
  for (const id of ["layer", "step"]) $(id).onchange = async () => { V[id] = Number($(id).value); await loadAttn(); render(); };
  $("head").onchange = () => { V.head = $("head").value; render(); };
  $("scale").onchange = () => { V.scale = $("scale").value; render(); };
  $("sample").onchange = () => selectSample($("sample").value);
  $("time").oninput = () => { pause(); setTime(Number($("time").value)); };
  $("play").onclick = () => (V.playing ? pause() : play());
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "SELECT") return;
    // a focused checkbox or button takes its own space (the follow box could not be ticked from the keyboard)
    if (e.key === " " && (e.target.tagName === "BUTTON" || e.target.type === "checkbox")) return;
    if (e.target.id === "time" && e.key.startsWith("Arrow")) return;  // the slider steps itself (oninput)
    if (e.key === " ") { e.preventDefault(); V.playing ? pause() : play(); }
    if (e.key === "ArrowRight") setTime(Math.min(V.t + 1, lastTime()));
    if (e.key === "ArrowLeft") setTime(Math.max(V.t - 1, 0));
  });
  window.addEventListener("resize", render);
  if (m.live) V.poller = setInterval(poll, 700);
  render();
}

async function selectSample(id) {
  V.sample = id;
  const s = V.meta.samples.find((x) => x.sample === id);
  $("prompt").textContent = s ? `prompt ${s.prompt_index}: “${s.prompt}” · seed ${s.seed}` : "";
  V.frames = []; V.framesLoaded = 0;
  V.state = await api(`/api/state?${q({ sample: id })}`);
  loadFrames();
  await loadAttn();
  setTime(Math.min(V.t, lastTime()));
}

function loadFrames() {
  const st = V.state, sample = V.sample;
  for (let t = 0; t < st.frames_ready; t++) {
    if (V.frames[t]) continue;
    const img = new Image();
    V.frames[t] = img;
    img.onload = () => {
      if (V.sample !== sample) return;
      img.loaded = true; V.framesLoaded++;
      document.body.dataset.framesLoaded = V.framesLoaded;
      if (t === V.t) drawFrame();
    };
    img.src = `/api/frame?${q({ sample, t })}`;
  }
}

async function loadAttn() {
  try {
    V.attn = await api(`/api/attn?${q({ sample: V.sample, layer: V.layer, step: V.step })}`);
    V.attnError = null;
    const bad = V.attn.not_finite || [];  // rows NaN for every head: the attention was not finite, not "not attended"
    showError(bad.length ? `query frames ${bad.join(", ")}: every value of attn_mass is NaN at this layer and step ` +
      "(the attention was not finite: the rollout's activations overflowed); drawn grey" : null);
  } catch (err) { V.attn = null; V.attnError = err; showError(err); }  // no stale maps under an error
  document.body.dataset.attnLoaded = `${V.sample}/${V.layer}/${V.step}/${V.state ? V.state.chunks.length : 0}`;
}

async function poll() {
  try {
    const meta = await api("/api/meta");
    const newSamples = meta.samples.length !== (V.meta.samples || []).length;
    const had = V.meta.samples || [], wasNewest = had.length > 0 && V.sample === had[had.length - 1].sample;
    V.meta = meta;
    if (!V.sample && meta.samples.length) { fillSamples(); await selectSample($("sample").value); return; }
    if (newSamples) fillSamples();
    const newest = meta.samples.length ? meta.samples[meta.samples.length - 1].sample : null;
    if (newSamples && $("follow").checked && wasNewest && newest !== V.sample) {
      $("sample").value = newest;  // following the run (on its newest sample): on to the one it makes now
      await selectSample(newest);
      render();
      return;
    }
    if (!V.sample) return;
    const st = await api(`/api/state?${q({ sample: V.sample })}`);
    const grew = st.chunks.length !== V.state.chunks.length || st.frames_ready !== V.state.frames_ready;
    V.state = st;
    if (grew) {
      loadFrames();
      await loadAttn();
      if ($("follow").checked && !V.playing) setTime(lastTime());
    }
    render();
    if (meta.status !== "running" && st.done && V.poller) { clearInterval(V.poller); V.poller = null; }
  } catch (err) { showError(err); }
}

// ---------------------------------------------------------------- time
function lastTime() {  // the last pixel frame there is (without a video: every frame the attention covers)
  const st = V.state;
  if (!st) return 0;
  if (st.frames_ready > 0) return st.frames_ready - 1;
  if (V.meta.live) {  // no decoded frames: as far as the chunks made so far reach
    return st.chunks.length ? Math.max(...st.chunks.map((c) => c.pixel_stop)) - 1 : 0;
  }
  return V.meta.pixel_frames - 1;
}
function setTime(t) {
  V.t = Math.max(0, Math.min(t, V.meta.pixel_frames - 1));
  $("time").value = V.t;
  render();
}
V.setTime = setTime;
function play() {
  if (V.t >= lastTime()) V.t = 0;
  V.playing = true;
  $("play").textContent = "❚❚ pause";
  clearInterval(V.timer);
  V.timer = setInterval(() => { if (V.t >= lastTime()) { V.meta.live && !V.state.done ? null : setTime(0); } else setTime(V.t + 1); },
                        1000 / (V.meta.fps || 16));
}
function pause() { V.playing = false; clearInterval(V.timer); $("play").textContent = "▶ play"; }

function current() {  // where pixel frame t sits: its latent frame and that frame's chunk (from the labels)
  const latent = V.meta.pixel_to_latent[V.t];
  const chunk = V.state ? V.state.chunks.find((c) => c.query_frames.includes(latent)) : undefined;
  return { t: V.t, latent, chunk };
}
V.current = current;

// ---------------------------------------------------------------- drawing
function sizeCanvas(canvas, cssHeight) {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth || 300;
  canvas.style.height = `${cssHeight}px`;
  canvas.width = Math.round(w * dpr); canvas.height = Math.round(cssHeight * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return [ctx, w];
}

function render() {
  if (!V.meta || !V.state) return;
  drawFrame(); drawTimeline(); drawWhere(); drawMaps(); drawColorbar(); drawStatus();
}

function drawStatus() {
  const s = $("status"), st = V.state, m = V.meta;
  const made = st.chunks.length, total = st.chunks.length && st.done ? made : null;
  s.className = `status ${m.status || st.status}`;
  s.textContent = m.live ? `${m.status === "running" ? "live" : m.status}: ${made} chunk(s)${total ? "" : " so far"}`
                         : m.samples.some((x) => x.intervention !== undefined)
                           ? `effects store · ${m.samples.length} rollout(s): entries × samples`
                           : `store · ${m.samples.length} sample(s)`;
}

function drawFrame() {
  const canvas = $("frame"), img = V.frames[V.t], none = $("no-video");
  if (img && img.loaded) {
    if (canvas.width !== img.naturalWidth || canvas.height !== img.naturalHeight) {
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    }
    canvas.getContext("2d").drawImage(img, 0, 0);
    none.hidden = true;
  } else {
    const st = V.state;
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);  // never another frame under the text
    none.hidden = false;
    none.textContent = st.video_error ? st.video_error
      : V.meta.live && V.t >= st.frames_ready ? `pixel frame ${V.t} is not decoded yet`
      : st.frames_ready === 0 && st.make_video ? `no video found for this sample: ${st.make_video} makes it ` +
        `(then reload), or name one: workbench view ${V.meta.name} --video FILE.mp4`
      : st.frames_ready === 0 ? "no video found for this sample: workbench generate makes it (its prompt and seed, " +
        `--out ${V.meta.name.replace(/\.zarr$/, "")} beside the store; workbench report's page gives the command), ` +
        "or name one: workbench view STORE --video FILE.mp4"
      : "loading…";
  }
}

function drawTimeline() {
  const T = V.meta.pixel_frames, [ctx, w] = sizeCanvas($("timeline"), 40);
  const x = (t) => 4 + (t / T) * (w - 8);
  ctx.clearRect(0, 0, w, 40);
  ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
  const cur = current();
  V.state.chunks.forEach((c, i) => {
    const a = x(c.pixel_first), b = x(c.pixel_stop);
    ctx.fillStyle = c === cur.chunk ? "#f3b33d" : (i % 2 ? "#c9cdd3" : "#dde0e4");
    ctx.fillRect(a, 6, b - a - 1, 18);
    ctx.fillStyle = "#222";
    if (b - a > 18) ctx.fillText(`c${c.chunk}`, (a + b) / 2, 15);
  });
  const made = V.state.chunks.length ? Math.max(...V.state.chunks.map((c) => c.pixel_stop)) : 0;
  if (made < T) { ctx.fillStyle = "#eeeeec"; ctx.fillRect(x(made), 6, x(T) - x(made), 18); }
  ctx.fillStyle = "#d0302a"; ctx.fillRect(x(V.t + 0.5) - 1, 2, 2, 26);
  ctx.fillStyle = "#555"; ctx.textAlign = "left"; ctx.fillText("chunks (pixel frames)", 4, 34);
}

function drawWhere() {
  const T = V.meta.pixel_frames, { t, latent, chunk } = current();
  let text = `pixel frame ${t} (of 0–${T - 1}) · latent frame ${latent}`;
  if (chunk) {
    const f = chunk.query_frames;
    text += ` · chunk ${chunk.chunk}: latent frames ${f[0]}–${f[f.length - 1]}, pixel frames ${chunk.pixel_first}–${chunk.pixel_stop - 1}`;
  } else text += " · its chunk is not made yet";
  $("where").textContent = text;
  $("time").setAttribute("aria-valuetext", text);
}

function drawMaps() {
  const box = $("maps"), { latent, chunk } = current(), m = V.meta, attn = V.attn;
  const step = m.steps.find((s) => s.step === V.step);
  const q = chunk ? chunk.query_frames : [];
  $("maps-title").textContent = `layer ${V.layer} · step ${step ? step.label : V.step}` +
    (chunk ? ` · chunk ${chunk.chunk}: query frames ${q[0]}–${q[q.length - 1]} × key frames 0–${m.num_frames - 1}`
      : "") +
    // image-to-video: frame 0 is the given image, written to the cache by a context pass and never denoised
    (m.image && q.includes(0) && step && step.phase !== "context"
      ? ` · frame 0 is the image ${m.image}: it is not denoised, only its context pass ` +
        "attends (choose the context step)" : "");
  const heads = V.head === "all" ? m.heads.map((h, i) => i) : [m.heads.indexOf(Number(V.head))];
  box.classList.toggle("single", V.head !== "all");
  while (box.children.length > heads.length) box.removeChild(box.lastChild);
  while (box.children.length < heads.length) {
    const fig = document.createElement("figure");
    fig.innerHTML = '<figcaption></figcaption><canvas role="img"></canvas>';
    fig.querySelector("canvas").addEventListener("mousemove", hover);
    fig.querySelector("canvas").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
    box.appendChild(fig);
  }
  heads.forEach((hi, n) => {
    const fig = box.children[n];
    fig.querySelector("figcaption").textContent = `head ${m.heads[hi]}`;
    drawMap(fig.querySelector("canvas"), hi, chunk, latent, attn);
  });
}

function drawMap(canvas, hi, chunk, latent, attn) {
  const F = V.meta.num_frames, rows = chunk ? chunk.query_frames : [];
  const left = 40, top = 4, bottom = 31, right = 6;  // (below: the key frame ticks, then the axis's name)
  const width = canvas.clientWidth || 300;
  const cell = Math.max(4, Math.min(V.head === "all" ? 26 : 44, Math.floor((width - left - right) / F)));
  // rows at least as tall as their labels: with many key frames the columns get thin, the rows stay readable
  const cellH = Math.max(cell, V.head === "all" ? 14 : 22);
  const height = top + Math.max(rows.length, 1) * cellH + bottom;
  const [ctx] = sizeCanvas(canvas, height);
  // the chunk's first query frame at the bottom, as the notebooks' and reports' heatmaps draw it (origin lower)
  const rowY = (r) => top + (rows.length - 1 - r) * cellH;
  canvas.layout = { left, top, cell, cellH, rows, hi, rowY };
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "middle";
  if (!chunk || !attn) {
    const text = !chunk ? "this chunk is not made yet" : V.attnError ? "no data: see the error above" : "loading…";
    ctx.fillStyle = "#777";
    ctx.fillText(text, left, top + cellH / 2);
    canvas.setAttribute("aria-label", `head ${V.meta.heads[hi]}: ${text}`);  // (not the last frame's key frames)
    return;
  }
  const values = attn.values[hi];
  canvas.setAttribute("aria-label", mapText(hi, latent, values[latent] || []));
  rows.forEach((qf, r) => {
    for (let kf = 0; kf < F; kf++) {
      const v = values[qf][kf];
      ctx.fillStyle = v === null ? "#e2e2de" : viridis(unitOf(v));
      ctx.fillRect(left + kf * cell, rowY(r), cell, cellH);
    }
    ctx.fillStyle = qf === latent ? "#d0302a" : "#333"; ctx.textAlign = "right";
    ctx.fillText(`q${qf}`, left - 6, rowY(r) + cellH / 2);
  });
  const r = rows.indexOf(latent);  // the query frame on screen
  ctx.strokeStyle = "#d0302a"; ctx.lineWidth = 2;
  ctx.strokeRect(left - 1, rowY(r) - 1, F * cell + 2, cellH + 2);
  // key frame ticks: every frame where two digits fit, else every 2nd or 5th; the chunk's own frames underlined
  const every = cell >= 19 || F <= 10 ? 1 : cell >= 10 ? 2 : 5;
  ctx.fillStyle = "#333"; ctx.textAlign = "center";
  const tickY = top + rows.length * cellH + 10;
  for (let kf = 0; kf < F; kf += every) ctx.fillText(`${kf}`, left + kf * cell + cell / 2, tickY);
  ctx.fillStyle = "#777";  // the columns' name on the map itself (the rows': q + the query frame)
  ctx.fillText("key frame", left + (F * cell) / 2, tickY + 13);
  ctx.fillStyle = "#d0302a";
  ctx.fillRect(left + rows[0] * cell, top + rows.length * cellH + 1, rows.length * cell, 2);
}

function mapText(hi, latent, row) {
  // what a screen reader says of a map: the on-screen query frame's three largest key frames (the canvas is a picture)
  const top = row.map((v, kf) => [v, kf]).filter(([v]) => v !== null).sort((a, b) => b[0] - a[0]).slice(0, 3);
  return `head ${V.meta.heads[hi]}, query frame ${latent}: ` +
    (top.length ? top.map(([v, kf]) => `key frame ${kf} ${v.toFixed(3)}`).join(", ")
      : (V.attn.not_finite || []).includes(latent) ? "NaN: the attention was not finite" : "no key frame attended");
}

function hover(e) {
  const canvas = e.currentTarget, L = canvas.layout, tip = $("tooltip");
  if (!L || !V.attn || !L.rows.length) return;
  const rect = canvas.getBoundingClientRect();
  const kf = Math.floor((e.clientX - rect.left - L.left) / L.cell);
  const r = L.rows.length - 1 - Math.floor((e.clientY - rect.top - L.top) / L.cellH);  // rows run upwards
  if (kf < 0 || kf >= V.meta.num_frames || r < 0 || r >= L.rows.length) { tip.hidden = true; return; }
  const v = V.attn.values[L.hi][L.rows[r]][kf];
  tip.textContent = `head ${V.meta.heads[L.hi]} · query frame ${L.rows[r]} · key frame ${kf} · ` +
                    (v === null ? ((V.attn.not_finite || []).includes(L.rows[r]) ? "NaN (not finite)" : "not attended")
                     : `mass ${v.toFixed(4)}`);
  tip.style.left = `${e.clientX + 12}px`; tip.style.top = `${e.clientY + 12}px`; tip.hidden = false;
}

function tickDecimals(top) {  // the same decimals on every tick: 3 significant digits of the top value
  return Math.max(0, Math.min(6, 2 - Math.floor(Math.log10(top))));
}
function drawColorbar() {
  const [ctx, w] = sizeCanvas($("colorbar"), 34), barW = w - 20;
  ctx.clearRect(0, 0, w, 34);
  for (let i = 0; i < barW; i++) { ctx.fillStyle = viridis(i / (barW - 1)); ctx.fillRect(10 + i, 2, 1, 14); }
  ctx.fillStyle = "#333"; ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "top"; ctx.textAlign = "center";
  const ticks = V.scale === "log" ? [1e-4, 1e-3, 1e-2, 1e-1, 1].map((v) => [unitOf(v), v === 1 ? "1" : `1e${Math.log10(v)}`])
    : [0, 0.25, 0.5, 0.75, 1].map((u) => [u, (u * scaleTop()).toFixed(tickDecimals(scaleTop()))]);
  ticks.forEach(([u, text], i) => {  // the end labels aligned inwards, so that none is cut at the canvas edge
    const x = 10 + u * (barW - 1);
    ctx.fillRect(x, 16, 1, 3);
    ctx.textAlign = i === 0 ? "left" : i === ticks.length - 1 ? "right" : "center";
    ctx.fillText(text, i === 0 ? Math.max(0, x - 4) : i === ticks.length - 1 ? Math.min(w, x + 4) : x, 20);
  });
  $("colorbar-label").textContent = V.scale === "video"
    ? `attn_mass; one scale for every time, head and chunk of this layer and step (max ${V.attn && V.attn.vmax !== null ? V.attn.vmax.toFixed(3) : "–"}${V.meta.live && V.meta.status === "running" ? " so far" : ""})`
    : V.scale === "unit" ? "attn_mass (probability), 0 to 1" : "attn_mass, log scale (values under 10⁻⁴ at the bottom)";
}

init().catch(showError);
