"""INT8: calibrate a bundle's graphs on label maps with the runtimes' own quantizers, gate the result
against the bundle's fp32 graphs, and find the layers that cost the most fidelity. No torch.

    maps = [CalibrationMap(...)]              # ids padded to whole tiles (app/quantize.py reads the PNGs)
    res = quantize_bundle(bundle, maps[:8], maps[8:], QuantizeOptions(method="ort"))
    res.graphs       {"predictor": bytes, "pixelwise": bytes, "asap": bytes}: QDQ ONNX models
    res.gate         fidelity per stage vs the fp32 graphs (THRESHOLDS["int8"]), passed or not
    res.description  the manifest's `quantization` object (export.bundle.add_precision writes it)

What becomes int8 (measured on a random facades-preset model, 2-core Xeon; README "INT8"):
  predictor  Conv nodes, QDQ format (ONNX Runtime fuses DequantizeLinear -> Conv -> into QLinearConv):
             int8 weights per output channel (symmetric), uint8 activations per tensor. `layers`:
             "heavy" (default) quantizes the largest Convs, by multiply-adds, until they hold >= 90% of
             the predictor's Conv work; the narrow early Convs stay fp32 (quantizing them too cost
             ~8 dB of PSNR, 42 -> 34 dB, for ~7% of the work). "all": every Conv.
  pixelwise  fp32 by default: pixelwise.int8.onnx is then the fp32 pixelwise graph. `pixelwise="int8"`
             quantizes the MatMuls inside the SpatialMLP node's function (their weights are the
             predicted grid, i.e. activations: static per-tensor scales from the calibration maps)
             on the function body expanded into the graph, then folds it back into the function,
             so the node, its attributes (`check_graph_matches_config`) and the TensorRT plugin
             mapping stay; "auto" does that unless the stage alone fails the gate. Measured on
             facades (random weights): PSNR 42-53 dB vs fp32 for that stage alone, but no faster
             (ONNX Runtime 1.32 fuses QLinearMatMul, yet 512x512 took 300 vs 278 ms fp32, 1024x1024
             tiled 488 vs 393 ms; OpenVINO 2026.4 907 vs 431 ms): the MLP's K is only 65 and
             the stage is bound by its gathers, transposes and activations, not by the GEMMs.
  asap       the int8 predictor's nodes followed by the pixelwise part (node + function) of
             pixelwise.int8.onnx: one graph computing what the two stage graphs compute.

Methods: "ort" (= "ort-minmax"), "ort-entropy", "ort-percentile": onnxruntime.quantization's
quantize_static with that calibration (biases stay fp32; `activations` "uint8" asymmetric, or "int8"
symmetric, the only kind TensorRT builds). "nncf": OpenVINO's NNCF (`nncf.quantize` on the ONNX
predictor, its own activation scheme and fast bias correction), whose activation Quantize/Dequantize
pairs sit before the reflection Pads; they are moved after them (exact: a reflection pad copies
values) so that each Conv reads a DequantizeLinear. Its graphs are for OpenVINO, which runs them in
int8: ONNX Runtime runs their Convs in fp32 (NNCF quantizes no Conv output, and ONNX Runtime's
QLinearConv needs one), i.e. slower than fp32. NNCF imports torch when it is installed (optional:
`contextlib.suppress(ImportError)` in nncf.tensor), not for the ONNX backend. The pixelwise
MatMuls are always quantized by ONNX Runtime's tool with MinMax ranges (histogram methods would
hold every full-resolution MLP activation in memory).

Sensitivity: for a quantized model, each int8 Conv in turn (and the pixelwise stage) is put back to
fp32 in the quantized graph itself (its Quantize/Dequantize pairs removed, its fp32 weights
restored: exactly "this layer in fp32, all else as quantized") and the end-to-end PSNR measured.
For the ONNX Runtime methods that equals quantizing afresh with the layer excluded (the other
tensors' ranges come from the fp32 model either way: test_keep_conv_in_float_equals_quantizing_without_it),
so no re-calibration is needed; for NNCF it keeps the other layers' bias correction as made.

Auto keep-float (`auto_keep`, the default of `asap quantize`): when the gate fails, the scan runs,
the layer that recovers most PSNR is put back to fp32 in the graphs (that surgery), the gate runs
again, and so on, greedily, up to `auto_keep` layers, stopping early when the best one recovers
less than AUTO_MIN_GAIN_DB; the last int8 Conv always stays int8 (graphs without one are not int8,
and the gate then fails as it should). Measured on a trained facades-preset model (1024x1024, 8 calibration
maps): the default graphs 14.9 dB end to end; the scan named the output Conv (the parameter grid)
+21.5 dB, then lowres_stream.model.21's Conv +4 dB; with both fp32, 40.0 dB (passes). The output
Conv is NOT kept fp32 by default: it is the predictor's single largest Conv (17.7% of its
multiply-adds on facades: 1024 -> 15107 channels, 1x1), and the demo model passes the gate with it
int8 (42 dB); auto keeps it where it costs fidelity.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from asap_deploy.config import ModelConfig
from asap_deploy.errors import MissingDependencyError, UsageError, did_you_mean
from asap_deploy.export.bundle import file_name
from asap_deploy.export.graphs import ExportError
from asap_deploy.export.stages import Stage
from asap_deploy.plugins import spec as plugin_spec
from asap_deploy.precisions import QUANTIZED

from .base import IMAGE

METHODS = {  # --method -> (tool, calibration)
    "ort": ("onnxruntime", "minmax"),
    "ort-minmax": ("onnxruntime", "minmax"),
    "ort-entropy": ("onnxruntime", "entropy"),
    "ort-percentile": ("onnxruntime", "percentile"),
    "nncf": ("nncf", "nncf"),
}
DEFAULT_METHOD = "ort"
LAYER_POLICIES = ("heavy", "all")
HEAVY_SHARE = 0.9  # "heavy": the largest Convs until they hold this share of the multiply-adds
PIXELWISE_CHOICES = ("auto", "int8", "fp32")
# ONNX Runtime recipes' activations: uint8 asymmetric (default: the best fidelity, ~1.5-2 dB over int8
# on facades, same speed), or int8 symmetric (zero point 0), the only kind TensorRT builds
ACTIVATIONS = ("uint8", "int8")
PIXELWISE = "pixelwise"  # the --keep-float name of the whole pixelwise stage
PIXELWISE_FP32_NOTE = ("fp32 (pixelwise kept fp32: its int8 MatMuls measured no faster than fp32 in ONNX Runtime "
                       "1.32 and slower in OpenVINO, for ~1 dB of PSNR; --pixelwise int8 quantizes them)")
MAX_SAMPLES = 256  # calibration maps (--samples)
MAX_HOLDOUT = 64  # held-out evaluation maps
MAX_CALIBRATION_PIXELS = 1 << 28  # all maps read (calibration + held out), padded: 256 maps of 1024x1024
SENSITIVITY_MAPS = 2  # evaluation maps the sensitivity scan runs on (it runs once per layer)
AUTO_KEEP_MAX = 4  # auto keep-float: at most this many layers put back to fp32 (each costs one scan)
AUTO_MIN_GAIN_DB = 0.5  # ... and only a layer whose fp32 recovers at least this much end-to-end PSNR
AUTO, NONE = "auto", "none"  # --keep-float words: find layers when the gate fails / keep nothing
DEFAULT_TOP = 3
CHECK_CROP = 512  # side of the crop on which the end-to-end int8 graph is checked against the stages

Progress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass
class CalibrationMap:
    """One label map as the engines take it: ids (H, W) padded to whole tiles [+ instances]."""

    name: str
    sha256: str
    labels: np.ndarray
    instances: np.ndarray | None = None
    size: tuple[int, int] | None = None  # (H, W) before padding

    def feeds(self) -> dict[str, np.ndarray]:
        out = {"labels": self.labels[None]}
        if self.instances is not None:
            out["instances"] = self.instances[None]
        return out

    def describe(self) -> dict[str, Any]:
        h, w = self.size or self.labels.shape
        return {"name": self.name, "sha256": self.sha256, "size": [int(h), int(w)]}


@dataclass
class QuantizeOptions:
    method: str = DEFAULT_METHOD
    layers: str = "heavy"
    keep_float: tuple[str, ...] = ()  # Conv node names (and/or "pixelwise") kept in fp32
    auto_keep: int = 0  # gate failed: put back to fp32 up to this many layers the scan names (0: off)
    pixelwise: str = "fp32"  # measured no faster in int8 (module docstring)
    activations: str = "uint8"  # ONNX Runtime methods: uint8 asymmetric, or int8 symmetric (TensorRT)
    sensitivity: str = "on-failure"  # "on-failure", "always", "never"
    top: int = DEFAULT_TOP
    seed: int = 0

    def check(self) -> None:
        from asap_deploy.limits import check_range, check_seed

        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}{did_you_mean(self.method, METHODS)} "
                             f"(choose from: {', '.join(METHODS)})")
        if self.layers not in LAYER_POLICIES:
            raise UsageError(f"unknown --layers {self.layers!r}{did_you_mean(self.layers, LAYER_POLICIES)} "
                             f"(choose from: {', '.join(LAYER_POLICIES)})")
        if self.pixelwise not in PIXELWISE_CHOICES:
            raise UsageError(f"unknown --pixelwise {self.pixelwise!r}{did_you_mean(self.pixelwise, PIXELWISE_CHOICES)} "
                             f"(choose from: {', '.join(PIXELWISE_CHOICES)})")
        if self.activations not in ACTIVATIONS:
            raise UsageError(f"unknown --activations {self.activations!r} (choose from: {', '.join(ACTIVATIONS)})")
        if self.activations == "int8" and METHODS[self.method][0] == "nncf":
            raise UsageError("--activations applies to the ONNX Runtime methods (NNCF chooses its own)")
        if self.sensitivity not in ("on-failure", "always", "never"):
            raise UsageError(f"unknown sensitivity mode {self.sensitivity!r}")
        check_range("--top", self.top, 1, 64)
        check_range("auto keep-float layers", self.auto_keep, 0, 64)
        words = [k for k in self.keep_float if k in (AUTO, NONE)]
        if words:
            raise UsageError(f"--keep-float {words[0]!r} reached the quantizer as a layer name "
                             "(parse_keep_float turns the words into options)")
        check_seed("--seed", self.seed)
        if PIXELWISE in self.keep_float and self.pixelwise == "int8":
            raise UsageError("--keep-float pixelwise and --pixelwise int8 contradict each other")


def parse_keep_float(values: Sequence[str]) -> tuple[tuple[str, ...], int]:
    """(layer names, auto_keep) of --keep-float's values: none given or 'auto' among them: auto on
    (AUTO_KEEP_MAX), on top of any names; explicit names alone: those, auto off; 'none' alone:
    nothing kept, auto off (UsageError for 'none' with anything else)."""
    values = tuple(dict.fromkeys(values))
    if NONE in values:
        if len(values) > 1:
            raise UsageError(f"--keep-float {NONE} keeps nothing in fp32: it takes no other value")
        return (), 0
    names = tuple(v for v in values if v != AUTO)
    return names, AUTO_KEEP_MAX if (not values or AUTO in values) else 0


def tool_version(tool: str) -> str:
    if tool == "nncf":
        return nncf_module().__version__
    import onnxruntime

    return onnxruntime.__version__


def nncf_module():
    """nncf, or a one-line MissingDependencyError naming the extra that installs it (with OpenVINO)."""
    try:
        import nncf
    except ImportError as exc:
        raise MissingDependencyError("asap quantize --method nncf needs OpenVINO's NNCF, which is not installed: "
                                     "pip install 'asap-deploy[openvino]'") from exc
    return nncf


def check_method_available(method: str) -> None:
    """MissingDependencyError now (before any calibration) if the method's tool is missing."""
    if METHODS[method][0] == "nncf":
        nncf_module()
    else:
        try:
            import onnxruntime.quantization  # noqa: F401
        except ImportError as exc:  # pragma: no cover - onnxruntime is a base dependency
            raise MissingDependencyError("asap quantize needs onnxruntime: pip install onnxruntime") from exc


