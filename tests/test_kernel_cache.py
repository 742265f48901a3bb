"""Kernel cache integrity (issue 12): the AOT kernel cache of `asap build-engine` and kernel folders
written by `asap compile-kernels` are untrusted when read back. Every cached binary is hashed in its
index and verified when used; damaged or foreign entries are recompiled (or refused with the
cause); names are confined to the entry. Needs Triton (compiles for sm_80/sm_86 on the CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

pytest.importorskip("triton")

from asap_deploy.config import ModelConfig  # noqa: E402
from asap_deploy.engines import build as eb  # noqa: E402
from asap_deploy.errors import KernelError  # noqa: E402
from asap_deploy.io import MARKER  # noqa: E402
from asap_deploy.plugins import aot, launcher  # noqa: E402
from asap_deploy.plugins.plugin_core import KernelPack  # noqa: E402

CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, instance_edges=True, crop_size=256, learned_ds_factor=8,
                  lr_width=8, lr_max_width=8, lr_depth=1, hr_width=16, hr_depth=3)  # S=16, tiny MLP


@pytest.fixture(autouse=True)
def _no_hang():
    """A test that would block (a FIFO opened for reading) fails instead of hanging the run."""
    def alarm(signum, frame):
        raise TimeoutError("blocked: a kernel file read did not return")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A kernel cache holding sm_86 fp16, sm_86 fp32 and sm_80 fp16 entries (compiled once)."""
    d = tmp_path_factory.mktemp("kcache")
    eb.plugin_kernels(CFG, [86, 80], [("fp16", "fp16")], d)
    eb.plugin_kernels(CFG, [86], [("fp32", "fp32")], d)
    return d


@pytest.fixture
def cache(golden, tmp_path):
    d = tmp_path / "cache"
    shutil.copytree(golden, d, symlinks=True)
    return d


def entry(cache: Path, cc: int = 86, dtype: str = "fp16") -> Path:
    for folder in cache.iterdir():
        e = json.loads((folder / "index.json").read_text())["kernels"][0]
        if e["arch"] == f"sm_{cc}" and e["params_dtype"] == dtype:
            return folder
    raise AssertionError(f"no sm_{cc} {dtype} entry in {cache}")


def files(folder: Path) -> dict[str, Path]:
    e = json.loads((folder / "index.json").read_text())["kernels"][0]
    meta = json.loads((folder / e["json"]).read_text())
    return {"json": folder / e["json"], "cubin": folder / meta["files"]["cubin"], "ptx": folder / meta["files"]["ptx"],
            "index": folder / "index.json"}


def forge_meta(folder: Path, edit) -> None:
    """Edit the metadata JSON and re-hash it in index.json (a consistent forgery: only the content
    checks can catch it, not the hash)."""
    f = files(folder)
    meta = json.loads(f["json"].read_text())
    edit(meta)
    raw = json.dumps(meta).encode()
    f["json"].write_bytes(raw)
    index = json.loads(f["index"].read_text())
    index["kernels"][0]["sha256"]["json"] = hashlib.sha256(raw).hexdigest()
    index["kernels"][0]["sha256"].update(meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {})
    f["index"].write_text(json.dumps(index))


def build(cache: Path, cc: int = 86, dtype: str = "fp16"):
    msgs: list[str] = []
    pack = eb.plugin_kernels(CFG, [cc], [(dtype, dtype)], cache, msgs.append)
    return pack, msgs


def assert_recompiled(cache: Path, cause: str, cc: int = 86, dtype: str = "fp16") -> KernelPack:
    pack, msgs = build(cache, cc, dtype)
    assert len(msgs) == 1 and "compiling" in msgs[0] and cause in msgs[0], msgs
    (k,) = pack.kernels
    assert (k.cc, k.params_dtype) == (cc, dtype) and k.cubin[:4] == b"\x7fELF"
    KernelPack.from_bytes(pack.to_bytes())  # every image matches its recorded sha256
    again, msgs = build(cache, cc, dtype)  # the entry was repaired: used as is now
    assert msgs == [] and again.to_bytes() == pack.to_bytes()
    folder = entry(cache, cc, dtype)
    marker = json.loads((folder / MARKER).read_text())
    assert sorted(p.name for p in folder.iterdir() if p.name != MARKER) == marker["files"]
    return pack


def test_a_sound_entry_is_used_without_compiling(cache):
    pack, msgs = build(cache)
    assert msgs == []
    assert pack.kernels[0].cubin == files(entry(cache))["cubin"].read_bytes()


