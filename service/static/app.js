// The aex viewer: plain JavaScript against the public API (/v1/...). No build step, no
// libraries; every node is built with the DOM API (text via textContent, never innerHTML).
// The access token pasted in the page is kept in sessionStorage (this tab, until it closes)
// and sent as "Authorization: Bearer"; images and DICOM objects are fetched with it.
"use strict";

const POLL_MS = 250;
const MAX_BARS = 20;
const TOKEN_KEY = "aex-token";

// Words in front of the service's own message, by error code.
const ERROR_WORDS = {
  unsupported_media_type: "This file is not a supported image",
  undecodable_image: "This image could not be read",
  decompression_bomb: "This image is too large to decode",
  upload_too_large: "This file is too large",
  unknown_model: "This model is not served",
  unknown_job: "This job is not known (results are kept for a limited time)",
  bad_parameter: "A setting is not valid",
  queue_full: "The service is busy",
  service_unavailable: "The service is not available right now",
  bound_not_reached: "The search did not reach the budget ρ in time (raise ρ or the steps)",
  job_timeout: "The job took too long and was stopped",
  worker_lost: "The worker running this job stopped",
  job_cancelled: "The job was cancelled",
  job_failed: "The job failed",
  network: "Could not reach the service",
  unauthenticated: "An access token is needed (paste it above)",
  key_lost: "This access token was lost with the service's data (paste a new one above)",
  forbidden: "This access token may not do that",
  too_many_jobs: "You have the most jobs this service allows queued or running",
};

const $ = (id) => document.getElementById(id);
const state = { models: {}, file: null, previewUrl: null, job: null, timer: null, blobs: [] };

// --- the access token ---------------------------------------------------------------------
function token() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { return ""; }
}

function setToken(value) {
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch (_) { /* storage disabled: the token lasts until the page is left */ }
  state.token = value;
  showTokenState();
}

function currentToken() {
  return state.token !== undefined ? state.token : token();
}

function authHeaders(extra = {}) {
  const t = currentToken();
  return t ? { ...extra, Authorization: `Bearer ${t}` } : extra;
}

function showTokenState() {
  const has = Boolean(currentToken());
  $("token").value = "";
  $("token").placeholder = has ? "a token is set for this tab (paste another to replace it)" : "aex_…";
  $("token-forget").hidden = !has;
}

class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function describeError(err) {
  const lead = ERROR_WORDS[err.code] || "The request failed";
  let message = err.message || "";
  // "This file is not a supported image: not a supported image; send one of ..." reads
  // badly: drop the service's first clause when the lead already says it.
  const first = message.split(/[;:] /)[0];
  if (first && first.length < message.length && lead.toLowerCase().endsWith(first.toLowerCase())) {
    message = message.slice(first.length + 2);
  }
  return message ? `${lead}: ${message}` : `${lead}.`;
}

async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, { ...options, headers: authHeaders({ Accept: "application/json", ...(options.headers || {}) }) });
  } catch (e) {
    throw new ApiError("network", String(e.message || e));
  }
  const text = await resp.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { body = null; }
  if (!resp.ok) {
    const e = body && body.error;
    if (e && e.code) throw new ApiError(e.code, e.message);
    throw new ApiError(`http_${resp.status}`, `HTTP ${resp.status} ${resp.statusText} ${text.slice(0, 200)}`);
  }
  return { status: resp.status, body };
}

// --- small DOM helpers ------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const pct = (p) => `${(100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1)} %`;
const num = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toPrecision(digits));

// An output of the service, fetched with the token (an <img src> or a link cannot send it)
// and shown from a blob: URL; without a token the URL is used as it is.
async function authedBlobUrl(url) {
  const resp = await fetch(url, { headers: authHeaders() });
  if (!resp.ok) throw new ApiError(`http_${resp.status}`, `HTTP ${resp.status} for ${url}`);
  const blobUrl = URL.createObjectURL(await resp.blob());
  state.blobs.push(blobUrl);
  return blobUrl;
}

function releaseBlobs() {
  for (const u of state.blobs) URL.revokeObjectURL(u);
  state.blobs = [];
}

function figure(src, caption, alt, extraClass = "") {
  const img = el("img", { alt, class: `px ${extraClass}`.trim(), loading: "eager", decoding: "async", "data-src": src });
  if (src.startsWith("blob:") || !currentToken()) img.src = src;
  else authedBlobUrl(src).then((u) => { img.src = u; }, (err) => showError(err));
  return el("figure", {}, img, el("figcaption", { text: caption }));
}

