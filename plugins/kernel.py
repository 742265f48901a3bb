"""The fused spatially-adaptive MLP as one Triton kernel (the kernel alone: no launch logic).

One program computes the whole pixelwise stage for PIX = BLOCK_P * ITERS pixels of ONE S x S tile:

* it loads that tile's MLP parameters once (any strides: the public grid (N, P, h, w) as the
  predictor writes it, or the channels-last re-pack (N, h, w, P) that `repack_params` makes, which
  turns every weight row into one contiguous read); fp16 or fp32, converted to fp16 for the dots;
* takes the positional encoding from tables built once per program and per block (it is the
  same in every tile; tiles are S-aligned, so x mod f = tile-local x mod f): no sin/cos per pixel;
* does layer 1 for the one-hot label input as a row gather W1[label] (no one-hot, no zero
  multiplies), the PE part as a small fp16 dot, plus EXTRA dense input channels (the general,
  non-one-hot first layer) as rank-1 updates;
* runs the hidden layers as fp16 `tl.dot` with fp32 accumulation, leaky_relu(LEAKY_SLOPE), and the
  output layer (padded to OUT_PAD columns for the dot) with tanh;
* writes RGB as float (fp32/fp16: whatever the output pointer's element type is) or, with
  OUT_U8, as uint8 `clip(round_half_even((x + 1) * 127.5), 0, 255)`.

No intermediate at full resolution exists: activations live in registers.

Parameter layout read (public, per layer: [bias (c_out) | weight (c_in*c_out), element i*c_out+o]),
C0 = n_lab + EXTRA + 4*LOG2S:
  layer 1   bias at 0, weight at HID; rows 0..n_lab-1 labels, then EXTRA rows, then PE rows
  hidden k  bias at HID + C0*HID + k*(HID + HID*HID), weight HID further
  output    bias at HID + C0*HID + N_HIDDEN*(HID + HID*HID), weight OUT further

Label ids: id 255 maps to channel `dontcare_ch` when that is >= 0; ids are then clamped to
[0, n_lab-1] so that a bad id can never read outside the tile's parameters (the torch wrapper
validates ids before launching; the TensorRT plugin relies on the clamp for memory safety).

Launch grid rule: grid = (N * h * w * (S*S // (BLOCK_P*ITERS)), 1, 1), h = H/S, w = W/S.
Kernel argument order (the AOT launcher relies on it): input pointers, i32 scalars, output pointer.

Written against the Triton language of 3.6 (the GPU machines' image) and newer: only tl.load/store,
arange, dot, where, exp/sin/cos/floor, static_range and constexpr `if`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from . import spec

KERNEL_NAME = "asap_spatial_mlp"
REPACK_NAME = "asap_repack_params"

# Argument names in order; the runtime (non-constexpr) ones first, as the launcher packs them.
POINTER_ARGS = ("ids_ptr", "params_ptr", "extra_ptr")
SCALAR_ARGS = ("H", "W", "n_tiles_h", "n_tiles_w", "n_lab", "dontcare_ch",
               "p_sn", "p_sc", "p_sy", "p_sx", "o_sn", "o_sy", "o_sx", "o_sc")
OUTPUT_ARGS = ("out_ptr",)
CONSTEXPR_ARGS = ("S", "LOG2S", "HID", "N_HIDDEN", "OUT", "OUT_PAD", "PE_PAD", "EXTRA",
                  "BLOCK_P", "ITERS", "OUT_U8", "RELOAD")
# The contract (plugins/spec.py): the hidden layers are unrolled below for N_HIDDEN up to
# spec.MAX_HIDDEN (tests/test_spec.py counts the branches); a kernel reads globals only as constexpr.
LEAKY_SLOPE = tl.constexpr(spec.LEAKY_SLOPE)


def asap_spatial_mlp(
    ids_ptr, params_ptr, extra_ptr,
    H, W, n_tiles_h, n_tiles_w, n_lab, dontcare_ch,
    p_sn, p_sc, p_sy, p_sx, o_sn, o_sy, o_sx, o_sc,
    out_ptr,
    S: tl.constexpr, LOG2S: tl.constexpr, HID: tl.constexpr, N_HIDDEN: tl.constexpr,
    OUT: tl.constexpr, OUT_PAD: tl.constexpr, PE_PAD: tl.constexpr, EXTRA: tl.constexpr,
    BLOCK_P: tl.constexpr, ITERS: tl.constexpr, OUT_U8: tl.constexpr, RELOAD: tl.constexpr,
):
    pid = tl.program_id(0)
    split = (S * S) // (BLOCK_P * ITERS)
    part = pid % split
    tile = pid // split
    tc = tile % n_tiles_w
    rest = tile // n_tiles_w
    tr = rest % n_tiles_h
    n = (rest // n_tiles_h).to(tl.int64)

    pbase = params_ptr + n * p_sn + tr.to(tl.int64) * p_sy + tc.to(tl.int64) * p_sx
    hcol = tl.arange(0, HID)
    c0 = n_lab + EXTRA + 4 * LOG2S
    w1 = HID  # layer-1 weight start

    # ---- the tile's parameters, read once per program --------------------------------------
    # (RELOAD: the hidden layers' weight matrices are read again for every block of BLOCK_P pixels,
    # right before their dot, instead of being held for the whole program: Triton then keeps one
    # HID x HID operand in shared memory at a time instead of all N_HIDDEN; the AOT compiler picks
    # it when the kernel would exceed the target's shared memory per block, plugins/aot.py)
    b1 = tl.load(pbase + hcol * p_sc).to(tl.float32)
    pe_row = tl.arange(0, PE_PAD)
    pe_w = tl.load(pbase + (w1 + (n_lab + EXTRA + pe_row[:, None]) * HID + hcol[None, :]) * p_sc,
                   mask=pe_row[:, None] < 4 * LOG2S, other=0.0).to(tl.float16)
    hid0 = HID + c0 * HID
    hrow = tl.arange(0, HID)
    if N_HIDDEN >= 1:
        ba = tl.load(pbase + (hid0 + hcol) * p_sc).to(tl.float32)
        if not RELOAD:
            wa = tl.load(pbase + (hid0 + HID + hrow[:, None] * HID + hcol[None, :]) * p_sc).to(tl.float16)
    if N_HIDDEN >= 2:
        o2 = hid0 + (HID + HID * HID)
        bb = tl.load(pbase + (o2 + hcol) * p_sc).to(tl.float32)
        if not RELOAD:
            wb = tl.load(pbase + (o2 + HID + hrow[:, None] * HID + hcol[None, :]) * p_sc).to(tl.float16)
    if N_HIDDEN >= 3:
        o3 = hid0 + 2 * (HID + HID * HID)
        bc = tl.load(pbase + (o3 + hcol) * p_sc).to(tl.float32)
        if not RELOAD:
            wc = tl.load(pbase + (o3 + HID + hrow[:, None] * HID + hcol[None, :]) * p_sc).to(tl.float16)
    if N_HIDDEN >= 4:
        o4 = hid0 + 3 * (HID + HID * HID)
        bd = tl.load(pbase + (o4 + hcol) * p_sc).to(tl.float32)
        if not RELOAD:
            wd = tl.load(pbase + (o4 + HID + hrow[:, None] * HID + hcol[None, :]) * p_sc).to(tl.float16)
    oo = hid0 + N_HIDDEN * (HID + HID * HID)
    ocol = tl.arange(0, OUT_PAD)
    bo = tl.load(pbase + (oo + ocol) * p_sc, mask=ocol < OUT, other=0.0).to(tl.float32)
    wo = tl.load(pbase + (oo + OUT + hrow[:, None] * OUT + ocol[None, :]) * p_sc,
                 mask=ocol[None, :] < OUT, other=0.0).to(tl.float16)

    # Positional encoding. PE channel c: frequency index k = c // 4 (f = S >> k), kind = c % 4:
    # cos(x), sin(x), cos(y), sin(y) of 2*pi*(v mod f)/f, (x, y) in-tile (tiles are S-aligned).
    # It is the same in every tile, so it is not evaluated per pixel but taken from tables:
    # * S <= 32: two tables built once per program, row r = the x (pe_tx) or y (pe_ty) half of the
    #   PE of in-tile column / row r (max(S, 16) rows: a dot's K >= 16); per pixel two one-hot dots
    #   copy its rows (exact: one 1 per row, the x and y columns disjoint). No sin/cos in the loop.
    # * S >= 64 (a one-hot of S columns would cost more registers than it saves), BLOCK_P >= S:
    #   every block spans whole tile rows (tx = i % S for its i-th pixel), so the x half is one
    #   table per program (pe_x, BLOCK_P x PE_PAD); the y half of the block's BLOCK_P / S rows is a
    #   small table per block (max(BLOCK_P / S, 16) rows) copied to the pixels by a one-hot dot:
    #   sin/cos 8x fewer in the loop than per pixel at the default BLOCK_P = 128.
    # * S >= 64 with BLOCK_P < S (only when asked for): per pixel, as the formula reads.
    pe_k = pe_row // 4
    pe_kind = pe_row % 4
    pe_div = tl.maximum((pe_k * 0 + S) >> pe_k, 1)  # f = S >> k (padding columns: 1)
    pe_f = pe_div.to(tl.float32)
    pe_mask = pe_div - 1
    pe_on = pe_row < 4 * LOG2S  # columns >= 4*LOG2S are padding: zero (they meet zero weights)
    two_pi = 6.283185307179586
    blk = tl.arange(0, BLOCK_P)
    if S <= 32:
        t_row = tl.arange(0, 16 * ((S + 15) // 16))
        t_ang = (t_row[:, None] & pe_mask[None, :]).to(tl.float32) * two_pi / pe_f[None, :]
        t_val = tl.where((t_row[:, None] < S) & pe_on[None, :],
                         tl.where((pe_kind[None, :] % 2) == 0, tl.cos(t_ang), tl.sin(t_ang)), 0.0)
        pe_tx = tl.where(pe_kind[None, :] < 2, t_val, 0.0).to(tl.float16)
        pe_ty = tl.where(pe_kind[None, :] >= 2, t_val, 0.0).to(tl.float16)
    elif BLOCK_P >= S:
        ang_x = ((blk % S)[:, None] & pe_mask[None, :]).to(tl.float32) * two_pi / pe_f[None, :]
        pe_x = tl.where((pe_kind[None, :] < 2) & pe_on[None, :],
                        tl.where((pe_kind[None, :] % 2) == 0, tl.cos(ang_x), tl.sin(ang_x)), 0.0).to(tl.float16)
        ry = tl.arange(0, 16 * ((BLOCK_P // S + 15) // 16))  # y-table rows: max(BLOCK_P / S, 16) (a dot's K >= 16)

    # ---- the pixels ------------------------------------------------------------------------
    for it in range(ITERS):  # a real loop: unrolling it only raises register pressure
        q = part * (BLOCK_P * ITERS) + it * BLOCK_P + tl.arange(0, BLOCK_P)  # index in the tile
        ty = q // S
        tx = q % S
        y = tr * S + ty
        x = tc * S + tx
        pix = (n * H + y) * W + x  # int64
        lab = tl.load(ids_ptr + pix).to(tl.int32)
        lab = tl.where((lab == 255) & (dontcare_ch >= 0), dontcare_ch, lab)
        lab = tl.minimum(tl.maximum(lab, 0), n_lab - 1)

        # positional encoding (PE_PAD columns, fp16 values as the dot takes them)
        if S <= 32:
            pe = tl.dot((tx[:, None] == t_row[None, :]).to(tl.float16), pe_tx)
            pe = tl.dot((ty[:, None] == t_row[None, :]).to(tl.float16), pe_ty, pe)
        elif BLOCK_P >= S:
            ty0 = (part * (BLOCK_P * ITERS) + it * BLOCK_P) // S  # the block's first tile row
            ang_y = ((ty0 + ry)[:, None] & pe_mask[None, :]).to(tl.float32) * two_pi / pe_f[None, :]
            tab_y = tl.where((pe_kind[None, :] >= 2) & pe_on[None, :] & (ry[:, None] < BLOCK_P // S),
                             tl.where((pe_kind[None, :] % 2) == 0, tl.cos(ang_y), tl.sin(ang_y)), 0.0)
            # (ty - ty0 = blk // S, written with this block's ty so that the one-hot stays a per-block
            # register value: hoisted out of the loop, Triton would hold it in shared memory)
            pe = tl.dot(((ty - ty0)[:, None] == ry[None, :]).to(tl.float16), tab_y.to(tl.float16))
            pe += pe_x.to(tl.float32)  # x and y columns are disjoint: the sum is exact
        else:
            v = tl.where(pe_kind[None, :] < 2, tx[:, None], ty[:, None])
            ang = (v & pe_mask[None, :]).to(tl.float32) * two_pi / pe_f[None, :]
            pe = tl.where((pe_kind[None, :] % 2) == 0, tl.cos(ang), tl.sin(ang))
            pe = tl.where(pe_on[None, :], pe, 0.0)

        # layer 1: bias + row gather by label + extra dense channels + PE dot
        h = tl.load(pbase + (w1 + lab[:, None] * HID + hcol[None, :]) * p_sc).to(tl.float32)
        h += b1[None, :]
        for e in tl.static_range(EXTRA):
            fe = tl.load(extra_ptr + ((n * EXTRA + e) * H + y) * W + x).to(tl.float32)
            we = tl.load(pbase + (w1 + (n_lab + e) * HID + hcol) * p_sc).to(tl.float32)
            h += fe[:, None] * we[None, :]
        h += tl.dot(pe.to(tl.float16), pe_w)

        # hidden layers: fp16 dots, fp32 accumulation
        if N_HIDDEN >= 1:
            h = tl.where(h > 0, h, h * LEAKY_SLOPE)
            if RELOAD:
                wa = tl.load(pbase + (hid0 + HID + hrow[:, None] * HID + hcol[None, :]) * p_sc).to(tl.float16)
            h = tl.dot(h.to(tl.float16), wa) + ba[None, :]
        if N_HIDDEN >= 2:
            h = tl.where(h > 0, h, h * LEAKY_SLOPE)
            if RELOAD:
                wb = tl.load(pbase + (o2 + HID + hrow[:, None] * HID + hcol[None, :]) * p_sc).to(tl.float16)
            h = tl.dot(h.to(tl.float16), wb) + bb[None, :]
        if N_HIDDEN >= 3:
            h = tl.where(h > 0, h, h * LEAKY_SLOPE)
            if RELOAD:
                wc = tl.load(pbase + (o3 + HID + hrow[:, None] * HID + hcol[None, :]) * p_sc).to(tl.float16)
            h = tl.dot(h.to(tl.float16), wc) + bc[None, :]
        if N_HIDDEN >= 4:
            h = tl.where(h > 0, h, h * LEAKY_SLOPE)
            if RELOAD:
                wd = tl.load(pbase + (o4 + HID + hrow[:, None] * HID + hcol[None, :]) * p_sc).to(tl.float16)
            h = tl.dot(h.to(tl.float16), wd) + bd[None, :]
        h = tl.where(h > 0, h, h * LEAKY_SLOPE)
        o = tl.dot(h.to(tl.float16), wo) + bo[None, :]
        # tanh(o) = 1 - 2 / (exp(2o) + 1): saturates to +-1 without inf/inf
        t = 1.0 - 2.0 / (tl.exp(2.0 * o) + 1.0)

        optr = out_ptr + n * o_sn + y.to(tl.int64)[:, None] * o_sy + x.to(tl.int64)[:, None] * o_sx \
            + ocol[None, :] * o_sc
        omask = (ocol[None, :] < OUT) & (q[:, None] >= 0)
        if OUT_U8:
            s = (t + 1.0) * 127.5
            r = tl.floor(s + 0.5)
            odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
            r = tl.where(((r - s) == 0.5) & odd, r - 1.0, r)  # ties to even, as ONNX Round
            r = tl.minimum(tl.maximum(r, 0.0), 255.0)
            tl.store(optr, r.to(tl.uint8), mask=omask)
        else:
            tl.store(optr, t.to(out_ptr.dtype.element_ty), mask=omask)


def asap_repack_params(src_ptr, s_sn, s_sc, s_sy, s_sx, P, n_tiles_h, n_tiles_w, n_tiles, dst_ptr,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Re-pack pre-pass: (N, P, h, w) public grid (any strides, fp16/fp32) -> (N*h*w, P)
    contiguous fp16, channels last, SAME channel order (so the fused kernel reads it with
    p_sc = 1, p_sx = P, p_sy = w*P, p_sn = h*w*P). Grid: (cdiv(n_tiles, BLOCK_T), cdiv(P, BLOCK_C), 1)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tc = t % n_tiles_w
    rest = t // n_tiles_w
    tr = rest % n_tiles_h
    n = rest // n_tiles_h
    mask = (t[:, None] < n_tiles) & (c[None, :] < P)
    src = src_ptr + (n.to(tl.int64) * s_sn + tr.to(tl.int64) * s_sy + tc.to(tl.int64) * s_sx)[:, None] \
        + c[None, :].to(tl.int64) * s_sc
    val = tl.load(src, mask=mask, other=0.0)
    tl.store(dst_ptr + t.to(tl.int64)[:, None] * P + c[None, :], val.to(tl.float16), mask=mask)


# Built explicitly (not with @triton.jit) so that TRITON_INTERPRET in the environment at import
# time does not decide for the whole process: AOT compilation always needs the JITFunction, and
# the interpreter is chosen per call (`interpreted()`).
spatial_mlp = JITFunction(asap_spatial_mlp)
repack = JITFunction(asap_repack_params)
_INTERPRETED: dict[str, object] = {}


def interpreted(name: str = KERNEL_NAME):
    """The same kernel run by Triton's CPU interpreter (tensors on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    if name not in _INTERPRETED:
        fn = asap_spatial_mlp if name == KERNEL_NAME else asap_repack_params
        _INTERPRETED[name] = InterpretedFunction(fn)
    return _INTERPRETED[name]


def triton_version() -> str:
    return triton.__version__
