// @ts-check
// LoRA Workbench: what the picked LoRA says about itself, on Load LoRA.
//
// A panel under the widgets shows trigger words (click one to copy it), base model family,
// rank/alpha, scope and provenance, read by GET /lora_workbench/info (the file's safetensors
// header only). Stack LoRA / Merge LoRA rows open the same panel from their ⓘ button
// (lw_stack_rows.js). The panel follows the lora_name widget.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { NONE, chain, clearInfoCache, fetchInfo, findWidget, fitHeight, h, injectStyle, redraw, renderInfo } from "./lw_common.js";

const NODE_TYPE = "LW_LoadLoRA";
const PANEL_HEIGHT = 104;

function show(node) {
  const panel = node.lw_info_panel;
  if (!panel) return;
  const name = findWidget(node, "lora_name")?.value;
  if (panel.name === name && panel.loaded) return;
  panel.name = name;
  panel.loaded = false;
  if (!name || name === NONE) {
    panel.element.replaceChildren(h("div.lw-muted", {}, "pick a LoRA to see its trigger words"));
    return;
  }
  panel.element.dataset.node = String(node.id);
  panel.element.replaceChildren(h("div.lw-muted", {}, `reading ${name}…`));
  fetchInfo(name).then((result) => {
    if (panel.name !== name) return; // another LoRA was picked meanwhile
    panel.loaded = true;
    panel.element.replaceChildren(renderInfo(result, { compact: false }));
    panel.element.dataset.status = result.ok ? "ok" : String(result.status);
    requestAnimationFrame(() => fitContent(node));
    redraw(node);
  });
}

/** Grow or shrink the panel to its content once it is on screen (10 px widget margins, 10 px padding). */
function fitContent(node) {
  const panel = node.lw_info_panel;
  const content = panel?.element.firstElementChild;
  if (!content || !panel.element.isConnected) return;
  const needed = Math.ceil(content.getBoundingClientRect().height / (app.canvas?.ds?.scale || 1)) + 30;
  if (needed > 40 && Math.abs(needed - panel.height) > 2) {
    panel.height = needed;
    fitHeight(node);
  }
}

function setUp(node) {
  if (node.lw_info_panel) return;
  injectStyle();
  const element = h("div.lw-root.lw-inline-info", { dataset: { lwInfo: "LW_LoadLoRA" } });
  const panel = { element, name: undefined, loaded: false, height: PANEL_HEIGHT };
  node.lw_info_panel = panel;
  const widget = node.addDOMWidget("lw_info", "lw_info", element, {
    serialize: false,
    hideOnZoom: true,
    getMinHeight: () => panel.height,
    getMaxHeight: () => panel.height,
  });
  widget.serialize = false;
  const lora = findWidget(node, "lora_name");
  if (lora) {
    const callback = lora.callback;
    lora.callback = function (...args) {
      const result = callback?.apply(this, args);
      show(node);
      return result;
    };
  }
  chain(node, "onConfigure", function () {
    show(this);
  });
  // values set without the widget's callback (undo, paste, scripts) are caught at the next draw
  chain(node, "onDrawForeground", function () {
    if (findWidget(this, "lora_name")?.value !== panel.name) show(this);
  });
  fitHeight(node, 340);
  show(node);
}

app.registerExtension({
  name: "lora_workbench.LoraInfo",
  setup() {
    // a run may write a LoRA (Train / Merge LoRA) under a name that was read before
    api.addEventListener("execution_success", () => clearInfoCache());
  },
  nodeCreated(node) {
    if ((node.comfyClass || node.type) === NODE_TYPE) setUp(node);
  },
  loadedGraphNode(node) {
    if ((node.comfyClass || node.type) === NODE_TYPE) show(node);
  },
});
