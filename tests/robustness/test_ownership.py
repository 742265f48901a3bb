"""Never lose a user's file (issue 12, class 1): the toolkit deletes or replaces only what it can
prove it wrote, an output never aliases an input (however the path is spelled: symlinks, hard
links, `..`), and every name it derives works for every legal input name (255-byte names).

Each case checks the exit code, a one-line error naming the path, and that every byte of the
user's files is still there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asap_deploy.errors import InputError, OutputError
from asap_deploy.io import MARKER, atomic_path, is_our_png, read_marker, staged_dir, temp_name

from .conftest import ROOT, label_maps, run_cli, save_png

OUT, BAD = OutputError.exit_code, InputError.exit_code


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _maps(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    labels, _ = label_maps(n, 16, 24, seed=seed)
    return [save_png(folder / f"m{i}.png", labels[i]) for i in range(n)]


def _infer(*args):
    return ["infer", *args, "--backend", "onnxruntime"]


# ---- infer: an output never replaces an input -------------------------------------------------------
def test_infer_into_its_own_input_folder_is_refused_even_with_overwrite(tmp_path, bundle_dir):
    _maps(tmp_path / "maps")
    before = _snapshot(tmp_path / "maps")
    for extra in ([], ["--overwrite"]):
        run_cli(_infer(tmp_path / "maps", "--bundle", bundle_dir, "-o", tmp_path / "maps", *extra), OUT,
                names=(str(tmp_path / "maps" / "m0.png"),), says=("would replace the input", "even with --overwrite"))
        assert _snapshot(tmp_path / "maps") == before


@pytest.mark.parametrize("spelling", ["symlinked folder", "dotdot", "hard link", "symlinked file"])
def test_infer_output_aliasing_an_input_by_another_spelling_is_refused(tmp_path, bundle_dir, spelling):
    maps = _maps(tmp_path / "maps")
    out = tmp_path / "out"
    if spelling == "symlinked folder":
        out.symlink_to(tmp_path / "maps", target_is_directory=True)
    elif spelling == "dotdot":
        (tmp_path / "x").mkdir()
        out = tmp_path / "x" / ".." / "maps"
    else:
        out.mkdir()
        (os.link if spelling == "hard link" else os.symlink)(maps[1], out / "m1.png")
    before = _snapshot(tmp_path / "maps")
    run_cli(_infer(tmp_path / "maps", "--bundle", bundle_dir, "-o", out, "--overwrite"), OUT,
            says=("would replace the input",))
    assert _snapshot(tmp_path / "maps") == before


def test_infer_output_folder_of_instance_maps_is_protected(tmp_path, bundle_dir):
    """An output named like a side input (here: a high-resolution map of --hires-labels) is refused."""
    maps = _maps(tmp_path / "maps", 2)
    hi, _ = label_maps(2, 32, 48, seed=3)
    for i in range(2):
        save_png(tmp_path / "hi" / maps[i].name, hi[i])
    before = _snapshot(tmp_path / "hi")
    run_cli(_infer(tmp_path / "maps", "--bundle", bundle_dir, "--scale", "2", "--hires-labels", tmp_path / "hi",
                   "-o", tmp_path / "hi", "--overwrite"), OUT, says=("would replace the input",))
    assert _snapshot(tmp_path / "hi") == before


def test_infer_overwrite_replaces_only_pngs_asap_wrote(tmp_path, bundle_dir):
    _maps(tmp_path / "maps", 3)
    out = tmp_path / "out"
    run_cli(_infer(tmp_path / "maps", "--bundle", bundle_dir, "-o", out), 0)
    assert all(is_our_png(p) for p in out.iterdir())
    rng = np.random.default_rng(5)
    save_png(out / "m0.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))  # the user's own photo, same name
    (out / "elsewhere.png").write_bytes(b"user data")
    (out / "m2.png").unlink()
    (out / "m2.png").symlink_to(out / "elsewhere.png")  # a link to a user's file
    mine = (out / "m0.png").read_bytes()
    r = run_cli(_infer(tmp_path / "maps", "--bundle", bundle_dir, "-o", out, "--overwrite"), BAD,
                names=(str(out / "m0.png"), str(out / "m2.png")), says=("not written by asap",))
    assert "1 image(s) written" in " ".join(r.output.split())  # m1.png, ours, was replaced
    assert (out / "m0.png").read_bytes() == mine and (out / "elsewhere.png").read_bytes() == b"user data"
    assert (out / "m2.png").is_symlink()


# ---- folders: only an earlier folder of ours, holding nothing else, is replaced -----------------------
def test_export_overwrite_never_empties_a_folder_that_merely_holds_a_manifest(tmp_path, checkpoint):
    d = tmp_path / "d"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    (d / "thesis.tex").write_text("keep")
    before = _snapshot(d)
    run_cli(["export", checkpoint, "-o", d, "--overwrite", "--no-fp16"], OUT, names=(str(d),),
            says=("asap did not write",))
    assert _snapshot(d) == before


def test_export_over_an_earlier_bundle_with_a_users_file_inside_is_refused(tmp_path, checkpoint):
    b = tmp_path / "b"
    run_cli(["export", checkpoint, "-o", b, "--no-fp16"], 0)
    assert read_marker(b)["kind"] == "bundle"
    (b / "notes.txt").write_text("keep")
    before = _snapshot(b)
    run_cli(["export", checkpoint, "-o", b, "--overwrite", "--no-fp16"], OUT, names=("notes.txt",),
            says=("asap did not write",))
    assert _snapshot(b) == before
    (b / "notes.txt").unlink()
    run_cli(["export", checkpoint, "-o", b, "--overwrite", "--no-fp16"], 0)  # ours alone: replaced


def test_export_into_the_checkpoints_own_folder_is_refused(tmp_path, checkpoint):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    ck = Path(shutil.copy(checkpoint, run / "model.pt"))
    before = _snapshot(run)
    for target in (run, tmp_path):  # the folder holding it, and a folder above
        run_cli(["export", ck, "-o", target, "--overwrite", "--no-fp16"], OUT, says=("replace the input",))
        assert _snapshot(run) == before


def test_a_folder_of_another_kind_is_not_replaced(tmp_path, checkpoint, bundle_dir):
    """A validation report folder of ours is not a bundle: export --overwrite refuses it."""
    rep = tmp_path / "rep"
    run_cli(["validate", bundle_dir, "--random", "1", "--report", rep], 0)
    assert read_marker(rep)["kind"] == "validation report"
    before = _snapshot(rep)
    run_cli(["export", checkpoint, "-o", rep, "--overwrite", "--no-fp16"], OUT,
            says=("validation report", "not a bundle"))
    assert _snapshot(rep) == before


def test_a_forged_or_damaged_marker_is_no_proof(tmp_path, checkpoint):
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("keep")
    for marker in ('{"tool": "asap-deploy", "schema": 1, "kind": "bundle", "files": ["../keep.txt"]}',
                   '{"tool": "someone", "schema": 1, "kind": "bundle", "files": ["keep.txt"]}',
                   'not json', '{"tool": "asap-deploy", "schema": 1, "kind": "bundle", "files": "keep.txt"}'):
        (d / MARKER).write_text(marker)
        run_cli(["export", checkpoint, "-o", d, "--overwrite", "--no-fp16"], OUT, says=("asap did not write",))
        assert (d / "keep.txt").read_text() == "keep"
    (d / MARKER).unlink()
    (d / MARKER).mkdir()  # not even a file
    run_cli(["export", checkpoint, "-o", d, "--overwrite", "--no-fp16"], OUT, says=("asap did not write",))
    assert (d / "keep.txt").read_text() == "keep"


def test_bench_overwrite_replaces_only_reports_asap_wrote(tmp_path, bundle_dir):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("my own notes")
    args = ["bench", "--bundle", bundle_dir, "--size", "16x16", "--iterations", "1", "--duration", "0.01",
            "-b", "onnxruntime", "-o", out, "--overwrite"]
    run_cli(args, OUT, names=(str(out / "report.md"),), says=("not written by asap",))
    assert (out / "report.md").read_text() == "my own notes"
    (out / "report.md").unlink()
    run_cli(args, 0)
    run_cli(args, 0)  # its own reports: replaced
    assert set(read_marker(out)["files"]) == {"report.json", "report.md", "latency.png"}


# ---- derived names fit for every legal input name ---------------------------------------------------
def test_255_byte_names_work_for_files_and_folders(tmp_path):
    long = "é" * 125 + "a.png"  # 255 bytes in UTF-8
    assert len(long.encode()) == 255
    assert len(temp_name(tmp_path / long, kind=".partial", suffix=".png").name.encode()) <= 255
    with atomic_path(tmp_path / long) as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / long).read_bytes() == b"x"
    folder = "b" * 255
    for _ in range(2):  # a new folder, then replacing it (the old one is moved aside under a derived name)
        with staged_dir(tmp_path / folder, "bundle") as tmp:
            (tmp / "f").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long, folder])


@pytest.mark.parametrize("name", ["m" * 251 + ".png", "n" * 253 + ".p", "é" * 127])
def test_infer_with_a_255_byte_input_name(tmp_path, bundle_dir, name):
    """The output name (stem + .png) and its temp name fit 255 bytes whatever the input's name."""
    labels, _ = label_maps(1, 16, 16, seed=2)
    save_png(tmp_path / "in" / "x.png", labels[0]).rename(tmp_path / "in" / name)
    for extra in ([], ["--overwrite"]):
        run_cli(_infer(tmp_path / "in" / name, "--bundle", bundle_dir, "-o", tmp_path / "out", *extra), 0)
    [out] = list((tmp_path / "out").iterdir())
    assert out.suffix == ".png" and len(out.name.encode()) <= 255 and is_our_png(out)


