"""Resolution-free rendering (`asap infer --scale K`): the parameter grid at the label map's own
resolution, the pixelwise MLP on a K-times denser pixel grid.

The rule (issue 7), for output pixel (x', y') of an image K times larger (K > 0, any real):
  * source position (x, y) = (x'/K, y'/K), real-valued;
  * its tile: (floor(y/S), floor(x/S)) of the grid predicted from the label map at its own size;
  * positional encoding: the ASAPNET.md formula at the real-valued x, y
    (cos 2pi (x mod f)/f, sin .., cos 2pi (y mod f)/f, sin .., f = S .. 2);
  * label id: the source pixel whose area [x, x+1) x [y, y+1) holds (x, y), i.e. labels[floor(y),
    floor(x)] (the pixel plain nearest-neighbour resizing picks, in the same tile), or the id of
    the same output pixel in a label map given at the output resolution (`--hires-labels`).
Output size: ceil(H*K) x ceil(W*K) for an H x W input (the pixels whose source position lies
inside the input). At K = 1 this is the normal forward (infer routes K = 1 to it: identical bytes).

Layout shared by both backends (host side, numpy, `ScaleLayout`): output rows are grouped by
tile row and padded to Ly slots per tile row (Lx per tile column); a slot holds its output pixel's
label channel and its TILE-LOCAL source coordinate u = y - S*floor(y/S) in [0, S), computed in
float64 and passed as float32 (small values: the encoding keeps ~1e-6 accuracy at any image size;
x mod f = u mod f because f divides S). The per-tile MLP then runs on (Ly x Lx) slots per tile:
  torch        `tiled_mlp_torch` (batched matmuls over tiles)
  onnxruntime  the `pixelwise_scaled` graph (`scaled_pixelwise_graph(cfg)`): standard ops, no
               weights (the grid is an input), built from the bundle's config at run time, so
               bundles need no extra file. Inputs: ids int32 (N,h,Ly,w,Lx), params (N,P,h,w),
               u_y float32 (h,Ly), u_x float32 (w,Lx); output rgb float32 (N,h,Ly,w,Lx,3) in
               [-1, 1]; the encoding is computed in the graph (Mod, Cos, Sin).
Work runs in chunks of tile rows (about `CHUNK_PIXELS` output pixels) to bound memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import DONTCARE_ID, ModelConfig
from ..errors import InputError, UsageError

CHUNK_PIXELS = 2**19


def scaled_size(n: int, k: float) -> int:
    """Output pixels along an axis of n input pixels at scale k: the x' with x'/k < n."""
    return max(1, int(math.ceil(n * k - 1e-9)))


MAX_SCALE = 1024.0


def check_scale(k: float, max_pixels: int | None = None) -> float:
    """--scale K: a real number in 1..MAX_SCALE whose output of a 1x1 map fits `max_pixels` (the
    size of each input's output is checked from its header: `check_scaled_output`)."""
    from ..limits import check_range

    try:
        k = float(k)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"--scale must be a number in 1..{MAX_SCALE:g} (got {k!r})") from None
    if math.isfinite(k) and 0 < k < 1:
        raise UsageError(f"--scale {k:g}: K must be >= 1 (rendering below the label map's resolution is not supported)")
    check_range("--scale", k, 1.0, MAX_SCALE)
    if max_pixels is not None and scaled_size(1, k) ** 2 > max_pixels:
        raise UsageError(f"--scale {k:g}: even a 1x1 label map would give {scaled_size(1, k) ** 2:,} pixels, more "
                         f"than --max-pixels {max_pixels:,}")
    return k


def check_scaled_output(path, height: int, width: int, k: float, max_pixels: int, side_by_side: bool = False) -> None:
    """InputError naming the label map if its output at scale K (ceil(H*K) x ceil(W*K), twice as wide
    with --side-by-side) would hold more than `max_pixels` pixels: checked from the header, before
    anything is decoded or allocated."""
    oh, ow = scaled_size(height, k), scaled_size(width, k) * (2 if side_by_side else 1)
    if oh * ow > max_pixels:
        raise InputError(f"{path}: at --scale {k:g} its output would be {ow}x{oh} ({oh * ow:,} pixels), more than "
                         f"--max-pixels {max_pixels:,}")


@dataclass
class AxisLayout:
    """One axis: output coordinate of each (tile, slot), its tile-local source coordinate, validity."""

    out_index: np.ndarray  # (tiles, L) int64 output pixel, clamped to a valid one on padded slots
    src_index: np.ndarray  # (tiles, L) int64 nearest source pixel
    local: np.ndarray  # (tiles, L) float32 tile-local source coordinate in [0, S)
    valid: np.ndarray  # (tiles, L) bool
    n_out: int

    @property
    def slots(self) -> int:
        return self.out_index.shape[1]


