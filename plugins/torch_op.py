"""Torch-facing wrapper of the fused kernel: what the `torch` engine calls.

* CUDA tensors: the Triton JIT kernel (plugins/kernel.py).
* CPU tensors with TRITON_INTERPRET=1 (or `interpret=True`): the same kernel in Triton's
  interpreter (tests, any machine).
* CPU tensors otherwise: the per-tile PyTorch path `asap_deploy.model.pixelwise` (fp32).

`kernel_spec(cfg)` turns a ModelConfig into the kernel's compile-time constants and refuses
configs the kernel cannot run, naming the config field.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace

from asap_deploy.config import ModelConfig
from asap_deploy.errors import ConfigError, InputError, UsageError, require_torch

DEFAULT_BLOCK_P = 128  # pixels per dot block
DEFAULT_ITERS = 4  # dot blocks per program (parameters loaded once for BLOCK_P*ITERS pixels)
DEFAULT_NUM_WARPS = 4
MAX_HIDDEN = 4  # keep in step with plugins.kernel.MAX_HIDDEN (not imported: no triton needed here)


@dataclass(frozen=True)
class KernelSpec:
    """Compile-time constants of one kernel variant (+ launch options)."""

    S: int  # noqa: N815
    LOG2S: int  # noqa: N815
    HID: int  # noqa: N815
    N_HIDDEN: int  # noqa: N815
    OUT: int  # noqa: N815
    OUT_PAD: int  # noqa: N815
    PE_PAD: int  # noqa: N815
    EXTRA: int  # noqa: N815
    BLOCK_P: int  # noqa: N815
    ITERS: int  # noqa: N815
    OUT_U8: bool = False  # noqa: N815
    num_warps: int = DEFAULT_NUM_WARPS
    num_stages: int = 1

    @property
    def pixels_per_program(self) -> int:
        return self.BLOCK_P * self.ITERS

    @property
    def programs_per_tile(self) -> int:
        return (self.S * self.S) // self.pixels_per_program

    def constexprs(self) -> dict:
        d = asdict(self)
        d.pop("num_warps"), d.pop("num_stages")
        return d

    def grid(self, n: int, height: int, width: int) -> tuple[int, int, int]:
        """Launch grid rule: one program per BLOCK_P*ITERS pixels of one tile."""
        return (n * (height // self.S) * (width // self.S) * self.programs_per_tile, 1, 1)

    def num_params(self, n_lab: int) -> int:
        c0 = n_lab + self.EXTRA + 4 * self.LOG2S
        return (c0 + 1) * self.HID + self.N_HIDDEN * (self.HID + 1) * self.HID + (self.HID + 1) * self.OUT


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(v, 1)))))


def kernel_spec(cfg: ModelConfig, *, extra_channels: int = 0, out_u8: bool = False,
                block_p: int | None = None, iters: int | None = None,
                num_warps: int = DEFAULT_NUM_WARPS) -> KernelSpec:
    """The kernel variant for `cfg`, or ConfigError naming the field the kernel cannot take."""
    S = cfg.S  # noqa: N806
    if S < 4:
        raise ConfigError(f"the fused kernel needs S >= 4 (a tile of >= 16 pixels for its dots); this config has "
                          f"S = {S} from crop_size={cfg.crop_size}, aspect_ratio={cfg.aspect_ratio}")
    hid = cfg.hr_width
    if hid < 16 or hid > 128 or hid & (hid - 1):
        raise ConfigError(f"the fused kernel needs hr_width to be a power of two in 16..128 (tl.dot tiles, "
                          f"registers); this config has hr_width={hid}: use the torch per-tile path")
    n_hidden = cfg.hr_depth - 2
    if n_hidden > MAX_HIDDEN:
        raise ConfigError(f"the fused kernel unrolls at most {MAX_HIDDEN} hidden layers (hr_depth <= "
                          f"{MAX_HIDDEN + 2}); this config has hr_depth={cfg.hr_depth}")
    if cfg.output_nc > 16:
        raise ConfigError(f"the fused kernel supports output_nc <= 16; this config has output_nc={cfg.output_nc}")
    c0 = cfg.mlp_channels[0]
    if c0 != cfg.n_label_channels + cfg.pe_channels:
        raise ConfigError(
            f"the pixelwise input of this config is not [one-hot labels, PE]: mlp_channels[0]={c0} but "
            f"label_nc/contain_dontcare_label give {cfg.n_label_channels} label channels and S gives "
            f"{cfg.pe_channels} PE channels; pass the dense inputs as `extra` (general first layer)")
    if extra_channels < 0:
        raise UsageError(f"extra_channels must be >= 0 (got {extra_channels})")
    bp = min(block_p or DEFAULT_BLOCK_P, S * S)
    if bp < 16 or bp & (bp - 1):
        raise UsageError(f"block_p must be a power of two >= 16 (got {bp})")
    it = max(1, min(iters or DEFAULT_ITERS, (S * S) // bp))
    while (S * S) % (bp * it):
        it -= 1
    return KernelSpec(S=S, LOG2S=cfg.log2_S, HID=hid, N_HIDDEN=n_hidden, OUT=cfg.output_nc,
                      OUT_PAD=_pow2_at_least(cfg.output_nc, 16), PE_PAD=_pow2_at_least(cfg.pe_channels, 16),
                      EXTRA=extra_channels, BLOCK_P=bp, ITERS=it, OUT_U8=out_u8, num_warps=num_warps)


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def to_uint8(rgb):
    """Float RGB in [-1, 1] -> uint8, exactly as the kernel's OUT_U8 and the graphs do:
    clip(round_half_even((x + 1) * 127.5), 0, 255)."""
    torch = require_torch("to_uint8")
    return ((rgb.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def check_labels(labels, cfg: ModelConfig) -> None:
    """Raise InputError for ids the model does not take (no full-resolution temporaries in the
    common case: two reductions)."""
    n = cfg.n_label_channels
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < n:
        return
    allowed = cfg.allowed_label_ids
    if lo < 0:
        raise InputError(f"label id {lo} is out of range: this model takes ids {allowed}")
    if cfg.accepts_dontcare_id:
        rest = labels[labels != 255]
        hi = int(rest.max()) if rest.numel() else -1
        if hi < n:
            return
    raise InputError(f"label id {hi} is out of range: this model takes ids {allowed}")


def repack_params(params):
    """The re-pack pre-pass in torch: (N, P, h, w) -> the same tensor as fp16 channels-last
    (memory (N, h, w, P), public channel order). One copy; every tile's parameters become one
    contiguous run, so the kernel's weight rows and label-row gathers are coalesced."""
    torch = require_torch("repack_params")
    return params.to(dtype=torch.float16, memory_format=torch.channels_last)