// Faithfulness of a map (issue 13): RISE deletion / insertion AUCs of the explained class's
// probability beside a random pixel order's, as a sentence under the picture.
function faithfulnessSentence(f, className) {
  if (!f || typeof f.deletion_auc !== "number") return null;
  const del = f.deletion_auc, rdel = f.random_deletion_auc;
  const speed = del > 0 && rdel > del
    ? `removing its pixels first drops p(${className}) ${num(rdel / del, 2)}× faster than a random order`
    : `removing its pixels first drops p(${className}) no faster than a random order`;
  return `Faithfulness: deletion AUC ${num(del, 3)} (random ${num(rdel, 3)}), insertion AUC ${num(f.insertion_auc, 3)} `
    + `(random ${num(f.random_insertion_auc, 3)}): ${speed}.`;
}

function withFaithfulness(fig, f, className) {
  const text = faithfulnessSentence(f, className);
  if (fig && text) fig.querySelector("figcaption").append(el("span", { class: "faithfulness", text }));
  return fig;
}

function download(url, name, text) {
  const a = el("a", { href: url, download: name, text });
  a.addEventListener("click", async (e) => {
    if (!currentToken()) return; // the browser fetches it
    e.preventDefault();
    try {
      const tmp = el("a", { href: await authedBlobUrl(url), download: name });
      document.body.append(tmp);
      tmp.click();
      tmp.remove();
    } catch (err) {
      showError(err);
    }
  });
  return a;
}

function showError(err) {
  const box = $("error");
  box.textContent = typeof err === "string" ? err : describeError(err);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// --- models -------------------------------------------------------------------------------
function modelSummary(m) {
  const colour = m.in_channels === 1 ? "grey" : "colour";
  return `${m.name} (${m.num_classes} classes, ${m.input_size}×${m.input_size} ${colour})`;
}

function showModelInfo() {
  const box = $("model-info");
  box.replaceChildren();
  const m = state.models[$("model").value];
  if (!m) return;
  const classes = m.classes.slice(0, 12).join(", ") + (m.classes.length > 12 ? `, … (${m.classes.length})` : "");
  const dl = el("dl", { class: "facts" });
  const add = (k, v) => { if (v !== null && v !== undefined && v !== "") dl.append(el("dt", { text: k }), el("dd", { text: v })); };
  add("Architecture", m.arch + (m.arch_args && m.arch_args.depth ? `, depth ${m.arch_args.depth}` : ""));
  add("Input", `${m.input_size}×${m.input_size}, ${m.in_channels === 1 ? "grey-scale" : "RGB"}`);
  add("Classes", classes);
  const mt = m.metrics || {};
  const first = (...xs) => xs.find((x) => typeof x === "number");
  const testN = first(mt.test_n, mt.n);
  if (typeof mt.test_accuracy === "number") add("Test accuracy", pct(mt.test_accuracy) + (testN ? ` (n = ${testN})` : ""));
  const attackAra = first(mt.ara_attack, mt.attack_ara), btrAra = first(mt.ara_btr, mt.btr_ara);
  if (attackAra !== undefined) add("Attack ARA", num(attackAra, 3));
  if (btrAra !== undefined) add("BTR ARA", num(btrAra, 3));
  if (typeof mt.autoattack_accuracy === "number") {
    const aa = mt.autoattack_settings || {};
    add("AutoAttack accuracy", `${pct(mt.autoattack_accuracy)} (L2 ε ${num(aa.eps, 3)}, n = ${mt.autoattack_n}, `
      + `${(aa.attacks || []).join(" + ")})`);
  }
  if (typeof mt.sanity_adversarial_spearman === "number") {
    add("Maps after randomising the weights", `Spearman with the trained network's: Grad-CAM `
      + `${num(mt.sanity_gradcam_spearman, 2)}, explanations ${num(mt.sanity_adversarial_spearman, 2)}`);
  }
  if (typeof m.workers === "number") add("Workers", String(m.workers));
  box.append(dl);
}

async function loadModels() {
  const select = $("model");
  try {
    const { body } = await api("/v1/models");
    state.models = Object.fromEntries(body.models.map((m) => [m.name, m]));
    select.replaceChildren(...body.models.map((m) => el("option", { value: m.name, text: modelSummary(m) })));
    if (!body.models.length) {
      select.append(el("option", { value: "", text: "no models are served" }));
      showError("The service serves no models: start a worker with checkpoints (aex worker).");
    }
    if (body.default && state.models[body.default]) select.value = body.default;
    showModelInfo();
  } catch (err) {
    select.replaceChildren(el("option", { value: "", text: "the model list could not be loaded" }));
    showError(err);
    if (err.code === "unauthenticated" || err.code === "key_lost") $("token").focus();
  }
}

// --- the chosen file ----------------------------------------------------------------------
const PREVIEWABLE = /^image\/(png|jpeg|gif|bmp|webp)$/;

function setFile(file) {
  state.file = file || null;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = null;
  const preview = $("preview");
  preview.hidden = true;
  preview.removeAttribute("src");
  if (!file) {
    $("file-name").textContent = "No file chosen.";
    return;
  }
  const kb = (file.size / 1024).toFixed(file.size < 10240 ? 1 : 0);
  const dicom = /\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom";
  $("file-name").textContent = `${file.name} (${kb} KiB${dicom ? ", DICOM" : ""})`;
  if (PREVIEWABLE.test(file.type)) {
    state.previewUrl = URL.createObjectURL(file);
    preview.src = state.previewUrl;
    preview.hidden = false;
  }
  clearError();
}

function setupDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "dragend"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) setFile(file);
  });
  // A file dropped beside the zone must not make the browser leave the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

