"""The whole training set is checked before step 1 (issue 12): every pair read once, every problem
named in ONE DatasetError (exit 5), no model allocated, nothing written to the run folder; `--resume`
checks again. Before this check a bad pair surfaced only when drawn (step 3-4 of 8), after steps
that were then lost."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from asap_deploy.cli import app
from asap_deploy.config import ModelConfig
from asap_deploy.data import (MAX_SHOWN_PROBLEMS, DataCheckError, PairedDataset, check_datasets, find_samples)
from asap_deploy.errors import DatasetError, UsageError
from asap_deploy.io import write_png
from asap_deploy.train import train_run
from asap_deploy.train.trainer import STATE_FILE, TrainOptions, batch_indices

TINY = ModelConfig(label_nc=3, crop_size=32, learned_ds_factor=2, lr_width=4, lr_max_width=8, lr_depth=1,
                   hr_width=8, hr_depth=3)
N = 8
runner = CliRunner()


def _label(rng, size=(32, 32), n=3) -> np.ndarray:
    return rng.integers(0, n, size).astype(np.uint8)


def _photo(rng, size=(32, 32)) -> np.ndarray:
    return rng.integers(0, 256, (*size, 3)).astype(np.uint8)


def make_set(root: Path, n: int = N, split: str = "train", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_png(root / f"{split}_label" / f"{i:03d}.png", _label(rng))
        write_png(root / f"{split}_img" / f"{i:03d}.png", _photo(rng))
    return root


def lbl(root: Path, i: int, split: str = "train") -> Path:
    return root / f"{split}_label" / f"{i:03d}.png"


def img(root: Path, i: int, split: str = "train") -> Path:
    return root / f"{split}_img" / f"{i:03d}.png"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # header intact, image data cut


def _huge_header_png(path: Path) -> None:
    """A PNG whose (valid, CRC-correct) header declares 9000x9000 pixels (above the 64 Mpx limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (9000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


# Each breakage changes a clean set and returns [(bad file, words its problem must contain)].
def _sizes(root):
    rng = np.random.default_rng(1)
    write_png(img(root, 5), _photo(rng, (40, 48)))
    return [(lbl(root, 5), "label map is 32x32 but its image"), ]


def _missing_partners(root):
    img(root, 2).unlink()  # a label without a photo ...
    write_png(root / "train_img" / "extra.png", _photo(np.random.default_rng(2)))  # ... and a photo without a label
    return [(lbl(root, 2), "no matching image"), (root / "train_img" / "extra.png", "no matching label")]


def _id_over_label_nc(root):
    a = _label(np.random.default_rng(3))
    a[7, 9] = 7
    write_png(lbl(root, 6), a)
    return [(lbl(root, 6), "label id(s) 7 out of range")]


def _dontcare_not_configured(root):
    a = _label(np.random.default_rng(4))
    a[:4, :4] = 255
    write_png(lbl(root, 4), a)
    return [(lbl(root, 4), "don't-care id")]


def _corrupt_png(root):
    _truncate(lbl(root, 3))
    _truncate(img(root, 7))
    return [(lbl(root, 3), "cannot decode"), (img(root, 7), "cannot decode")]


def _header_over_pixel_limit(root):
    _huge_header_png(lbl(root, 1))
    return [(lbl(root, 1), "exceeds the limit")]


def _smaller_than_crop(root):
    rng = np.random.default_rng(5)
    write_png(lbl(root, 0), _label(rng, (16, 24)))
    write_png(img(root, 0), _photo(rng, (16, 24)))
    return [(lbl(root, 0), "smaller than the training crop")]


BREAKAGES = {f.__name__.strip("_"): f for f in (_sizes, _missing_partners, _id_over_label_nc, _dontcare_not_configured,
                                                _corrupt_png, _header_over_pixel_limit, _smaller_than_crop)}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if training allocates a generator (the check must come first)."""
    import asap_deploy.train.trainer as trainer_mod

    def refuse(*a, **k):
        raise AssertionError("a model was allocated before the data check refused the set")

    monkeypatch.setattr(trainer_mod, "ASAPNetGenerator", refuse)


def _opts(**kw) -> TrainOptions:
    base = dict(steps=N, batch_size=1, ndf=8, num_d=1, n_layers_d=2, save_every=1, log_every=1, lambda_l1=1.0)
    base.update(kw)
    return TrainOptions(**base)


def _assert_names(err: DatasetError, expected) -> None:
    for path, words in expected:
        assert str(path) in err.message, (path, err.message)
        assert words in err.message, (words, err.message)
    assert "\n" not in err.message


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_bad_pair_is_refused_before_step_one(tmp_path, breakage, no_model):
    root = make_set(tmp_path / "data")
    expected = BREAKAGES[breakage](root)
    out, steps = tmp_path / "run", []
    with pytest.raises(DatasetError) as info:
        train_run(TINY, _opts(), out, data=root, device="cpu", on_step=lambda *a: steps.append(a),
                  on_start=lambda t: steps.append("start"))
    _assert_names(info.value, expected)
    assert f"{len(expected)} problem" in info.value.message
    assert steps == [] and not out.exists()  # no step ran, nothing written


def test_dontcare_255_is_accepted_when_configured(tmp_path):
    root = make_set(tmp_path / "data")
    a = _label(np.random.default_rng(4))
    a[:4, :4] = 255
    write_png(lbl(root, 4), a)
    PairedDataset(find_samples(root)[1], TINY.replace(contain_dontcare_label=True)).check()
    with pytest.raises(DataCheckError, match="don't-care"):
        PairedDataset(find_samples(root)[1], TINY).check()


def test_instance_map_of_another_size_is_named(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "data"
    for i in range(3):
        write_png(root / "train_label" / f"{i}.png", _label(rng))
        write_png(root / "train_img" / f"{i}.png", _photo(rng))
        write_png(root / "train_inst" / f"{i}.png", rng.integers(0, 5, (32, 32 + 8 * i)).astype(np.uint8))
    ds = PairedDataset(find_samples(root)[1], TINY.replace(instance_edges=True))
    with pytest.raises(DataCheckError) as info:
        ds.check()
    _assert_names(info.value, [(root / "train_inst" / "1.png", "instance map is 40x32"),
                               (root / "train_inst" / "2.png", "instance map is 48x32")])
    assert len(info.value.problems) == 2
    PairedDataset(find_samples(root)[1], TINY).check()  # a model without instance edges never reads them


def test_bad_file_in_val_is_named_with_the_train_problems(tmp_path):
    root = make_set(tmp_path / "data")
    make_set(root, n=3, split="val", seed=9)
    _truncate(lbl(root, 1, "val"))
    a = _label(np.random.default_rng(7))
    a[0, 0] = 3
    write_png(lbl(root, 5), a)
    sets = [PairedDataset(find_samples(root, s)[1], TINY, name=f"the {s} set") for s in ("train", "val")]
    seen = []
    with pytest.raises(DataCheckError) as info:
        check_datasets(sets, progress=lambda done, total: seen.append((done, total)))
    _assert_names(info.value, [(lbl(root, 1, "val"), "cannot decode"), (lbl(root, 5), "label id(s) 3")])
    assert "the train set and the val set: 2 problems in 2 files" in info.value.message
    assert seen[-1] == (N + 3, N + 3) and [d for d, _ in seen] == list(range(1, N + 4))


def test_many_bad_files_are_all_counted(tmp_path, no_model):
    root = make_set(tmp_path / "data", n=30)
    rng = np.random.default_rng(8)
    for i in range(24):
        write_png(lbl(root, i), _label(rng, n=5))  # ids 3 and 4 in every map
    img(root, 29).unlink()
    with pytest.raises(DataCheckError) as info:
        train_run(TINY, _opts(), tmp_path / "run", data=root, device="cpu")
    err = info.value
    assert len(err.problems) == 25
    assert {p.path for p in err.problems} == {lbl(root, i) for i in range(24)} | {lbl(root, 29)}
    assert "25 problems in 25 files (checked 29 pairs)" in err.message
    assert err.message.endswith(f"and {25 - MAX_SHOWN_PROBLEMS} more")
    assert sum(m in err.message for m in (str(lbl(root, i)) for i in range(30))) == MAX_SHOWN_PROBLEMS
    assert not (tmp_path / "run").exists()


def _late(seed: int = 0) -> int:
    """The sample that batch 1 draws at step 4 (0-based 3) of the run: a bad file there used to
    surface after three steps had run and been saved."""
    return batch_indices(3, N, 1, seed)[0][0]


def test_bad_file_drawn_late_stops_the_run_before_it_starts(tmp_path):
    root = make_set(tmp_path / "data")
    late = _late()
    assert late not in {batch_indices(s, N, 1, 0)[0][0] for s in range(3)}
    a = _label(np.random.default_rng(10))
    a[5, 5] = 200
    write_png(lbl(root, late), a)
    steps = []
    with pytest.raises(DataCheckError, match=rf"{lbl(root, late).name}: label id\(s\) 200"):
        train_run(TINY, _opts(), tmp_path / "run", data=root, device="cpu", on_step=lambda *a: steps.append(a))
    assert steps == [] and not (tmp_path / "run").exists()


def test_load_size_smaller_than_crop_is_an_option_error(tmp_path):
    root = make_set(tmp_path / "data")
    with pytest.raises(UsageError, match="--load-size 16 .* smaller than the training crop"):
        PairedDataset(find_samples(root)[1], TINY, load_size=16).check()
    PairedDataset(find_samples(root)[1], TINY.replace(crop_size=64, learned_ds_factor=4), load_size=64).check()


# ---- the command line --------------------------------------------------------------------------------------
def _cli(root: Path, out: Path, tmp_path: Path, *extra: str):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(TINY.to_json())
    return runner.invoke(app, ["train", "--data", str(root), "--out", str(out), "--config", str(cfg),
                               "--batch-size", "1", "--ndf", "8", "--num-d", "1", "--save-every", "1",
                               "--l1-weight", "1", *extra])


def _error_lines(r) -> list[str]:
    return [line for line in r.output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("breakage", ["missing_partners", "corrupt_png", "dontcare_not_configured"])
def test_cli_exit_5_one_line_naming_every_bad_file(tmp_path, breakage):
    root = make_set(tmp_path / "data")
    expected = BREAKAGES[breakage](root)
    r = _cli(root, tmp_path / "run", tmp_path, "--steps", str(N))
    assert r.exit_code == 5, r.output
    lines = _error_lines(r)
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for path, words in expected:
        assert str(path) in lines[0] and words in lines[0], (path, lines[0])
    assert "trained" not in r.output and not (tmp_path / "run").exists()


def test_cli_resume_checks_the_data_again(tmp_path):
    root = make_set(tmp_path / "data")
    run = tmp_path / "run"
    r = _cli(root, run, tmp_path, "--steps", "2")
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert STATE_FILE in before
    late = _late()  # drawn by the resumed run's second step
    _truncate(img(root, late))
    r = runner.invoke(app, ["train", "--out", str(run), "--resume", "--steps", str(N), "--data", str(root),
                            "--save-every", "1"])  # any step that ran would be saved
    assert r.exit_code == 5, r.output
    lines = _error_lines(r)
    assert len(lines) == 1 and str(img(root, late)) in lines[0] and "cannot decode" in lines[0], r.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the run is untouched


def test_cli_shows_a_check_progress_bar_for_large_sets_only(monkeypatch):
    import io

    from rich.console import Console

    import asap_deploy.cli as cli

    monkeypatch.setattr(cli, "CHECK_BAR_MIN", 3)
    shown = []
    for total in (4, 2):
        buf = io.StringIO()
        monkeypatch.setattr(cli, "console", Console(file=buf, force_terminal=True, width=100))
        on_check, stop = cli._data_check_progress()
        for k in range(1, total + 1):
            on_check(k, total)
        stop()
        shown.append(buf.getvalue())
    assert "checking data" in shown[0] and f"{4}/{4}" in shown[0]
    assert shown[1] == ""  # a small set: no bar