# ---- damaged binaries: recompiled --------------------------------------------------------------------------
@pytest.mark.parametrize("which,at,cause", [("cubin", 0.5, "sha256"), ("cubin", 0.0, "sha256"), ("ptx", 0.9, "sha256"),
                                            ("json", None, "sha256"), ("index", None, "schema")])
def test_flipped_byte_is_recompiled(cache, which, at, cause):
    """One flipped bit (binaries) or one changed digit (JSON, still parseable): the issue's case."""
    f = files(entry(cache))[which]
    if at is not None:
        data = bytearray(f.read_bytes())
        data[int((len(data) - 1) * at)] ^= 0x01
        f.write_bytes(bytes(data))
    else:
        f.write_text(f.read_text().replace('"schema": 1', '"schema": 3', 1))
    assert_recompiled(cache, cause)


@pytest.mark.parametrize("which,keep", [("cubin", 0), ("cubin", 100), ("ptx", 10), ("json", 20), ("index", 5)])
def test_truncated_file_is_recompiled(cache, which, keep):
    f = files(entry(cache))[which]
    f.write_bytes(f.read_bytes()[:keep])
    assert_recompiled(cache, "")


@pytest.mark.parametrize("which", ["cubin", "ptx", "json", "index"])
def test_missing_file_is_recompiled(cache, which):
    files(entry(cache))[which].unlink()
    assert_recompiled(cache, "cannot read")


def test_fifo_instead_of_a_binary_is_recompiled_without_blocking(cache):
    f = files(entry(cache))["cubin"]
    f.unlink()
    os.mkfifo(f)
    assert_recompiled(cache, "not a regular file")


def test_folder_instead_of_a_binary_is_recompiled(cache):
    f = files(entry(cache))["ptx"]
    f.unlink()
    f.mkdir()
    assert_recompiled(cache, "not a regular file")


# ---- names leaving the entry: refused, recompiled, the outside file never read ----------------------------
@pytest.mark.parametrize("name", ["../outside.cubin", "{abs}", "sub/../../outside.cubin", "..", ".hidden.cubin",
                                  "a\\b.cubin", ""])
def test_metadata_naming_a_file_outside_the_entry(cache, tmp_path, name):
    outside = tmp_path / "outside.cubin"
    evil = b"\x7fELF" + b"not our kernel" * 10
    outside.write_bytes(evil)
    name = name.replace("{abs}", str(outside))

    def edit(meta):
        meta["files"]["cubin"] = name
        meta["sha256"]["cubin"] = hashlib.sha256(evil).hexdigest()

    forge_meta(entry(cache), edit)
    pack = assert_recompiled(cache, "not a plain file name")
    assert pack.kernels[0].cubin != evil
    assert outside.read_bytes() == evil  # untouched


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "x/../index.json"])
def test_index_naming_a_file_outside_the_entry(cache, name):
    f = files(entry(cache))["index"]
    index = json.loads(f.read_text())
    index["kernels"][0]["json"] = name
    f.write_text(json.dumps(index))
    assert_recompiled(cache, "not a plain file name")


def test_symlinked_binary_leaving_the_entry_is_not_followed(cache, tmp_path):
    """The cubin is a link to an outside file whose sha256 the metadata records: refused anyway."""
    outside = tmp_path / "outside.cubin"
    evil = b"\x7fELF" + b"foreign" * 10
    outside.write_bytes(evil)
    folder = entry(cache)
    f = files(folder)["cubin"]
    forge_meta(folder, lambda meta: meta["sha256"].update(cubin=hashlib.sha256(evil).hexdigest()))
    f.unlink()
    f.symlink_to(outside)
    pack = assert_recompiled(cache, "symbolic link")
    assert pack.kernels[0].cubin != evil and outside.read_bytes() == evil and not f.is_symlink()


@pytest.mark.parametrize("which", ["json", "index"])
def test_symlinked_metadata_or_index_is_not_followed(cache, tmp_path, which):
    folder = entry(cache)
    f = files(folder)[which]
    moved = tmp_path / f.name
    shutil.copy(f, moved)
    f.unlink()
    f.symlink_to(moved)
    assert_recompiled(cache, "symbolic link")
    assert moved.is_file()


