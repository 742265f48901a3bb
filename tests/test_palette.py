"""Palettes: id -> colour -> id round trips, unknown colours, palette files and names."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asap_deploy.config import ModelConfig
from asap_deploy.errors import InputError, UsageError
from asap_deploy.palette import CITYSCAPES, Palette, bundle_palette, load_palette


@pytest.mark.parametrize("dontcare", [False, True])
def test_bundle_palette_round_trip(dontcare):
    cfg = ModelConfig(label_nc=40, contain_dontcare_label=dontcare, crop_size=256)
    pal = load_palette(None, cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.n_label_channels, (17, 23))
    if dontcare:
        ids[rng.random(ids.shape) < 0.2] = 255
    rgb = pal.colourise(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (17, 23, 3)
    assert np.array_equal(pal.decode(rgb), ids)


def test_bundle_palette_equals_manifest_palette():
    cfg = ModelConfig(label_nc=7, contain_dontcare_label=True, crop_size=256)
    from asap_deploy.export.bundle import label_set

    manifest = {"labels": label_set(cfg)}
    assert load_palette(None, cfg, manifest).to_dict() == bundle_palette(cfg).to_dict()


def test_cityscapes_shared_colours_decode_to_smallest_id():
    pal = load_palette("cityscapes")
    ids = np.arange(34).reshape(2, 17)
    dec = pal.decode(pal.colourise(ids))
    expect = ids.copy()
    expect[(ids >= 0) & (ids <= 4)] = 0  # all black
    expect[ids == 18] = 17  # polegroup shares pole's grey
    assert np.array_equal(dec, expect)
    # and the colours are the data set's, e.g. road and car
    assert CITYSCAPES[7] == (128, 64, 128) and CITYSCAPES[26] == (0, 0, 142)


def test_palette_file_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    colours = {i: tuple(int(v) for v in rng.integers(0, 256, 3)) for i in range(12)}
    colours = {i: c for i, c in colours.items() if list(colours.values()).count(c) == 1}
    for form in ("dict", "wrapped", "list"):
        f = tmp_path / f"{form}.json"
        d = {str(i): list(c) for i, c in colours.items()}
        obj = {"dict": d, "wrapped": {"palette": d}, "list": [list(colours[i]) for i in sorted(colours)]}[form]
        f.write_text(json.dumps(obj))
        pal = load_palette(str(f))
        ids = rng.choice(sorted(colours), (9, 11))
        assert np.array_equal(pal.decode(pal.colourise(ids)), ids)


def test_unknown_colour_names_file_colour_and_position():
    pal = Palette({0: (0, 0, 0), 1: (255, 0, 0)}, "tiny")
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[2, 3] = (1, 2, 3)
    with pytest.raises(InputError, match=r"map\.png: 1 pixel\(s\) in 1 colour\(s\) not in the tiny palette: \[1, 2, 3\] "
                                         r"\(first at x=3, y=2\)"):
        pal.decode(rgb, "map.png")


def test_bad_palette_names_and_files(tmp_path):
    with pytest.raises(UsageError, match="did you mean 'cityscapes'"):
        load_palette("citiscapes")
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="p.json: cannot read the palette file"):
        load_palette(str(bad))
    bad.write_text(json.dumps({"0": [1, 2]}))
    with pytest.raises(UsageError, match="three values"):
        load_palette(str(bad))
