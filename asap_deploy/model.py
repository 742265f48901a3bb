"""The ASAP-Net generator, computing exactly the authors' function (ASAPNET.md), faster.

Input is label IDS (N, H, W), never a host-side one-hot. The low-res stream has the authors'
module structure so their state dicts load with their key names. The pixelwise stage runs per
tile, in cache-sized chunks, without any full-resolution intermediate of the authors' code:
  * the positional encoding is one (S*S, 4 log2 S) table shared by every tile (separable in x, y);
  * layer 1 for one-hot inputs is a row gather of the tile's weight matrix by label id;
  * each layer's bias is the first row of its matrix (activations carry a constant 1).
The low-res stream's tent pre-downsample is computed from the ids, not from a full-res one-hot.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DONTCARE_ID, LEAKY_SLOPE, ModelConfig
from .errors import InputError

# Pixels per chunk of the pixelwise stage (whole tiles, at least one): two reused activation
# buffers of 65 fp32 channels, 2 MiB at 2**12, stay in a 2 MiB L2 and bound peak memory; larger
# chunks measured slower on the benchmark CPU (benchmarks/FORWARD_SPEED.md).
DEFAULT_CHUNK_PIXELS = 2**12


# ---- fixed, parameter-free pieces ----------------------------------------------------------
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def device_constant(name: str, arg: int, make, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The numpy table `make()` as a tensor on `device`, made once per (name, arg, device, dtype).
    Taken from here, a forward pass does no host-to-device copy after its first call, so it can be
    captured in a CUDA graph (a copy from pageable host memory cannot be captured)."""
    key = (name, arg, str(torch.device(device)), dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.from_numpy(make()).to(device=device, dtype=dtype)
    return t


def tent_kernel(stride: int) -> np.ndarray:
    """1-D separable bilinear "tent" kernel [1,3,..,2s-1,2s-1,..,3,1]/sum (length 2s)."""
    ramp = np.arange(1, 2 * stride + 1, 2, dtype=np.float64)
    k = np.concatenate([ramp, ramp[::-1]])
    return (k / k.sum()).astype(np.float32)


def positional_encoding_table(S: int) -> np.ndarray:  # noqa: N803
    """(S*S, 4*log2 S) encoding of the pixels of one tile, row-major (y, x) within the tile.

    For f = S, S/2, ..., 2: cos(2pi(x mod f)/f), sin(..x..), cos(..y..), sin(..y..). Tiles are
    S-aligned, so x mod f is the same in every tile: this table serves all of them.
    """
    ys, xs = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    x = xs.reshape(-1).astype(np.float32)
    y = ys.reshape(-1).astype(np.float32)
    cols, f = [], S
    while f > 1:
        ax = np.float32(2 * math.pi) * np.remainder(x, f) / np.float32(f)
        ay = np.float32(2 * math.pi) * np.remainder(y, f) / np.float32(f)
        cols += [np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay)]
        f //= 2
    return np.stack(cols, axis=1).astype(np.float32)


def instance_edges(instances: torch.Tensor) -> torch.Tensor:
    """(N, H, W) instance ids -> (N, 1, H, W) float edge map: 1 where a 4-neighbour differs."""
    t = instances
    edge = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    dx = t[:, :, 1:] != t[:, :, :-1]
    dy = t[:, 1:, :] != t[:, :-1, :]
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    return edge.unsqueeze(1).float()


