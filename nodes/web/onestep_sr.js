// onestep-sr frontend extension: defaults of new Upscale nodes and values stored by older workflows.
import { app } from "../../scripts/app.js";

const UPSCALE_NODE = "OneStepSRUpscale";

// Older versions of the pack stored "auto" in these widgets as a number: 0 for sizes, -1 for the overlap
// (nodes/values.py, SizeChoice). The widgets are lists of strings now; numbers are shown as their string.
const LEGACY_AUTO_BELOW = { tile_size: 1, tile_overlap: 0, vae_tile_size: 1 };

function readLegacySizes(node) {
  for (const widget of node.widgets ?? []) {
    const autoBelow = LEGACY_AUTO_BELOW[widget.name];
    if (autoBelow === undefined || typeof widget.value !== "number") continue;
    widget.value = widget.value < autoBelow ? "auto" : String(widget.value);
  }
}

app.registerExtension({
  name: "onestep_sr.upscale",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== UPSCALE_NODE) return;
    // onConfigure runs when a saved node is loaded, after its widget values are set and before anything checks
    // them against the lists.
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      readLegacySizes(this);
      return result;
    };
  },

  nodeCreated(node) {
    if (node.comfyClass !== UPSCALE_NODE) return;
    // The seed only matters where sampling draws noise, so a new node keeps it fixed: a re-queue with nothing
    // changed then does not re-run the node. (Runs before a saved node's own values are applied.)
    const control = node.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
});
