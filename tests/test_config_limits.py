"""ModelConfig sizing (issue 12): parameters and activations from the config alone, stated limits,
field types, and the generator's constructor refusing before it allocates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from asap_deploy.config import MAX_ACTIVATION_BYTES, MAX_PARAMETERS, PRESETS, ModelConfig, preset
from asap_deploy.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_sized_like_the_published_model(name):
    torch = pytest.importorskip("torch")
    from asap_deploy.model import ASAPNetGenerator

    cfg = preset(name)
    c = cfg.cost()
    assert 80e6 < c.parameters < 95e6  # ASAPNET.md: about 82-84 M with the published widths
    assert c.parameter_bytes == 4 * c.parameters and (c.height, c.width) == cfg.crop_hw
    assert c.activation_bytes < 2**30
    small = cfg.replace(lr_width=8, lr_max_width=16, lr_depth=2)  # the count matches the module tree
    assert small.cost().parameters == sum(p.numel() for p in ASAPNetGenerator(small).parameters())
    del torch


@pytest.mark.parametrize("lr_depth,hr_depth,ds", [(0, 2, 16), (1, 3, 1), (3, 5, 4), (2, 7, 2)])
def test_parameter_count_matches_the_module_tree(lr_depth, hr_depth, ds):
    pytest.importorskip("torch")
    from asap_deploy.model import ASAPNetGenerator

    cfg = ModelConfig(label_nc=6, instance_edges=True, crop_size=256, learned_ds_factor=ds, lr_width=4,
                      lr_max_width=12, lr_depth=lr_depth, hr_width=10, hr_depth=hr_depth, reflection_pad=lr_depth == 1)
    assert cfg.cost().parameters == sum(p.numel() for p in ASAPNetGenerator(cfg).parameters())


def test_cost_grows_with_the_requested_size_and_batch():
    cfg = preset("facades")
    a, b, c = cfg.cost(1024, 1024), cfg.cost(2048, 2048), cfg.cost(1024, 1024, batch=4)
    assert a.parameters == b.parameters == c.parameters
    assert b.activation_bytes > 3 * a.activation_bytes and c.activation_bytes > 3 * a.activation_bytes


def test_check_cost_at_a_requested_size_names_it():
    cfg = preset("coco")
    cfg.check_cost(1024, 1024)
    with pytest.raises(ConfigError, match=r"activations for 1 x 16384 x 16384 \(the requested size\)"):
        cfg.check_cost(16384, 16384)
    with pytest.raises(ConfigError, match="too large: .* learned parameters"):
        cfg.check_cost(max_parameters=1_000_000)
    assert MAX_PARAMETERS >= 100_000_000 and MAX_ACTIVATION_BYTES >= 2**30


@pytest.mark.parametrize("changes,says", [
    (dict(lr_max_width=8192), "too large"), (dict(lr_depth=200), "too large"),
    (dict(hr_width=4096, hr_depth=50), "too large"), (dict(label_nc=60000), "too large"),
    (dict(crop_size=65536), "activations"), (dict(aspect_ratio=1 / 512), "no whole"),
])
def test_absurd_but_in_range_configs_are_refused_by_validate(changes, says):
    with pytest.raises(ConfigError, match=says):
        preset("facades", **changes)


@pytest.mark.parametrize("field,value", [("label_nc", 3.0), ("label_nc", False), ("crop_size", "256"),
                                         ("instance_edges", 1), ("contain_dontcare_label", 0),
                                         ("aspect_ratio", float("inf")), ("aspect_ratio", True),
                                         ("hr_depth", 257), ("output_nc", 65)])
def test_field_types_and_ranges(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({"label_nc": 3, "crop_size": 256, field: value})


def test_numpy_integers_become_plain_ints():
    cfg = ModelConfig(label_nc=np.int64(7), crop_size=np.int32(256))
    assert type(cfg.label_nc) is int and type(cfg.crop_size) is int
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_the_generator_constructor_sizes_a_config_that_skipped_validation():
    """A ModelConfig made without __post_init__ (unpickled, or built field by field) is still
    sized by ASAPNetGenerator before any parameter is allocated."""
    pytest.importorskip("torch")
    from asap_deploy.model import ASAPNetGenerator

    cfg = object.__new__(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        object.__setattr__(cfg, f.name, f.default)
    object.__setattr__(cfg, "label_nc", 13)
    object.__setattr__(cfg, "lr_max_width", 65536)  # 3.9e10 parameters per block
    with pytest.raises(ConfigError, match="too large"):
        ASAPNetGenerator(cfg)
