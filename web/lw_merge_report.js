// @ts-check
// LoRA Workbench: run reports on the nodes, after a run (onExecuted).
//
// Merge LoRA: the per-layer error summary (ui output lw_merge) and the worst layers of its report
// (lw_report) as a table with error bars. Load LoRA and Stack LoRA: their report text (what
// matched; requested vs effective strengths), folded to a few lines until clicked.
import { app } from "../../scripts/app.js";
import { chain, fitHeight, h, injectStyle, redraw } from "./lw_common.js";

const MERGE = "LW_MergeLoRA";
const TEXT_REPORTS = new Set(["LW_LoadLoRA", "LW_StackLoRA"]);
// "   12.345%  rank    4/8     lora_unet_x, trimmed 1.0%"
const LAYER_LINE = /^\s*([\d.]+)%\s+rank\s+(\d+)\s*\/\s*(\d+)\s+(\S+)(.*)$/;

export function parseMergeReport(text) {
  const lines = String(text || "").split("\n");
  const layers = [];
  const notes = [];
  let saved = null;
  for (const line of lines) {
    const m = LAYER_LINE.exec(line);
    if (m) layers.push({ error: Number(m[1]), rank: Number(m[2]), maxRank: Number(m[3]), name: m[4], extra: m[5].replace(/^,\s*/, "") });
    else if (line.startsWith("saved: ")) saved = line.slice(7);
    else if (line.startsWith("note: ") || line.startsWith("SKIPPED")) notes.push(line);
  }
  return { layers, notes, saved };
}

function mergeView(summary, reportText) {
  const { layers, notes, saved } = parseMergeReport(reportText);
  const worst = Math.max(1e-9, ...layers.map((l) => l.error));
  const table = layers.length
    ? h("table", {},
      h("tr.lw-muted", {}, h("td", {}, "error"), h("td", {}, ""), h("td", {}, "rank"), h("td", {}, "worst layers")),
      layers.map((l) => h("tr", { title: `${l.name}: ${l.error}% relative error${l.extra ? ", " + l.extra : ""}` },
        h("td", {}, `${l.error.toFixed(2)}%`),
        h("td", { style: { width: "60px" } }, h("div.lw-bar", { style: { width: `${Math.max(2, (l.error / worst) * 56)}px` } })),
        h("td", {}, `${l.rank}/${l.maxRank}`),
        h("td.lw-layer", {}, l.name))))
    : null;
  return [
    h("div.lw-report-summary", {}, summary || "merged"),
    table,
    ...notes.map((n) => h("div.lw-muted", {}, n)),
    saved ? h("div", {}, "saved ", h("b", {}, saved)) : null,
  ];
}

function textView(node, text) {
  const pre = h("pre", {}, text);
  const lines = text.split("\n").length;
  const toggle = h("button.lw-btn", {
    onclick: () => {
      node.lw_report.expanded = !node.lw_report.expanded;
      show(node);
    },
  }, node.lw_report.expanded ? "fold" : `show all ${lines} lines`);
  if (!node.lw_report.expanded) pre.textContent = text.split("\n").slice(0, 4).join("\n") + (lines > 4 ? "\n…" : "");
  return [pre, lines > 4 ? toggle : null];
}

function heightFor(node) {
  const report = node.lw_report;
  if (!report.text && !report.summary) return 0;
  if (report.kind === "merge") return Math.min(480, 130 + 19 * parseMergeReport(report.text).layers.length);
  const lines = report.text.split("\n").length;
  return report.expanded ? Math.min(360, 30 + 14 * lines) : 30 + 14 * Math.min(5, lines);
}

function show(node) {
  const report = node.lw_report;
  if (!report) return;
  const height = heightFor(node);
  if (!report.widget && height) {
    injectStyle();
    report.element = h("div.lw-root.lw-report", { dataset: { lwReport: node.comfyClass || node.type } });
    report.widget = node.addDOMWidget("lw_report", "lw_report", report.element, {
      serialize: false,
      hideOnZoom: true,
      getMinHeight: () => report.height,
      getMaxHeight: () => report.height,
    });
    report.widget.serialize = false;
  }
  if (!report.widget) return;
  const body = h(report.kind === "merge" ? "div.lw-report-body" : "div.lw-report-body.lw-fill", {},
    ...(report.kind === "merge" ? mergeView(report.summary, report.text) : textView(node, report.text)));
  report.element.replaceChildren(body);
  report.element.dataset.ready = "1";
  report.element.dataset.node = String(node.id);
  if (report.height !== height) {
    report.height = height;
    fitHeight(node);
  }
  // then fit the content exactly once it is laid out on screen (10 px widget margins)
  requestAnimationFrame(() => {
    if (!body.isConnected || report.kind !== "merge") return;
    const needed = Math.ceil(body.getBoundingClientRect().height / (app.canvas?.ds?.scale || 1)) + 24;
    if (needed > 40 && Math.abs(needed - report.height) > 2) {
      report.height = Math.min(needed, 480);
      fitHeight(node);
    }
  });
  redraw(node);
}

app.registerExtension({
  name: "lora_workbench.MergeReport",
  beforeRegisterNodeDef(nodeType, nodeData) {
    const kind = nodeData.name === MERGE ? "merge" : TEXT_REPORTS.has(nodeData.name) ? "text" : null;
    if (!kind) return;
    chain(nodeType.prototype, "onExecuted", function (output) {
      const text = Array.isArray(output?.lw_report) ? output.lw_report.join("\n") : "";
      const summary = Array.isArray(output?.lw_merge) ? output.lw_merge.join("\n") : "";
      if (!text && !summary) return;
      this.lw_report = { ...(this.lw_report || { expanded: false, height: 0 }), kind, text, summary };
      show(this);
    });
  },
});
