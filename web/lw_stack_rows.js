// @ts-check
// LoRA Workbench: row editor for Stack LoRA (6 rows) and Merge LoRA (4 rows).
//
// The nodes keep fixed rows of plain widgets (lora_N, on_N, strength_model_N, strength_clip_N)
// and an optional LW_LORA input lora_N_in, so a workflow is the same with or without this
// extension. The editor hides those widgets and shows the rows in use as cards: add, remove,
// reorder (arrows or drag), toggle, pick a LoRA, set strengths with sliders; after a run it shows
// each row's effective (clamped) strength beside the requested one (ui output lw_effective).
// Stack LoRA rows also carry block weights (blocks_N, a STRING widget): a compact text field with
// preset suggestions; after a run it says how many blocks the vector reached and which are off.
// Rows in use are always rows 1..K: K = max(last row with a LoRA or a link, properties.lw_rows),
// so a saved workflow reloads with the same rows.
import { app } from "../../scripts/app.js";
import {
  NONE, chain, closePanel, comboValues, findWidget, fitHeight, fmtNumber, h, injectStyle, inputIndex,
  isInputLinked, redraw, showInfoPanel, showPicker,
} from "./lw_common.js";

const NODE_TYPES = new Set(["LW_StackLoRA", "LW_MergeLoRA"]);
const FIELDS = ["lora", "on", "strength_model", "strength_clip", "blocks"]; // blocks: Stack LoRA only
const SLIDER_RANGE = 2; // sliders span -2..2; the number box takes the node's full -10..10
const ROW_HEIGHT = 84; // a row card (76 px) and the gap after it
const BLOCKS_HEIGHT = 24; // the block weights line of a Stack LoRA row
// The LoRA Block Weight presets people share (lora_core/patching/block_weights.py has their vectors).
const BLOCK_PRESETS = ["ALL", "NONE", "INS", "IND", "INALL", "MIDD", "MOUT", "OUTD", "OUTS", "OUTALL", "ALL0.5",
  "SDXL-ALL", "SDXL-INALL", "SDXL-MIDALL", "SDXL-OUTALL", "FLUX-DBL-FRONT", "FLUX-DBL-MID", "FLUX-DBL-TAIL"];
const BLOCKS_HELP = "Block weights (LoRA Block Weight convention): BASE (text encoder and non-block layers) first, "
  + "then one value per block the LoRA touches (SD1.x 17 values, SDXL 12, Flux: double then single blocks), "
  + "a preset (SD-MIDD, SDXL-OUTALL, ALL, OUTD, ...) or a %spec (%default=0,base=1,out=1). Empty: every block at 1.";
const FOOTER_HEIGHT = 26 + 20; // the add button, and the DOM widget's margins (10 px each side)
const MIN_WIDTH = 430;

const fieldName = (field, row) => `${field}_${row}`;

function rowHeight(node) {
  return ROW_HEIGHT + (findWidget(node, "blocks_1") ? BLOCKS_HEIGHT : 0);
}

function rowTotal(node) {
  return (node.widgets || []).filter((w) => /^lora_\d+$/.test(w.name)).length;
}

function rowWidgets(node, row) {
  return Object.fromEntries(FIELDS.map((f) => [f, findWidget(node, fieldName(f, row))]));
}

/** Names of the inputs that belong to a row: its LW_LORA socket and its widgets' sockets. */
function rowInputNames(row) {
  return [`lora_${row}_in`, ...FIELDS.map((f) => fieldName(f, row))];
}

function linkedLora(node, row) {
  const index = inputIndex(node, `lora_${row}_in`);
  if (index < 0 || node.inputs[index].link == null) return null;
  const source = node.getInputNode?.(index);
  return source ? (source.title || source.type) : "connected";
}

function rowUsed(node, row) {
  const w = rowWidgets(node, row);
  return (w.lora && w.lora.value !== NONE && w.lora.value != null) || linkedLora(node, row) !== null;
}

