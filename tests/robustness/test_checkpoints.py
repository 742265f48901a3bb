"""Untrusted checkpoints: code-executing pickles, huge declared tensors, truncation, random damage,
wrong keys/shapes, NaN/Inf. tests/test_checkpoints.py covers the library-level basics (pickle
refused, truncated/missing files, readable diff, NaN refused); here: the CLI contract (exit 4, file
named, no traceback) for every command that reads a checkpoint, and the cases it does not try."""

from __future__ import annotations

import io
import os
import pickle
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from asap_deploy.checkpoints import load_generator, read_state
from asap_deploy.errors import CheckpointError

from .conftest import ROOT, run_cli

EXIT = CheckpointError.exit_code


class _Payload:
    """Unpickling this runs `touch MARKER` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp: Path, marker: Path) -> dict[str, Path]:
    out = {}
    # torch's zip format with the payload next to real tensors
    out["zip"] = tmp / "evil_zip.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, out["zip"])
    # the legacy (non-zip) torch format
    out["legacy"] = tmp / "evil_legacy.pt"
    torch.save({"x": _Payload(marker)}, out["legacy"], _use_new_zipfile_serialization=False)
    # a bare pickle (the authors' .pth files are torch zips; this is what a hand-made file looks like)
    out["raw"] = tmp / "evil_raw.pth"
    out["raw"].write_bytes(pickle.dumps({"x": _Payload(marker)}))
    # the payload nested inside our own checkpoint format
    out["nested"] = tmp / "evil_nested.pt"
    torch.save({"format": "asap-deploy/generator", "version": 1, "config": {"label_nc": 5},
                "state_dict": {"a": torch.zeros(1)}, "extra": {"x": _Payload(marker)}}, out["nested"])
    return out


@pytest.mark.parametrize("command", ["inspect", "export", "infer"])
def test_code_executing_pickles_refused_by_every_command_and_never_run(tmp_path, command, good_map):
    marker = tmp_path / "PWNED"
    for kind, f in _evil_files(tmp_path, marker).items():
        args = {"inspect": ["inspect", f], "export": ["export", f, "-o", tmp_path / f"b_{kind}"],
                "infer": ["infer", good_map, "--model", f, "-o", tmp_path / f"o_{kind}"]}[command]
        run_cli(args, EXIT, names=(f.name,), says=("refused to load",))
        assert not marker.exists(), f"the payload of {kind} ran"
        assert not (tmp_path / f"b_{kind}").exists() and not (tmp_path / f"o_{kind}").exists()


def _rewrite_pickle(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(info, data)
    return dst


def _long1(n: int) -> bytes:
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def test_huge_declared_tensor_is_refused_without_allocating(tmp_path):
    """A 16-byte tensor whose pickle declares 10^12 elements (4 TB), in its storage or its shape:
    refused from the declared sizes, in a process whose peak RSS stays small."""
    small = tmp_path / "small.pt"
    torch.save({"w": torch.zeros(4)}, small)
    n = 10 ** 12
    files = [_rewrite_pickle(small, tmp_path / "huge_storage.pt", b"K\x04tq", _long1(n) + b"tq"),
             _rewrite_pickle(small, tmp_path / "huge_shape.pt", b"K\x04\x85q", _long1(n) + b"\x85q")]
    code = ("import sys, resource\n"
            "from asap_deploy.checkpoints import read_state\nfrom asap_deploy.errors import CheckpointError\n"
            "for f in sys.argv[1:]:\n"
            "    try:\n        read_state(f)\n        print('LOADED', f)\n"
            "    except CheckpointError as e:\n        print('REFUSED', e.message)\n"
            "print('RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    res = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:2]] == ["REFUSED", "REFUSED"], res.stdout
    assert "huge_storage.pt" in lines[0] and "huge_shape.pt" in lines[1]
    assert int(lines[-1].split()[1]) < 2048, res.stdout  # torch itself is ~300 MB; 4 TB was never allocated
    run_cli(["inspect", files[0]], EXIT, names=("huge_storage.pt",), says=("truncated or corrupt",))


def test_truncated_at_every_part_of_the_file(tmp_path, checkpoint):
    data = checkpoint.read_bytes()
    cuts = sorted({0, 1, 4, 30, 100, len(data) // 3, len(data) // 2, len(data) - 22, len(data) - 1})
    for cut in cuts:
        f = tmp_path / f"cut{cut}.pt"
        f.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.pt"):
            read_state(f)
    run_cli(["export", tmp_path / f"cut{cuts[-1]}.pt", "-o", tmp_path / "b"], EXIT, names=(f"cut{cuts[-1]}.pt",))
    assert not (tmp_path / "b").exists()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_random_byte_damage_gives_a_typed_error_or_a_clean_load(tmp_path, checkpoint, edits):
    """Any damage: CheckpointError naming the file, or (damage inside tensor bytes) a model that
    loads strictly; never another exception."""
    data = bytearray(checkpoint.read_bytes())
    for where, xor in edits:
        data[int(where * len(data))] ^= xor
    f = tmp_path / "damaged.pt"
    f.write_bytes(bytes(data))
    try:
        load_generator(f)
    except CheckpointError as exc:
        assert "damaged.pt" in exc.message


def test_wrong_keys_and_shapes_through_the_cli(tmp_path, tiny_model):
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    first = next(iter(sd))
    renamed = dict(sd)
    renamed["bogus." + first] = renamed.pop(first)
    torch.save(renamed, tmp_path / "keys.pth")
    reshaped = dict(sd)
    reshaped[first] = torch.zeros(*(s + 1 for s in sd[first].shape))
    torch.save(reshaped, tmp_path / "shapes.pth")
    torch.save({"a": [1, 2]}, tmp_path / "not_tensors.pth")
    torch.save([1, 2, 3], tmp_path / "a_list.pth")
    cfg = ["--config", _cfg_file(tmp_path)]
    run_cli(["inspect", tmp_path / "keys.pth", *cfg], EXIT, names=("keys.pth",), says=("missing key", "unexpected key"))
    run_cli(["inspect", tmp_path / "shapes.pth", *cfg], EXIT, names=("shapes.pth",), says=("shape mismatch at",))
    run_cli(["inspect", tmp_path / "not_tensors.pth"], EXIT, names=("not_tensors.pth",), says=("not tensors",))
    run_cli(["inspect", tmp_path / "a_list.pth"], EXIT, names=("a_list.pth",), says=("found list",))


def _cfg_file(tmp: Path) -> Path:
    from asap_deploy.config import ModelConfig

    from .conftest import CFG

    p = tmp / "cfg.json"
    p.write_text(CFG.to_json())
    assert ModelConfig.from_json(p.read_text()) == CFG  # the CLI reads the model the checkpoints were made for
    return p


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_refused_policy(tmp_path, tiny_model, value):
    """Policy (README, Trust and safety): NaN/Inf anywhere in a floating-point weight is refused, by
    every command, naming the tensor; there is no warn-and-continue mode."""
    from asap_deploy.checkpoints import save_generator

    sd = tiny_model.state_dict()
    key = [k for k, v in sd.items() if v.is_floating_point()][-1]
    before = sd[key].flatten()[0].item()
    with torch.no_grad():
        sd[key].view(-1)[0] = value
    try:
        f = save_generator(tiny_model, tmp_path / "bad.pt")
    finally:
        with torch.no_grad():
            sd[key].view(-1)[0] = before
    for args in (["inspect", f], ["export", f, "-o", tmp_path / "b"]):
        run_cli(args, EXIT, names=("bad.pt", key), says=("NaN or Inf",))
    assert not (tmp_path / "b").exists()