// --- jobs ---------------------------------------------------------------------------------
function setBusy(busy) {
  $("explain").disabled = busy;
  $("classify").disabled = busy;
  $("cancel").hidden = !busy;
}

function showProgress(view) {
  const bar = $("progress");
  const text = $("status-text");
  bar.hidden = false;
  const p = view.progress;
  if (view.status === "queued") {
    bar.removeAttribute("value");
    const pos = view.queue_position;
    text.textContent = pos === null || pos === undefined ? "Waiting in the queue…"
      : pos === 0 ? "Waiting in the queue: next in line." : `Waiting in the queue: ${pos} job(s) ahead.`;
  } else if (view.status === "running") {
    if (p && p.total) {
      bar.max = p.total;
      bar.value = p.done;
      const phase = p.phase && p.phase !== "search" ? ` (${p.phase})` : "";
      text.textContent = `Running${phase}: step ${p.done} of ${p.total}.`;
    } else {
      bar.removeAttribute("value");
      text.textContent = "Running…";
    }
  } else if (view.status === "finished") {
    bar.max = 1;
    bar.value = 1;
    const t = view.timings || {};
    const secs = typeof t.run_seconds === "number" ? ` in ${t.run_seconds.toFixed(1)} s` : "";
    const queued = typeof t.queued_seconds === "number" && t.queued_seconds >= 0.5
      ? ` after ${t.queued_seconds.toFixed(1)} s in the queue` : "";
    text.textContent = `Finished${secs}${queued}.`;
  } else {
    text.textContent = view.status === "cancelled" ? "Cancelled." : "Failed.";
  }
}

function stopPolling() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}

async function follow(view) {
  state.job = view;
  showProgress(view);
  if (view.status === "finished") {
    setBusy(false);
    renderResult(view);
    return;
  }
  if (view.status === "failed" || view.status === "cancelled") {
    setBusy(false);
    const e = view.error || { code: view.status === "cancelled" ? "job_cancelled" : "job_failed", message: "" };
    showError(new ApiError(e.code, e.message));
    return;
  }
  state.timer = setTimeout(async () => {
    try {
      const { body } = await api(view.url);
      follow(body);
    } catch (err) {
      setBusy(false);
      showError(err);
    }
  }, POLL_MS);
}

function targetsChosen() {
  const values = [...document.querySelectorAll('input[name="target"]:checked')].map((i) => i.value);
  return values.includes("all") ? ["predicted", "runner-up", "all"] : values;
}

function startForm(kind) {
  if (!state.file) throw new ApiError("bad_parameter", "choose an image or a DICOM file first");
  const model = $("model").value;
  if (!model) throw new ApiError("unknown_model", "no model is chosen (the model list did not load)");
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("model", model);
  if (kind === "explain") {
    const targets = targetsChosen();
    if (!targets.length) throw new ApiError("bad_parameter", "tick at least one class to explain toward");
    form.append("targets", targets.join(","));
    form.append("rho", $("rho").value);
    form.append("steps", $("steps").value);
  } else {
    form.append("top_k", String(Math.max(1, (state.models[model] || {}).num_classes || 5)));
    if ($("stability").checked) form.append("stability", "true");
  }
  return form;
}