export function visibleRows(node) {
  const total = rowTotal(node);
  let last = 0;
  for (let row = 1; row <= total; row++) if (rowUsed(node, row)) last = row;
  const kept = Number(node.properties?.lw_rows) || 0;
  return Math.min(total, Math.max(1, last, kept));
}

function setRowCount(node, count) {
  node.properties = node.properties || {};
  node.properties.lw_rows = count;
}

/** Row values and links; a change the editor did not make itself (undo, paste, a script) re-renders it. */
function signature(node) {
  const parts = [];
  for (let row = 1; row <= rowTotal(node); row++) {
    const w = rowWidgets(node, row);
    parts.push(FIELDS.map((f) => String(w[f]?.value)).join(","), linkedLora(node, row) ?? "");
    for (const name of rowInputNames(row).slice(1)) parts.push(isInputLinked(node, name) ? "L" : "");
  }
  return parts.join("|");
}

function setValue(node, widget, value) {
  if (!widget) return;
  widget.value = value;
  widget.callback?.(widget.value, app.canvas, node);
  redraw(node);
}

// ---------------------------------------------------------------- moving rows (values and links)

function takeLinks(node, row) {
  const links = {};
  for (const name of rowInputNames(row)) {
    const index = inputIndex(node, name);
    if (index < 0 || node.inputs[index].link == null) continue;
    const link = node.getInputLink ? node.getInputLink(index) : node.graph?.links?.[node.inputs[index].link];
    if (link) links[name.replace(`_${row}`, "_#")] = [link.origin_id, link.origin_slot];
    node.disconnectInput(index);
  }
  return links;
}

function putLinks(node, row, links) {
  for (const [pattern, [originId, originSlot]] of Object.entries(links)) {
    const origin = node.graph?.getNodeById(originId);
    const index = inputIndex(node, pattern.replace("_#", `_${row}`));
    if (origin && index >= 0) origin.connect(originSlot, node, index);
  }
}

function swapRows(node, a, b) {
  const wa = rowWidgets(node, a);
  const wb = rowWidgets(node, b);
  const linksA = takeLinks(node, a);
  const linksB = takeLinks(node, b);
  for (const f of FIELDS) {
    const va = wa[f]?.value;
    setValue(node, wa[f], wb[f]?.value);
    setValue(node, wb[f], va);
  }
  putLinks(node, a, linksB);
  putLinks(node, b, linksA);
  const eff = node.lw_effective;
  if (eff) [eff[a], eff[b]] = [eff[b], eff[a]];
}

function clearRow(node, row) {
  const w = rowWidgets(node, row);
  takeLinks(node, row);
  setValue(node, w.lora, NONE);
  setValue(node, w.on, true);
  setValue(node, w.strength_model, 1.0);
  setValue(node, w.strength_clip, 1.0);
  setValue(node, w.blocks, "");
  if (node.lw_effective) delete node.lw_effective[row];
}

export function addRow(node) {
  const count = visibleRows(node);
  if (count >= rowTotal(node)) return false;
  clearRow(node, count + 1);
  setRowCount(node, count + 1);
  refresh(node);
  return true;
}

export function removeRow(node, row) {
  const count = visibleRows(node);
  for (let r = row; r < count; r++) swapRows(node, r, r + 1);
  clearRow(node, count);
  setRowCount(node, Math.max(1, count - 1));
  refresh(node);
}

export function moveRow(node, from, to) {
  const count = visibleRows(node);
  if (to < 1 || to > count || from === to) return;
  const step = from < to ? 1 : -1;
  for (let r = from; r !== to; r += step) swapRows(node, r, r + step);
  refresh(node);
}

// ---------------------------------------------------------------- effective strengths (onExecuted)

/** ui.lw_effective rows: [name, requested_model, effective_model, requested_clip, effective_clip,
 *  model strength per block or null]. */