# ---- graph facts -------------------------------------------------------------------------------
@dataclass
class ConvInfo:
    name: str
    macs: int
    weight: tuple[int, ...]
    groups: int


def conv_work(model: onnx.ModelProto, height: int, width: int) -> list[ConvInfo]:
    """The Conv nodes of `model` (graph order) with their multiply-adds for one height x width map,
    from ONNX shape inference on the graph's structure (weights stand in as typed inputs: no copy
    of their data)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inputs = []
    for i in g.input:
        shape = [1, height, width][:len(i.type.tensor_type.shape.dim)]
        inputs.append(helper.make_tensor_value_info(i.name, i.type.tensor_type.elem_type, shape))
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer]
    skeleton = helper.make_model(helper.make_graph(list(g.node), "skeleton", inputs, list(g.output)),
                                 opset_imports=list(model.opset_import), ir_version=model.ir_version)
    skeleton.functions.extend(model.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx's InferenceError and friends
        raise ExportError(f"shape inference of the predictor failed ({type(exc).__name__}: {str(exc)[:200]})") from exc
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    out = []
    for n in g.node:
        if n.op_type != "Conv":
            continue
        w = tuple(inits[n.input[1]].dims) if n.input[1] in inits else ()
        o = shapes.get(n.output[0], [])
        if len(w) != 4 or len(o) != 4 or not all(o):
            raise ExportError(f"Conv {n.name}: cannot tell its weight or output shape")
        groups = next((a.i for a in n.attribute if a.name == "group"), 1)
        out.append(ConvInfo(n.name, int(np.prod(w)) * o[2] * o[3], w, groups))
    return out


def select_layers(convs: Sequence[ConvInfo], policy: str, keep_float: Sequence[str]) -> tuple[list[str], list[str]]:
    """(int8 Conv names, fp32 Conv names), each in graph order: `policy` "heavy" takes the largest
    Convs by multiply-adds (ties: graph order) until they hold HEAVY_SHARE of the work, "all" every
    one; then `keep_float` (UsageError for a name that is not a Conv of the predictor)."""
    names = [c.name for c in convs]
    for k in keep_float:
        if k != PIXELWISE and k not in names:
            raise UsageError(f"--keep-float {k!r} is not a Conv node of the predictor{did_you_mean(k, names)} "
                             f"(its Convs: {', '.join(names)}; or '{PIXELWISE}' for the pixelwise stage)")
    if policy == "all":
        chosen = set(names)
    else:
        total = sum(c.macs for c in convs) or 1
        chosen, acc = set(), 0
        for c in sorted(convs, key=lambda c: -c.macs):  # sorted() is stable: ties keep graph order
            if acc >= HEAVY_SHARE * total:
                break
            chosen.add(c.name)
            acc += c.macs
    chosen -= set(keep_float)
    return [n for n in names if n in chosen], [n for n in names if n not in chosen]


def _spatial_mlp(model: onnx.ModelProto) -> tuple[int, onnx.NodeProto, onnx.FunctionProto]:
    idx = [i for i, n in enumerate(model.graph.node)
           if n.op_type == plugin_spec.OP_NAME and n.domain == plugin_spec.DOMAIN]
    fns = [f for f in model.functions if f.name == plugin_spec.OP_NAME and f.domain == plugin_spec.DOMAIN]
    if len(idx) != 1 or len(fns) != 1:
        raise ExportError(f"expected one {plugin_spec.DOMAIN}::{plugin_spec.OP_NAME} node and its function "
                          f"(found {len(idx)} and {len(fns)})")
    return idx[0], model.graph.node[idx[0]], fns[0]


def _tensor_names(nodes) -> tuple[set[str], set[str]]:
    """(consumed, produced) tensor names of `nodes`."""
    used = {i for n in nodes for i in n.input if i}
    made = {o for n in nodes for o in n.output if o}
    return used, made


BRIDGE = "asap_quantize_bridge"


def expand_spatial_mlp(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its SpatialMLP node replaced by the function's body (the function's own tensor
    names kept; Identity bridges connect the node's actual inputs and outputs): a graph a quantizer
    sees into. `fold_spatial_mlp` puts the (quantized) body back."""
    i, node, fn = _spatial_mlp(model)
    if any(a.ref_attr_name for n in fn.node for a in n.attribute):
        raise ExportError(f"the {plugin_spec.OP_NAME} function reads node attributes; it cannot be expanded")
    main = [n for j, n in enumerate(model.graph.node) if j != i]
    used, made = _tensor_names(fn.node)
    outside = {x for n in main for x in (*n.input, *n.output)} | {t.name for t in model.graph.initializer} \
        | {v.name for v in (*model.graph.input, *model.graph.output)}
    formal = dict(zip(fn.input, node.input)) | dict(zip(fn.output, node.output))
    clash = sorted(((used | made) & outside) - {k for k, v in formal.items() if k == v})
    if clash:
        raise ExportError(f"the {plugin_spec.OP_NAME} function's tensors {', '.join(clash[:5])} clash with the graph's")
    bridges_in = [helper.make_node("Identity", [a], [f], name=f"{BRIDGE}_in_{k}")
                  for k, (f, a) in enumerate(zip(fn.input, node.input)) if f != a]
    bridges_out = [helper.make_node("Identity", [f], [a], name=f"{BRIDGE}_out_{k}")
                   for k, (f, a) in enumerate(zip(fn.output, node.output)) if f != a]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend([*main[:i], *bridges_in, *fn.node, *bridges_out, *main[i:]])
    del out.functions[:]
    return out


