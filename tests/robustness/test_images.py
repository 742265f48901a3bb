"""Untrusted label maps and instance maps: damaged and absurd files, every PNG flavour, ids and
colours outside the model's label set, odd file names. tests/test_infer.py covers a corrupt header,
a truncated file, one foreign colour and one id out of range; here the rest, through `asap infer`
(exit 5, the file named, the other inputs written) and hypothesis."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from asap_deploy.errors import InputError
from asap_deploy.app.infer import decode_label_map
from asap_deploy.io import read_image
from asap_deploy.palette import bundle_palette

from .conftest import CFG, label_maps, png_with_header, run_cli, save_png

EXIT = InputError.exit_code
PAL = bundle_palette(CFG)


def _infer(inputs, bundle_dir, out, *extra, exit_code=EXIT, names=(), says=()):
    return run_cli(["infer", *inputs, "--bundle", bundle_dir, "-o", out, *extra], exit_code, names, says)


def test_absurd_header_refused_before_allocating(tmp_path, bundle_dir, good_map):
    """100000x100000 declared in the header (a few hundred bytes on disk): refused from the header
    with --max-pixels, also above Pillow's own bomb limit, and for JPEG headers read by io.read_image."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_with_header(100_000, 100_000))
    mid = tmp_path / "mid.png"
    mid.write_bytes(png_with_header(5_000, 5_000))
    _infer([huge, mid, good_map], bundle_dir, tmp_path / "o", "--max-pixels", "1000000",
           names=("huge.png", "mid.png"), says=("5000x5000 pixels exceeds the limit of 1000000", "2 of 3"))
    assert (tmp_path / "o" / "good.png").is_file()
    _infer([huge], bundle_dir, tmp_path / "o2", "--max-pixels", str(2 ** 30), names=("huge.png",),  # the cap
           says=("more pixels than Pillow decodes",))
    run_cli(["infer", good_map, "--bundle", bundle_dir, "--max-pixels", "0"], 2, says=("--max-pixels",))
    # io.read_image (training data): a JPEG header, not only PNG, is checked before OpenCV decodes it
    jpg = tmp_path / "big.jpg"
    Image.new("L", (64, 64)).save(jpg)
    data = bytearray(jpg.read_bytes())
    sof = data.index(b"\xff\xc0")
    for side, message in ((10000, "10000x10000 pixels exceeds the limit"), (30000, "more pixels than Pillow decodes")):
        data[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2
        jpg.write_bytes(bytes(data))
        with pytest.raises(InputError, match=rf"big\.jpg: .*{message}"):
            read_image(jpg)


def test_empty_zero_size_and_non_images(tmp_path, bundle_dir, good_map):
    cases = {"empty.png": b"", "zero.png": png_with_header(0, 0), "zero_w.png": png_with_header(0, 16),
             "text.png": b"hello, not an image\n" * 10, "bad_idat.png": png_with_header(16, 16, idat=b"garbage"),
             "short_idat.png": png_with_header(16, 16, idat=zlib.compress(b"\0" * 10))}
    for name, data in cases.items():
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    (tmp_path / "in" / "folder.png").mkdir()
    _infer([tmp_path / "in", good_map], bundle_dir, tmp_path / "o", names=tuple(cases),
           says=(f"{len(cases)} of {len(cases) + 1}",))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["good.png"]


def test_png_flavours_decode_to_the_same_ids(tmp_path, bundle_dir):
    """8-bit gray, 16-bit gray, palette (mode P), RGB and RGBA in the bundle palette, gray stored as
    RGB: the same ids, the same output; LA keeps the id channel."""
    labels, _ = label_maps(1, 24, 16, seed=3)
    ids = labels[0]
    rgb = PAL.colourise(ids)
    pal_img = Image.fromarray(ids, "L").convert("P")
    pal_img.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
    pal_img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    pal_img.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
    files = {"gray8.png": save_png(tmp_path / "in" / "gray8.png", ids),
             "gray16.png": save_png(tmp_path / "in" / "gray16.png", ids.astype(np.uint16)),
             "rgb.png": save_png(tmp_path / "in" / "rgb.png", rgb),
             "rgba.png": save_png(tmp_path / "in" / "rgba.png", np.dstack([rgb, np.full(ids.shape, 200, np.uint8)])),
             "grayrgb.png": save_png(tmp_path / "in" / "grayrgb.png", np.repeat(ids[..., None], 3, axis=2)),
             "la.png": save_png(tmp_path / "in" / "la.png", np.dstack([ids, np.full_like(ids, 9)]), "LA")}
    pal_img.save(tmp_path / "in" / "palette.png")
    assert Image.open(files["gray16.png"]).mode.startswith("I")
    for f in list(files.values()) + [tmp_path / "in" / "palette.png"]:
        assert np.array_equal(decode_label_map(f, CFG, PAL), ids), f.name
    _infer([tmp_path / "in"], bundle_dir, tmp_path / "o", exit_code=0)
    outs = [np.array(Image.open(p)) for p in sorted((tmp_path / "o").iterdir())]
    assert len(outs) == 7 and all(np.array_equal(o, outs[0]) for o in outs)


def test_ids_and_colours_outside_the_label_set(tmp_path, bundle_dir, good_map):
    labels, _ = label_maps(1, 16, 16, seed=4)
    ids = labels[0].copy()
    cases = {}
    a = ids.astype(np.uint16)
    a[2, 3] = 40000
    cases["big16.png"] = (save_png(tmp_path / "in" / "big16.png", a), "label id 40000 at x=3, y=2")
    p = Image.frombytes("P", (16, 16), np.where(ids == 0, 77, ids).astype(np.uint8).tobytes())
    p.putpalette([0] * 768)
    p.save(tmp_path / "in" / "pal77.png")
    cases["pal77.png"] = (tmp_path / "in" / "pal77.png", "label id 77")
    b = ids.copy()
    b[0, 5] = 254  # 255 is don't care in this model; 254 is not
    cases["id254.png"] = (save_png(tmp_path / "in" / "id254.png", b), "label id 254 at x=5, y=0")
    rgb = PAL.colourise(ids)
    rgb[7, 1] = (13, 14, 15)
    cases["foreign.png"] = (save_png(tmp_path / "in" / "foreign.png", rgb), "[13, 14, 15]")
    _infer([tmp_path / "in", good_map], bundle_dir, tmp_path / "o",
           names=tuple(cases), says=tuple(w for _, w in cases.values()) + ("4 of 5",))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["good.png"]
    dontcare = ids.copy()
    dontcare[0, 0] = 255  # accepted: this model has a don't-care channel
    _infer([save_png(tmp_path / "dc" / "dc.png", dontcare)], bundle_dir, tmp_path / "o3", exit_code=0)


def test_mismatched_and_bad_instance_maps(tmp_path):
    from asap_deploy.export.bundle import export_model
    from asap_deploy.random_model import random_generator

    from .conftest import CFG_INST

    b = export_model(random_generator(CFG_INST, 1), tmp_path / "bi", fp16=False).path
    labels, inst = label_maps(4, 16, 16, seed=2, cfg=CFG_INST)
    for i, name in enumerate(("ok", "small", "colour", "corrupt")):
        save_png(tmp_path / "in" / f"{name}.png", labels[i])
    save_png(tmp_path / "inst" / "ok.png", inst[0].astype(np.uint16))
    save_png(tmp_path / "inst" / "small.png", inst[1][:8, :12].astype(np.uint16))
    save_png(tmp_path / "inst" / "colour.png", np.dstack([inst[2].astype(np.uint8)] * 2 + [inst[2].astype(np.uint8) + 1]))
    (tmp_path / "inst" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    save_png(tmp_path / "in" / "orphan.png", labels[0])
    _infer([tmp_path / "in"], b, tmp_path / "o", "--instances", tmp_path / "inst",
           names=("small.png", "colour.png", "corrupt.png", "orphan.png"),
           says=("is 12x8", "single-channel", "cannot read", "no instance map in", "4 of 5"))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["ok.png"]


@pytest.mark.parametrize("name", ["naïve façade.png", "場所 1.png", "with space.png", "-leading-dash.png",
                                  "quote'and\"double.png", "semi;colon $HOME.png"])
def test_odd_file_names(tmp_path, bundle_dir, name):
    labels, _ = label_maps(1, seed=5)
    src = save_png(tmp_path / "in dir" / name, labels[0])
    _infer([src.parent], bundle_dir, tmp_path / "out dir ü", exit_code=0)
    assert (tmp_path / "out dir ü" / name).is_file()
    bad = tmp_path / "bad ü" / name
    bad.parent.mkdir()
    bad.write_bytes(b"junk")
    _infer([bad], bundle_dir, tmp_path / "o2", names=(name,), says=("cannot read the image",))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_label_arrays(tmp_path, data):
    """Random (H, W) arrays of 8/16-bit ids: decoded as is when every id is valid, else an
    InputError naming the file and the first bad id in reading order."""
    h, w = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    depth = data.draw(st.sampled_from([np.uint8, np.uint16]))
    top = 255 if depth == np.uint8 else 65535
    pool = st.one_of(st.integers(0, CFG.label_nc - 1), st.just(CFG.label_nc), st.just(255), st.integers(0, top))
    a = np.array(data.draw(st.lists(pool, min_size=h * w, max_size=h * w)), dtype=depth).reshape(h, w)
    f = save_png(tmp_path / "r.png", a)
    # the documented rule: ids 0..n_label_channels-1 (with don't care that includes id label_nc, its
    # channel, as in the authors' pipeline) and 255 where the config has a don't-care channel
    valid = (a < CFG.n_label_channels) | ((a == 255) & (CFG.contain_dontcare_label is not False))
    if valid.all():
        assert np.array_equal(decode_label_map(f, CFG, PAL), a)
    else:
        y, x = np.argwhere(~valid)[0]
        with pytest.raises(InputError, match=rf"r\.png.*label id {a[y, x]} at x={x}, y={y}"):
            decode_label_map(f, CFG, PAL)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6),
       st.one_of(st.none(), st.floats(0, 1)))
def test_random_png_damage(tmp_path, good_map, edits, cut):
    """Byte flips anywhere (header, chunk lengths, CRCs, compressed data) and truncation: a valid
    label map or an InputError naming the file; never another exception."""
    data = bytearray(good_map.read_bytes())
    for where, xor in edits:
        data[int(where * len(data))] ^= xor
    if cut is not None:
        data = data[:int(cut * len(data))]
    f = tmp_path / "damaged.png"
    f.write_bytes(bytes(data))
    try:
        ids = decode_label_map(f, CFG, PAL, max_pixels=1 << 20)
    except InputError as exc:
        assert "damaged.png" in exc.message
    else:
        assert ids.ndim == 2 and ids.dtype == np.uint8
