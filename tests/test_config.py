"""ModelConfig: sizes from ASAPNET.md, presets, JSON round-trip, inference from shapes."""

from __future__ import annotations

import math

import pytest

from asap_deploy.config import PRESETS, ModelConfig, infer_config, preset
from asap_deploy.errors import CheckpointError, ConfigError
from oracles import num_params_oracle


@pytest.mark.parametrize(
    "label_nc,dontcare,crop,aspect,expect_s,expect_c0,expect_n",
    [
        (35, False, 1024, 1.0, 64, 59, 16515),  # ASAPNET.md examples
        (13, False, 1024, 1.0, 64, 37, 15107),
        (13, False, 512, 1.0, 32, 33, 14851),
        (35, False, 512, 2.0, 16, 51, 16003),  # cityscapes fixture
        (20, True, 512, 1.0, 32, 41, 15363),  # dontcare fixture
        (150, True, 256, 1.0, 16, 167, None),
    ],
)
def test_sizes_follow_asapnet_formulas(label_nc, dontcare, crop, aspect, expect_s, expect_c0, expect_n):
    cfg = ModelConfig(label_nc=label_nc, contain_dontcare_label=dontcare, crop_size=crop, aspect_ratio=aspect)
    assert cfg.S == expect_s == crop // (16 * aspect)
    assert cfg.mlp_channels[0] == expect_c0 == label_nc + dontcare + 4 * int(math.log2(expect_s))
    assert cfg.num_params == num_params_oracle(expect_c0) == 64 * expect_c0 + 12739
    if expect_n is not None:
        assert cfg.num_params == expect_n


def test_grid_is_16_rows_at_training_crop():
    for aspect, crop in [(1.0, 1024), (2.0, 1024), (2.0, 512), (1.0, 256)]:
        cfg = ModelConfig(label_nc=3, crop_size=crop, aspect_ratio=aspect)
        assert cfg.describe()["grid_at_crop"] == [16, int(16 * aspect)]


def test_param_offsets_tile_the_vector():
    cfg = preset("cityscapes")
    pos = 0
    for b0, w0, cin, cout in cfg.param_offsets():
        assert b0 == pos and w0 == pos + cout
        pos = w0 + cin * cout
    assert pos == cfg.num_params


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_json(name):
    cfg = preset(name)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_bad_configs_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="power of two"):
        ModelConfig(label_nc=3, crop_size=1000)
    with pytest.raises(ConfigError, match="learned_ds_factor"):
        ModelConfig(label_nc=3, crop_size=128)  # S = 8 < 16
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({"label_nc": 3, "bogus": 1})
    with pytest.raises(ConfigError, match="label_nc"):
        ModelConfig.from_dict({"crop_size": 256})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")


def _shapes(cfg: ModelConfig) -> dict:
    torch = pytest.importorskip("torch")
    from asap_deploy.model import ASAPNetGenerator

    torch.manual_seed(0)
    return {k: tuple(v.shape) for k, v in ASAPNetGenerator(cfg).state_dict().items()}


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(label_nc=13, crop_size=1024, reflection_pad=True, lr_width=8, lr_max_width=16, lr_depth=2),
        ModelConfig(label_nc=35, instance_edges=True, crop_size=512, aspect_ratio=2.0, lr_width=8, lr_max_width=16,
                    lr_depth=1),
        ModelConfig(label_nc=7, crop_size=64, learned_ds_factor=4, lr_width=8, lr_max_width=8, lr_depth=0),
        ModelConfig(label_nc=4, crop_size=2048, reflection_pad=True, lr_width=4, lr_max_width=8, lr_depth=3,
                    hr_width=32, hr_depth=3),
    ],
)
def test_infer_config_from_state_dict_shapes(cfg):
    got = infer_config(_shapes(cfg))
    same = ("label_nc", "instance_edges", "learned_ds_factor", "lr_width", "lr_max_width", "lr_depth", "hr_width",
            "hr_depth", "reflection_pad")
    assert {k: getattr(got, k) for k in same} == {k: getattr(cfg, k) for k in same}
    assert got.S == cfg.S and got.num_params == cfg.num_params
    assert got.contain_dontcare_label is None  # a checkpoint cannot tell


def test_infer_config_refuses_foreign_state_dicts():
    with pytest.raises(CheckpointError, match="unexpected key"):
        infer_config({"encoder.weight": (3, 3)})
    with pytest.raises(CheckpointError, match="no 'lowres_stream"):
        infer_config({})


def test_infer_config_property_over_random_configs():
    """Any valid config's state-dict shapes infer back to the same network (hypothesis)."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=25, deadline=None)
    @given(label_nc=st.integers(1, 40), edges=st.booleans(), log2_s=st.integers(2, 7), log2_s2=st.integers(1, 4),
           depth=st.integers(0, 3), refl=st.booleans(), hr_width=st.sampled_from([16, 32, 64]),
           hr_depth=st.integers(2, 6))
    def check(label_nc, edges, log2_s, log2_s2, depth, refl, hr_width, hr_depth):
        log2_s2 = min(log2_s2, log2_s)
        cfg = ModelConfig(label_nc=label_nc, instance_edges=edges, crop_size=16 * 2**log2_s,
                          learned_ds_factor=2**log2_s2, lr_width=4, lr_max_width=8, lr_depth=depth,
                          reflection_pad=refl, hr_width=hr_width, hr_depth=hr_depth)
        got = infer_config(_shapes(cfg), hr_width=hr_width, hr_depth=hr_depth)
        assert got.replace(contain_dontcare_label=False) == cfg

    check()
