// @ts-check
// LoRA Workbench: helpers shared by the pack's extensions (no extension is registered here).
// ComfyUI imports every .js file of web/ as a module; this one only exports.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const PACK = "lora_workbench";
export const NONE = "None";

/** Element helper: h("div.lw-a.lw-b", {title: "x", onclick: f}, child, "text", ...). */
export function h(tag, attrs = {}, ...children) {
  const [name, ...classes] = tag.split(".");
  const el = document.createElement(name || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function findWidget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

export function inputIndex(node, name) {
  return node.inputs?.findIndex((i) => i.name === name) ?? -1;
}

export function isInputLinked(node, name) {
  const index = inputIndex(node, name);
  return index >= 0 && node.inputs[index].link != null;
}

/** The widget's combo options, whatever form the frontend keeps them in. */
export function comboValues(widget) {
  let values = widget?.options?.values;
  if (typeof values === "function") values = values(widget, widget.node);
  if (Array.isArray(values)) return values;
  return values ? Object.keys(values) : [];
}

/** Call a node's existing method, then ours (the chaining every ComfyUI extension does). */
export function chain(object, method, fn) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    fn.apply(this, args);
    return result;
  };
}

export function redraw(node) {
  node?.setDirtyCanvas?.(true, true);
  app.canvas?.setDirty?.(true, true);
}

/** Resize a node's height to what its widgets need (width kept, never narrower than minWidth). */
export function fitHeight(node, minWidth = 0) {
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0], minWidth), size[1]]);
    redraw(node);
  });
}

export function toast(severity, summary, detail, life = 2500) {
  try {
    app.extensionManager?.toast?.add({ severity, summary, detail, life });
  } catch {
    // toasts are a nicety; the action itself already happened
  }
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // http on a LAN address is not a secure context: fall back to a selected textarea
    const area = h("textarea", { style: { position: "fixed", left: "-1000px", top: "0" } });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  toast("success", "Copied", `'${text}' is on the clipboard`, 1800);
}

export function fmtNumber(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const rounded = Number(value).toFixed(digits);
  return rounded.replace(/\.?0+$/, "") || "0";
}

export function fmtBytes(bytes) {
  if (!Number.isFinite(bytes)) return "";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 ** 2) return `${(bytes / 1024).toFixed(0)} KB`;
  if (bytes < 1024 ** 3) return `${(bytes / 1024 ** 2).toFixed(1)} MB`;
  return `${(bytes / 1024 ** 3).toFixed(2)} GB`;
}

export function fmtSeconds(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

// ---------------------------------------------------------------- LoRA info (GET /lora_workbench/info)

const infoCache = new Map(); // name -> Promise<{ok, status, info|error}>

export function fetchInfo(name, { fresh = false } = {}) {
  if (!name || name === NONE) return Promise.resolve({ ok: false, status: 0, error: "no LoRA picked" });
  if (fresh || !infoCache.has(name)) {
    const request = api
      .fetchApi(`/${PACK}/info?name=${encodeURIComponent(name)}`)
      .then(async (response) => {
        const body = await response.json().catch(() => ({}));
        return response.ok
          ? { ok: true, status: response.status, info: body }
          : { ok: false, status: response.status, error: body.error || `HTTP ${response.status}` };
      })
      .catch((err) => ({ ok: false, status: 0, error: `cannot reach the server (${err.message})` }));
    infoCache.set(name, request);
    request.then((result) => {
      if (!result.ok) infoCache.delete(name); // a missing file may appear later
    });
  }
  return infoCache.get(name);
}

/** Forget cached info (after a run wrote a LoRA of the same name, or a models refresh). */
export function clearInfoCache() {
  infoCache.clear();
}

function provenanceSummary(provenance) {
  if (!provenance || typeof provenance !== "object" || !Object.keys(provenance).length) return [];
  const lines = [];
  if (Array.isArray(provenance.parents)) {
    const parents = provenance.parents.map((p) => `${p.name} ×${fmtNumber(p.weight, 2)}`).join(", ");
    lines.push(`merged (${provenance.method || "?"}) from ${parents}`);
  }
  if (Array.isArray(provenance.images_sha256)) {
    const s = provenance.settings || {};
    const bits = [`${provenance.images_sha256.length} images`];
    if (Array.isArray(provenance.reg_images_sha256)) bits.push(`${provenance.reg_images_sha256.length} regularisation images`);
    if (s.steps) bits.push(`${s.steps} steps`);
    if (s.learning_rate) bits.push(`lr ${s.learning_rate}`);
    if (s.resolution) bits.push(`${s.resolution}px`);
    if (s.preserve_untriggered) {
      const weight = Number(s.preservation_weight ?? 1);
      bits.push(weight === 1 ? "output preservation" : `output preservation ×${fmtNumber(weight, 2)}`);
    }
    lines.push(`trained in LoRA Workbench on ${bits.join(", ")}`);
  }
  if (provenance.base_model_sha256) lines.push(`base model sha256 ${String(provenance.base_model_sha256).slice(0, 12)}…`);
  if (provenance.date) lines.push(`date ${provenance.date}`);
  if (provenance.pack_version) lines.push(`LoRA Workbench ${provenance.pack_version}`);
  if (!lines.length) lines.push(`${Object.keys(provenance).length} provenance fields`);
  return lines;
}

/** The info panel's content for one /info answer (used inline and in popovers). */
export function renderInfo(result, { compact = false } = {}) {
  if (!result) return h("div.lw-info.lw-muted", {}, "loading…");
  if (!result.ok) return h("div.lw-info.lw-info-error", { dataset: { status: String(result.status) } }, result.error);
  const info = result.info;
  const facts = [
    info.family && info.family !== "unknown" ? info.family : info.base_model || "base model unknown",
    info.rank ? `rank ${info.rank}` : null,
    info.alpha ? `alpha ${fmtNumber(Number(info.alpha), 2)}` : null,
    `${info.modules} modules`,
    fmtBytes(info.size_bytes),
  ].filter(Boolean);
  const triggers = (info.trigger_words || []).map((word) =>
    h("button.lw-chip.lw-trigger", {
      title: `Copy '${word}'`,
      dataset: { word },
      onclick: (event) => {
        event.stopPropagation();
        copyText(word);
      },
    }, word),
  );
  const provenance = provenanceSummary(info.provenance);
  const body = h("div.lw-info", { dataset: { name: info.name } },
    compact ? null : h("div.lw-info-title", {}, info.title || info.name),
    h("div.lw-info-facts", {}, facts.join(" · ")),
    h("div.lw-info-row", {},
      h("span.lw-label", {}, "Trigger"),
      triggers.length ? h("span.lw-chips", {}, triggers) : h("span.lw-muted", {}, "none in the file")),
    info.scope ? h("div.lw-info-row", {}, h("span.lw-label", {}, "Scope"), h("span.lw-scope", {}, info.scope)) : null,
    provenance.length
      ? h("div.lw-info-row", {}, h("span.lw-label", {}, "Origin"),
        h("span.lw-provenance", {}, provenance.map((line) => h("div", {}, line))))
      : null,
  );
  return body;
}

// ---------------------------------------------------------------- floating panels

let openPanel = null;

export function closePanel() {
  if (openPanel) {
    openPanel.remove();
    openPanel = null;
  }
}

/** A floating panel (info, LoRA picker) next to `anchor`; closes on outside click or Escape. */
export function showPanel(anchor, content, { className = "", width = 320 } = {}) {
  closePanel();
  const panel = h(`div.lw-panel${className ? "." + className : ""}`, {
    style: { width: `${width}px` },
    onpointerdown: (e) => e.stopPropagation(),
    onwheel: (e) => e.stopPropagation(),
  }, content);
  document.body.append(panel);
  const box = anchor.getBoundingClientRect();
  const left = Math.min(box.left, window.innerWidth - width - 8);
  const below = box.bottom + 4;
  panel.style.left = `${Math.max(8, left)}px`;
  panel.style.top = `${below}px`;
  requestAnimationFrame(() => {
    const height = panel.getBoundingClientRect().height;
    if (below + height > window.innerHeight - 8) panel.style.top = `${Math.max(8, box.top - height - 4)}px`;
  });
  openPanel = panel;
  return panel;
}

document.addEventListener("pointerdown", (event) => {
  if (openPanel && !openPanel.contains(event.target)) closePanel();
}, true);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closePanel();
});