def spatial_mlp(labels, params, cfg: ModelConfig, *, out_dtype=None, out=None, extra=None,
                repack: bool | None = None, interpret: bool | None = None, validate: bool = True,
                block_p: int | None = None, iters: int | None = None, num_warps: int = DEFAULT_NUM_WARPS):
    """labels (N, H, W) integer ids (uint8/int32/int64), params (N, P, H/S, W/S) fp16/fp32 in the
    public layout -> RGB (N, H, W, output_nc), float32 by default, or `out_dtype` float16/uint8
    (uint8 = `to_uint8` of the float result). `out` may be any (N, H, W, C)-indexed view (e.g. an
    NCHW tensor permuted) of a matching dtype. `extra` (N, E, H, W): dense first-layer inputs that
    sit between the label rows and the PE rows of W1 (the general, non-one-hot first layer).
    With `extra`, the grid holds P = cfg.num_params + E * hr_width parameters per tile.
    `repack` (default: when the channel stride is not 1) converts params to fp16 channels-last first.
    """
    torch = require_torch("the fused spatial MLP")
    if labels.dim() != 3 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"labels must be (N, H, W) integer ids, got {tuple(labels.shape)} {labels.dtype}")
    n, H, W = labels.shape  # noqa: N806
    S = cfg.S  # noqa: N806
    if H % S or W % S or H == 0 or W == 0:
        raise InputError(f"image size {H}x{W} (HxW) is not a positive multiple of S={S}")
    n_extra = 0 if extra is None else int(extra.shape[1])
    # Dense extra inputs add rows to W1 between the label rows and the PE rows.
    expected = (n, cfg.num_params + n_extra * cfg.hr_width, H // S, W // S)
    if tuple(params.shape) != expected:
        raise InputError(f"parameter grid has shape {tuple(params.shape)}, expected {expected}")
    if params.dtype not in (torch.float16, torch.float32):
        raise InputError(f"parameters must be float16 or float32, got {params.dtype}")
    out_dtype = out.dtype if out is not None else (out_dtype or torch.float32)
    if out_dtype not in (torch.float32, torch.float16, torch.uint8):
        raise UsageError(f"out_dtype must be float32, float16 or uint8, got {out_dtype}")
    if extra is not None and (extra.dim() != 4 or tuple(extra.shape[::2]) != (n, H) or extra.shape[3] != W):
        raise InputError(f"extra inputs must be (N, E, H, W) = ({n}, E, {H}, {W}), got {tuple(extra.shape)}")
    if validate:
        check_labels(labels, cfg)

    interpret = interpret_requested() if interpret is None else interpret
    use_kernel = params.is_cuda or interpret
    if not use_kernel:
        if extra is not None:
            raise ConfigError("extra (non-one-hot) MLP inputs need the fused kernel: run on CUDA or with "
                              "TRITON_INTERPRET=1")
        from asap_deploy.model import label_channels, pixelwise

        with torch.no_grad():
            rgb = pixelwise(label_channels(labels, cfg), params.float(), cfg)
        res = to_uint8(rgb) if out_dtype == torch.uint8 else rgb.to(out_dtype)
        if out is None:
            return res
        out.copy_(res)
        return out

    spec = kernel_spec(cfg, extra_channels=n_extra, out_u8=out_dtype == torch.uint8, block_p=block_p,
                       iters=iters, num_warps=num_warps)
    from . import kernel as K

    if repack is None:
        repack = params.stride(1) != 1
    if repack:
        params = repack_params(params)
    if out is None:
        out = torch.empty((n, H, W, cfg.output_nc), dtype=out_dtype, device=params.device)
    elif tuple(out.shape) != (n, H, W, cfg.output_nc):
        raise InputError(f"out has shape {tuple(out.shape)}, expected {(n, H, W, cfg.output_nc)}")
    ids = labels.contiguous()
    ext = extra.contiguous() if extra is not None else ids  # any pointer when EXTRA == 0
    fn = K.interpreted() if (interpret and not params.is_cuda) else K.spatial_mlp
    kw = spec.constexprs()
    launch = {} if fn is not K.spatial_mlp else {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    fn[spec.grid(n, H, W)](
        ids, params, ext,
        H, W, H // S, W // S, cfg.n_label_channels, cfg.n_label_channels - 1 if cfg.accepts_dontcare_id else -1,
        *params.stride(), out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        out, **kw, **launch,
    )
    return out


def with_spec(spec: KernelSpec, **changes) -> KernelSpec:
    return replace(spec, **changes)