function readEffective(node, output) {
  const rows = output?.lw_effective;
  if (!Array.isArray(rows)) return;
  const byRow = {};
  for (const entry of rows) {
    const match = /^row (\d+): (.*)$/.exec(String(entry[0]));
    if (!match) continue;
    const row = Number(match[1]);
    const w = rowWidgets(node, row);
    byRow[row] = {
      lora: w.lora?.value, on: w.on?.value !== false, name: match[2],
      model: [Number(entry[1]), Number(entry[2])],
      clip: [Number(entry[3]), Number(entry[4])],
      blocks: entry[5] && typeof entry[5] === "object" ? entry[5] : null, blocksText: w.blocks?.value ?? "",
    };
  }
  node.lw_effective = byRow;
  refresh(node);
}

function effectiveLabel(node, row, which, requested) {
  const eff = node.lw_effective?.[row];
  if (!eff || eff.lora !== rowWidgets(node, row).lora?.value) return null;
  const [req, value] = eff[which];
  if (!eff.on) {
    const dataset = { effective: "0", requested: String(req) };
    const switched = rowWidgets(node, row).on?.value !== false;
    return h(`span.lw-eff${switched ? ".lw-stale" : ""}`,
      { title: "this row was off in the last run: it contributed nothing", dataset }, "off");
  }
  const clamped = Math.abs(value - req) > 1e-6;
  const stale = Math.abs(req - requested) > 1e-9;
  const title = stale
    ? `last run: ${fmtNumber(req)} requested -> ${fmtNumber(value)} applied (strength changed since)`
    : clamped ? `clamped: ${fmtNumber(req)} requested -> ${fmtNumber(value)} applied` : "applied as requested";
  return h(`span.lw-eff${clamped ? ".lw-clamped" : ""}${stale ? ".lw-stale" : ""}`,
    { title, dataset: { effective: String(value), requested: String(req) } }, `→ ${fmtNumber(value)}`);
}

// ---------------------------------------------------------------- rendering

function strengthControl(node, row, field, label) {
  const widget = findWidget(node, fieldName(field, row));
  const linked = isInputLinked(node, fieldName(field, row));
  const value = Number(widget?.value ?? 1);
  const min = widget?.options?.min ?? -10;
  const max = widget?.options?.max ?? 10;
  const slider = h("input", {
    type: "range", min: -SLIDER_RANGE, max: SLIDER_RANGE, step: 0.01, disabled: linked,
    title: `${label} strength (drag; type beyond ±${SLIDER_RANGE} in the box)`, dataset: { field },
  });
  slider.value = String(Math.max(-SLIDER_RANGE, Math.min(SLIDER_RANGE, value)));
  const box = h("input.lw-num", { type: "number", min, max, step: 0.05, disabled: linked, dataset: { field } });
  box.value = value.toFixed(2);
  const commit = (raw, fromSlider) => {
    let v = Number(raw);
    if (!Number.isFinite(v)) return;
    v = Math.max(min, Math.min(max, Math.round(v * 100) / 100));
    setValue(node, widget, v);
    node.lw_signature = signature(node);
    if (fromSlider) box.value = v.toFixed(2);
    else slider.value = String(Math.max(-SLIDER_RANGE, Math.min(SLIDER_RANGE, v)));
    const eff = effectiveLabel(node, row, field === "strength_model" ? "model" : "clip", v);
    effSlot.replaceChildren(...(eff ? [eff] : []));
  };
  slider.addEventListener("input", () => commit(slider.value, true));
  box.addEventListener("change", () => commit(box.value, false));
  box.addEventListener("keydown", (e) => e.stopPropagation());
  const eff = effectiveLabel(node, row, field === "strength_model" ? "model" : "clip", value);
  const effSlot = h("span", {}, eff);
  return h("div.lw-strength", {}, h("span.lw-muted", {}, linked ? `${label} ⛓` : label), slider, box, effSlot);
}

