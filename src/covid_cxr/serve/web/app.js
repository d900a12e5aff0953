// The analysis page: upload (picker or drag-and-drop) -> POST /explain -> report.
// Plain browser JavaScript: no build step, no external resources.
"use strict";

const CLASSES = ["COVID", "Normal", "Viral Pneumonia"];
const $ = (id) => document.getElementById(id);
let busy = false;
let lastFile = null;  // the film whose result is shown: the report button re-posts it to /report

function authHeaders() {
  const t = $("token").value.trim();
  return t ? { Authorization: "Bearer " + t } : {};
}

function setStatus(text) { $("status").textContent = text || ""; }

function showError(text) {
  $("report").hidden = true;
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// The server answers every rejection with JSON {error, detail}; BentoML's own
// request validation uses {error, detail: [{msg}, ...]}.
function describeError(status, body, filename) {
  const prefix = "Could not analyse " + (filename ? "\u201c" + filename + "\u201d" : "the file") + ": ";
  if (status === 401) {
    $("auth").open = true;
    return "This server needs an API token. Enter it under \u201cAPI token\u201d and upload again.";
  }
  if (body && typeof body.detail === "string") return prefix + body.detail + ".";
  if (body && Array.isArray(body.detail) && body.detail.length) {
    return prefix + body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ") + ".";
  }
  if (body && body.error) return prefix + body.error + ".";
  if (Array.isArray(body) && body[0] && body[0].error) return prefix + body[0].error + ".";
  return prefix + "the server answered HTTP " + status + ".";
}

function capitalise(t) { return t ? t.charAt(0).toUpperCase() + t.slice(1) : t; }

function render(res, filename) {
  $("xray").src = "data:image/png;base64," + res.image_png;
  $("heatmap").src = "data:image/png;base64," + res.heatmap_png;
  $("filename").textContent = filename || "";
  $("explained").textContent = res.explained_class || res.label;
  $("cam-method").textContent = res.cam_method || "Grad-CAM";
  const tbody = $("probs").querySelector("tbody");
  tbody.replaceChildren();
  for (const c of CLASSES) {
    const tr = document.createElement("tr");
    tr.dataset.cls = c;
    if (c === res.label) tr.className = "top";
    const name = document.createElement("td");
    name.textContent = c;
    const p = document.createElement("td");
    p.textContent = (100 * res.probabilities[c]).toFixed(2);
    tr.append(name, p);
    tbody.append(tr);
  }
  // "refer" is an answer of its own: lead with it, and never present the label as the answer.
  const refer = res.verdict === "refer";
  $("refer").hidden = !refer;
  $("refer-msg").textContent = refer ? capitalise(res.message || "the model cannot judge this film") + "." : "";
  $("label-box").hidden = refer;
  $("refer-label").hidden = !refer;
  $("label").textContent = refer ? "" : res.label;
  $("top-class").textContent = res.label;
  $("report").hidden = false;
}

async function analyse(file) {
  if (!file || busy) return;
  busy = true;
  clearError();
  $("report").hidden = true;  // never show the previous film's report beside a new upload
  lastFile = null;
  $("download-status").textContent = "";
  setStatus("Analysing " + file.name + " \u2026");
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    let resp;
    try {
      resp = await fetch("/explain", { method: "POST", headers: authHeaders(), body: form });
    } catch (e) {
      showError("Could not reach the server (" + e.message + "). Is it still running?");
      return;
    }
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      showError(describeError(resp.status, body, file.name));
      return;
    }
    render(body, file.name);
    lastFile = file;
    if (!$("model-info").textContent) loadMetadata();
  } finally {
    busy = false;
    setStatus("");
    $("file").value = "";
  }
}

// The analysis report (PDF): the same film re-posted to /report, saved through a blob URL.
async function downloadReport() {
  const file = lastFile;
  const btn = $("download-report");
  if (!file || btn.disabled) return;
  btn.disabled = true;
  $("download-status").textContent = "Preparing the report \u2026";
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("format", "pdf");
  try {
    const resp = await fetch("/report", { method: "POST", headers: authHeaders(), body: form });
    if (!resp.ok) {
      let body = null;
      try { body = await resp.json(); } catch (e) { body = null; }
      $("download-status").textContent = describeError(resp.status, body, file.name);
      return;
    }
    const blob = await resp.blob();
    const m = /filename="([^"]+)"/.exec(resp.headers.get("Content-Disposition") || "");
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = m ? m[1] : "covid-cxr-report.pdf";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    $("download-status").textContent = "";
  } catch (e) {
    $("download-status").textContent = "Could not reach the server (" + e.message + ").";
  } finally {
    btn.disabled = false;
  }
}

async function loadMetadata() {
  try {
    const r = await fetch("/metadata", { headers: authHeaders() });
    if (!r.ok) return;
    const m = await r.json();
    const parts = ["Model " + m.model];
    if (m.arch) parts.push(m.arch + " @ " + m.image_size + " px");
    if (m.data_version) parts.push("data " + String(m.data_version).slice(0, 12));
    if (m.metrics && typeof m.metrics.accuracy === "number") {
      parts.push("test accuracy " + (100 * m.metrics.accuracy).toFixed(1) + " %");
    }
    $("model-info").textContent = parts.join(" \u00b7 ");
  } catch (e) { /* the footer is optional */ }
}

function init() {
  const zone = $("dropzone");
  const input = $("file");
  const saved = sessionStorage.getItem("covid-cxr-token");
  if (saved) $("token").value = saved;
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("covid-cxr-token", $("token").value.trim());
    loadMetadata();
  });
  input.addEventListener("change", () => analyse(input.files[0]));
  $("download-report").addEventListener("click", downloadReport);
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  for (const ev of ["dragenter", "dragover"]) {
    zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => {
    const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (f) analyse(f);
  });
  // A file dropped outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  loadMetadata();
}

init();
