"""The scaled pixelwise stage (`asap infer --scale K`) for the engines that run it: the per-tile MLP
on a denser pixel grid, given the slot layout that asap_deploy/app/scale.py computes (module doc
there: the rule, the layout, the chunks).

Inputs: ids int32 (N,h,Ly,w,Lx) label channel indices, params (N,P,h,w), u_y float32 (h,Ly),
u_x float32 (w,Lx) tile-local source coordinates; output rgb float32 (N,h,Ly,w,Lx,3) in [-1, 1].
  torch        `tiled_mlp_torch` (batched matmuls over tiles)
  onnxruntime  the `pixelwise_scaled` graph (`scaled_pixelwise_graph(cfg)`): standard ops, no
               weights (the grid is an input), built from the bundle's config at run time, so
               bundles need no extra file; the encoding is computed in the graph (Mod, Cos, Sin).
"""

from __future__ import annotations

import math

import numpy as np

from asap_deploy.config import LEAKY_SLOPE, ModelConfig


# ---- torch -------------------------------------------------------------------------------------
def _pe_axis_torch(torch, u, S: int):  # noqa: N803
    """(tiles, L) local coordinates -> (tiles, L, 2 log2 S): [cos, sin] per f = S..2."""
    cols, f = [], S
    while f > 1:
        a = (2 * math.pi / f) * torch.remainder(u, f)
        cols += [torch.cos(a), torch.sin(a)]
        f //= 2
    return torch.stack(cols, -1)