function blockSummary(node, row) {
  const eff = node.lw_effective?.[row];
  if (!eff || !eff.on || !eff.blocks || eff.lora !== rowWidgets(node, row).lora?.value) return null;
  const entries = Object.entries(eff.blocks);
  const off = entries.filter(([, v]) => Number(v) === 0).map(([k]) => k);
  const stale = (rowWidgets(node, row).blocks?.value ?? "") !== eff.blocksText;
  const title = `${stale ? "last run (block weights changed since): " : "last run: "}model strength per block: `
    + entries.map(([k, v]) => `${k} ${fmtNumber(Number(v))}`).join(", ");
  return h(`span.lw-eff${stale ? ".lw-stale" : ""}`, { title, dataset: { blocks: String(entries.length) } },
    `${entries.length} blocks${off.length ? `, ${off.length} off` : ""}`);
}

function ensurePresetList() {
  if (document.getElementById("lw-block-presets")) return;
  document.body.append(h("datalist", { id: "lw-block-presets" }, BLOCK_PRESETS.map((p) => h("option", { value: p }))));
}

function blocksControl(node, row) {
  const widget = findWidget(node, fieldName("blocks", row));
  if (!widget) return null; // Merge LoRA rows have no block weights
  ensurePresetList();
  const linked = isInputLinked(node, fieldName("blocks", row));
  const box = h("input.lw-blocks-text", {
    type: "text", disabled: linked, placeholder: "all blocks 1 · e.g. MIDD or 1,0,0,…", title: BLOCKS_HELP,
    spellcheck: false, dataset: { field: "blocks" }, list: "lw-block-presets",
  });
  box.value = String(widget.value ?? "");
  const effSlot = h("span", {}, blockSummary(node, row));
  box.addEventListener("change", () => {
    setValue(node, widget, box.value.trim());
    node.lw_signature = signature(node);
    effSlot.replaceChildren(...[blockSummary(node, row)].filter(Boolean));
  });
  box.addEventListener("keydown", (e) => e.stopPropagation());
  return h("div.lw-blocks", {}, h("span.lw-muted", {}, linked ? "blocks ⛓" : "blocks"), box, effSlot);
}

function renderRow(node, row, count) {
  const w = rowWidgets(node, row);
  const on = w.on?.value !== false;
  const linked = linkedLora(node, row);
  const loraName = w.lora?.value ?? NONE;
  const toggle = h("input.lw-toggle", {
    type: "checkbox", checked: on, title: on ? "On: click to switch this LoRA off" : "Off: click to switch it on",
    onchange: (e) => {
      setValue(node, w.on, e.target.checked);
      refresh(node);
    },
  });
  const picker = linked
    ? h("span.lw-linked", { title: `LoRA ${row} comes from the connected node '${linked}'` }, `⟵ ${linked}`)
    : h(`button.lw-btn.lw-pick${loraName === NONE ? ".lw-none" : ""}`, {
      title: "Pick a LoRA file",
      onclick: (e) => {
        e.stopPropagation();
        showPicker(e.currentTarget, comboValues(w.lora), loraName, (value) => {
          setValue(node, w.lora, value);
          refresh(node);
        });
      },
    }, loraName === NONE ? "pick a LoRA…" : loraName);
  const info = h("button.lw-btn.lw-icon.lw-info-btn", {
    title: "Trigger words, base model, rank, scope", disabled: linked || loraName === NONE,
    onclick: (e) => {
      e.stopPropagation();
      showInfoPanel(e.currentTarget, loraName);
    },
  }, h("i.pi.pi-info-circle"));
  const button = (name, title, disabled, onclick, icon) =>
    h(`button.lw-btn.lw-icon.${name}`, { title, disabled, onclick }, h(`i.pi.${icon}`));
  const up = button("lw-up", "Move up", row === 1, () => moveRow(node, row, row - 1), "pi-arrow-up");
  const down = button("lw-down", "Move down", row === count, () => moveRow(node, row, row + 1), "pi-arrow-down");
  const remove = button("lw-remove", "Remove this row", false, () => removeRow(node, row), "pi-times");
  const handle = h("span.lw-handle", { title: "Drag to reorder", draggable: "true" }, h("i.pi.pi-bars"));

  const card = h(`div.lw-row${on ? "" : ".lw-off"}`, { dataset: { row: String(row), lora: linked ? "" : loraName } },
    h("div.lw-row-head", {}, handle, h("span.lw-index", {}, row), toggle, picker, info, up, down, remove),
    strengthControl(node, row, "strength_model", "model"),
    strengthControl(node, row, "strength_clip", "clip"),
    blocksControl(node, row),
  );
  handle.addEventListener("dragstart", (e) => {
    e.dataTransfer.setData("text/x-lw-row", String(row));
    e.dataTransfer.effectAllowed = "move";
  });
  card.addEventListener("dragover", (e) => {
    if (!e.dataTransfer.types.includes("text/x-lw-row")) return;
    e.preventDefault();
    card.classList.add("lw-drop-target");
  });
  card.addEventListener("dragleave", () => card.classList.remove("lw-drop-target"));
  card.addEventListener("drop", (e) => {
    e.preventDefault();
    card.classList.remove("lw-drop-target");
    const from = Number(e.dataTransfer.getData("text/x-lw-row"));
    if (from) moveRow(node, from, row);
  });
  return card;
}

