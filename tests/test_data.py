"""Folder datasets (layout detection, pairing, validation errors naming the file) and the synthetic set."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from asap_deploy.config import ModelConfig
from asap_deploy.data import PairedDataset, collate, find_samples
from asap_deploy.errors import DatasetError, InputError, UsageError
from asap_deploy.io import read_label_map, read_rgb, write_png
from asap_deploy.synthetic_dataset import class_textures, make_dataset, render_target

CFG = ModelConfig(label_nc=4, crop_size=32, learned_ds_factor=2)
RNG = np.random.default_rng(0)


def _pair(label_path: Path, image_path: Path, size=(32, 32), n=4, inst_path: Path | None = None):
    write_png(label_path, RNG.integers(0, n, size).astype(np.uint8))
    write_png(image_path, RNG.integers(0, 256, (*size, 3)).astype(np.uint8))
    if inst_path is not None:
        write_png(inst_path, RNG.integers(0, 3, size).astype(np.uint8))


def test_facades_layout(tmp_path):
    for i in range(3):
        _pair(tmp_path / "train_label" / f"{i}.png", tmp_path / "train_img" / f"{i}.png")
    _pair(tmp_path / "val_label" / "a.png", tmp_path / "val_img" / "a.png")
    layout, samples = find_samples(tmp_path, "train")
    assert layout.name == "facades" and len(samples) == 3 and samples[0].instance is None
    layout, samples = find_samples(tmp_path, "val")
    assert layout.name == "facades" and [s.label.name for s in samples] == ["a.png"]


def test_cityscapes_layout_recursive_with_suffixes(tmp_path):
    for city in ("aachen", "bonn"):
        stem = f"{city}_000000_000019"
        lab = tmp_path / "train_labels" / city
        _pair(lab / f"{stem}_gtFine_labelIds.png", tmp_path / "train_images" / city / f"{stem}_leftImg8bit.png",
              inst_path=lab / f"{stem}_gtFine_instanceIds.png")
        write_png(lab / f"{stem}_gtFine_color.png", np.zeros((32, 32, 3), np.uint8))  # ignored
    layout, samples = find_samples(tmp_path, "train")
    assert layout.name == "cityscapes" and len(samples) == 2
    s = samples[0]
    assert s.label.name.endswith("_labelIds.png") and s.instance.name.endswith("_instanceIds.png")
    assert s.image.name.endswith("_leftImg8bit.png")
    ds = PairedDataset(samples, CFG.replace(instance_edges=True))
    labels, inst, img = ds[0]
    assert inst is not None and inst.shape == labels.shape == (32, 32)


def test_pix2pixhd_layout(tmp_path):
    for i in range(2):
        _pair(tmp_path / "test_label" / f"{i}.png", tmp_path / "test_img" / f"{i}.jpg",
              inst_path=tmp_path / "test_inst" / f"{i}.png")
    layout, samples = find_samples(tmp_path, "val")
    assert layout.name == "pix2pixhd" and layout.split == "test" and all(s.instance for s in samples)


def test_custom_layout(tmp_path):
    _pair(tmp_path / "L" / "x.png", tmp_path / "I" / "x.png")
    layout, samples = find_samples(label_dir=tmp_path / "L", image_dir=tmp_path / "I")
    assert layout.name == "custom" and len(samples) == 1
    with pytest.raises(DatasetError, match="both"):
        find_samples(label_dir=tmp_path / "L")
    with pytest.raises(DatasetError, match="nope: no such folder"):
        find_samples(label_dir=tmp_path / "L", image_dir=tmp_path / "nope")


def test_unknown_layout_lists_what_it_found(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="Found folders: stuff"):
        find_samples(tmp_path, "train")


def test_unmatched_names_name_the_file(tmp_path):
    _pair(tmp_path / "train_label" / "a.png", tmp_path / "train_img" / "a.png")
    _pair(tmp_path / "train_label" / "b.png", tmp_path / "train_img" / "c.png")
    with pytest.raises(DatasetError, match=r"train_label/b\.png: no matching image"):
        find_samples(tmp_path, "train")


def test_every_unmatched_file_is_named_in_one_error(tmp_path):
    _pair(tmp_path / "train_label" / "a.png", tmp_path / "train_img" / "a.png")
    _pair(tmp_path / "train_label" / "b.png", tmp_path / "train_img" / "c.png")
    _pair(tmp_path / "train_label" / "d.png", tmp_path / "train_img" / "e.png")
    with pytest.raises(DatasetError, match="4 problems in 4 files") as info:
        find_samples(tmp_path, "train")
    for name in ("train_label/b.png", "train_img/c.png", "train_label/d.png", "train_img/e.png"):
        assert name in info.value.message
    problems = []
    _, samples = find_samples(tmp_path, "train", problems=problems)  # collected, not raised
    assert [s.label.name for s in samples] == ["a.png"] and len(problems) == 4


def test_item_types_ranges_and_batching(tmp_path):
    _pair(tmp_path / "train_label" / "a.png", tmp_path / "train_img" / "a.png")
    _pair(tmp_path / "train_label" / "b.png", tmp_path / "train_img" / "b.png")
    ds = PairedDataset(find_samples(tmp_path)[1], CFG)
    labels, inst, img = ds[0]
    assert labels.dtype == torch.int64 and labels.shape == (32, 32) and inst is None
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32)
    assert float(img.min()) >= -1 and float(img.max()) <= 1
    want = read_rgb(tmp_path / "train_img" / "a.png").astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(img.permute(1, 2, 0).numpy(), want, atol=1e-6)
    np.testing.assert_array_equal(labels.numpy(), read_label_map(tmp_path / "train_label" / "a.png"))
    lb, ib, xb = collate([ds[0], ds[1]])
    assert lb.shape == (2, 32, 32) and ib is None and xb.shape == (2, 3, 32, 32)


def test_random_crop_and_flip_are_seeded_and_consistent(tmp_path):
    write_png(tmp_path / "train_label" / "a.png", (np.arange(48 * 40).reshape(40, 48) % 4).astype(np.uint8))
    img = np.zeros((40, 48, 3), np.uint8)
    img[..., 0] = np.arange(48)[None, :]
    img[..., 1] = np.arange(40)[:, None]
    write_png(tmp_path / "train_img" / "a.png", img)
    ds = PairedDataset(find_samples(tmp_path)[1], CFG, augment=True, flip=True)
    crops = [ds[(0, s)] for s in range(12)]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(crops, [ds[(0, s)] for s in range(12)]))  # seeded
    offsets = set()
    for labels, _, im in crops:
        xs = ((im[0] + 1) * 127.5).round().long()
        ys = ((im[1] + 1) * 127.5).round().long()
        y0, row = int(ys[0, 0]), xs[0]
        flipped = bool(row[0] > row[-1])
        x0 = int(row.min())
        offsets.add((y0, x0, flipped))
        # labels moved with the image: label = (y*48 + x) % 4 at the source pixel
        src_x = xs
        np.testing.assert_array_equal(labels.numpy(), ((ys * 48 + src_x) % 4).numpy())
    assert len(offsets) > 3 and any(f for *_, f in offsets) and not all(f for *_, f in offsets)
    centre = ds[0][2]
    assert int(((centre[1, 0, 0] + 1) * 127.5).round()) == 4 and int(((centre[0, 0, 0] + 1) * 127.5).round()) == 8


def test_label_maps_read_alike_in_every_format_train_validate_and_infer_share(tmp_path):
    """One reader for label maps (training data, validate --labels, infer): palette PNGs give their
    indices, 16-bit gray its values, gray RGB its channel; a true colour map is refused by name."""
    from PIL import Image

    ids = RNG.integers(0, 4, (24, 40)).astype(np.uint8)
    pal = Image.fromarray(ids, mode="P")
    pal.putpalette(RNG.integers(0, 256, 768).astype(np.uint8).tolist())  # colours unrelated to the ids
    pal.save(tmp_path / "palette.png")
    Image.fromarray(ids.astype(np.uint16) * 1000).save(tmp_path / "sixteen.png")
    write_png(tmp_path / "grey_rgb.png", np.repeat(ids[..., None], 3, axis=2))
    write_png(tmp_path / "colour.png", RNG.integers(0, 256, (24, 40, 3)).astype(np.uint8))
    np.testing.assert_array_equal(read_label_map(tmp_path / "palette.png"), ids)
    np.testing.assert_array_equal(read_label_map(tmp_path / "sixteen.png"), ids.astype(np.int32) * 1000)
    np.testing.assert_array_equal(read_label_map(tmp_path / "grey_rgb.png"), ids)
    with pytest.raises(InputError, match=r"colour\.png: a colour image"):
        read_label_map(tmp_path / "colour.png")
    _pair(tmp_path / "d" / "train_label" / "a.png", tmp_path / "d" / "train_img" / "a.png")
    square = Image.fromarray(ids[:, :24].repeat(2, axis=0)[:32].repeat(2, axis=1)[:, :32], mode="P")
    square.putpalette(pal.getpalette())
    square.save(tmp_path / "d" / "train_label" / "a.png")
    labels, _, _ = PairedDataset(find_samples(tmp_path / "d")[1], CFG)[0]
    np.testing.assert_array_equal(labels.numpy(), np.array(square))  # the indices, not the colours


def test_bad_files_are_named(tmp_path):
    root = tmp_path
    _pair(root / "train_label" / "ok.png", root / "train_img" / "ok.png")
    (root / "train_label" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _pair(root / "x_label" / "unused.png", root / "x_img" / "unused.png")
    write_png(root / "train_img" / "broken.png", np.zeros((32, 32, 3), np.uint8))
    _pair(root / "train_label" / "size.png", root / "train_img" / "tmp.png")
    write_png(root / "train_img" / "size.png", np.zeros((16, 32, 3), np.uint8))
    (root / "train_img" / "tmp.png").unlink()
    write_png(root / "train_label" / "ids.png", np.full((32, 32), 9, np.uint8))
    write_png(root / "train_img" / "ids.png", np.zeros((32, 32, 3), np.uint8))
    ds = PairedDataset(find_samples(root)[1], CFG)
    names = [s.label.name for s in ds.samples]
    with pytest.raises(DatasetError, match=r"broken\.png: cannot (read|decode) the image"):
        ds[names.index("broken.png")]
    with pytest.raises(DatasetError, match=r"size\.png: label map is 32x32 but its image .*size\.png is 32x16"):
        ds[names.index("size.png")]
    with pytest.raises(DatasetError, match=r"ids\.png: label id\(s\) 9 out of range.*label_nc=4"):
        ds[names.index("ids.png")]
    ds[names.index("ok.png")]
    with pytest.raises(DatasetError, match="broken.png"):
        ds.check()
    with pytest.raises(DatasetError, match="smaller than the training crop"):
        PairedDataset(find_samples(root)[1], CFG.replace(crop_size=64, learned_ds_factor=4))[names.index("ok.png")]


def test_instance_edges_need_instance_maps(tmp_path):
    _pair(tmp_path / "train_label" / "a.png", tmp_path / "train_img" / "a.png")
    with pytest.raises(DatasetError, match="instance"):
        PairedDataset(find_samples(tmp_path)[1], CFG.replace(instance_edges=True))


# ---- the synthetic set --------------------------------------------------------------------------
def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_and_in_facades_layout(tmp_path):
    a = make_dataset(tmp_path / "a", n_train=6, n_val=2, size=32, n_classes=5, seed=3)
    make_dataset(tmp_path / "b", n_train=6, n_val=2, size=32, n_classes=5, seed=3)
    make_dataset(tmp_path / "c", n_train=6, n_val=2, size=32, n_classes=5, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    assert a["suggested_config"] == {"label_nc": 5, "crop_size": 32}
    layout, samples = find_samples(tmp_path / "a", "train")
    assert layout.name == "facades" and len(samples) == 6 and len(find_samples(tmp_path / "a", "val")[1]) == 2
    ds = PairedDataset(samples, ModelConfig(label_nc=5, crop_size=32, learned_ds_factor=2))
    ds.check()
    ids = np.unique(np.concatenate([read_label_map(s.label).ravel() for s in samples]))
    assert len(ids) >= 3 and ids.max() < 5  # several classes appear


def test_synthetic_texture_depends_on_class_and_position(tmp_path):
    size, n_classes, seed = 64, 6, 1
    tex = class_textures(n_classes, size, seed)
    S = size // 16  # noqa: N806
    for c, t in enumerate(tex):
        assert S % t.period == 0 and t.period >= 2  # representable by the positional encoding
        img = render_target(np.full((size, size), c, np.uint8), tex).astype(np.float64)
        # position matters: the image of one class is not constant ...
        assert img.std(axis=(0, 1)).max() > 10
        # ... and it repeats with the class's period, aligned to the S-tiles
        np.testing.assert_array_equal(img[:, :-t.period], img[:, t.period:])
        np.testing.assert_array_equal(img[:-t.period], img[t.period:])
        # direct formula at a few pixels
        for y, x in [(0, 0), (3, 5), (17, 42)]:
            k = 2 * np.pi / t.period
            if t.checker:
                v = 0.5 + 0.5 * np.cos(k * x + t.phase) * np.cos(k * y + t.phase)
            else:
                v = 0.5 + 0.5 * np.cos(k * (t.orientation[0] * x + t.orientation[1] * y) + t.phase)
            want = np.clip(np.rint(np.array(t.color_a) + v * (np.array(t.color_b) - np.array(t.color_a))), 0, 255)
            np.testing.assert_array_equal(img[y, x], want)
    means = np.array([render_target(np.full((size, size), c, np.uint8), tex).reshape(-1, 3).mean(0)
                      for c in range(n_classes)])
    assert np.min(np.linalg.norm(means[:, None] - means[None], axis=-1)[~np.eye(n_classes, dtype=bool)]) > 5
    # the images on disk are exactly the rendering of their label maps
    make_dataset(tmp_path, n_train=2, n_val=1, size=size, n_classes=n_classes, seed=seed)
    lab = read_label_map(tmp_path / "train_label" / "000000.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "train_img" / "000000.png"), render_target(lab, tex))


def test_synthetic_argument_errors(tmp_path):
    with pytest.raises(UsageError, match="multiple of 16"):
        make_dataset(tmp_path, size=40)
    with pytest.raises(UsageError, match="classes"):
        make_dataset(tmp_path, n_classes=1)
