"""ONNX graphs of an ASAP-Net generator, written node by node from the PyTorch module tree.

Why not `torch.onnx.export`: the TorchScript exporter is deprecated in torch 2.x and turns every
reflection pad into ~15 shape-plumbing nodes; the dynamo exporter needs onnxscript and takes
seconds per graph. The low-res stream is a plain chain of Pad/Conv/InstanceNorm/ReLU modules, so
walking the module tree gives a small, readable, deterministic graph whose initializers carry the
state-dict key names (which is how the PyTorch reference can be rebuilt from a bundle). Every
module the walker does not know is refused with an ExportError; the graphs are proven equal to
the PyTorch model by the tests and by `asap validate`.

Graphs (opset 18, IR 9; batch, H and W dynamic, H and W multiples of S):
  predictor: labels (N,H,W) [+ instances (N,H,W) int32] -> params (N,P,H/S,W/S) float32
  pixelwise: labels (N,H,W) + params -> image (N,H,W,3) uint8, image_float (N,H,W,3) float32
  asap:      labels [+ instances] -> image, image_float (both stages in one graph)
The per-pixel MLP is ONE node `SpatialMLP` (domain `asap`, attribute plugin_namespace="asap")
backed by a model-local function of the same name with a standard-op body (per tile: layer 1 as
a row Gather at tile*label_count + label, the positional encoding as one constant (S*S, 4 log2 S)
table times the tiles' weights, batched MatMul + bias for the other layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from asap_deploy.config import DONTCARE_ID, ModelConfig
from asap_deploy.errors import AsapError
from asap_deploy.plugins import spec as plugin_spec

from .stages import GRAPHS, Stage

OPSET = 18
IR_VERSION = 9
PRODUCER = "asap-deploy"

# Public tensor names of the graphs (the manifest lists them with dtypes and shapes).
LABELS, INSTANCES, PARAMS, IMAGE, IMAGE_FLOAT = "labels", "instances", "params", "image", "image_float"


class ExportError(AsapError):
    """A model that cannot be written as ONNX (unknown module, bad config)."""

    exit_code = 7


def _tensor_type(dtype: str) -> int:
    return {"uint8": TensorProto.UINT8, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT}[dtype]


@dataclass
class _Builder:
    """Collects nodes and initializers with deterministic names."""

    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    counter: int = 0

    def op(self, op_type: str, inputs: list[str], name: str | None = None, domain: str = "", n_out: int = 1,
           outputs: list[str] | None = None, **attrs: Any) -> str:
        self.counter += 1
        name = name or f"{op_type}_{self.counter}"
        outs = outputs or ([f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)])
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0]

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        """A Constant node (usable inside function bodies, where initializers are not allowed)."""
        return self.op("Constant", [], name=name, outputs=[name],
                       value=numpy_helper.from_array(np.ascontiguousarray(array), name))


def _i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


# ---- front: ids -> channel index ---------------------------------------------------------------
def _channel_ids(b: _Builder, cfg: ModelConfig, labels: str) -> str:
    """Label ids (uint8/int32) -> INT32 one-hot channel index (id 255 -> last channel)."""
    ids = b.op("Cast", [labels], name="labels_to_int32", to=TensorProto.INT32)
    if cfg.accepts_dontcare_id:
        is_dc = b.op("Equal", [ids, b.const("dontcare_id", np.array(DONTCARE_ID, np.int32))], name="is_dontcare")
        ids = b.op("Where", [is_dc, b.const("dontcare_channel", np.array(cfg.n_label_channels - 1, np.int32)), ids],
                   name="dontcare_to_last_channel")
    return ids


# ---- predictor ---------------------------------------------------------------------------------
def _one_hot(b: _Builder, cfg: ModelConfig, ch: str) -> str:
    """(N,H,W) int32 channel ids -> (N,C,H,W) float one-hot as Equal against a (1,C,1,1) arange."""
    x = b.op("Unsqueeze", [ch, b.const("axis1", _i64(1))], name="ids_unsqueeze")
    classes = b.const("label_channels", np.arange(cfg.n_label_channels, dtype=np.int32).reshape(1, -1, 1, 1))
    # Where on float constants rather than Cast(to=FLOAT): fp16 conversion then retypes it cleanly
    return b.op("Where", [b.op("Equal", [x, classes], name="one_hot_equal"), b.init("one_hot_on", np.array(1.0, np.float32)),
                          b.init("one_hot_off", np.array(0.0, np.float32))], name="one_hot")


def _edges(b: _Builder, instances: str) -> str:
    """(N,H,W) int32 instance ids -> (N,1,H,W) float: 1 where a 4-neighbour has another id."""
    big = np.iinfo(np.int64).max
    parts = []
    for axis, (lo_pad, hi_pad) in ((2, ((0, 0, 1), (0, 0, 0))), (1, ((0, 1, 0), (0, 0, 0)))):
        tag = "x" if axis == 2 else "y"
        a = b.op("Slice", [instances, b.const(f"e{tag}_s1", _i64(1)), b.const(f"e{tag}_e1", _i64(big)),
                           b.const(f"e{tag}_ax", _i64(axis))], name=f"edge_{tag}_next")
        c = b.op("Slice", [instances, b.const(f"e{tag}_s0", _i64(0)), b.const(f"e{tag}_e0", _i64(-1)),
                           b.const(f"e{tag}_ax2", _i64(axis))], name=f"edge_{tag}_prev")
        d = b.op("Where", [b.op("Equal", [a, c], name=f"edge_{tag}_eq"), b.init(f"edge_{tag}_same", np.array(0.0, np.float32)),
                           b.init(f"edge_{tag}_differs", np.array(1.0, np.float32))], name=f"edge_{tag}_f")
        # the difference marks both pixels: pad it once at the start and once at the end of the axis
        before = [0, 0, 0]
        before[axis] = 1
        for side, pads in (("lo", before + [0, 0, 0]), ("hi", [0, 0, 0] + before)):
            parts.append(b.op("Pad", [d, b.const(f"edge_{tag}_{side}_pads", _i64(*pads))], name=f"edge_{tag}_{side}",
                              mode="constant"))
    e = b.op("Max", parts, name="edges_max")
    return b.op("Unsqueeze", [e, b.const("edge_axis1", _i64(1))], name="edges")


def _conv(b: _Builder, x: str, conv, key: str) -> str:
    """nn.Conv2d -> Conv (initializer names = state-dict keys)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ExportError(f"{key}: Conv2d padding {conv.padding!r}/{conv.padding_mode!r} is not supported")
    ph, pw = conv.padding
    ins = [x, b.init(f"{key}.weight", conv.weight.detach().cpu().float().numpy())]
    if conv.bias is not None:
        ins.append(b.init(f"{key}.bias", conv.bias.detach().cpu().float().numpy()))
    return b.op("Conv", ins, name=key, kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
                pads=[ph, pw, ph, pw], dilations=list(conv.dilation), group=conv.groups)