export function refresh(node) {
  const editor = node.lw_editor;
  if (!editor) return;
  const count = visibleRows(node);
  const total = rowTotal(node);
  const cards = [];
  for (let row = 1; row <= count; row++) cards.push(renderRow(node, row, count));
  let active = 0;
  for (let row = 1; row <= count; row++) if (rowUsed(node, row) && rowWidgets(node, row).on?.value !== false) active++;
  const add = h("button.lw-btn.lw-add", {
    disabled: count >= total, title: count >= total ? `All ${total} rows are in use` : "Add a LoRA row",
    onclick: () => addRow(node),
  }, "+ Add LoRA");
  const footer = h("div.lw-footer", {}, add, h("span.lw-muted", {}, `${active} on · ${count}/${total} rows`));
  editor.element.replaceChildren(...cards, footer);
  node.lw_signature = signature(node);
  editor.element.dataset.rows = String(count);
  editor.element.dataset.node = String(node.id);
  const height = count * rowHeight(node) + FOOTER_HEIGHT;
  if (editor.height !== height) {
    editor.height = height;
    fitHeight(node, MIN_WIDTH);
  }
  redraw(node);
}

function scheduleRefresh(node) {
  if (node.lw_refresh_pending) return;
  node.lw_refresh_pending = true;
  queueMicrotask(() => {
    node.lw_refresh_pending = false;
    refresh(node);
  });
}

function setUp(node) {
  if (node.lw_editor) return;
  injectStyle();
  for (let row = 1; row <= rowTotal(node); row++) {
    for (const f of FIELDS) {
      const widget = findWidget(node, fieldName(f, row));
      if (widget) widget.hidden = true;
    }
  }
  const element = h("div.lw-root.lw-rows", { dataset: { lwEditor: node.comfyClass || node.type } });
  const editor = { element, height: rowHeight(node) + FOOTER_HEIGHT };
  node.lw_editor = editor;
  const widget = node.addDOMWidget("lw_rows", "lw_rows", element, {
    serialize: false,
    hideOnZoom: true,
    getMinHeight: () => editor.height,
    getMaxHeight: () => editor.height,
  });
  widget.serialize = false; // not a node input; the row widgets carry the values
  editor.widget = widget;
  chain(node, "onConfigure", function () {
    refresh(this);
  });
  chain(node, "onConnectionsChange", function () {
    scheduleRefresh(this);
  });
  chain(node, "onRemoved", () => closePanel());
  chain(node, "onDrawForeground", function () {
    if (this.lw_signature !== signature(this)) scheduleRefresh(this);
  });
  refresh(node);
  fitHeight(node, MIN_WIDTH);
}

app.registerExtension({
  name: "lora_workbench.StackRows",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    chain(nodeType.prototype, "onExecuted", function (output) {
      readEffective(this, output);
    });
  },
  nodeCreated(node) {
    if (NODE_TYPES.has(node.comfyClass || node.type)) setUp(node);
  },
  loadedGraphNode(node) {
    if (NODE_TYPES.has(node.comfyClass || node.type)) refresh(node);
  },
});