# ---- metadata of the wrong types: refused, recompiled ------------------------------------------------------
@pytest.mark.parametrize("edit", [
    lambda m: m.update(shared="big"),
    lambda m: m.update(shared=True),
    lambda m: m.update(args={}),
    lambda m: m.update(args=[{"name": "ids_ptr; rm", "type": "*i32", "bytes": 8}]),
    lambda m: m.update(hidden_args=[{"name": "global_scratch", "type": "*i8", "value": 4096}]),
    lambda m: m.update(files=["a.cubin", "a.ptx"]),
    lambda m: m.update(files={"cubin": 7, "ptx": None}),
    lambda m: m.update(sha256="00"),
    lambda m: m.update(block=[99999, 1, 1]),
    lambda m: m.update(cc="86"),
    lambda m: m.update(schema=True),
    lambda m: m.update(variant=None),
    lambda m: m.pop("kernel_name"),
    lambda m: m.update(kernel_name="other_entry"),
    lambda m: m.update(grid_rule={"S": -1, "programs_per_tile": "x"}),
    lambda m: m.update(constexprs={"S": "16"}),
], ids=["shared-str", "shared-bool", "args-dict", "arg-name", "hidden-value", "files-list", "files-types",
        "sha-str", "block", "cc-str", "schema-bool", "variant-null", "no-kernel-name", "kernel-name", "grid-rule",
        "constexpr-str"])
def test_metadata_of_the_wrong_types_is_recompiled(cache, edit):
    forge_meta(entry(cache), edit)
    assert_recompiled(cache, "")


@pytest.mark.parametrize("index", [[], "x", {"schema": 1, "kernels": {}}, {"schema": 1, "kernels": [7]},
                                   {"schema": 1, "triton_version": "3", "kernels": [{"json": 7}]}])
def test_index_of_the_wrong_types_is_recompiled(cache, index):
    files(entry(cache))["index"].write_text(json.dumps(index))
    assert_recompiled(cache, "index")


# ---- an entry compiled for another arch or configuration: recompiled --------------------------------------
def test_entry_of_another_arch_is_recompiled(cache):
    ours, other = entry(cache, 86), entry(cache, 80)
    shutil.rmtree(ours)
    shutil.copytree(other, ours)
    pack = assert_recompiled(cache, "")
    assert pack.kernels[0].cc == 86


def test_entry_of_another_config_is_recompiled(cache):
    """The fp32 entry's files renamed to the fp16 names, consistently re-hashed: check_variant refuses."""
    ours, other = entry(cache, 86, "fp16"), entry(cache, 86, "fp32")
    want = files(ours)
    for p in ours.iterdir():
        if p.name != MARKER:
            p.unlink()
    got = files(other)
    shutil.copy(got["cubin"], want["cubin"])
    shutil.copy(got["ptx"], want["ptx"])
    meta = json.loads(got["json"].read_text())
    meta["files"] = {"cubin": want["cubin"].name, "ptx": want["ptx"].name}
    raw = json.dumps(meta).encode()
    want["json"].write_bytes(raw)
    index = json.loads(got["index"].read_text())
    index["kernels"][0]["json"] = want["json"].name
    index["kernels"][0]["sha256"]["json"] = hashlib.sha256(raw).hexdigest()
    want["index"].write_text(json.dumps(index))
    pack = assert_recompiled(cache, "variant")
    assert pack.kernels[0].params_dtype == "fp16"


# ---- foreign entries: refused with the cause, nothing of theirs touched -----------------------------------
def test_entry_that_is_a_symlink_leaving_the_cache_is_refused(cache, tmp_path):
    folder = entry(cache)
    outside = tmp_path / "elsewhere"
    shutil.copytree(folder, outside)
    shutil.rmtree(folder)
    folder.symlink_to(outside)
    with pytest.raises(KernelError, match=r"not a folder.*remove it") as ei:
        build(cache)
    assert ei.value.exit_code == 10
    assert folder.is_symlink() and sorted(p.name for p in outside.iterdir()) == sorted(
        [*(p.name for p in files(outside).values()), MARKER])


def test_entry_that_is_a_fifo_is_refused(cache):
    folder = entry(cache)
    shutil.rmtree(folder)
    os.mkfifo(folder)
    with pytest.raises(KernelError, match="not a folder"):
        build(cache)


def test_damaged_entry_without_our_marker_is_refused_and_kept(cache):
    folder = entry(cache)
    (folder / MARKER).unlink()
    f = files(folder)["cubin"]
    f.write_bytes(b"someone else's file")
    with pytest.raises(KernelError, match=r"sha256.*not one asap can replace.*did not write"):
        build(cache)
    assert f.read_bytes() == b"someone else's file"