/** Info popover for a LoRA name, anchored at a button. */
export function showInfoPanel(anchor, name) {
  const panel = showPanel(anchor, h("div.lw-muted", {}, `reading ${name}…`), { className: "lw-info-panel" });
  fetchInfo(name).then((result) => {
    if (openPanel !== panel) return;
    panel.replaceChildren(renderInfo(result));
  });
  return panel;
}

/** A searchable LoRA picker; calls onPick(value). */
export function showPicker(anchor, values, current, onPick) {
  const list = h("div.lw-picker-list");
  const filter = h("input.lw-picker-filter", { type: "text", placeholder: "Filter LoRAs…", spellcheck: false });
  const panel = showPanel(anchor, [filter, list], { className: "lw-picker", width: Math.max(260, anchor.offsetWidth) });
  let active = 0;
  let shown = [];
  const render = () => {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    shown = values.filter((v) => words.every((w) => String(v).toLowerCase().includes(w)));
    active = Math.min(active, Math.max(0, shown.length - 1));
    list.replaceChildren(...shown.map((value, i) =>
      h(`div.lw-picker-item${value === current ? ".lw-current" : ""}${i === active ? ".lw-active" : ""}`, {
        dataset: { value },
        onclick: () => {
          closePanel();
          onPick(value);
        },
      }, String(value))));
    if (!shown.length) list.append(h("div.lw-muted", {}, "no LoRA matches"));
  };
  filter.addEventListener("input", () => {
    active = 0;
    render();
  });
  filter.addEventListener("keydown", (event) => {
    event.stopPropagation(); // keep ComfyUI's shortcuts away while typing
    if (event.key === "ArrowDown") active = Math.min(active + 1, shown.length - 1);
    else if (event.key === "ArrowUp") active = Math.max(active - 1, 0);
    else if (event.key === "Enter" && shown[active] !== undefined) {
      closePanel();
      onPick(shown[active]);
      return;
    } else if (event.key === "Escape") {
      closePanel();
      return;
    } else return;
    event.preventDefault();
    render();
    list.children[active]?.scrollIntoView({ block: "nearest" });
  });
  active = Math.max(0, values.indexOf(current));
  render();
  requestAnimationFrame(() => {
    filter.focus();
    list.querySelector(".lw-active")?.scrollIntoView({ block: "nearest" });
  });
  return panel;
}

// ---------------------------------------------------------------- styles (web/lw_workbench.css)

let styled = false;
/** Load web/lw_workbench.css once (a <link> beside this module); lw_common.js calls it when imported. */
export function injectStyle() {
  if (styled || document.getElementById("lora-workbench-style")) return;
  styled = true;
  document.head.append(h("link", { id: "lora-workbench-style", rel: "stylesheet",
    href: new URL("./lw_workbench.css", import.meta.url).href }));
}
injectStyle();