def _module(b: _Builder, x: str, m, key: str) -> str:
    from torch import nn

    from asap_deploy.model import ConvBlock

    if isinstance(m, nn.Sequential):
        for i, child in enumerate(m):
            x = _module(b, x, child, f"{key}.{i}")
        return x
    if isinstance(m, ConvBlock):
        return _module(b, x, m.conv_block, f"{key}.conv_block")
    if isinstance(m, nn.ReflectionPad2d):
        left, right, top, bottom = m.padding
        return b.op("Pad", [x, b.const(f"{key}.pads", _i64(0, 0, top, left, 0, 0, bottom, right))], name=key,
                    mode="reflect")
    if isinstance(m, nn.Conv2d):
        return _conv(b, x, m, key)
    if isinstance(m, nn.InstanceNorm2d):
        if not m.affine or m.track_running_stats:
            raise ExportError(f"{key}: only affine InstanceNorm2d without running stats is supported")
        return b.op("InstanceNormalization", [x, b.init(f"{key}.weight", m.weight.detach().cpu().float().numpy()),
                                              b.init(f"{key}.bias", m.bias.detach().cpu().float().numpy())],
                    name=key, epsilon=float(m.eps))
    if isinstance(m, nn.ReLU):
        return b.op("Relu", [x], name=key)
    raise ExportError(f"{key}: module {type(m).__name__} has no ONNX translation in asap-deploy")