def fold_spatial_mlp(original: onnx.ModelProto, expanded_q: onnx.ModelProto) -> onnx.FunctionProto:
    """The SpatialMLP function of `original` with the body the quantizer made of it in `expanded_q`
    (the nodes that are neither the graph's own nor bridges; the initializers they read become
    Constant nodes: a function holds no initializers)."""
    i, node, fn = _spatial_mlp(original)
    main = {n.name for j, n in enumerate(original.graph.node) if j != i}
    body = [n for n in expanded_q.graph.node if n.name not in main and not n.name.startswith(BRIDGE)]
    used, made = _tensor_names(body)
    orig_inits = {t.name for t in original.graph.initializer}
    consts = []
    for t in expanded_q.graph.initializer:
        if t.name in used and t.name not in made:
            if t.name in orig_inits:
                raise ExportError(f"the quantized {plugin_spec.OP_NAME} body reads the graph's initializer {t.name}")
            consts.append(helper.make_node("Constant", [], [t.name], name=f"{t.name}_const", value=t))
    free = used - made - {t.name for t in expanded_q.graph.initializer} - set(fn.input)
    missing = set(fn.output) - made
    if free or missing:
        raise ExportError(f"the quantized {plugin_spec.OP_NAME} body does not close over its inputs "
                          f"(reads {', '.join(sorted(free)[:5]) or '-'}; lacks {', '.join(sorted(missing)) or '-'})")
    domains = {n.domain for n in body}
    opsets = [o for o in expanded_q.opset_import if o.domain in domains or (o.domain in ("", "ai.onnx") and "" in domains)]
    return helper.make_function(fn.domain, fn.name, list(fn.input), list(fn.output), consts + body, opsets,
                                attributes=list(fn.attribute),
                                doc_string=fn.doc_string + " int8: QDQ on its MatMul inputs (asap quantize).")