def label_channels(labels: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Label ids -> int64 channel index of the one-hot encoding, validated.

    Ids 0..n_label_channels-1 map to themselves; id 255 (don't care) maps to the last channel
    where the config has one. Anything else raises InputError.
    """
    idx = labels.long()
    n = cfg.n_label_channels
    cfg.check_label_ids(idx, at=None)
    if cfg.accepts_dontcare_id:
        idx = torch.where(idx == DONTCARE_ID, torch.full_like(idx, n - 1), idx)
    return idx


def one_hot(channel_idx: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W) int64 -> (N, n, H, W) one-hot."""
    out = torch.zeros((channel_idx.shape[0], n, *channel_idx.shape[1:]), dtype=dtype, device=channel_idx.device)
    return out.scatter_(1, channel_idx.unsqueeze(1), 1.0)


def tent_downsample_ids(channel_idx: torch.Tensor, n: int, stride: int) -> torch.Tensor:
    """The tent pre-downsample of the one-hot of `channel_idx` (N, H, W), computed from the ids:
    the horizontal pass adds each tap's weight to the class under it, so no full-resolution
    one-hot exists; the vertical pass is the usual depthwise conv on the `stride`-times narrower
    result. Equals `TentDownsample(stride, n)(one_hot(channel_idx, n))` up to float rounding."""
    b, _, W = channel_idx.shape  # noqa: N806
    pad = stride // 2
    k = device_constant("tent", stride, lambda: tent_kernel(stride), channel_idx.device)
    col = torch.arange(-pad, W + pad, device=channel_idx.device).abs()  # reflect padding of the columns
    col = torch.where(col >= W, 2 * (W - 1) - col, col)
    w_out = (W + 2 * pad - 2 * stride) // stride + 1
    taps = col[(torch.arange(w_out, device=col.device) * stride).view(-1, 1) + torch.arange(2 * stride, device=col.device)]
    lab = channel_idx[:, :, taps]  # (N, H, w_out, 2s): the class under each tap
    horiz = torch.zeros((*lab.shape[:3], n), device=lab.device).scatter_add_(3, lab, k.expand(lab.shape).contiguous())
    horiz = F.pad(horiz.permute(0, 3, 1, 2), (0, 0, pad, pad), mode="reflect")
    return F.conv2d(horiz, k.view(1, 1, -1, 1).repeat(n, 1, 1, 1), stride=(stride, 1), groups=n)


class TentDownsample(nn.Module):
    """Fixed separable tent downsample by `stride` (not learned, not in the state dict)."""

    def __init__(self, stride: int, channels: int):
        super().__init__()
        self.stride, self.channels = stride, channels
        k = torch.from_numpy(tent_kernel(stride))
        self.register_buffer("kernel_h", k.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), persistent=False)
        self.register_buffer("kernel_v", k.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, [self.stride // 2] * 4, mode="reflect")
        x = F.conv2d(x, self.kernel_h, stride=(1, self.stride), groups=self.channels)
        return F.conv2d(x, self.kernel_v, stride=(self.stride, 1), groups=self.channels)


# ---- the low-res stream (the authors' module tree, so their key names load) ------------------
def _conv_in(cin: int, cout: int, stride: int, padding: int) -> nn.Sequential:
    """Conv3x3 without bias + InstanceNorm2d(affine): keys `.0.weight`, `.1.weight`, `.1.bias`."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=padding, bias=False),
                         nn.InstanceNorm2d(cout, affine=True))


class ConvBlock(nn.Module):
    """[ReflectionPad] Conv3x3 + IN + ReLU, no residual (the authors' ASAPNetsBlock)."""

    def __init__(self, width: int, reflection_pad: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(1)] if reflection_pad else []
        layers += [_conv_in(width, width, 1, 0 if reflection_pad else 1), nn.ReLU(inplace=True)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x)


class LowResStream(nn.Module):
    """CNN on the (pre-downsampled) one-hot: predicts the per-tile MLP parameters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pad = 0 if cfg.reflection_pad else 1
        refl = [nn.ReflectionPad2d(1)] if cfg.reflection_pad else []
        width = cfg.lr_width
        layers: list[nn.Module] = [*refl, _conv_in(cfg.n_lowres_inputs, width, 1, pad), nn.ReLU(inplace=True)]
        n_ds = int(round(math.log2(cfg.learned_ds_factor)))
        for i in range(n_ds):
            out = cfg.lr_max_width if i == n_ds - 1 else width
            layers += [*[nn.ReflectionPad2d(1)] * bool(refl), _conv_in(width, out, 2, pad), nn.ReLU(inplace=True)]
            width = out
        layers += [ConvBlock(width, cfg.reflection_pad) for _ in range(cfg.lr_depth)]
        layers.append(nn.Conv2d(width, cfg.num_params, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ---- the pixelwise stage ---------------------------------------------------------------------
def split_params(params: torch.Tensor, cfg: ModelConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(N, P, h, w) public-layout grid -> per layer (weight (T, c_in, c_out), bias (T, 1, c_out)),
    T = N*h*w tiles in (n, row, col) order."""
    n, p, h, w = params.shape
    flat = params.permute(0, 2, 3, 1).reshape(n * h * w, p)
    out = []
    for b0, w0, cin, cout in cfg.param_offsets():
        out.append((flat[:, w0:w0 + cin * cout].view(-1, cin, cout), flat[:, b0:b0 + cout].view(-1, 1, cout)))
    return out


def pixelwise(channel_idx: torch.Tensor, params: torch.Tensor, cfg: ModelConfig,
              chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> torch.Tensor:
    """The spatially-varying per-pixel MLP. channel_idx (N, H, W) int64 (see `label_channels`),
    params (N, P, H/S, W/S) -> RGB (N, H, W, 3) in [-1, 1], channels last.

    Runs over chunks of whole tiles (rectangles of one tile row, or of whole tile rows), so the
    activations stay in cache; the same function as the authors', rounded differently:
      * a layer's public block [bias | weight] is one (c_in+1, c_out) matrix with the bias as row
        0, so activations carry a constant 1 in channel 0 and every matmul adds its own bias;
      * layer 1: the label part is a row gather (one-hot input); the encoding part is separable,
        pe(x, y) @ W = pe_x(x) @ W_x + pe_y(y) @ W_y, two (S, c) tables per tile added to the rows;
      * the last layer is computed as (c_out, c) @ (c, pixels): a 3-wide matmul output is slow.
    Without autograd it writes into two reused buffers; with it, the same math out of place.
    """
    S = cfg.S  # noqa: N806
    n, H, W = channel_idx.shape  # noqa: N806
    h, w = H // S, W // S
    if params.shape != (n, cfg.num_params, h, w):
        raise InputError(f"parameter grid has shape {tuple(params.shape)}, expected {(n, cfg.num_params, h, w)}")
    n_lab, n_tiles, px = cfg.n_label_channels, n * h * w, S * S
    dev, dt = params.device, params.dtype
    offsets = cfg.param_offsets()
    c1, c_out = offsets[0][3], offsets[-1][3]
    flat = params.permute(0, 2, 3, 1).reshape(n_tiles, -1)  # tile t = (n, row, col) in order
    mats = [flat[:, b0:w0 + cin * cout].view(n_tiles, cin + 1, cout) for b0, w0, cin, cout in offsets]
    # gather table: per (tile, label) the row [1, bias_1 + W_1[label]]
    w1 = mats[0]
    table = torch.cat([torch.ones_like(w1[:, :n_lab, :1]), w1[:, 1:n_lab + 1] + w1[:, :1]], 2)
    table = table.reshape(n_tiles * n_lab, c1 + 1)
    pe = device_constant("pe", S, lambda: positional_encoding_table(S), dev, dt)  # rows (y, x), cols [x x y y]*
    # columns (frequency, [cos x, sin x, cos y, sin y]) split by views, not by a boolean mask
    # (a host mask indexing a device tensor is copied to it: that call could not be captured)
    n_f = pe.shape[1] // 4
    pe_x = pe[:S].view(S, n_f, 4)[..., :2].reshape(S, 2 * n_f)  # x along the first tile row
    pe_y = pe[::S].view(S, n_f, 4)[..., 2:].reshape(S, 2 * n_f)  # y down its first column
    w1_pe = w1[:, 1 + n_lab:].reshape(n_tiles, n_f, 4, c1)
    w1_x, w1_y = w1_pe[:, :, :2].reshape(n_tiles, 2 * n_f, c1), w1_pe[:, :, 2:].reshape(n_tiles, 2 * n_f, c1)
    last_t = mats[-1].transpose(1, 2)  # (T, c_out, c+1)
    rows = channel_idx.reshape(n * h, S, w, S)
    fast = not (torch.is_grad_enabled() and params.requires_grad)
    out = torch.empty((n * h, S, w, S, c_out), device=dev, dtype=dt)
    per = max(1, chunk_pixels // px)  # tiles per chunk
    if per >= w:
        rects = [(r, min(n * h, r + per // w), 0, w) for r in range(0, n * h, per // w)]
    else:
        rects = [(r, r + 1, c, min(w, c + per)) for r in range(n * h) for c in range(0, w, per)]
    k_max = max((r1 - r0) * (q1 - q0) for r0, r1, q0, q1 in rects)
    bufs = torch.ones((2, k_max, px, c1 + 1), device=dev, dtype=dt) if fast else None
    for r0, r1, q0, q1 in rects:
        k, t0 = (r1 - r0) * (q1 - q0), r0 * w + q0
        t1 = t0 + k
        tile = torch.arange(t0, t1, device=dev).view(r1 - r0, q1 - q0, 1, 1)
        ids = (rows[r0:r1, :, q0:q1].permute(0, 2, 1, 3) + tile * n_lab).reshape(-1)
        if fast:
            x = torch.index_select(table, 0, ids, out=bufs[0, :k].view(k * px, c1 + 1)).view(k, px, c1 + 1)
        else:
            x = torch.index_select(table, 0, ids).view(k, px, c1 + 1)
        pos = (torch.bmm(pe_y.expand(k, -1, -1), w1_y[t0:t1]).unsqueeze(2)
               + torch.bmm(pe_x.expand(k, -1, -1), w1_x[t0:t1]).unsqueeze(1))  # (k, S, S, c1)
        x.view(k, S, S, c1 + 1)[..., 1:].add_(pos)
        for i, m in enumerate(mats[1:-1]):
            x = F.leaky_relu(x, LEAKY_SLOPE, inplace=True)  # leaky(1) = 1 keeps the bias channel
            if fast:
                y = bufs[(i + 1) % 2, :k]
                torch.bmm(x, m[t0:t1], out=y[..., 1:])
                x = y
            else:
                x = F.pad(torch.bmm(x, m[t0:t1]), (1, 0), value=1.0)
        x = F.leaky_relu(x, LEAKY_SLOPE, inplace=True)
        rgb = torch.tanh(torch.bmm(last_t[t0:t1], x.transpose(1, 2)))  # (k, c_out, px)
        out[r0:r1, :, q0:q1] = rgb.view(r1 - r0, q1 - q0, c_out, S, S).permute(0, 3, 1, 4, 2)
    return out.view(n, H, W, c_out)


# ---- the generator ---------------------------------------------------------------------------
class ASAPNetGenerator(nn.Module):
    """ASAP-Net generator. `forward(labels, instances=None)` -> image (N, 3, H, W) in [-1, 1].

    labels: (N, H, W) integer label ids; instances: (N, H, W) instance ids when the config uses
    instance edges. Any batch and any H, W that are multiples of S, on every call.
    """

    def __init__(self, cfg: ModelConfig):
        # Every path that builds a generator (checkpoints, bundles, --config, training) comes
        # here: check the config's fields and size the model it describes (ModelConfig.check_cost)
        # before anything is allocated, even for a config that skipped __post_init__.
        cfg.validate()
        super().__init__()
        self.cfg = cfg
        self.lowres_stream = LowResStream(cfg)
        s1 = cfg.pre_downsample
        self.pre_downsample = TentDownsample(s1, cfg.n_lowres_inputs) if s1 > 1 else nn.Identity()

    # The two stages, usable on their own (export and benchmarks time them separately).
    def check_inputs(self, labels: torch.Tensor, instances: torch.Tensor | None) -> None:
        if labels.dim() != 3:
            raise InputError(f"labels must be (N, H, W) ids, got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InputError(f"labels must be integer ids, got dtype {labels.dtype}")
        _, H, W = labels.shape  # noqa: N806
        self.cfg.check_size(H, W)
        if self.cfg.instance_edges:
            if instances is None:
                raise InputError("this model uses instance edges: an instance map is required")
            if tuple(instances.shape) != tuple(labels.shape):
                raise InputError(f"instance map shape {tuple(instances.shape)} differs from label shape {tuple(labels.shape)}")

    def encode(self, channel_idx: torch.Tensor, instances: torch.Tensor | None) -> torch.Tensor:
        """Full-resolution low-res-stream input: one-hot (+ instance edge channel)."""
        x = one_hot(channel_idx, self.cfg.n_label_channels)
        if self.cfg.instance_edges:
            x = torch.cat([x, instance_edges(instances.to(x.device))], 1)
        return x

    def lowres_input(self, channel_idx: torch.Tensor, instances: torch.Tensor | None) -> torch.Tensor:
        """`pre_downsample(encode(...))`, without the full-resolution one-hot when S1 > 1."""
        s1 = self.cfg.pre_downsample
        if s1 == 1:
            return self.encode(channel_idx, instances)
        x = tent_downsample_ids(channel_idx, self.cfg.n_label_channels, s1)
        if self.cfg.instance_edges:
            edges = instance_edges(instances.to(x.device))
            tent = self.pre_downsample
            edges = F.pad(edges, [s1 // 2] * 4, mode="reflect")
            edges = F.conv2d(F.conv2d(edges, tent.kernel_h[-1:], stride=(1, s1)), tent.kernel_v[-1:], stride=(s1, 1))
            x = torch.cat([x, edges], 1)
        return x

    def predict_params(self, labels: torch.Tensor, instances: torch.Tensor | None = None) -> torch.Tensor:
        """labels (N, H, W) -> parameter grid (N, P, H/S, W/S) in the public layout."""
        self.check_inputs(labels, instances)
        idx = label_channels(labels, self.cfg)
        return self.lowres_stream(self.lowres_input(idx, instances))

    def pixelwise(self, labels: torch.Tensor, params: torch.Tensor,
                  chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> torch.Tensor:
        """labels (N, H, W) + params -> RGB (N, H, W, 3) channels last, in [-1, 1]."""
        self.check_inputs(labels, torch.zeros_like(labels) if self.cfg.instance_edges else None)
        return pixelwise(label_channels(labels, self.cfg), params, self.cfg, chunk_pixels)

    def forward(self, labels: torch.Tensor, instances: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(labels, instances)
        idx = label_channels(labels, self.cfg)
        params = self.lowres_stream(self.lowres_input(idx, instances))
        return pixelwise(idx, params, self.cfg).permute(0, 3, 1, 2).contiguous()


def init_weights(model: nn.Module, gain: float = 0.02) -> None:
    """The authors' training initialisation: xavier-normal convs (gain 0.02), zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