def test_damaged_entry_holding_a_foreign_file_is_refused_and_kept(cache):
    folder = entry(cache)
    (folder / "notes.txt").write_text("mine")
    files(folder)["ptx"].unlink()
    with pytest.raises(KernelError, match="notes.txt"):
        build(cache)
    assert (folder / "notes.txt").read_text() == "mine"


# ---- compile-kernels folders read back by the launcher ------------------------------------------------------
@pytest.fixture(scope="module")
def kfolder(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels") / "k"
    v = aot.Variant(__import__("asap_deploy.plugins.spec", fromlist=["kernel_spec"]).kernel_spec(CFG), "fp16",
                    "fp32")
    aot.compile_kernels([86], d, [v], repack_dtypes=[])
    return d


@pytest.fixture
def kdir(kfolder, tmp_path):
    d = tmp_path / "k"
    shutil.copytree(kfolder, d)
    return d


def _load_all(d: Path):
    index = aot.load_index(d)
    return [aot.load_kernel(d, e) for e in index["kernels"]]


def test_kernel_folder_index_records_every_hash(kdir):
    (e,) = aot.load_index(kdir)["kernels"]
    meta, cubin, ptx = aot.load_kernel(kdir, e)
    assert e["sha256"] == {"json": hashlib.sha256((kdir / e["json"]).read_bytes()).hexdigest(),
                           "cubin": hashlib.sha256(cubin).hexdigest(), "ptx": hashlib.sha256(ptx).hexdigest()}
    marker = json.loads((kdir / MARKER).read_text())
    assert marker["kind"] == "kernels" and sorted(marker["files"]) == sorted(p.name for p in kdir.iterdir()
                                                                             if p.name != MARKER)


@pytest.mark.parametrize("damage", ["flip-cubin", "truncate-ptx", "missing-cubin", "flip-json", "fifo-cubin",
                                    "symlink-index", "index-abs", "index-dotdot"])
def test_damaged_kernel_folder_is_refused(kdir, tmp_path, damage):
    (e,) = json.loads((kdir / "index.json").read_text())["kernels"]
    meta = json.loads((kdir / e["json"]).read_text())
    cubin, ptx, js, index = (kdir / meta["files"]["cubin"], kdir / meta["files"]["ptx"], kdir / e["json"],
                             kdir / "index.json")
    if damage == "flip-cubin":
        b = bytearray(cubin.read_bytes())
        b[100] ^= 0x80
        cubin.write_bytes(bytes(b))
    elif damage == "truncate-ptx":
        ptx.write_bytes(ptx.read_bytes()[:50])
    elif damage == "missing-cubin":
        cubin.unlink()
    elif damage == "flip-json":
        js.write_text(js.read_text().replace('"num_warps": 4', '"num_warps": 8'))
    elif damage == "fifo-cubin":
        cubin.unlink()
        os.mkfifo(cubin)
    elif damage == "symlink-index":
        shutil.copy(index, tmp_path / "i.json")
        index.unlink()
        index.symlink_to(tmp_path / "i.json")
    else:
        doc = json.loads(index.read_text())
        doc["kernels"][0]["json"] = str(js) if damage == "index-abs" else f"../k/{js.name}"
        index.write_text(json.dumps(doc))
    with pytest.raises(KernelError) as ei:
        _load_all(kdir)
    assert ei.value.exit_code == 10 and str(kdir) in ei.value.message


def test_launcher_reads_only_verified_images(kdir):
    (e,) = aot.load_index(kdir)["kernels"]
    path = launcher.find_kernel(kdir, 86, S=16, HID=16, N_HIDDEN=1, params_dtype="fp16", out_dtype="fp32")
    k = launcher.DriverKernel.from_json(path)  # reads only; no GPU needed
    assert k.image[:4] == b"\x7fELF"
    meta = json.loads(path.read_text())
    b = bytearray((kdir / meta["files"]["cubin"]).read_bytes())
    b[-1] ^= 0x01
    (kdir / meta["files"]["cubin"]).write_bytes(bytes(b))
    with pytest.raises(KernelError, match="sha256"):
        launcher.DriverKernel.from_json(path)
    meta["files"]["ptx"] = "/etc/hostname"
    path.write_text(json.dumps(meta))
    with pytest.raises(KernelError, match="not a plain file name"):
        launcher.DriverKernel.from_json(path, prefer="ptx")
