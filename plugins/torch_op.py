"""Torch-facing wrapper of the fused kernel: what the `torch` engine calls.

* CUDA tensors: the Triton JIT kernel (plugins/kernel.py).
* CPU tensors with TRITON_INTERPRET=1 (or `interpret=True`): the same kernel in Triton's
  interpreter (tests, any machine).
* CPU tensors otherwise: the per-tile PyTorch path `asap_deploy.model.pixelwise` (fp32).

The kernel's compile-time constants (`KernelSpec`, `kernel_spec(cfg)`, which refuses configs the
kernel cannot run, naming the config field) are part of the contract in plugins/spec.py.
"""

from __future__ import annotations

import os
from dataclasses import replace

from asap_deploy.config import ModelConfig
from asap_deploy.errors import ConfigError, InputError, UsageError, require_torch

from .spec import DEFAULT_NUM_WARPS, KernelSpec, kernel_spec


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def to_uint8(rgb):
    """Float RGB in [-1, 1] -> uint8, exactly as the kernel's OUT_U8 and the graphs do:
    clip(round_half_even((x + 1) * 127.5), 0, 255)."""
    torch = require_torch("to_uint8")
    return ((rgb.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def check_labels(labels, cfg: ModelConfig) -> None:
    """Raise InputError for ids the model does not take (the config's rule: no full-resolution
    temporaries in the common case, two reductions)."""
    cfg.check_label_ids(labels, at=None)


def repack_params(params):
    """The re-pack pre-pass in torch: (N, P, h, w) -> the same tensor as fp16 channels-last
    (memory (N, h, w, P), public channel order). One copy; every tile's parameters become one
    contiguous run, so the kernel's weight rows and label-row gathers are coalesced."""
    torch = require_torch("repack_params")
    return params.to(dtype=torch.float16, memory_format=torch.channels_last)


def spatial_mlp(labels, params, cfg: ModelConfig, *, out_dtype=None, out=None, extra=None,
                repack: bool | None = None, interpret: bool | None = None, validate: bool = True,
                block_p: int | None = None, iters: int | None = None, num_warps: int = DEFAULT_NUM_WARPS,
                reload: bool = False):
    """labels (N, H, W) integer ids (uint8/int32/int64), params (N, P, H/S, W/S) fp16/fp32 in the
    public layout -> RGB (N, H, W, output_nc), float32 by default, or `out_dtype` float16/uint8
    (uint8 = `to_uint8` of the float result). `out` may be any (N, H, W, C)-indexed view (e.g. an
    NCHW tensor permuted) of a matching dtype. `extra` (N, E, H, W): dense first-layer inputs that
    sit between the label rows and the PE rows of W1 (the general, non-one-hot first layer).
    With `extra`, the grid holds P = cfg.num_params + E * hr_width parameters per tile.
    `repack` (default: when the channel stride is not 1) converts params to fp16 channels-last first.
    `reload`: the kernel variant that re-reads the hidden weights per block (less shared memory; the
    AOT compiler picks it for GPUs whose shared memory per block the default does not fit).
    """
    torch = require_torch("the fused spatial MLP")
    if labels.dim() != 3 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"labels must be (N, H, W) integer ids, got {tuple(labels.shape)} {labels.dtype}")
    n, H, W = labels.shape  # noqa: N806
    S = cfg.S  # noqa: N806
    cfg.check_size(H, W)
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
    if reload:
        spec = replace(spec, RELOAD=True)
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