async function submit(kind) {
  stopPolling();
  clearError();
  let form;
  try {
    form = startForm(kind);
  } catch (err) {
    showError(err);
    return;
  }
  $("results").hidden = true;
  setBusy(true);
  $("progress").hidden = false;
  $("progress").removeAttribute("value");
  $("status-text").textContent = "Uploading…";
  try {
    const { body } = await api(`/v1/${kind}`, { method: "POST", body: form });
    follow(body);
  } catch (err) {
    setBusy(false);
    $("progress").hidden = true;
    $("status-text").textContent = "Nothing was queued.";
    showError(err);
  }
}

async function cancel() {
  if (!state.job) return;
  try {
    const { body } = await api(state.job.url, { method: "DELETE" });
    $("status-text").textContent = body.status === "running" ? "Cancelling at the next step…" : "Cancelled.";
  } catch (err) {
    showError(err);
  }
}

// --- rendering a finished job -------------------------------------------------------------
function renderProbs(result) {
  const list = $("probs");
  const entries = Object.entries(result.probs || {}).sort((a, b) => b[1] - a[1]);
  const predicted = result.predicted ? result.predicted.class_name : null;
  list.replaceChildren(...entries.slice(0, MAX_BARS).map(([name, p]) => {
    const fill = el("span", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
    return el("li", { class: name === predicted ? "top" : null },
      el("span", { class: "name", text: name }),
      el("span", { class: "bar", "aria-hidden": "true" }, fill),
      el("span", { class: "value", text: pct(p) }));
  }));
  const note = $("probs-note");
  note.hidden = entries.length <= MAX_BARS;
  note.textContent = `The ${MAX_BARS} most probable of ${entries.length} classes.`;
}

function stabilitySentences(s) {
  const out = [];
  if (typeof s.attack_percentile === "number") {
    out.push(`This decision is more stable than ${Math.round(s.attack_percentile)}% of test images.`);
  } else {
    out.push("No comparison with test images: this checkpoint has no recorded reference radii.");
  }
  const details = [];
  details.push(`Smallest change that flips the decision: rms ${num(s.attack_rms, 3)}`
    + (s.attack_found === false ? " (not reached within the search: at least this much)" : "")
    + (typeof s.attack_percentile === "number" ? `, larger than for ${Math.round(s.attack_percentile)}% of test images.` : "."));
  details.push(`Smallest change that brings the predicted class down to chance: rms ${num(s.btr_rms, 3)}`
    + (s.btr_found === false ? " (not reached within the search: at least this much)" : "")
    + (typeof s.btr_percentile === "number" ? `, larger than for ${Math.round(s.btr_percentile)}% of test images.` : "."));
  if (s.reference_n) details.push(`Reference: ${s.reference_n} test images recorded in the checkpoint.`);
  if (s.comparable === false && typeof s.attack_percentile === "number") {
    details.push("The reference radii were searched with other settings than this score, so the comparison is approximate.");
  }
  return { headline: out.join(" "), details };
}

function renderStability(result) {
  const box = $("stability-box");
  const s = result.stability;
  box.hidden = !s;
  if (!s) return;
  const { headline, details } = stabilitySentences(s);
  $("stability-text").textContent = headline;
  $("stability-details").replaceChildren(...details.map((d) => el("li", { text: d })));
}

function renderGradcam(view) {
  const images = view.images || {};
  const box = $("gradcam");
  const figs = [];
  if (images["input.png"]) figs.push(figure(images["input.png"], "Input, as the model saw it", "The input image as the model saw it"));
  const cam = (view.result && view.result.gradcam) || {};
  const camClass = Object.keys((view.result && view.result.probs) || {})[cam.class_index];
  if (images["gradcam.png"]) {
    figs.push(withFaithfulness(figure(images["gradcam.png"], "Grad-CAM heat map", "Grad-CAM heat map of the predicted class"),
      cam.faithfulness, camClass));
  }
  if (images["gradcam_overlay.png"]) figs.push(figure(images["gradcam_overlay.png"], "Heat map over the input", "Grad-CAM heat map laid over the input"));
  if (!figs.length && state.previewUrl) figs.push(figure(state.previewUrl, "Input (your file)", "The uploaded image", "natural"));
  box.replaceChildren(...figs);
  $("gradcam-title").textContent = images["gradcam.png"] ? "Where the network looked (Grad-CAM)" : "Input";
  $("gradcam-box").hidden = !figs.length;
}

function roleWords(t) {
  if (t.role === "predicted") return "Predicted class";
  if (t.role === "runner-up") return "Runner-up class";
  return "Class";
}

function renderExplanations(view) {
  const targets = (view.result && view.result.targets) || [];
  const images = view.images || {};
  const classes = Object.keys(view.result.probs || {});
  const cards = targets.map((t) => {
    const imageUrl = t.image_url || images[t.image];
    const diffUrl = t.difference_url || images[t.difference];
    const after = classes[t.predicted_after];
    const facts = el("ul", { class: "plain facts-list" },
      el("li", { text: `p(${t.class_name}): ${pct(t.prob_before)} → ${pct(t.prob_after)}` }),
      el("li", { text: `rms(δ) = ${num(t.rms, 3)}` }),
      after !== undefined ? el("li", { text: `decision afterwards: ${after}` }) : null);
    const dicom = [[t.dicom_url, t.dicom, "x + δ"], [t.dicom_difference_url, t.dicom_difference, "δ amplified"]]
      .filter(([url]) => url)
      .map(([url, name, label]) => download(url, name, `${label} (DICOM)`));
    return el("article", { class: "card" },
      el("h4", {}, el("span", { class: "role", text: `${roleWords(t)}: ` }), t.class_name),
      facts,
      dicom.length ? el("p", { class: "downloads" }, ...dicom.flatMap((a, i) => (i ? [" · ", a] : [a]))) : null,
      el("div", { class: "figures" },
        imageUrl ? figure(imageUrl, `x + δ toward ${t.class_name}`, `Explanation image toward ${t.class_name}`) : null,
        diffUrl
          ? withFaithfulness(figure(diffUrl, "δ amplified", `Amplified perturbation toward ${t.class_name}`),
            t.faithfulness, t.class_name)
          : null));
  });
  $("explanations").replaceChildren(...cards);
  $("explanations-box").hidden = !cards.length;
}

function dicomLinks(view) {
  for (const holder of [view, view.result || {}]) {
    const links = holder.dicom;
    if (links && typeof links === "object" && !Array.isArray(links)) return links;
  }
  return {};
}

function renderDicom(view) {
  const links = Object.entries(dicomLinks(view));
  const problem = view.result && view.result.dicom_error;
  const items = links.map(([name, url]) =>
    el("li", {}, download(url, name.endsWith(".dcm") ? name : `${name}.dcm`, name)));
  if (problem) items.push(el("li", { class: "hint", text: problem }));
  $("dicom").replaceChildren(...items);
  $("dicom-box").hidden = !items.length;
}

function inputWords(view) {
  // How a DICOM input was read (from the provenance); nothing for ordinary images.
  const info = view.result && view.result.provenance && view.result.provenance.input;
  if (!info || info.format !== "dicom") return "";
  const parts = [info.modality, info.photometric_interpretation,
    info.rows && info.columns ? `${info.columns}×${info.rows}` : null,
    info.window ? `window ${info.window.map((v) => num(v, 4)).join(" / ")}` : "no window",
    info.inverted ? "inverted (MONOCHROME1)" : null].filter(Boolean);
  return ` DICOM input: ${parts.join(", ")}.`;
}

function renderResult(view) {
  releaseBlobs();
  const r = view.result || {};
  const pred = r.predicted || {};
  const second = r.runner_up || (r.top && r.top[1]);
  const headline = $("headline");
  headline.replaceChildren("Predicted: ", el("strong", { text: pred.class_name }),
    ` (${pct(pred.prob)})` + (second ? `; runner-up: ${second.class_name} (${pct(second.prob)})` : "")
    + (view.model ? ` by ${view.model}.` : ".") + inputWords(view));
  if (r.reused) {
    $("status-text").textContent = "Finished: answered from an identical earlier request"
      + (r.reused_from ? ` (job ${r.reused_from})` : "") + ".";
  }
  renderProbs(r);
  renderGradcam(view);
  renderStability(r);
  renderExplanations(view);
  renderDicom(view);
  const provenance = r.provenance || view.provenance;
  $("provenance-box").hidden = !provenance;
  $("provenance").textContent = provenance ? JSON.stringify(provenance, null, 2) : "";
  $("raw").textContent = JSON.stringify(view, null, 2);
  $("results").hidden = false;
}

// --- start --------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  setupDrop();
  showTokenState();
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    setToken(value);
    clearError();
    loadModels();
  });
  $("token-forget").addEventListener("click", () => { setToken(""); loadModels(); });
  $("model").addEventListener("change", showModelInfo);
  $("form").addEventListener("submit", (e) => { e.preventDefault(); submit("explain"); });
  $("classify").addEventListener("click", () => submit("classify"));
  $("cancel").addEventListener("click", cancel);
  loadModels();
});
