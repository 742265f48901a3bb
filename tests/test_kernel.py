"""The fused Triton kernel on CPU (TRITON_INTERPRET=1) against the per-pixel numpy oracle.

fp16 tolerances (the kernel runs every dot in fp16 with fp32 accumulation; activations O(1)):
max abs <= 1.5e-2 and mean abs <= 1.5e-3 on the [-1, 1] float output (measured: about 5e-3 and
3e-4), whatever the parameter dtype.
The uint8 output must equal the conversion of the kernel's own float output exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from asap_deploy.config import ModelConfig  # noqa: E402
from asap_deploy.errors import ConfigError, InputError  # noqa: E402
from asap_deploy.model import label_channels, pixelwise  # noqa: E402
from oracles import pe_oracle, pixelwise_oracle  # noqa: E402
from asap_deploy.plugins import torch_op  # noqa: E402
from asap_deploy.plugins.spec import kernel_spec  # noqa: E402
from asap_deploy.plugins.torch_op import spatial_mlp, to_uint8  # noqa: E402

MAX_ABS, MEAN_ABS = 1.5e-2, 1.5e-3


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_params(mlp_channels, n, h, w, seed, dtype=torch.float32):
    """Random grid in the public layout with activations of order one (per-layer scaled)."""
    g = torch.Generator().manual_seed(seed)
    per_tile = []
    for li, (cin, cout) in enumerate(zip(mlp_channels[:-1], mlp_channels[1:])):
        std = 0.35 if li == 0 else 1.6 / math.sqrt(cin)
        per_tile.append(torch.randn(n, cout, h, w, generator=g) * 0.1)
        per_tile.append(torch.randn(n, cin * cout, h, w, generator=g) * std)
    return torch.cat(per_tile, 1).to(dtype)


def cfg_for(S, label_nc=6, **kw):  # noqa: N803
    return ModelConfig(label_nc=label_nc, crop_size=16 * S, **kw)


def check_close(out, ref, what):
    err = (out.double() - torch.as_tensor(ref)).abs()
    print(f"{what}: max abs {float(err.max()):.2e}, mean abs {float(err.mean()):.2e}")
    assert float(err.max()) <= MAX_ABS, f"{what}: max abs {float(err.max()):.3g} > {MAX_ABS}"
    assert float(err.mean()) <= MEAN_ABS, f"{what}: mean abs {float(err.mean()):.3g} > {MEAN_ABS}"


CASES = [  # S, N, H, W, params dtype, label_nc
    (16, 2, 32, 48, torch.float32, 6),
    (32, 2, 64, 32, torch.float16, 13),
    (64, 1, 64, 128, torch.float32, 5),
]


@pytest.mark.parametrize("S,N,H,W,pdtype,nlab", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernel_matches_oracle(S, N, H, W, pdtype, nlab):  # noqa: N803
    cfg = cfg_for(S, label_nc=nlab)
    g = torch.Generator().manual_seed(S + N)
    labels = torch.randint(0, nlab, (N, H, W), generator=g, dtype=torch.int32)
    params = make_params(cfg.mlp_channels, N, H // S, W // S, seed=S, dtype=pdtype)
    ref = pixelwise_oracle(labels.numpy(), params.float().numpy(), cfg.mlp_channels, S)
    out = spatial_mlp(labels, params, cfg)
    assert out.shape == (N, H, W, 3) and out.dtype == torch.float32
    check_close(out, ref, f"S={S} N={N} {H}x{W} {pdtype}")


@pytest.mark.slow
def test_kernel_matches_oracle_128():
    S, N, H, W = 64, 2, 128, 128  # noqa: N806
    cfg = cfg_for(S, label_nc=13)
    labels = torch.randint(0, 13, (N, H, W), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    params = make_params(cfg.mlp_channels, N, 2, 2, seed=3, dtype=torch.float16)
    ref = pixelwise_oracle(labels.numpy(), params.float().numpy(), cfg.mlp_channels, S)
    check_close(spatial_mlp(labels, params, cfg), ref, "S=64 128x128")


def test_no_repack_and_fp16_output_and_layouts():
    """Public (N,P,h,w) strides read directly, fp16 output, and an NCHW output view."""
    cfg = cfg_for(16, label_nc=4)
    labels = torch.randint(0, 4, (1, 32, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    params = make_params(cfg.mlp_channels, 1, 2, 1, seed=7)
    ref = pixelwise_oracle(labels.numpy().astype(np.int64), params.numpy(), cfg.mlp_channels, 16)
    check_close(spatial_mlp(labels, params, cfg, repack=False), ref, "fp32 public layout")
    half = spatial_mlp(labels, params, cfg, out_dtype=torch.float16, block_p=64, iters=2)
    assert half.dtype == torch.float16
    check_close(half.float(), ref, "fp16 output")
    nchw = torch.empty(1, 3, 32, 16)
    spatial_mlp(labels, params, cfg, out=nchw.permute(0, 2, 3, 1))
    check_close(nchw.permute(0, 2, 3, 1), ref, "NCHW output view")


@pytest.mark.parametrize("hr_depth", [3, 6])
def test_reload_variant_equals_the_default(hr_depth):
    """The variant that re-reads the hidden weights per block (picked where shared memory is short,
    issue 15 defect 3) computes exactly what the default does, for 1 to 4 hidden layers."""
    cfg = cfg_for(16, label_nc=5, hr_width=32, hr_depth=hr_depth)
    labels = torch.randint(0, 5, (1, 32, 16), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    params = make_params(cfg.mlp_channels, 1, 2, 1, seed=13, dtype=torch.float16)
    ref = pixelwise_oracle(labels.numpy(), params.float().numpy(), cfg.mlp_channels, 16)
    default = spatial_mlp(labels, params, cfg, block_p=64, iters=2)
    again = spatial_mlp(labels, params, cfg, block_p=64, iters=2, reload=True)
    assert torch.equal(default, again)
    check_close(again, ref, f"reload, hr_depth={hr_depth}")


def test_uint8_equals_conversion_of_float():
    cfg = cfg_for(16, label_nc=7)
    labels = torch.randint(0, 7, (2, 16, 32), generator=torch.Generator().manual_seed(5), dtype=torch.int64)
    params = make_params(cfg.mlp_channels, 2, 1, 2, seed=11, dtype=torch.float16)
    f = spatial_mlp(labels, params, cfg)
    u = spatial_mlp(labels, params, cfg, out_dtype=torch.uint8)
    assert u.dtype == torch.uint8
    assert torch.equal(u, to_uint8(f)), f"max level diff {int((u.int() - to_uint8(f).int()).abs().max())}"
    assert int(u.min()) < 64 and int(u.max()) > 192  # the test spans the 8-bit range


def test_to_uint8_rounds_and_clips():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 2.0])  # 0.1275 -> 0, 127.5 -> 128, 254.87 -> 255
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 255, 255, 255]


def test_dontcare_id_maps_to_last_channel():
    cfg = cfg_for(16, label_nc=5, contain_dontcare_label=True)
    labels = torch.randint(0, 5, (1, 16, 16), generator=torch.Generator().manual_seed(9), dtype=torch.int32)
    labels[0, ::3, ::2] = 255
    params = make_params(cfg.mlp_channels, 1, 1, 1, seed=13)
    idx = label_channels(labels, cfg).numpy()
    ref = pixelwise_oracle(idx, params.numpy(), cfg.mlp_channels, 16)
    check_close(spatial_mlp(labels, params, cfg), ref, "don't care")


def test_bad_label_ids_raise():
    cfg = cfg_for(16, label_nc=5)
    params = make_params(cfg.mlp_channels, 1, 1, 1, seed=1)
    for bad in (5, 255, -1):
        labels = torch.zeros(1, 16, 16, dtype=torch.int32)
        labels[0, 3, 4] = bad
        with pytest.raises(InputError, match=str(bad)):
            spatial_mlp(labels, params, cfg)


def test_triton_repack_kernel_equals_torch_repack():
    from asap_deploy.plugins import kernel as K

    cfg = cfg_for(16, label_nc=3)
    params = make_params(cfg.mlp_channels, 2, 2, 3, seed=4)
    n, p, h, w = params.shape
    dst = torch.empty(n * h * w, p, dtype=torch.float16)
    bt, bc = 32, 64
    K.interpreted("asap_repack_params")[(-(-n * h * w // bt), -(-p // bc), 1)](
        params, *params.stride(), p, h, w, n * h * w, dst, BLOCK_T=bt, BLOCK_C=bc)
    expect = torch_op.repack_params(params).permute(0, 2, 3, 1).reshape(n * h * w, p)
    assert torch.equal(dst, expect)


def _reference_with_extra(ids, extra, params, n_lab, n_extra, hid, depth, S):  # noqa: N803
    """float64 per-tile reference for the general first layer: input [one-hot, extra, PE]."""
    n, H, W = ids.shape  # noqa: N806
    ch = [n_lab + n_extra + 4 * int(math.log2(S))] + [hid] * (depth - 1) + [3]
    out = np.zeros((n, H, W, 3))
    for b in range(n):
        for r in range(H // S):
            for c in range(W // S):
                p, off, layers = params[b, :, r, c].astype(np.float64), 0, []
                for cin, cout in zip(ch[:-1], ch[1:]):
                    bias = p[off:off + cout]
                    wgt = p[off + cout:off + cout + cin * cout].reshape(cin, cout)
                    layers.append((wgt, bias))
                    off += cout + cin * cout
                for y in range(r * S, r * S + S):
                    for x in range(c * S, c * S + S):
                        v = np.concatenate([np.eye(n_lab)[ids[b, y, x]], extra[b, :, y, x], pe_oracle(x, y, S)])
                        for li, (wgt, bias) in enumerate(layers):
                            v = v @ wgt + bias
                            v = np.tanh(v) if li == len(layers) - 1 else np.where(v > 0, v, 0.01 * v)
                        out[b, y, x] = v
    return out


def test_general_first_layer_extra_inputs():
    cfg = cfg_for(16, label_nc=4)
    n_extra, N, H, W = 2, 1, 16, 32  # noqa: N806
    ch = [cfg.mlp_channels[0] + n_extra] + cfg.mlp_channels[1:]
    params = make_params(ch, N, 1, 2, seed=21)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (N, H, W), generator=g, dtype=torch.int32)
    extra = torch.rand(N, n_extra, H, W, generator=g)
    ref = _reference_with_extra(labels.numpy(), extra.numpy().astype(np.float64), params.numpy(), 4, n_extra,
                                cfg.hr_width, cfg.hr_depth, 16)
    check_close(spatial_mlp(labels, params, cfg, extra=extra), ref, "extra inputs")
    with pytest.raises(InputError, match="parameter grid"):
        spatial_mlp(labels, params[:, :-1], cfg, extra=extra)


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    cfg = cfg_for(16, label_nc=4)
    labels = torch.randint(0, 4, (1, 16, 32), generator=torch.Generator().manual_seed(8), dtype=torch.int32)
    params = make_params(cfg.mlp_channels, 1, 1, 2, seed=8)
    out = spatial_mlp(labels, params, cfg)
    assert torch.allclose(out, pixelwise(label_channels(labels, cfg), params, cfg), atol=1e-6)
    assert torch.equal(spatial_mlp(labels, params, cfg, out_dtype=torch.uint8), to_uint8(out))
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        spatial_mlp(labels, torch.zeros(1, cfg.num_params + 64, 1, 2), cfg, extra=torch.zeros(1, 1, 16, 32))


@pytest.mark.parametrize("field,kw", [("hr_width", dict(hr_width=48)), ("hr_depth", dict(hr_depth=7)),
                                      ("output_nc", dict(output_nc=20))])
def test_unsupported_configs_are_refused_naming_the_field(field, kw):
    with pytest.raises(ConfigError, match=field):
        kernel_spec(cfg_for(16, **kw))


def test_spec_grid_rule():
    spec = kernel_spec(cfg_for(64))
    assert spec.BLOCK_P * spec.ITERS * spec.programs_per_tile == 64 * 64
    assert spec.grid(2, 1024, 2048) == (2 * 16 * 32 * spec.programs_per_tile, 1, 1)
    assert spec.PE_PAD == 32 and spec.OUT_PAD == 16
    small = kernel_spec(cfg_for(4, label_nc=3, learned_ds_factor=4))
    assert small.BLOCK_P == 16 and small.ITERS == 1 and small.PE_PAD == 16


@pytest.mark.parametrize("S,block_p", [(32, 16), (64, 64), (64, 32)])
def test_every_positional_encoding_path_matches_the_oracle(S, block_p):  # noqa: N803
    """The kernel's three PE paths (plugins/kernel.py): tables for S <= 32 (any block), a per-block
    y table for S >= 64 with BLOCK_P >= S (here one tile row per block), per pixel for BLOCK_P < S."""
    cfg = cfg_for(S, label_nc=6)
    labels = torch.randint(0, 6, (1, S, 64), generator=torch.Generator().manual_seed(S + block_p), dtype=torch.int32)
    params = make_params(cfg.mlp_channels, 1, 1, 64 // S, seed=block_p)
    ref = pixelwise_oracle(labels.numpy(), params.numpy(), cfg.mlp_channels, S)
    check_close(spatial_mlp(labels, params, cfg, block_p=block_p, iters=2), ref, f"S={S} BLOCK_P={block_p}")


@pytest.mark.parametrize("S", [16, 64])
def test_positional_encoding_is_not_evaluated_per_pixel(S):  # noqa: N803
    """Issue 15, defect 9: the PE is the same in every tile, so the compiled per-block loop never
    evaluates sin/cos for each of its BLOCK_P pixels: with S <= 32 not at all (tables built once
    per program, before the loop), with S = 64 only for the block's small table of tile rows
    (16 x PE_PAD). Read from the kernel compiled for sm_80 (Triton's TTIR; no GPU needed)."""
    import re

    from asap_deploy.plugins import aot
    from asap_deploy.plugins.kernel import spatial_mlp as jit_kernel

    cfg = cfg_for(S, label_nc=5, hr_width=16, hr_depth=3)
    spec = kernel_spec(cfg, block_p=128, iters=2)
    v = aot.Variant(spec, "fp16", "fp32")
    ttir = aot._compile(jit_kernel, v.signature(), v.constexprs(), 80, spec.num_warps, 1).asm["ttir"]
    start = ttir.index("scf.for")
    body = ttir[start:ttir.index("scf.yield", start)] if "scf.yield" in ttir[start:] else ttir[start:]
    trig = r"math\.(?:sin|cos) .*?: tensor<(\d+)x(\d+)xf32>"
    in_loop = [(int(r), int(c)) for r, c in re.findall(trig, body)]
    before = [(int(r), int(c)) for r, c in re.findall(trig, ttir[:start])]
    if S <= 32:
        assert not in_loop, f"sin/cos in the per-block loop: {in_loop}"
        assert before and all(r == 16 for r, _ in before)  # the tables: one row per in-tile position
    else:
        assert in_loop and all(r == 16 < spec.BLOCK_P for r, _ in in_loop), f"per-pixel sin/cos in the loop: {in_loop}"
        assert (spec.BLOCK_P, spec.PE_PAD) in before  # the x half, once per program
