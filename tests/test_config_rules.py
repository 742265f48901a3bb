"""The size rule and the label-id rule, written once on ModelConfig (DESIGN.md, Contracts): padding
to whole tiles round-trips, and the vectorised id check agrees with a per-pixel loop oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asap_deploy.config import DONTCARE_ID, ModelConfig, crop, pad_to_tiles, padded_size
from asap_deploy.errors import InputError

SIZES = st.integers(1, 70)
# S = 8 (crop 128), 16 (crop 256); label sets with and without don't care, and an inferred config
# (contain_dontcare_label=None: id 255 maps to the last channel).
CONFIGS = [ModelConfig(label_nc=n, contain_dontcare_label=d, crop_size=c, learned_ds_factor=8, lr_width=8,
                       lr_max_width=8, lr_depth=1, hr_width=16)
           for n, d, c in [(5, False, 128), (5, True, 128), (6, None, 256), (300, None, 128), (255, True, 128)]]


@settings(max_examples=150, deadline=None)
@given(h=SIZES, w=SIZES, s=st.sampled_from([2, 4, 8, 16, 32]), extra=st.sampled_from([(), (3,)]), seed=st.integers(0, 2**31))
def test_pad_then_crop_round_trips(h, w, s, extra, seed):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, *extra)).astype(np.uint8)
    ph, pw = padded_size(h, w, s)
    assert ph % s == pw % s == 0 and h <= ph < h + s and w <= pw < w + s
    p = pad_to_tiles(a, s)
    assert p.shape == (ph, pw, *extra) and p.dtype == a.dtype
    np.testing.assert_array_equal(crop(p, h, w), a)
    if ph > h and h > 1 and w > 1:  # reflect at the bottom: row h mirrors row h-2
        np.testing.assert_array_equal(p[h, :w], a[h - 2])
    np.testing.assert_array_equal(pad_to_tiles(p, s), p)  # already whole tiles: unchanged


@settings(max_examples=60, deadline=None)
@given(h=st.integers(0, 70), w=st.integers(0, 70), i=st.sampled_from(range(len(CONFIGS))))
def test_config_size_rule(h, w, i):
    cfg = CONFIGS[i]
    S = cfg.S  # noqa: N806
    assert cfg.padded_size(h, w) == padded_size(h, w, S)
    ok = h > 0 and w > 0 and h % S == 0 and w % S == 0
    assert cfg.fits_tiles(h, w) == ok
    if ok:
        cfg.check_size(h, w)
        assert cfg.pad_to_tiles(np.zeros((h, w), np.uint8)).shape == (h, w)
    else:
        ph, pw = padded_size(h, w, S)
        with pytest.raises(InputError, match=rf"image size {h}x{w} \(HxW\) is not a positive multiple of "
                                             rf"S={S}: pad it to {ph}x{pw}"):
            cfg.check_size(h, w)


def _oracle(cfg: ModelConfig, ids: np.ndarray):
    """Per-pixel loop, straight from ASAPNET.md: ids 0..n-1 are channels; 255 is the last channel
    when the config has don't care (or does not know: None) and 255 is not already a channel."""
    n = cfg.n_label_channels
    dontcare = cfg.contain_dontcare_label is not False and n <= DONTCARE_ID
    chan = np.empty(ids.shape, np.int64)
    first = None
    for idx in np.ndindex(*ids.shape):
        v = int(ids[idx])
        if 0 <= v < n:
            chan[idx] = v
        elif dontcare and v == DONTCARE_ID:
            chan[idx] = n - 1
        else:
            chan[idx] = -1
            if first is None:
                first = (v, int(idx[-1]), int(idx[-2]))
    return first, chan


@settings(max_examples=200, deadline=None)
@given(i=st.sampled_from(range(len(CONFIGS))), shape=st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 6)),
       dtype=st.sampled_from([np.uint8, np.int32, np.int64, np.uint16]), seed=st.integers(0, 2**31),
       rare=st.floats(0, 0.3))
def test_label_id_rule_matches_loop_oracle(i, shape, dtype, seed, rare):
    cfg = CONFIGS[i]
    rng = np.random.default_rng(seed)
    n = cfg.n_label_channels
    ids = rng.integers(0, n, shape)
    specials = np.array([DONTCARE_ID, n, n - 1, 0, 254, 256, 1000, -1, -7])
    mask = rng.random(shape) < rare
    ids[mask] = rng.choice(specials, mask.sum())
    info = np.iinfo(dtype)
    ids = np.clip(ids, info.min, info.max).astype(dtype)
    first, chan = _oracle(cfg, ids)
    assert cfg.first_invalid_label_id(ids) == first
    np.testing.assert_array_equal(cfg.invalid_label_ids(ids.astype(np.int64)), chan < 0)
    if first is None:
        cfg.check_label_ids(ids, "m.png")
        np.testing.assert_array_equal(cfg.channel_index(ids), chan)
    else:
        v, x, y = first
        msg = f"m.png: label id {v} at x={x}, y={y} is out of range: this model takes ids {cfg.allowed_label_ids}"
        with pytest.raises(InputError) as e:
            cfg.check_label_ids(ids, "m.png")
        assert e.value.message == msg
        with pytest.raises(InputError) as e:
            cfg.check_label_ids(ids, at=None)
        assert e.value.message == f"label id {v} is out of range: this model takes ids {cfg.allowed_label_ids}"
        with pytest.raises(InputError, match="m.png: label id"):
            cfg.channel_index(ids, "m.png")
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(ids.astype(np.int64))
    assert cfg.first_invalid_label_id(t) == first  # the same rule on a tensor (model, torch op)


def test_inferred_config_maps_dontcare_to_last_channel():
    cfg = CONFIGS[2]  # label_nc=6, contain_dontcare_label=None: 6 channels, 255 -> channel 5
    assert cfg.n_label_channels == 6 and cfg.accepts_dontcare_id
    np.testing.assert_array_equal(cfg.channel_index(np.array([[0, 5, 255]], np.uint8)), [[0, 5, 5]])
    with pytest.raises(InputError, match=r"label id 6 at x=1, y=0 .* 0..5 or 255 \(don't care\)"):
        cfg.check_label_ids(np.array([[0, 6, 255]], np.uint8), "x")
    assert not CONFIGS[3].accepts_dontcare_id  # 300 labels: 255 is an ordinary id
    CONFIGS[3].check_label_ids(np.array([[255, 299]], np.int32))