def _predictor(b: _Builder, model, ch: str, instances: str | None) -> str:
    from asap_deploy.model import TentDownsample

    cfg = model.cfg
    x = _one_hot(b, cfg, ch)
    if cfg.instance_edges:
        x = b.op("Concat", [x, _edges(b, instances)], name="lowres_input", axis=1)
    pre = model.pre_downsample
    if isinstance(pre, TentDownsample):
        s, c = pre.stride, pre.channels
        x = b.op("Pad", [x, b.const("pre_downsample.pads", _i64(0, 0, s // 2, s // 2, 0, 0, s // 2, s // 2))],
                 name="pre_downsample.pad", mode="reflect")
        for tag, kern, stride in (("h", pre.kernel_h, [1, s]), ("v", pre.kernel_v, [s, 1])):
            k = kern.detach().cpu().float().numpy()
            x = b.op("Conv", [x, b.init(f"pre_downsample.kernel_{tag}", k)], name=f"pre_downsample.conv_{tag}",
                     kernel_shape=list(k.shape[2:]), strides=stride, group=c)
    x = _module(b, x, model.lowres_stream.model, "lowres_stream.model")
    return b.op("Identity", [x], name="params_out", outputs=[PARAMS])


# ---- pixelwise: the SpatialMLP node and its function ------------------------------------------
def spatial_mlp_function(cfg: ModelConfig) -> onnx.FunctionProto:
    """Standard-op body of SpatialMLP(ids INT32 (N,H,W), params T (N,P,H/S,W/S)) -> rgb T (N,H,W,3).

    Type-generic in T (float or float16): the one constant, the positional-encoding table, goes
    through CastLike(params).
    """
    from asap_deploy.model import positional_encoding_table

    S, n_lab, P = cfg.S, cfg.n_label_channels, cfg.num_params  # noqa: N806
    b = _Builder()
    c = lambda name, arr: b.const(name, arr)  # noqa: E731
    shp = b.op("Shape", ["ids"], name="ids_shape")
    dims = [b.op("Slice", [shp, c(f"d{i}_s", _i64(i)), c(f"d{i}_e", _i64(i + 1))], name=f"dim_{n}")
            for i, n in enumerate("NHW")]
    n_, h_full, w_full = dims
    s_c = c("S", _i64(S))
    h = b.op("Div", [h_full, s_c], name="grid_h")
    w = b.op("Div", [w_full, s_c], name="grid_w")
    # ids -> (T, S*S) in tile order (n, row, col), pixels row-major inside a tile
    t5 = b.op("Concat", [n_, h, s_c, w, s_c], name="tiles5_shape", axis=0)
    idt = b.op("Reshape", [b.op("Transpose", [b.op("Reshape", ["ids", t5], name="ids_5d")], name="ids_tiles",
                                perm=[0, 1, 3, 2, 4]), c("tile_pixels", _i64(-1, S * S))], name="ids_per_tile")
    # params -> (T, P)
    flat = b.op("Reshape", [b.op("Transpose", ["params"], name="params_nhwc", perm=[0, 2, 3, 1]),
                            c("flat_shape", _i64(-1, P))], name="params_per_tile")
    n_tiles = b.op("Squeeze", [b.op("Slice", [b.op("Shape", [flat], name="flat_shape_of"), c("t_s", _i64(0)),
                                              c("t_e", _i64(1))], name="n_tiles_1d")], name="n_tiles")
    tile = b.op("Range", [c("zero", np.array(0, np.int64)), n_tiles, c("one", np.array(1, np.int64))], name="tile_index")
    base = b.op("Mul", [b.op("Unsqueeze", [tile, c("ax1", _i64(1))], name="tile_col"), c("n_lab", np.array(n_lab, np.int64))],
                name="tile_row_base")
    gidx = b.op("Add", [base, b.op("Cast", [idt], name="ids_i64", to=TensorProto.INT64)], name="gather_index")

    def piece(tag: str, start: int, stop: int, shape: tuple[int, ...]) -> str:
        sl = b.op("Slice", [flat, c(f"{tag}_s", _i64(start)), c(f"{tag}_e", _i64(stop)), c(f"{tag}_ax", _i64(1))],
                  name=f"{tag}_slice")
        return b.op("Reshape", [sl, c(f"{tag}_shape", _i64(*shape))], name=tag)

    offsets = cfg.param_offsets()
    last = len(offsets) - 1
    t1 = b.op("Unsqueeze", [n_tiles, c("t_ax0", _i64(0))], name="n_tiles_vec")

    def filled(tag: str, value: float, rows: int) -> str:
        """(T, rows, 1) of `value`, in the type of params."""
        shape = b.op("Concat", [t1, c(f"{tag}_dims", _i64(rows, 1))], name=f"{tag}_shape", axis=0)
        v = b.op("CastLike", [c(f"{tag}_value", np.array(value, np.float32)), "params"], name=f"{tag}_like")
        return b.op("Expand", [v, shape], name=tag)

    # Biases ride inside the matmuls: every activation carries one extra channel fixed at 1
    # (leaky_relu(1) = 1), and each layer's weight is augmented to [[W, 0], [b, 1]] per tile
    # ([W; b] for the last layer). That costs T*(c_in+1)*(c_out+1) values per layer instead of
    # a full-resolution Add per layer.
    x = None
    for li, (b0, w0, cin, cout) in enumerate(offsets):
        bias = piece(f"b{li}", b0, b0 + cout, (-1, 1, cout))
        if li == 0:
            # rows 0..n_lab-1 of W1 (label inputs): one gather of row tile*n_lab + label; the bias
            # is added to these few rows per tile, and the gathered rows carry the constant 1.
            w_lab = piece("w0_labels", w0, w0 + n_lab * cout, (-1, n_lab, cout))
            w_lab = b.op("Add", [w_lab, bias], name="w0_labels_plus_bias")
            w_lab = b.op("Concat", [w_lab, filled("ones_lab", 1.0, n_lab)], name="w0_labels_aug", axis=2)
            w_lab = b.op("Reshape", [w_lab, c("w0_rows_shape", _i64(-1, cout + 1))], name="w0_label_rows")
            w_pe = piece("w0_pe", w0 + n_lab * cout, w0 + cin * cout, (-1, cin - n_lab, cout))
            w_pe = b.op("Concat", [w_pe, filled("zeros_pe", 0.0, cin - n_lab)], name="w0_pe_aug", axis=2)
            pe = b.op("CastLike", [c("pe_table", positional_encoding_table(S)), "params"], name="pe_table_like")
            lab = b.op("Gather", [w_lab, gidx], name="layer0_label_rows", axis=0)
            x = b.op("Add", [lab, b.op("MatMul", [pe, w_pe], name="layer0_pe")], name="layer0")
        else:
            x = b.op("LeakyRelu", [x], name=f"act{li - 1}", alpha=plugin_spec.LEAKY_SLOPE)
            wl = piece(f"w{li}", w0, w0 + cin * cout, (-1, cin, cout))
            if li < last:
                wl = b.op("Concat", [wl, filled(f"zeros{li}", 0.0, cin)], name=f"w{li}_right", axis=2)
                bias = b.op("Concat", [bias, filled(f"one{li}", 1.0, 1)], name=f"b{li}_aug", axis=2)
            wl = b.op("Concat", [wl, bias], name=f"w{li}_aug", axis=1)
            x = b.op("MatMul", [x, wl], name=f"layer{li}")
    x = b.op("Tanh", [x], name="tanh")
    n_out = cfg.output_nc
    t6 = b.op("Concat", [n_, h, w, s_c, s_c, c("c_out", _i64(n_out))], name="tiles6_shape", axis=0)
    x = b.op("Transpose", [b.op("Reshape", [x, t6], name="rgb_tiles")], name="rgb_rows", perm=[0, 1, 3, 2, 4, 5])
    out_shape = b.op("Concat", [n_, h_full, w_full, c("c_out2", _i64(n_out))], name="rgb_shape", axis=0)
    b.op("Reshape", [x, out_shape], name="rgb", outputs=["rgb"])
    return helper.make_function(
        plugin_spec.DOMAIN, plugin_spec.OP_NAME, ["ids", "params"], ["rgb"], b.nodes,
        [helper.make_opsetid("", OPSET)], attributes=sorted(plugin_spec.node_attributes(cfg)),
        doc_string="Spatially-adaptive per-pixel MLP of ASAP-Net, per tile (standard ops; TensorRT maps the node "
                   "to the asap::SpatialMLP plugin).",
    )


def _pixelwise(b: _Builder, cfg: ModelConfig, ch: str, params: str) -> None:
    rgb = b.op(plugin_spec.OP_NAME, [ch, params], name="spatial_mlp", domain=plugin_spec.DOMAIN,
               **plugin_spec.node_attributes(cfg))
    b.op("Identity", [rgb], name="image_float_out", outputs=[IMAGE_FLOAT])
    # uint8 = round((x + 1) * 127.5), clipped: the same formula as asap_deploy.io.to_uint8
    y = b.op("Mul", [b.op("Add", [rgb, b.init("one_f", np.array(1.0, np.float32))], name="to_u8_add"),
                     b.init("half_range", np.array(127.5, np.float32))], name="to_u8_scale")
    y = b.op("Clip", [b.op("Round", [y], name="to_u8_round"), b.init("u8_lo", np.array(0.0, np.float32)),
                      b.init("u8_hi", np.array(255.0, np.float32))], name="to_u8_clip")
    b.op("Cast", [y], name="to_u8_cast", outputs=[IMAGE], to=TensorProto.UINT8)


# ---- public ------------------------------------------------------------------------------------
GRAPH_NAMES = GRAPHS  # one per stage: predictor, pixelwise, asap (= end-to-end); export/stages.py
FP32_NODES_FOR_FP16 = ("to_u8_add", "to_u8_scale", "to_u8_round", "to_u8_clip", "to_u8_cast")


def io_spec(cfg: ModelConfig, graph: str) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes of a graph's inputs and outputs (shape entries: int or a name)."""
    lab = {"name": LABELS, "dtype": cfg.label_dtype, "shape": ["N", "H", "W"]}
    inst = {"name": INSTANCES, "dtype": "int32", "shape": ["N", "H", "W"]}
    par = {"name": PARAMS, "dtype": "float32", "shape": ["N", cfg.num_params, "H/S", "W/S"]}
    img = {"name": IMAGE, "dtype": "uint8", "shape": ["N", "H", "W", cfg.output_nc]}
    imgf = {"name": IMAGE_FLOAT, "dtype": "float32", "shape": ["N", "H", "W", cfg.output_nc]}
    front = [lab] + ([inst] if cfg.instance_edges else [])
    return {
        Stage.PREDICTOR.graph: {"inputs": front, "outputs": [par]},
        Stage.PIXELWISE.graph: {"inputs": [lab, par], "outputs": [img, imgf]},
        Stage.END_TO_END.graph: {"inputs": front, "outputs": [img, imgf]},
    }[graph]


def _value_info(spec: dict[str, Any], S: int) -> onnx.ValueInfoProto:  # noqa: N803
    dims = [{"H/S": "h", "W/S": "w"}.get(d, d) if isinstance(d, str) else d for d in spec["shape"]]
    return helper.make_tensor_value_info(spec["name"], _tensor_type(spec["dtype"]), dims)


def build_graph(model, graph: str) -> onnx.ModelProto:
    """One of GRAPH_NAMES as an fp32 ONNX model, from a (CPU, eval) ASAPNetGenerator."""
    if graph not in GRAPH_NAMES:
        raise ExportError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPH_NAMES)}")
    cfg: ModelConfig = model.cfg
    b = _Builder()
    ch = _channel_ids(b, cfg, LABELS)
    if graph in (Stage.PREDICTOR.graph, Stage.END_TO_END.graph):
        params = _predictor(b, model, ch, INSTANCES if cfg.instance_edges else None)
    else:
        params = PARAMS
    if graph in (Stage.PIXELWISE.graph, Stage.END_TO_END.graph):
        _pixelwise(b, cfg, ch, params)
    spec = io_spec(cfg, graph)
    S = cfg.S  # noqa: N806
    doc = (f"ASAP-Net {graph} graph (asap-deploy). Batch N, height H and width W are dynamic; H and W must be "
           f"multiples of S={S}; h = H/S, w = W/S. Label ids {cfg.label_dtype}: 0..{cfg.n_label_channels - 1}"
           + (" and 255 (don't care)" if cfg.accepts_dontcare_id else "") + ". image = round((image_float+1)*127.5).")
    g = helper.make_graph(b.nodes, f"asap_{graph}", [_value_info(s, S) for s in spec["inputs"]],
                          [_value_info(s, S) for s in spec["outputs"]], initializer=b.inits, doc_string=doc)
    opsets = [helper.make_opsetid("", OPSET)]
    functions = []
    if graph in (Stage.PIXELWISE.graph, Stage.END_TO_END.graph):
        opsets.append(helper.make_opsetid(plugin_spec.DOMAIN, 1))
        functions.append(spatial_mlp_function(cfg))
    m = helper.make_model(g, opset_imports=opsets, functions=functions, producer_name=PRODUCER,
                          ir_version=IR_VERSION, doc_string=doc)
    return m


def check_graph(m: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """checker.check_model(full_check=True) + strict shape inference; ExportError naming `what`."""
    try:
        onnx.checker.check_model(m, full_check=True)
        return onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{what}: the ONNX graph fails the checker/shape inference: {exc}") from exc
