// @ts-check
// LoRA Workbench: live training view on Train LoRA.
//
// A loss chart that grows with every 'lw.train.progress' event the node sends
// ({node, step, total, loss, lr, eta_s}), the step counter, learning rate and ETA, and the
// sample renders as they arrive (ComfyUI's own preview on the node shows the latest; the strip
// keeps them all with their step). After the run the chart shows the node's full loss list
// (ui output lw_loss) and the saved file (lw_train).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { chain, fitHeight, fmtNumber, fmtSeconds, h, injectStyle, redraw } from "./lw_common.js";

const NODE_TYPE = "LW_TrainLoRA";
const EVENT = "lw.train.progress";
const MAX_SAMPLES = 12;
const HEIGHT = 196;

const isTrainNode = (node) => node && (node.comfyClass || node.type) === NODE_TYPE;

function nodeFor(id) {
  if (id === null || id === undefined) return null;
  const graph = app.rootGraph || app.graph;
  const node = graph?.getNodeById(id) ?? graph?.getNodeById(Number(id));
  return isTrainNode(node) ? node : null;
}

function emptyState() {
  return { points: [], total: 0, step: 0, loss: null, lr: null, eta: null, state: "idle", samples: [], summary: null,
    started: null };
}

function reset(node, state = "running") {
  for (const sample of node.lw_train?.samples || []) URL.revokeObjectURL(sample.url);
  node.lw_train = { ...emptyState(), state, started: performance.now() };
}

// ---------------------------------------------------------------- drawing

/** Exponential moving average. @param {number[]} values @param {number} alpha @returns {number[]} */
function ema(values, alpha) {
  const out = [];
  /** @type {number | null} */
  let value = null;
  for (const v of values) {
    value = value === null ? v : alpha * v + (1 - alpha) * value;
    out.push(value);
  }
  return out;
}