def with_function(model: onnx.ModelProto, fn: onnx.FunctionProto) -> onnx.ModelProto:
    """`model` with its SpatialMLP function replaced by `fn` (and the model's opsets raised to fn's)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [f for f in out.functions if not (f.name == fn.name and f.domain == fn.domain)]
    del out.functions[:]
    out.functions.extend([*keep, fn])
    _merge_opsets(out, fn.opset_import)
    return out


def _merge_opsets(model: onnx.ModelProto, extra) -> None:
    have = {o.domain: o for o in model.opset_import}
    for o in extra:
        if o.domain in have:
            have[o.domain].version = max(have[o.domain].version, o.version)
        else:
            model.opset_import.append(helper.make_opsetid(o.domain, o.version))


def merge_end_to_end(asap: onnx.ModelProto, predictor: onnx.ModelProto, predictor_q: onnx.ModelProto,
                     pixelwise_fn: onnx.FunctionProto | None) -> onnx.ModelProto:
    """The end-to-end graph made of the quantized predictor's nodes followed by `asap`'s own
    pixelwise part (the SpatialMLP node and the 8-bit conversion), with `pixelwise_fn` as its
    function (None: asap's fp32 one). ExportError unless `asap` is `predictor` + that part."""
    pred_nodes = {n.name: n for n in predictor.graph.node}
    own = {n.name: n for n in asap.graph.node}
    differs = [k for k, n in pred_nodes.items() if own.get(k) != n]
    if differs:
        raise ExportError(f"asap.onnx does not hold predictor.onnx's nodes as they are ({', '.join(differs[:3])})")
    tail = [n for n in asap.graph.node if n.name not in pred_nodes]
    q_inits = {t.name for t in predictor_q.graph.initializer}
    used, _ = _tensor_names(tail)
    tail_inits = [t for t in asap.graph.initializer if t.name in used]
    clash = [t.name for t in tail_inits if t.name in q_inits]
    if clash:
        raise ExportError(f"initializer names clash when merging the int8 end-to-end graph: {', '.join(clash[:3])}")
    nodes = [*predictor_q.graph.node, *tail]
    _, made = _tensor_names(nodes)
    free = {x for n in tail for x in n.input if x} - made - {t.name for t in tail_inits} \
        - {i.name for i in asap.graph.input}
    if free:
        raise ExportError(f"the int8 end-to-end graph would read tensors nothing makes: {', '.join(sorted(free)[:5])}")
    g = helper.make_graph(nodes, asap.graph.name, list(asap.graph.input), list(asap.graph.output),
                          initializer=[*predictor_q.graph.initializer, *tail_inits], doc_string=asap.graph.doc_string)
    out = helper.make_model(g, opset_imports=list(asap.opset_import), ir_version=max(asap.ir_version, predictor_q.ir_version),
                            producer_name=asap.producer_name, doc_string=asap.doc_string)
    _merge_opsets(out, predictor_q.opset_import)
    out.functions.extend(asap.functions)
    return with_function(out, pixelwise_fn) if pixelwise_fn is not None else out


# ---- QDQ surgery ---------------------------------------------------------------------------------
def _consumers(nodes) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _prune(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads."""
    g = model.graph
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)


def move_dq_after_pads(model: onnx.ModelProto) -> int:
    """Rewrite x -> Q -> DQ -> Pad(reflect/edge) -> Conv as x -> Pad -> Q -> DQ -> Conv (exact: such a
    pad copies values, and per-tensor quantization acts per value) so that ONNX Runtime's QDQ
    fusion sees DQ -> Conv. Only where the DQ feeds nothing but that Pad. Returns how many moved."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    cons = _consumers(g.node)
    moved = 0
    for pad in list(g.node):
        if pad.op_type != "Pad":
            continue
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        dq = producer.get(pad.input[0])
        if mode not in ("reflect", "edge") or dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(cons.get(dq.output[0], [])) != 1 \
                or len(cons.get(q.output[0], [])) != 1 or not all(c.op_type == "Conv" for c in cons.get(pad.output[0], [])):
            continue
        x, padded = q.input[0], pad.output[0]
        pad.input[0] = x
        pad.output[0] = f"{padded}_fp"
        q.input[0] = f"{padded}_fp"
        dq.output[0] = padded
        moved += 1
    if moved:  # restore topological order: each moved Q/DQ pair now follows its Pad
        order, made = [], {i.name for i in g.input} | {t.name for t in g.initializer}
        pending = list(g.node)
        while pending:
            rest = []
            for n in pending:
                if all(not i or i in made for i in n.input):
                    order.append(n)
                    made.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise ExportError("moving Quantize/Dequantize pairs past Pad left a cycle")
            pending = rest
        del g.node[:]
        g.node.extend(order)
    return moved


def keep_conv_in_float(q_model: onnx.ModelProto, fp32_model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of the QDQ model `q_model` in which Conv `name` runs in fp32, as if the quantizer had
    left it out: the Quantize/Dequantize pairs of its input and output bypassed (removed when
    nothing else reads them) and its weight and bias the fp32 model's initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(q_model)
    g = out.graph
    producer = {o: n for n in g.node for o in n.output}
    conv = next((n for n in g.node if n.name == name and n.op_type == "Conv"), None)
    ref = next((n for n in fp32_model.graph.node if n.name == name and n.op_type == "Conv"), None)
    if conv is None or ref is None:
        raise ExportError(f"no Conv {name} in the quantized and the fp32 predictor")
    dq = producer.get(conv.input[0])
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            conv.input[0] = q.input[0]
    # its output's Quantize/Dequantize pair (ONNX Runtime's QDQ quantizes the outputs of the nodes it
    # quantizes: the pair is the Conv's): its readers read the fp32 output instead
    graph_outputs = {o.name for o in g.output}
    cons = _consumers(g.node)
    for q in [c for c in cons.get(conv.output[0], []) if c.op_type == "QuantizeLinear"]:
        dqs = cons.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in graph_outputs for d in dqs):
            continue
        for d in dqs:
            for reader in cons.get(d.output[0], []):
                reader.input[:] = [conv.output[0] if i == d.output[0] else i for i in reader.input]
    fp_inits = {t.name: t for t in fp32_model.graph.initializer}
    have = {t.name for t in g.initializer}
    for k in range(1, len(ref.input)):
        src = ref.input[k]
        if src in fp_inits:  # under a new name: the quantized model may hold a changed tensor of that name
            name_fp = f"{src}_fp32"
            while name_fp in have:
                name_fp += "_"
            t = onnx.TensorProto()
            t.CopyFrom(fp_inits[src])
            t.name = name_fp
            g.initializer.append(t)
            have.add(name_fp)
            conv.input[k] = name_fp
    _prune(out)
    return out


QUANTIZED_OPS = ("Conv", "MatMul")  # the op types asap quantize makes int8


def int8_nodes(model: onnx.ModelProto, graph: str) -> list[dict[str, str]]:
    """{graph, name, op_type} of the Conv/MatMul nodes of `model` (and of its functions) that read a
    DequantizeLinear output: the ones that run in int8 (the runtime fuses DQ -> op -> Q)."""
    out = []
    for where, nodes in [(graph, model.graph.node)] + [(f"{graph}/{f.name}", f.node) for f in model.functions]:
        dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
        out += [{"graph": where, "name": n.name, "op_type": n.op_type} for n in nodes
                if n.op_type in QUANTIZED_OPS and any(i in dq for i in n.input)]
    return out


# ---- quantizers ----------------------------------------------------------------------------------
class CalibrationReader:
    """Feeds for a calibration run, one map at a time, reporting progress (and where a Ctrl-C lands
    while the quantizer runs its model on them). Used as onnxruntime's CalibrationDataReader and as
    NNCF's data source."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]], step: str = "calibrating",
                 progress: Progress | None = None):
        self._feeds = list(feeds)
        self._step = step
        self._progress = progress
        self._next = 0

    def __len__(self) -> int:
        return len(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        feed = self._feeds[self._next]
        self._next += 1
        if self._progress:
            self._progress(self._step, self._next, len(self._feeds))
        return feed

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Every feed from the first (NNCF goes over the data once per algorithm)."""
        self._next = 0
        while (feed := self.get_next()) is not None:
            yield feed


def _ort_reader(reader: CalibrationReader):
    """`reader` as an onnxruntime.quantization.CalibrationDataReader."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

        def __len__(self):
            return len(reader)

    return _Reader()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizers' own chatter (root-logger warnings, prints, NNCF's progress bars) kept off the
    user's terminal: the command reports progress itself."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(level)


def ort_quantize(model: onnx.ModelProto, reader: CalibrationReader, calibration: str, *, op_types: list[str],
                 exclude: Sequence[str] = (), per_channel: bool = True, activations: str = "uint8") -> onnx.ModelProto:
    """onnxruntime.quantization.quantize_static on `model`: QDQ; int8 weights, symmetric; activations
    uint8 asymmetric or int8 symmetric (`activations`); `calibration` minmax/entropy/percentile;
    biases left fp32 (TensorRT refuses an int32 bias DequantizeLinear; ONNX Runtime fuses either
    way, measured same speed and output). `model` is not changed (quantize_static rewrites a
    ModelProto it is given: it gets a copy)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration]
    work = onnx.ModelProto()
    work.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix="asap-quantize-") as tmp:
        out = Path(tmp) / "quantized.onnx"
        try:
            with _quiet():
                quantize_static(work, str(out), _ort_reader(reader), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=op_types, per_channel=per_channel, reduce_range=False,
                                activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude), calibrate_method=method,
                                extra_options={"WeightSymmetric": True, "ActivationSymmetric": activations == "int8",
                                               "QuantizeBias": False})
        except (ValueError, RuntimeError, KeyError, TypeError, onnx.checker.ValidationError) as exc:
            raise ExportError(f"ONNX Runtime's quantizer failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
        return onnx.load_model(str(out), load_external_data=False)


def nncf_quantize(model: onnx.ModelProto, reader: CalibrationReader, *, ignore: Sequence[str]) -> onnx.ModelProto:
    """nncf.quantize on `model` (ONNX backend) with the Convs `ignore` left fp32 (and every other op
    type ignored); activation Quantize/Dequantize pairs then moved past reflection Pads
    (move_dq_after_pads) so that ONNX Runtime fuses them with the Convs."""
    nncf = nncf_module()
    other = sorted({n.op_type for n in model.graph.node} - {"Conv"})
    scope = nncf.IgnoredScope(names=list(ignore), types=other, validate=False)
    try:
        with _quiet():
            nncf.set_log_level(logging.ERROR)
            q = nncf.quantize(model, nncf.Dataset(reader), subset_size=len(reader), ignored_scope=scope)
    except Exception as exc:  # noqa: BLE001 - NNCF raises its own error classes (not KeyboardInterrupt)
        raise ExportError(f"NNCF failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    move_dq_after_pads(q)
    return q


# ---- in-memory graphs for the engines ------------------------------------------------------------
class StagedGraphs:
    """Graphs not yet in a bundle, served to an Engine as a bundle's would be (the engines read
    `config`, `path`, `precisions`, `file()`, `graph_bytes()` and `graph_model()`)."""

    def __init__(self, bundle, graphs: dict[str, bytes], precision: str = QUANTIZED):
        self.config: ModelConfig = bundle.config
        self.path: Path = bundle.path
        self.precision = precision
        self._graphs = graphs

    @property
    def precisions(self) -> list[str]:
        return [self.precision]

    def file(self, graph: str, precision: str = QUANTIZED) -> Path:
        return self.path / file_name(graph, precision)

    def graph_bytes(self, graph: str, precision: str = QUANTIZED) -> bytes:
        return self._graphs[graph]

    def graph_model(self, graph: str, precision: str = QUANTIZED) -> onnx.ModelProto:
        return onnx.load_model_from_string(self._graphs[graph])


def _engine(source, precision: str, pixels_per_run: int | None = None):
    from .onnxruntime_engine import DEFAULT_PIXELS_PER_RUN, OnnxRuntimeEngine

    return OnnxRuntimeEngine(source, precision, pixels_per_run=pixels_per_run or DEFAULT_PIXELS_PER_RUN)


# ---- the gate ------------------------------------------------------------------------------------
@dataclass
class Reference:
    """The fp32 graphs' outputs on one evaluation map."""

    map: CalibrationMap
    params: np.ndarray
    pixelwise: dict[str, np.ndarray]  # fp32 pixelwise of the fp32 grid
    end_to_end: dict[str, np.ndarray]


@dataclass
class Gate:
    passed: bool
    stages: dict[str, dict[str, Any]]  # stage key -> worst metrics over the maps + "failures"
    failures: list[str]
    thresholds: dict[str, Any]
    maps: int
    held_out: bool

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "stages": self.stages, "failures": self.failures,
                "thresholds": self.thresholds, "maps": self.maps, "held_out": self.held_out,
                "reference": "the bundle's fp32 graphs in ONNX Runtime (CPU)"}


def references(bundle, maps: Sequence[CalibrationMap], progress: Progress | None = None) -> list[Reference]:
    out = []
    with _engine(bundle, "fp32") as e32:
        for k, m in enumerate(maps):
            f = m.feeds()
            p = e32.predict_params(f["labels"], f.get("instances"), ids_checked=True)
            out.append(Reference(m, p, e32.pixelwise(f["labels"], p),
                                 e32.generate(f["labels"], f.get("instances"), ids_checked=True)))
            if progress:
                progress("fp32 reference", k + 1, len(maps))
    return out


def _stage_metrics(stage: str, per_map: list[dict[str, Any]]) -> dict[str, Any]:
    from .validate import THRESHOLDS, failures, worst_of

    worst = worst_of(stage, per_map)
    worst["failures"] = failures(stage, worst, THRESHOLDS[QUANTIZED])
    return worst


def evaluate_pixelwise(bundle, graphs: dict[str, bytes], refs: Sequence[Reference]) -> dict[str, Any]:
    """The int8 pixelwise graph fed the fp32 grid, vs the fp32 pixelwise graph (worst over maps)."""
    from .validate import image_metrics

    with _engine(StagedGraphs(bundle, graphs), QUANTIZED) as e8:
        ms = [image_metrics(r.pixelwise, e8.pixelwise(r.map.labels[None], r.params)) for r in refs]
    return _stage_metrics(Stage.PIXELWISE.key, ms)


def evaluate(bundle, graphs: dict[str, bytes], refs: Sequence[Reference], held_out: bool,
             pixelwise: dict[str, Any] | None = None, progress: Progress | None = None) -> Gate:
    """The fidelity gate: the int8 graphs vs the bundle's fp32 graphs on `refs`' maps, per stage
    (predictor: grid cosine; pixelwise: the int8 pixelwise graph fed the fp32 grid; end_to_end:
    labels -> image as an engine runs them), worst over the maps, against THRESHOLDS["int8"]; plus
    a check that asap.int8.onnx computes what the two int8 stage graphs compute."""
    from .validate import THRESHOLDS, image_metrics, params_metrics

    staged = StagedGraphs(bundle, graphs)
    pm, em = [], []
    with _engine(staged, QUANTIZED) as e8:
        for k, r in enumerate(refs):
            f = r.map.feeds()
            pm.append(params_metrics(r.params, e8.predict_params(f["labels"], f.get("instances"), ids_checked=True)))
            em.append(image_metrics(r.end_to_end, e8.generate(f["labels"], f.get("instances"), ids_checked=True)))
            if progress:
                progress("evaluating int8", k + 1, len(refs))
        if pixelwise is None:
            pixelwise = evaluate_pixelwise(bundle, graphs, refs)
        stages = {Stage.PREDICTOR.key: _stage_metrics(Stage.PREDICTOR.key, pm), Stage.PIXELWISE.key: pixelwise,
                  Stage.END_TO_END.key: _stage_metrics(Stage.END_TO_END.key, em)}
        fails = [f"{s}: {x}" for s, m in stages.items() for x in m["failures"]]
        fails += check_end_to_end_graph(staged, e8, refs[0].map)
    return Gate(not fails, stages, fails, THRESHOLDS[QUANTIZED].describe(), len(refs), held_out)


def check_end_to_end_graph(staged: StagedGraphs, e8, m: CalibrationMap) -> list[str]:
    """asap.int8.onnx run whole on (a crop of) map `m` vs the int8 predictor + pixelwise graphs:
    the same computation, so within the fp32 thresholds (failures as text; empty = agrees)."""
    from .validate import THRESHOLDS, failures, image_metrics

    S = staged.config.S  # noqa: N806
    side = max(S, (CHECK_CROP // S) * S)
    f = {k: v[:, :side, :side] for k, v in m.feeds().items()}
    n, h, w = f["labels"].shape
    with _engine(staged, QUANTIZED, pixels_per_run=n * h * w) as whole:
        got = whole.generate(f["labels"], f.get("instances"), ids_checked=True)
    want = e8.pixelwise(f["labels"], e8.predict_params(f["labels"], f.get("instances"), ids_checked=True))
    bad = failures(Stage.END_TO_END.key, image_metrics(want, got), THRESHOLDS["fp32"])
    return [f"asap.int8.onnx differs from the int8 predictor + pixelwise graphs on {h}x{w}: {'; '.join(bad)}"] \
        if bad else []


# ---- sensitivity -----------------------------------------------------------------------------------
@dataclass
class SensitivityRow:
    keep_float: str  # a Conv node name, or "pixelwise"
    op_type: str
    psnr_db: float  # end-to-end PSNR vs fp32 with this layer in fp32
    gain_db: float  # over the quantized model as it is

    def to_dict(self) -> dict[str, Any]:
        return {"keep_float": self.keep_float, "op_type": self.op_type, "psnr_db": round(self.psnr_db, 3),
                "gain_db": round(self.gain_db, 3)}


@dataclass
class Sensitivity:
    base_psnr_db: float
    rows: list[SensitivityRow]  # every candidate, most PSNR recovered first
    top: list[str]
    top_together_psnr_db: float | None
    maps: int

    def to_dict(self, k: int | None = None) -> dict[str, Any]:
        return {"base_psnr_db": round(self.base_psnr_db, 3), "maps": self.maps,
                "rows": [r.to_dict() for r in self.rows[:k]], "top": self.top,
                "top_together_psnr_db": None if self.top_together_psnr_db is None else round(self.top_together_psnr_db, 3)}


def sensitivity(bundle, predictor_fp32: onnx.ModelProto, predictor_q: onnx.ModelProto, pixelwise_graph: bytes,
                refs: Sequence[Reference], top: int = DEFAULT_TOP, pixelwise_int8: bool = False,
                progress: Progress | None = None) -> Sensitivity:
    """For each int8 Conv of `predictor_q` (and the pixelwise stage when it is int8): the end-to-end
    PSNR vs fp32 (mean over `refs`' maps) with that layer alone back in fp32 (keep_conv_in_float),
    sorted by the PSNR it recovers; then the `top` layers that recover any PSNR, together."""
    from .validate import psnr_u8

    convs = [n.name for n in predictor_q.graph.node if n.op_type == "Conv"
             and any(i in {o for d in predictor_q.graph.node if d.op_type == "DequantizeLinear" for o in d.output}
                     for i in n.input)]
    fp32_pixelwise = bundle.graph_bytes(Stage.PIXELWISE.graph, "fp32")

    def psnr_of(pred: onnx.ModelProto, pix: bytes) -> float:
        graphs = {Stage.PREDICTOR.graph: pred.SerializeToString(), Stage.PIXELWISE.graph: pix}
        vals = []
        with _engine(StagedGraphs(bundle, graphs), QUANTIZED) as e:
            for r in refs:
                f = r.map.feeds()
                p = e.predict_params(f["labels"], f.get("instances"), ids_checked=True)
                vals.append(psnr_u8(r.end_to_end[IMAGE], e.pixelwise(f["labels"], p)[IMAGE]))
        return float(np.mean(vals))

    total = len(convs) + (1 if pixelwise_int8 else 0) + 2
    step = "sensitivity"
    base = psnr_of(predictor_q, pixelwise_graph)
    if progress:
        progress(step, 1, total)
    rows = []
    for k, name in enumerate(convs):
        v = psnr_of(keep_conv_in_float(predictor_q, predictor_fp32, name), pixelwise_graph)
        rows.append(SensitivityRow(name, "Conv", v, v - base))
        if progress:
            progress(step, k + 2, total)
    if pixelwise_int8:
        v = psnr_of(predictor_q, fp32_pixelwise)
        rows.append(SensitivityRow(PIXELWISE, "SpatialMLP (MatMul)", v, v - base))
        if progress:
            progress(step, total - 1, total)
    rows.sort(key=lambda r: -r.gain_db)
    chosen = [r.keep_float for r in rows[:top] if r.gain_db > 0]
    together = None
    if chosen:
        pred = predictor_q
        for name in chosen:
            if name != PIXELWISE:
                pred = keep_conv_in_float(pred, predictor_fp32, name)
        together = psnr_of(pred, fp32_pixelwise if PIXELWISE in chosen else pixelwise_graph)
    if progress:
        progress(step, total, total)
    return Sensitivity(base, rows, chosen, together, len(refs))


def pixelwise_feeds(bundle, maps: Sequence[CalibrationMap], progress: Progress | None = None) -> list[dict[str, np.ndarray]]:
    """Calibration feeds of the pixelwise graph: each map's labels with the fp32 grid, cut into
    blocks of whole tiles (at most the engine's pixels per run: the MLP's activations of a whole
    1024x1024 map would take ~1 GiB per run; MinMax ranges over the blocks are those of the map)."""
    from .onnxruntime_engine import DEFAULT_PIXELS_PER_RUN
    from .tiled import pixelwise_blocks

    feeds = []
    with _engine(bundle, "fp32") as e32:
        for k, m in enumerate(maps):
            f = m.feeds()
            params = e32.predict_params(f["labels"], f.get("instances"), ids_checked=True)
            feeds.extend(block for _, block in pixelwise_blocks(f["labels"], params, bundle.config.S,
                                                                DEFAULT_PIXELS_PER_RUN))
            if progress:
                progress("fp32 grids for the pixelwise calibration", k + 1, len(maps))
    return feeds


def json_safe(value):
    """`value` with every non-finite float as None (a manifest is strict JSON: no NaN, no Infinity)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ---- the whole run -------------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    graphs: dict[str, bytes]
    gate: Gate
    description: dict[str, Any]
    sensitivity: Sensitivity | None = None
    int8_convs: list[str] = field(default_factory=list)
    float_convs: list[str] = field(default_factory=list)
    pixelwise: str = "int8"  # or "fp32: <why>"
    kept_auto: list[tuple[str, float]] = field(default_factory=list)  # (layer, dB it recovered), in order


def _describe_method(options: QuantizeOptions) -> dict[str, str]:
    tool, calibration = METHODS[options.method]
    if tool == "nncf":
        return {"weights": "int8, per output channel, symmetric (NNCF)",
                "activations": "8-bit per tensor as NNCF chooses (fast bias correction); Quantize/Dequantize moved "
                               "after reflection pads", "biases": "fp32",
                "runtime": "OpenVINO runs these graphs in int8; ONNX Runtime runs their Convs in fp32 (no Quantize "
                           "after a Conv for QLinearConv)"}
    kind = "int8, per tensor, symmetric" if options.activations == "int8" else "uint8, per tensor, asymmetric"
    return {"weights": "int8, per output channel, symmetric",
            "activations": f"{kind} ({calibration} calibration)", "biases": "fp32"}


def quantize_bundle(bundle, calib: Sequence[CalibrationMap], held_out: Sequence[CalibrationMap],
                    options: QuantizeOptions, progress: Progress | None = None) -> QuantizeResult:
    """Quantize `bundle`'s graphs on the maps `calib`, gate them on `held_out` (or, when that is
    empty, on `calib`) against the bundle's fp32 graphs; nothing is written (the caller adds the
    graphs to the bundle: export.bundle.add_precision)."""
    options.check()
    check_method_available(options.method)
    if not calib:
        raise UsageError("no calibration maps")
    tool, calibration = METHODS[options.method]
    evaluation = list(held_out) or list(calib)
    eval_held_out = bool(held_out)
    predictor = bundle.graph_model(Stage.PREDICTOR.graph, "fp32")
    pixelwise = bundle.graph_model(Stage.PIXELWISE.graph, "fp32")
    asap = bundle.graph_model(Stage.END_TO_END.graph, "fp32")

    h, w = calib[0].labels.shape
    convs = conv_work(predictor, h, w)
    int8_convs, float_convs = select_layers(convs, options.layers, options.keep_float)
    if not int8_convs:
        raise UsageError("no Conv node left to quantize (--keep-float names them all)")

    # 1. predictor: calibrate on the maps, quantize the chosen Convs
    reader = CalibrationReader([m.feeds() for m in calib], "calibrating the predictor", progress)
    if tool == "nncf":
        # NNCF quantizes a grouped Conv's input per channel, which ONNX Runtime's QLinearConv refuses
        grouped = [c.name for c in convs if c.groups > 1 and c.name in int8_convs]
        if grouped:
            int8_convs = [n for n in int8_convs if n not in grouped]
            float_convs = [c.name for c in convs if c.name not in int8_convs]
        predictor_q = nncf_quantize(predictor, reader, ignore=float_convs)
    else:
        predictor_q = ort_quantize(predictor, reader, calibration, op_types=["Conv"], exclude=float_convs,
                                   activations=options.activations)

    # 2. the fp32 references on the evaluation maps (and the grids the pixelwise calibration reads)
    refs = references(bundle, evaluation, progress)
    pix_choice = "fp32" if PIXELWISE in options.keep_float else options.pixelwise
    pixel_note, pixel_fn, pixel_stage = "int8", None, None
    if pix_choice != "fp32":
        feeds = pixelwise_feeds(bundle, calib, progress)
        expanded = expand_spatial_mlp(pixelwise)
        pix_q = ort_quantize(expanded, CalibrationReader(feeds, "calibrating the pixelwise MLP", progress), "minmax",
                             op_types=["MatMul"], per_channel=False, activations=options.activations)
        pixel_fn = fold_spatial_mlp(pixelwise, pix_q)
        pix_bytes = with_function(pixelwise, pixel_fn).SerializeToString()
        pixel_stage = evaluate_pixelwise(bundle, {Stage.PIXELWISE.graph: pix_bytes}, refs)
        if pixel_stage["failures"] and pix_choice == "auto":
            pixel_note = ("fp32: its int8 MatMuls failed the gate on their own ("
                          + "; ".join(pixel_stage["failures"]) + ")")
            pixel_fn, pixel_stage = None, None
    else:
        pixel_note = "fp32: --keep-float pixelwise" if PIXELWISE in options.keep_float else PIXELWISE_FP32_NOTE

    def assemble() -> dict[str, bytes]:
        pixelwise_graph = with_function(pixelwise, pixel_fn) if pixel_fn is not None else pixelwise
        graphs = {Stage.PREDICTOR.graph: predictor_q.SerializeToString(),
                  Stage.PIXELWISE.graph: pixelwise_graph.SerializeToString(),
                  Stage.END_TO_END.graph: merge_end_to_end(asap, predictor, predictor_q, pixel_fn).SerializeToString()}
        for g, data in graphs.items():  # what the bundle will hold passes the checker
            try:
                onnx.checker.check_model(onnx.load_model_from_string(data), full_check=False)
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"the int8 {g} graph fails the ONNX checker: {str(exc)[:300]}") from exc
        return graphs

    def scan() -> Sensitivity:
        return sensitivity(bundle, predictor, predictor_q, graphs[Stage.PIXELWISE.graph], refs[:SENSITIVITY_MAPS],
                           options.top, pixelwise_int8=pixel_fn is not None, progress=progress)

    # 3. the gate (+ sensitivity when it fails, or always if asked)
    graphs = assemble()
    gate = evaluate(bundle, graphs, refs, eval_held_out, pixel_stage, progress)
    sens = None
    if options.sensitivity == "always" or (options.sensitivity == "on-failure" and not gate.passed):
        sens = scan()
    # 4. auto keep-float: the layer that recovers most back to fp32 (QDQ surgery, no re-calibration), the
    # gate again, greedily (module docstring); the scan of the graphs as they end is what is reported
    kept_auto: list[tuple[str, float]] = []

    def next_layer() -> SensitivityRow | None:  # never the last int8 Conv: graphs without one are not int8
        rows = [r for r in (sens.rows if sens is not None else []) if r.keep_float == PIXELWISE or len(int8_convs) > 1]
        return rows[0] if rows and rows[0].gain_db >= AUTO_MIN_GAIN_DB else None

    while not gate.passed and len(kept_auto) < options.auto_keep and (best := next_layer()) is not None:
        if best.keep_float == PIXELWISE:
            pixel_fn, pixel_stage = None, None
            pixel_note = f"fp32: kept by auto keep-float (recovered {best.gain_db:.1f} dB)"
        else:
            predictor_q = keep_conv_in_float(predictor_q, predictor, best.keep_float)
            int8_convs = [n for n in int8_convs if n != best.keep_float]
            float_convs = [c.name for c in convs if c.name not in int8_convs]
        kept_auto.append((best.keep_float, best.gain_db))
        graphs = assemble()
        gate = evaluate(bundle, graphs, refs, eval_held_out, pixel_stage, progress)
        sens = scan() if not gate.passed or options.sensitivity == "always" else None

    work = {c.name: c.macs for c in convs}
    total = sum(work.values()) or 1
    nodes = int8_nodes(predictor_q, Stage.PREDICTOR.graph)
    if pixel_fn is not None:
        nodes += int8_nodes(onnx.load_model_from_string(graphs[Stage.PIXELWISE.graph]), Stage.PIXELWISE.graph)
    floats = [{"graph": Stage.PREDICTOR.graph, "name": n, "op_type": "Conv"} for n in float_convs]
    if pixel_fn is None:
        floats.append({"graph": Stage.PIXELWISE.graph, "name": plugin_spec.OP_NAME, "op_type": plugin_spec.OP_NAME})
    description = {
        "method": options.method if options.method != "ort" else "ort-minmax",
        "tool": {"name": "nncf" if tool == "nncf" else "onnxruntime.quantization", "version": tool_version(tool)},
        "format": "QDQ",
        **_describe_method(options),
        "layers": options.layers,
        "keep_float": list(options.keep_float),
        "keep_float_auto": ({"max_layers": options.auto_keep, "min_gain_db": AUTO_MIN_GAIN_DB,
                             "maps": min(len(refs), SENSITIVITY_MAPS)} if options.auto_keep else False),
        "kept_in_fp32": [{"name": n, "reason": "--keep-float"} for n in options.keep_float]
        + [{"name": n, "reason": f"auto: recovered {g:.1f} dB (end-to-end PSNR vs fp32 on "
                                 f"{min(len(refs), SENSITIVITY_MAPS)} map(s))"} for n, g in kept_auto],
        "int8_conv_work_share": round(sum(work[n] for n in int8_convs) / total, 4),
        "int8_nodes": nodes,
        "float_nodes": floats,
        "pixelwise": pixel_note if pixel_fn is None else ("int8: the SpatialMLP function's MatMuls, per-tensor uint8 "
                                                           "activations and grid weights (MinMax calibration)"),
        "samples": len(calib),
        "seed": options.seed,
        "calibration_maps": [m.describe() for m in calib],
        "calibration_pixels": int(sum(m.labels.size for m in calib)),
        "evaluation_maps": [m.describe() for m in evaluation],
        "evaluated_on": ("held-out maps (not used for calibration)" if eval_held_out
                         else "the calibration maps (no other maps were given)"),
        "fidelity": {**gate.to_dict(), "forced": False},
    }
    from .build import tensorrt_qdq_problems

    trt_problems = [p for g in (Stage.PREDICTOR.graph, Stage.END_TO_END.graph)
                    for p in tensorrt_qdq_problems(onnx.load_model_from_string(graphs[g]))]
    description["tensorrt"] = ("buildable: symmetric int8 QDQ (asap build-engine --int8)" if not trt_problems else
                               f"not buildable ({trt_problems[0]}; TensorRT takes symmetric int8 only: "
                               "--method ort --activations int8)")
    if sens is not None:
        description["sensitivity"] = sens.to_dict(options.top)
    return QuantizeResult(graphs, gate, json_safe(description), sens, int8_convs, float_convs, pixel_note, kept_auto)