def test_validate_default_report_name_fits_for_a_255_byte_bundle_name(tmp_path, bundle_dir):
    import shutil

    b = Path(shutil.copytree(bundle_dir, tmp_path / ("b" * 255)))
    run_cli(["validate", b, "--random", "1"], 0)
    [rep] = [p for p in tmp_path.iterdir() if p != b]
    assert rep.name.endswith("-validation") and read_marker(rep)["kind"] == "validation report"


def test_exit_hook_never_prints_a_traceback(tmp_path):
    """A temp name the exit hook cannot even stat (too long, a vanished folder) is skipped quietly."""
    code = ("import pathlib, asap_deploy.io as io\n"
            f"io._live_temps.add(pathlib.Path({str(tmp_path)!r}) / ('x' * 300))\n"
            f"io._live_temps.add(pathlib.Path({str(tmp_path)!r}) / 'gone' / 'y')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_loadtest_json_never_replaces_a_users_file(tmp_path):
    """Checked before connecting (nothing listens on the URL): a user's file is refused, also with
    --overwrite; only a report an earlier loadtest wrote may be replaced."""
    mine = tmp_path / "load.json"
    mine.write_text("my notes")
    url = "http://127.0.0.1:9"
    run_cli(["loadtest", url, "--requests", "1", "--json", mine], OUT, names=(str(mine),), says=("--overwrite",))
    run_cli(["loadtest", url, "--requests", "1", "--json", mine, "--overwrite"], OUT, names=(str(mine),),
            says=("not written by asap",))
    assert mine.read_text() == "my notes"