def tiled_mlp_torch(ids: np.ndarray, params, u_y: np.ndarray, u_x: np.ndarray, cfg: ModelConfig):
    """ids (N,h,Ly,w,Lx) channel indices, params torch (N,P,h,w), u_y (h,Ly), u_x (w,Lx)
    -> torch float32 (N,h,Ly,w,Lx,3) in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    S, n_lab = cfg.S, cfg.n_label_channels  # noqa: N806
    n, P, h, w = params.shape  # noqa: N806
    ly, lx = u_y.shape[1], u_x.shape[1]
    dev, dt = params.device, params.dtype
    flat = params.permute(0, 2, 3, 1).reshape(n * h * w, P)
    offsets = cfg.param_offsets()
    b0, w0, cin, c1 = offsets[0]
    w1 = flat[:, w0:w0 + cin * c1].view(-1, cin, c1)
    table = (w1[:, :n_lab] + flat[:, b0:b0 + c1].view(-1, 1, c1)).reshape(-1, c1)
    is_x = (torch.arange(cin - n_lab) % 4) < 2
    w1_x, w1_y = w1[:, n_lab:][:, is_x], w1[:, n_lab:][:, ~is_x]  # (T, 2L, c1)
    pe_y = _pe_axis_torch(torch, torch.from_numpy(u_y).to(dev, dt), S)  # (h, Ly, 2L)
    pe_x = _pe_axis_torch(torch, torch.from_numpy(u_x).to(dev, dt), S)  # (w, Lx, 2L)
    py = torch.matmul(pe_y.view(1, h, 1, ly, -1), w1_y.view(n, h, w, -1, c1))  # (n,h,w,Ly,c1)
    px = torch.matmul(pe_x.view(1, 1, w, lx, -1), w1_x.view(n, h, w, -1, c1))  # (n,h,w,Lx,c1)
    idt = torch.from_numpy(ids).to(dev).long().permute(0, 1, 3, 2, 4).reshape(n * h * w, ly * lx)
    tile = torch.arange(n * h * w, device=dev).view(-1, 1)
    x = table[tile * n_lab + idt].view(n, h, w, ly, lx, c1) + py.unsqueeze(4) + px.unsqueeze(3)
    x = x.view(n * h * w, ly * lx, c1)
    for li, (bo, wo, ci, co) in enumerate(offsets[1:], start=1):
        x = F.leaky_relu(x, LEAKY_SLOPE)
        x = torch.baddbmm(flat[:, bo:bo + co].view(-1, 1, co), x, flat[:, wo:wo + ci * co].view(-1, ci, co))
    x = torch.tanh(x)
    return x.view(n, h, w, ly, lx, -1).permute(0, 1, 3, 2, 4, 5)


# ---- ONNX graph ----------------------------------------------------------------------------------
SCALED_GRAPH = "pixelwise_scaled"


def scaled_pixelwise_graph(cfg: ModelConfig):
    """The `pixelwise_scaled` ONNX model (opset 18, standard ops, no weights) for `cfg`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    S, n_lab, P = cfg.S, cfg.n_label_channels, cfg.num_params  # noqa: N806
    nodes, count = [], [0]

    def op(kind, inputs, **attrs):
        count[0] += 1
        name = f"{kind}_{count[0]}"
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name

    def const(arr):
        count[0] += 1
        name = f"c_{count[0]}"
        nodes.append(helper.make_node("Constant", [], [name], name=name,
                                      value=numpy_helper.from_array(np.ascontiguousarray(arr), name)))
        return name

    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    dim = lambda t, i: op("Slice", [op("Shape", [t]), const(i64(i)), const(i64(i + 1))])  # noqa: E731
    n_, h_, w_ = dim("params", 0), dim("params", 2), dim("params", 3)
    ly_, lx_ = dim("u_y", 1), dim("u_x", 1)
    flat = op("Reshape", [op("Transpose", ["params"], perm=[0, 2, 3, 1]), const(i64(-1, P))])

    def piece(start, stop, tail):
        return op("Reshape", [op("Slice", [flat, const(i64(start)), const(i64(stop)), const(i64(1))]), const(i64(-1, *tail))])

    offsets = cfg.param_offsets()
    b0, w0, cin, c1 = offsets[0]
    table = op("Reshape", [op("Add", [piece(w0, w0 + n_lab * c1, (n_lab, c1)), piece(b0, b0 + c1, (1, c1))]),
                           const(i64(-1, c1))])
    pe_rows = np.arange(cin - n_lab)
    rows_x, rows_y = n_lab + pe_rows[pe_rows % 4 < 2], n_lab + pe_rows[pe_rows % 4 >= 2]
    w1 = piece(w0, w0 + cin * c1, (cin, c1))
    grid5 = lambda last: op("Concat", [n_, h_, w_, const(i64(*last))], axis=0)  # noqa: E731
    w1_x = op("Reshape", [op("Gather", [w1, const(rows_x)], axis=1), grid5((len(rows_x), c1))])
    w1_y = op("Reshape", [op("Gather", [w1, const(rows_y)], axis=1), grid5((len(rows_y), c1))])

    def pe(u):
        cols, f = [], S
        while f > 1:
            a = op("Mul", [op("Mod", [u, const(np.array(f, np.float32))], fmod=1),
                           const(np.array(2 * math.pi / f, np.float32))])
            cols += [op("Unsqueeze", [op("Cos", [a]), const(i64(-1))]), op("Unsqueeze", [op("Sin", [a]), const(i64(-1))])]
            f //= 2
        return op("Concat", cols, axis=-1)

    one = const(i64(1))
    pe_y = op("Reshape", [pe("u_y"), op("Concat", [one, h_, one, ly_, const(i64(-1))], axis=0)])
    pe_x = op("Reshape", [pe("u_x"), op("Concat", [one, one, w_, lx_, const(i64(-1))], axis=0)])
    py = op("Unsqueeze", [op("MatMul", [pe_y, w1_y]), const(i64(4))])  # (n,h,w,Ly,1,c1)
    px = op("Unsqueeze", [op("MatMul", [pe_x, w1_x]), const(i64(3))])  # (n,h,w,1,Lx,c1)
    ids = op("Cast", [op("Transpose", ["ids"], perm=[0, 1, 3, 2, 4])], to=TensorProto.INT64)  # (n,h,w,Ly,Lx)
    n_tiles = op("Mul", [op("Mul", [n_, h_]), w_])
    tile = op("Range", [const(np.array(0, np.int64)), op("Squeeze", [n_tiles, const(i64(0))]),
                        const(np.array(1, np.int64))])
    tile = op("Reshape", [op("Mul", [tile, const(np.array(n_lab, np.int64))]), grid5((1, 1))])
    x = op("Gather", [table, op("Add", [ids, tile])], axis=0)  # (n,h,w,Ly,Lx,c1)
    x = op("Add", [op("Add", [x, py]), px])
    x = op("Reshape", [x, op("Concat", [n_tiles, const(i64(-1, c1))], axis=0)])
    for bo, wo, ci, co in offsets[1:]:
        x = op("LeakyRelu", [x], alpha=LEAKY_SLOPE)
        x = op("Add", [op("MatMul", [x, piece(wo, wo + ci * co, (ci, co))]), piece(bo, bo + co, (1, co))])
    x = op("Tanh", [x])
    x = op("Reshape", [x, op("Concat", [n_, h_, w_, ly_, lx_, const(i64(cfg.output_nc))], axis=0)])
    nodes.append(helper.make_node("Transpose", [x], ["rgb"], name="rgb", perm=[0, 1, 3, 2, 4, 5]))
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        nodes, "asap_pixelwise_scaled",
        [vi("ids", TensorProto.INT32, ["N", "h", "Ly", "w", "Lx"]), vi("params", TensorProto.FLOAT, ["N", P, "h", "w"]),
         vi("u_y", TensorProto.FLOAT, ["h", "Ly"]), vi("u_x", TensorProto.FLOAT, ["w", "Lx"])],
        [vi("rgb", TensorProto.FLOAT, ["N", "h", "Ly", "w", "Lx", cfg.output_nc])],
        doc_string="ASAP-Net pixelwise MLP on a denser pixel grid (asap infer --scale); see asap_deploy/engines/scaled.py")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="asap-deploy", ir_version=9)
    onnx.checker.check_model(m, full_check=True)
    return m