function draw(node) {
  const view = node.lw_view;
  const data = node.lw_train;
  if (!view || !data) return;
  const canvas = view.canvas;
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(50, canvas.clientWidth);
  const height = Math.max(40, canvas.clientHeight);
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "10px Inter, Arial, sans-serif";
  const points = data.points;
  canvas.dataset.points = String(points.length);
  canvas.dataset.lastStep = String(points.length ? points[points.length - 1][0] : 0);
  const pad = { left: 44, right: 10, top: 10, bottom: 16 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  ctx.strokeStyle = "#ffffff18";
  ctx.fillStyle = "#999";
  ctx.lineWidth = 1;
  if (!points.length) {
    ctx.textAlign = "center";
    ctx.fillText(data.state === "running" ? "waiting for the first step…" : "the loss curve appears here while training",
      width / 2, height / 2);
    return;
  }
  const losses = points.map((p) => p[1]).filter(Number.isFinite);
  let lo = Math.min(...losses);
  let hi = Math.max(...losses);
  if (hi - lo < 1e-9) {
    hi += Math.abs(hi) * 0.1 + 1e-6;
    lo -= Math.abs(lo) * 0.1 + 1e-6;
  }
  const span = hi - lo;
  lo -= span * 0.05;
  hi += span * 0.05;
  const firstStep = Math.min(points[0][0], 1);
  const lastStep = Math.max(data.total || 0, points[points.length - 1][0], firstStep + 1);
  const x = (step) => pad.left + ((step - firstStep) / (lastStep - firstStep)) * plotW;
  const y = (loss) => pad.top + (1 - (loss - lo) / (hi - lo)) * plotH;
  ctx.textAlign = "right";
  for (let i = 0; i <= 3; i++) {
    const value = lo + ((hi - lo) * i) / 3;
    const yy = y(value);
    ctx.beginPath();
    ctx.moveTo(pad.left, yy);
    ctx.lineTo(width - pad.right, yy);
    ctx.stroke();
    ctx.fillText(value.toPrecision(3), pad.left - 4, yy + 3);
  }
  ctx.textAlign = "left";
  ctx.fillText(`step ${firstStep}`, pad.left, height - 3);
  ctx.textAlign = "right";
  ctx.fillText(`${lastStep}`, width - pad.right, height - 3);
  // raw loss, then its moving average
  ctx.strokeStyle = "#7aa2f788";
  ctx.lineWidth = 1;
  ctx.beginPath();
  points.forEach(([step, loss], i) => (i ? ctx.lineTo(x(step), y(loss)) : ctx.moveTo(x(step), y(loss))));
  ctx.stroke();
  if (points.length > 3) {
    const smooth = ema(points.map((p) => p[1]), Math.min(0.6, 6 / points.length + 0.1));
    ctx.strokeStyle = "#e0af68";
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach(([step], i) => (i ? ctx.lineTo(x(step), y(smooth[i])) : ctx.moveTo(x(step), y(smooth[i]))));
    ctx.stroke();
  }
  const [lastX, lastY] = points[points.length - 1];
  ctx.fillStyle = "#7aa2f7";
  ctx.beginPath();
  ctx.arc(x(lastX), y(lastY), 3, 0, Math.PI * 2);
  ctx.fill();
}

function render(node) {
  const view = node.lw_view;
  const data = node.lw_train;
  if (!view || !data) return;
  const status = [];
  if (data.state === "idle" && !data.points.length) {
    status.push(h("span.lw-muted", {}, "Queue the workflow to train; loss, ETA and samples show here."));
  } else {
    status.push(h("span.lw-step", {}, "step ", h("b", {}, `${data.step}/${data.total || "?"}`)));
    status.push(h("span", {}, "loss ", h("b", {}, data.loss === null ? "–" : fmtNumber(data.loss, 4))));
    if (data.lr !== null) status.push(h("span", {}, "lr ", h("b", {}, Number(data.lr).toExponential(1))));
    if (data.state === "running") status.push(h("span.lw-eta", {}, "ETA ", h("b", {}, fmtSeconds(data.eta))));
    if (data.state === "done" && data.summary) {
      status.push(h("span", {}, "saved ", h("b", {}, data.summary.file), ` in ${fmtSeconds(data.summary.seconds)}`));
    }
    if (data.state === "stopped") status.push(h("span.lw-muted", {}, "stopped (what was learned is saved)"));
    if (data.state === "failed") status.push(h("span.lw-info-error", {}, "failed: see the error"));
  }
  view.status.replaceChildren(...status);
  view.element.dataset.state = data.state;
  view.element.dataset.node = String(node.id);
  view.element.dataset.step = String(data.step);
  view.samples.replaceChildren(...data.samples.map((s) =>
    h("figure", { title: `sample at step ${s.step}` }, h("img", { src: s.url, alt: `step ${s.step}` }), `step ${s.step}`)));
  view.samples.style.display = data.samples.length ? "flex" : "none";
  const height = HEIGHT + (data.samples.length ? 74 : 0);
  if (view.height !== height) {
    view.height = height;
    fitHeight(node);
  }
  draw(node);
  redraw(node);
}

function scheduleRender(node) {
  if (node.lw_render_pending) return;
  node.lw_render_pending = true;
  requestAnimationFrame(() => {
    node.lw_render_pending = false;
    render(node);
  });
}

// ---------------------------------------------------------------- events

function onProgress({ detail }) {
  const node = nodeFor(detail?.node);
  if (!node) return;
  const data = node.lw_train;
  if (!data || data.state !== "running" || (data.points.length && detail.step < data.points[data.points.length - 1][0])) {
    reset(node);
  }
  const train = node.lw_train;
  const last = train.points[train.points.length - 1];
  if (last && last[0] === detail.step) last[1] = detail.loss; // a sample step sends its progress twice
  else train.points.push([detail.step, detail.loss]);
  Object.assign(train, { step: detail.step, total: detail.total, loss: detail.loss, lr: detail.lr, eta: detail.eta_s });
  scheduleRender(node);
}

function onPreview({ detail }) {
  const node = nodeFor(detail?.displayNodeId ?? detail?.nodeId);
  if (!node || !node.lw_train || node.lw_train.state !== "running" || !detail.blob) return;
  const samples = node.lw_train.samples;
  samples.push({ step: node.lw_train.step, url: URL.createObjectURL(detail.blob) });
  while (samples.length > MAX_SAMPLES) URL.revokeObjectURL(samples.shift().url);
  scheduleRender(node);
}

function onExecuting({ detail }) {
  const node = nodeFor(typeof detail === "object" && detail ? detail.node : detail);
  if (node) {
    reset(node);
    scheduleRender(node);
  }
}

function onEnded(state) {
  return ({ detail }) => {
    const node = nodeFor(detail?.node_id);
    if (node?.lw_train && node.lw_train.state === "running") {
      node.lw_train.state = state;
      scheduleRender(node);
    }
  };
}

function onExecuted(node, output) {
  const train = node.lw_train || emptyState();
  node.lw_train = train;
  let summary = null;
  try {
    summary = output?.lw_train?.[0] ? JSON.parse(output.lw_train[0]) : null;
  } catch {
    summary = null;
  }
  const losses = Array.isArray(output?.lw_loss) ? output.lw_loss.map(Number) : [];
  if (losses.length) {
    const lastStep = summary?.steps ?? losses.length;
    train.points = losses.map((loss, i) => [lastStep - losses.length + i + 1, loss]);
    train.step = lastStep;
    train.total = Math.max(train.total || 0, lastStep);
    train.loss = losses[losses.length - 1];
  }
  train.summary = summary;
  train.state = "done";
  scheduleRender(node);
}

// ---------------------------------------------------------------- widget

function setUp(node) {
  if (node.lw_view) return;
  injectStyle();
  const status = h("div.lw-train-status");
  const canvas = h("canvas.lw-train-chart", { dataset: { points: "0" } });
  const samples = h("div.lw-train-samples", { style: { display: "none" } });
  const element = h("div.lw-root.lw-train", { dataset: { lwTrain: "1", state: "idle" } }, status, canvas, samples);
  const view = { element, status, canvas, samples, height: HEIGHT };
  node.lw_view = view;
  node.lw_train = emptyState();
  const widget = node.addDOMWidget("lw_train_view", "lw_train_view", element, {
    serialize: false,
    hideOnZoom: true,
    getMinHeight: () => view.height,
    getMaxHeight: () => view.height + 120,
  });
  widget.serialize = false;
  new ResizeObserver(() => draw(node)).observe(canvas);
  fitHeight(node);
  chain(node, "onRemoved", function () {
    for (const sample of this.lw_train?.samples || []) URL.revokeObjectURL(sample.url);
  });
  render(node);
}

app.registerExtension({
  name: "lora_workbench.TrainView",
  setup() {
    api.addEventListener(EVENT, onProgress);
    api.addEventListener("b_preview_with_metadata", onPreview);
    api.addEventListener("executing", onExecuting);
    api.addEventListener("execution_error", onEnded("failed"));
    api.addEventListener("execution_interrupted", onEnded("stopped"));
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    chain(nodeType.prototype, "onExecuted", function (output) {
      onExecuted(this, output);
    });
  },
  nodeCreated(node) {
    if (isTrainNode(node)) setUp(node);
  },
});