def axis_layout(n_src: int, k: float, S: int) -> AxisLayout:  # noqa: N803
    n_out = scaled_size(n_src, k)
    xo = np.arange(n_out, dtype=np.float64)
    src = xo / k
    tile = np.minimum(np.floor(src / S).astype(np.int64), (n_src - 1) // S)
    n_tiles = int(tile.max()) + 1
    counts = np.bincount(tile, minlength=n_tiles)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    L = int(counts.max())  # noqa: N806
    slot = np.arange(L)
    valid = slot[None, :] < counts[:, None]
    out_index = np.where(valid, starts[:, None] + slot[None, :], np.maximum(starts[:, None], 0))
    out_index = np.minimum(out_index, n_out - 1)
    s = src[out_index]
    local = (s - S * np.arange(n_tiles)[:, None]).astype(np.float32)
    local = np.where(valid, local, 0.0).astype(np.float32)
    src_index = np.minimum(np.floor(s).astype(np.int64), n_src - 1)
    return AxisLayout(out_index, src_index, local, valid, n_out)


@dataclass
class ScaleLayout:
    y: AxisLayout
    x: AxisLayout

    @classmethod
    def make(cls, height: int, width: int, k: float, S: int) -> "ScaleLayout":  # noqa: N803
        return cls(axis_layout(height, k, S), axis_layout(width, k, S))

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.y.n_out, self.x.n_out

    @property
    def grid(self) -> tuple[int, int]:
        """Tile rows and columns the output needs (the top-left part of the grid)."""
        return self.y.out_index.shape[0], self.x.out_index.shape[0]

    def gather_ids(self, channel_idx: np.ndarray, hires: bool) -> np.ndarray:
        """(N, H, W) channel indices (at the source resolution, or at the output one when `hires`)
        -> (N, h, Ly, w, Lx) int32 slots."""
        ay, ax = (self.y.out_index, self.x.out_index) if hires else (self.y.src_index, self.x.src_index)
        rows = channel_idx[:, ay.reshape(-1)]  # (N, h*Ly, W)
        return np.ascontiguousarray(rows[:, :, ax.reshape(-1)].reshape(
            channel_idx.shape[0], ay.shape[0], ay.shape[1], ax.shape[0], ax.shape[1]), dtype=np.int32)

    def scatter(self, rgb_slots: np.ndarray) -> np.ndarray:
        """(N, h, Ly, w, Lx, C) -> (N, H', W', C): the valid slots in output order."""
        n, h, ly, w, lx, c = rgb_slots.shape
        flat = rgb_slots.reshape(n, h * ly, w * lx, c)
        return flat[:, self.y.valid.reshape(-1)][:, :, self.x.valid.reshape(-1)]

    def row_chunks(self, pixels: int = CHUNK_PIXELS) -> list[tuple[int, int]]:
        h = self.grid[0]
        per_row = self.y.slots * self.x.slots * self.grid[1]
        step = max(1, pixels // max(1, per_row))
        return [(r, min(h, r + step)) for r in range(0, h, step)]


def channel_index(ids: np.ndarray, cfg: ModelConfig, what: str) -> np.ndarray:
    """Label ids -> one-hot channel index (id 255 -> last channel where accepted); InputError."""
    a = ids.astype(np.int64)
    bad = cfg.invalid_label_ids(a)
    if bad.any():
        y, x = (int(v[0]) for v in np.nonzero(bad)[-2:])
        raise InputError(f"{what}: label id {int(ids[bad].flat[0])} at x={x}, y={y} is out of range: this model takes "
                         f"ids {cfg.allowed_label_ids}")
    if cfg.accepts_dontcare_id:
        a = np.where(a == DONTCARE_ID, cfg.n_label_channels - 1, a)
    return a


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
        x = F.leaky_relu(x, 0.01)
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
        x = op("LeakyRelu", [x], alpha=0.01)
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
        doc_string="ASAP-Net pixelwise MLP on a denser pixel grid (asap infer --scale); see asap_deploy/app/scale.py")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="asap-deploy", ir_version=9)
    onnx.checker.check_model(m, full_check=True)
    return m


# ---- running it on an engine ------------------------------------------------------------------------
class ScaledRenderer:
    """The scaled pixelwise stage for one Engine (torch or onnxruntime)."""

    def __init__(self, engine):
        self.engine = engine
        self.cfg = engine.config
        self._session = None
        if engine.name not in ("torch", "onnxruntime"):
            raise UsageError(f"--scale runs on the torch and onnxruntime backends, not {engine.name} "
                             "(pass --backend onnxruntime or --backend torch)")
        if engine.name == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = ort.InferenceSession(scaled_pixelwise_graph(self.cfg).SerializeToString(), opts,
                                                 providers=list(getattr(engine, "providers", ["CPUExecutionProvider"])))

    def mlp(self, ids: np.ndarray, params: np.ndarray, u_y: np.ndarray, u_x: np.ndarray) -> np.ndarray:
        if self._session is not None:
            return self._session.run(["rgb"], {"ids": ids, "params": np.ascontiguousarray(params, np.float32),
                                               "u_y": u_y, "u_x": u_x})[0]
        import torch

        eng = self.engine
        with torch.inference_mode():
            p = torch.from_numpy(np.ascontiguousarray(params, np.float32)).to(eng.device)
            return tiled_mlp_torch(ids, p, u_y, u_x, self.cfg).float().cpu().numpy()

    def render(self, params: np.ndarray, labels: np.ndarray, k: float, height: int, width: int,
               hires: np.ndarray | None = None, what: str = "input") -> np.ndarray:
        """params (N,P,h,w) of the (padded) label map, labels (N,Hp,Wp) ids (padded), the original
        height x width -> float32 RGB (N, ceil(height*K), ceil(width*K), 3) in [-1, 1]."""
        cfg = self.cfg
        lay = ScaleLayout.make(height, width, k, cfg.S)
        if hires is not None:
            if tuple(hires.shape[1:]) != lay.out_shape:
                raise InputError(f"{what}: the high-resolution label map is {hires.shape[2]}x{hires.shape[1]}, "
                                 f"--scale {k:g} of {width}x{height} needs {lay.out_shape[1]}x{lay.out_shape[0]}")
            ch = channel_index(hires, cfg, what)
        else:
            ch = channel_index(labels[:, :height, :width], cfg, what)
        gh, gw = lay.grid
        ids = lay.gather_ids(ch, hires is not None)
        out = np.empty(ids.shape + (cfg.output_nc,), np.float32)
        for r0, r1 in lay.row_chunks():
            out[:, r0:r1] = self.mlp(ids[:, r0:r1], params[:, :, r0:r1, :gw], lay.y.local[r0:r1], lay.x.local)
        return lay.scatter(out)
