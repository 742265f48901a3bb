"""Untrusted checkpoints, bounded before they cost (issue 12): zip entries that decompress far
beyond their compressed size or differ from the storage size the pickle declares, pickles that
allocate from a number in the file, dtypes nobody supports (complex, float8, quantized, ...),
non-finite values in any floating or complex dtype, and stored configs describing absurd models.

Every case: a CheckpointError naming the file (and the tensor or field), exit 4 through the CLI,
and nothing large allocated (peak RSS measured in a fresh process for the allocation cases).
The files are made here from a tiny random model; nothing binary is committed."""

from __future__ import annotations

import io
import json
import pickletools
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from asap_deploy import checkpoints
from asap_deploy.checkpoints import FORMAT, FORMAT_VERSION, load_checkpoint, load_generator, read_state
from asap_deploy.config import ModelConfig
from asap_deploy.errors import CheckpointError, ConfigError

from .conftest import CFG, ROOT, run_cli

EXIT = CheckpointError.exit_code


# ---- building hostile files ------------------------------------------------------------------
def _entries(src: Path) -> list[list]:
    """[name, payload, method, uncompressed size, crc] of every entry of a torch zip, stored."""
    with zipfile.ZipFile(src) as z:
        out = []
        for i in z.infolist():
            data = z.read(i)
            out.append([i.filename, data, zipfile.ZIP_STORED, len(data), zlib.crc32(data)])
    return out


def _write_zip(path: Path, entries) -> Path:
    """A zip written byte by byte, so that sizes, methods and flags can say anything."""
    body, central = bytearray(), bytearray()
    for name, payload, method, usize, crc, *flags in entries:
        nb, fl = name.encode(), (flags[0] if flags else 0)
        off = len(body)
        body += struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, fl, method, 0, 0x21, crc, len(payload), usize,
                            len(nb), 0) + nb + payload
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, fl, method, 0, 0x21, crc, len(payload),
                               usize, len(nb), 0, 0, 0, 0, 0, off) + nb
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(body), 0)
    path.write_bytes(bytes(body + central + eocd))
    return path


def _zeros_deflated(mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of `mib` MiB of zeros (about 1/1000 of that) and its CRC-32."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\0" * (1 << 20)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)  # self-contained: it can be repeated
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(chunk, crc)
    return block * mib + c.flush(), crc


def _long1(n: int) -> bytes:
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def _storage_numels(data: bytes, skip: int = 0) -> dict[str, tuple[int, int]]:
    """key -> (start, end) in `data` of the opcode giving the element count of each storage
    declaration ('storage', type, key, location, numel[, view]) in the pickle that follows `skip`
    other pickles (torch zip: data.pkl, skip 0; legacy format: skip 3)."""
    buf = io.BytesIO(data)
    for _ in range(skip):
        list(pickletools.genops(buf))
    ops = list(pickletools.genops(buf))
    memo = ("BINPUT", "LONG_BINPUT", "MEMOIZE")
    out = {}
    for i, (op, _, _) in enumerate(ops):
        if op.name == "BINPERSID":
            tup = max(j for j in range(i) if ops[j][0].name == "TUPLE")
            mark = max(j for j in range(tup) if ops[j][0].name == "MARK")
            args = [j for j in range(mark + 1, tup) if ops[j][0].name not in memo]
            key, num = ops[args[2]][1], args[4]
            out.setdefault(key, (ops[num][2], ops[num + 1][2]))
    return out


def _with_declared_numel(pkl: bytes, key: str, n: int, skip: int = 0) -> bytes:
    start, end = _storage_numels(pkl, skip)[key]
    return pkl[:start] + _long1(n) + pkl[end:]


def _pickled_in_zip(path: Path, src: Path, pkl: bytes) -> Path:
    """`src` (a torch zip) with its data.pkl replaced by `pkl`."""
    entries = _entries(src)
    for e in entries:
        if e[0].endswith("/data.pkl"):
            e[1], e[3], e[4] = pkl, len(pkl), zlib.crc32(pkl)
    return _write_zip(path, entries)


def _data_pkl(src: Path) -> bytes:
    with zipfile.ZipFile(src) as z:
        return z.read([n for n in z.namelist() if n.endswith("/data.pkl")][0])


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model) -> Path:
    """The tiny model's state dict as the authors save it (torch zip, one storage per tensor)."""
    p = tmp_path_factory.mktemp("plain") / "plain.pth"
    torch.save({k: v.clone() for k, v in tiny_model.state_dict().items()}, p)
    return p


def _biggest_storage(src: Path) -> tuple[str, int]:
    with zipfile.ZipFile(src) as z:
        i = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    return i.filename.rsplit("/", 1)[1], i.file_size


def _bomb_files(tmp: Path, plain: Path, mib: int = 1536) -> dict[str, Path]:
    key, nbytes = _biggest_storage(plain)
    stream, crc = _zeros_deflated(mib)
    out = {}
    # 1. the file: a storage entry deflated to ~1.5 MB that inflates to 1.5 GB; the
    #    pickle declares the storage's real (small) size
    entries = _entries(plain)
    for e in entries:
        if e[0].endswith(f"/data/{key}"):
            e[1:] = [stream, zipfile.ZIP_DEFLATED, mib << 20, crc]
    out["bomb_mismatch"] = _write_zip(tmp / "bomb_mismatch.pth", entries)
    # 2. the same entry, and a pickle that declares the storage as big as the entry (sizes agree)
    pkl = _with_declared_numel(_data_pkl(plain), key, (mib << 20) // 4)
    for e in entries:
        if e[0].endswith("/data.pkl"):
            e[1], e[3], e[4] = pkl, len(pkl), zlib.crc32(pkl)
    out["bomb_declared"] = _write_zip(tmp / "bomb_declared.pth", entries)
    # 3. a pickle (inside a valid torch zip) that builds a 2 GB bytearray: torch's weights_only
    #    loader allows bytearray, and zero-fills it (real memory)
    evil = b"\x80\x02cbuiltins\nbytearray\n" + _long1(2 * 10**9) + b"\x85R."
    out["bytearray"] = _pickled_in_zip(tmp / "bytearray.pth", plain, evil)
    return out


_RSS_PROBE = ("import sys, resource\n"
              "from asap_deploy.checkpoints import read_state\nfrom asap_deploy.errors import CheckpointError\n"
              "for f in sys.argv[1:]:\n"
              "    try:\n        read_state(f)\n        print('LOADED', f)\n"
              "    except CheckpointError as e:\n        print('REFUSED', e.message.splitlines()[0])\n"
              "    except BaseException as e:\n        print('RAISED', type(e).__name__, f)\n"
              "print('RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")


def _probe(files) -> tuple[list[str], int]:
    res = subprocess.run([sys.executable, "-c", _RSS_PROBE, *map(str, files)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    return lines[:-1], int(lines[-1].split()[1])


# ---- zip bombs and declared sizes --------------------------------------------------------------
def test_zip_bombs_refused_before_decompressing_with_bounded_memory(tmp_path, plain):
    """1.5 GB of deflated zeros in a 1.5 MB file, with the pickle's declared size small or equal,
    and a 2 GB bytearray from a 40-byte pickle: refused from the zip directory / the pickle's
    opcodes, in a process whose peak RSS stays near torch's own (~0.3 GB)."""
    files = _bomb_files(tmp_path, plain)
    assert files["bomb_mismatch"].stat().st_size < 2 << 20
    lines, rss_mb = _probe(files.values())
    assert [ln.split()[0] for ln in lines] == ["REFUSED"] * 3, lines
    for ln, name in zip(lines, files):
        assert f"{name}.pth" in ln, ln
    assert "decompress" in lines[0] and "decompress" in lines[1] and "bytearray" in lines[2], lines
    assert rss_mb < 900, (rss_mb, lines)  # the bomb alone would be 1536 MB, the bytearray 1907 MB
    run_cli(["inspect", files["bomb_mismatch"]], EXIT, names=("bomb_mismatch.pth",), says=("zip bomb",))
    run_cli(["export", files["bomb_declared"], "-o", tmp_path / "b"], EXIT, names=("bomb_declared.pth",))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("delta", [4096, -4, 1 << 20])
def test_entry_size_differing_from_the_declared_storage_is_refused(tmp_path, plain, delta):
    """A storage entry holding more or fewer bytes than the pickle declares (stored, and deflated
    within the ratio limit): refused before torch reads it, naming the storage."""
    key, nbytes = _biggest_storage(plain)
    entries = _entries(plain)
    for e in entries:
        if e[0].endswith(f"/data/{key}"):
            data = (e[1] + torch.randn(delta // 4).numpy().tobytes()) if delta > 0 else e[1][:delta]
            if delta == 1 << 20:  # random bytes deflate to about their own size
                c = zlib.compressobj(6, zlib.DEFLATED, -15)
                e[1:] = [c.compress(data) + c.flush(), zipfile.ZIP_DEFLATED, len(data), zlib.crc32(data)]
            else:
                e[1:] = [data, zipfile.ZIP_STORED, len(data), zlib.crc32(data)]
    f = _write_zip(tmp_path / f"size{delta}.pth", entries)
    with pytest.raises(CheckpointError, match=rf"size{delta}.pth.*data/{key} is declared as .* entry holds {nbytes + delta:,}"):
        read_state(f)
    if delta == 4096:
        run_cli(["inspect", f], EXIT, names=(f.name,), says=("truncated or corrupt",))


def test_deflated_entry_that_inflates_beyond_its_stated_size_is_refused(tmp_path, plain):
    """The central directory states the storage's true size, the deflate stream holds 64 MB:
    nothing beyond the stated size is ever inflated."""
    key, nbytes = _biggest_storage(plain)
    stream, crc = _zeros_deflated(64)
    entries = _entries(plain)
    for e in entries:
        if e[0].endswith(f"/data/{key}"):
            e[1:] = [stream, zipfile.ZIP_DEFLATED, nbytes, crc]
    f = _write_zip(tmp_path / "liar.pth", entries)
    with pytest.raises(CheckpointError, match="liar.pth"):
        load_generator(f)


def test_zip_limits_on_entries_total_and_pickle(tmp_path, plain, monkeypatch):
    """The stated limits (entries, total uncompressed, data.pkl) are enforced from the directory."""
    n = len(_entries(plain))
    for name, value, says in [("MAX_ZIP_ENTRIES", n - 1, "entries"), ("MAX_CHECKPOINT_BYTES", 1000, "add up to"),
                              ("MAX_PICKLE_BYTES", 100, "data.pkl is")]:
        with monkeypatch.context() as m:
            m.setattr(checkpoints, name, value)
            with pytest.raises(CheckpointError, match=f"plain.pth: refused to load: .*{says}"):
                read_state(plain)
    read_state(plain)  # and the file itself is fine


def test_unknown_method_duplicate_and_encrypted_entries_refused(tmp_path, plain):
    entries = _entries(plain)
    key, _ = _biggest_storage(plain)
    e = [x for x in entries if x[0].endswith(f"/data/{key}")][0]
    bz = _write_zip(tmp_path / "bzip2.pth", [x if x is not e else [e[0], e[1], 12, e[3], e[4]] for x in entries])
    with pytest.raises(CheckpointError, match="bzip2.pth: refused to load: .*compression method 12"):
        read_state(bz)
    dup = _write_zip(tmp_path / "dup.pth", entries + [e])
    with pytest.raises(CheckpointError, match="dup.pth: refused to load: .*two entries"):
        read_state(dup)
    enc = _write_zip(tmp_path / "enc.pth", [x if x is not e else [*e, 0x1] for x in entries])
    with pytest.raises(CheckpointError, match="enc.pth: refused to load: .*encrypted"):
        read_state(enc)


def test_legacy_format_declaring_more_than_the_file_holds(tmp_path, tiny_model):
    """The pre-1.6 format (no zip): storages are read from the file after the pickle; a pickle
    that declares 10^12 or 10^8 elements for a storage of a few bytes is refused from the pickle."""
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    load_generator(legacy, config=CFG)  # the honest file loads
    data = legacy.read_bytes()
    key = next(iter(_storage_numels(data, skip=3)))
    for n in (10**12, 10**8):
        f = tmp_path / f"legacy_{n}.pth"
        f.write_bytes(_with_declared_numel(data, key, n, skip=3))
        with pytest.raises(CheckpointError, match=f"legacy_{n}.pth: not a readable PyTorch checkpoint"):
            read_state(f)
    run_cli(["inspect", tmp_path / f"legacy_{10**12}.pth"], EXIT, names=(f"legacy_{10**12}.pth",))


def test_expanded_view_over_a_tiny_storage_is_refused(tmp_path):
    """stride 0: 4 stored bytes viewed as 10^8 elements would become 400 MB at the first copy."""
    f = tmp_path / "expanded.pth"
    torch.save({"w": torch.randn(1).expand(10**8)}, f)
    with pytest.raises(CheckpointError, match=r"expanded.pth: refused to load: .*w \(100,000,000 elements over 4"):
        read_state(f)


# ---- what a pickle may build ---------------------------------------------------------------------
@pytest.mark.parametrize("pickle_bytes,says", [
    (b"\x80\x02ctorch\nFloatTensor\n" + _long1(10**9) + b"\x85R.", "tensor constructor"),
    (b"\x80\x02ctorch\nByteTensor\n" + _long1(10**10) + b"\x85R.", "tensor constructor"),
    (b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R.", "bytearray"),
    (b"\x80\x02ctorch._utils\n_rebuild_meta_tensor_no_storage\n)R.", "without data"),
    (b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R.", "not something a weights file needs"),
    (b"\x80\x02cposix\nsystem\n(garbage", "not something a weights file needs"),  # refused before the damage
])
def test_pickles_that_allocate_from_a_number_are_refused_by_name(tmp_path, plain, pickle_bytes, says):
    f = _pickled_in_zip(tmp_path / "alloc.pth", plain, pickle_bytes)
    with pytest.raises(CheckpointError, match=f"alloc.pth: refused to load: .*{says}"):
        read_state(f)


# ---- dtypes ---------------------------------------------------------------------------------------
def _with_tensor(tmp: Path, tiny_model, name: str, make) -> tuple[Path, str]:
    """Our checkpoint format with the last weight replaced by make(weight) (same shape)."""
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    key = list(sd)[-1]
    sd[key] = make(sd[key])
    f = tmp / f"{name}.pt"
    torch.save({"format": FORMAT, "version": FORMAT_VERSION, "config": CFG.to_dict(), "state_dict": sd, "extra": {}}, f)
    return f, key


def _nonfinite_complex(dtype, value, imag: bool):
    def make(w):
        z = torch.complex(w, torch.randn_like(w)).to(dtype)
        (z.imag if imag else z.real).view(-1)[0] = value
        return z
    return make


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("value,imag", [(float("nan"), False), (float("inf"), True), (float("-inf"), False),
                                        (float("nan"), True)])
def test_complex_weights_with_nan_or_inf_are_refused_by_name(tmp_path, tiny_model, dtype, value, imag):
    f, key = _with_tensor(tmp_path, tiny_model, f"cplx_{str(dtype)[6:]}", _nonfinite_complex(dtype, value, imag))
    with pytest.raises(CheckpointError, match=rf"{f.name}: refused to load: .*state_dict.{key} \({dtype}\)"):
        load_generator(f)


def test_complex_weights_through_the_cli_export_nothing(tmp_path, tiny_model):
    f, key = _with_tensor(tmp_path, tiny_model, "cplx", _nonfinite_complex(torch.complex64, float("nan"), True))
    run_cli(["inspect", f], EXIT, names=(f.name, key), says=("torch.complex64",))
    run_cli(["export", f, "-o", tmp_path / "b"], EXIT, names=(f.name, key), says=("torch.complex64",))
    assert not (tmp_path / "b").exists()


FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                                      "float8_e8m0fnu") if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", FLOAT8 + [torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_float8_and_other_unsupported_dtypes_are_refused_by_name(tmp_path, tiny_model, dtype):
    f, key = _with_tensor(tmp_path, tiny_model, f"dt_{str(dtype)[6:]}",
                          lambda w: (w * 3).to(dtype) if dtype.is_floating_point else torch.randint(0, 9, w.shape).to(dtype))
    with pytest.raises(CheckpointError, match=rf"{f.name}: refused to load: .*{key} \({dtype}\)"):
        read_state(f)


def test_float8_through_the_cli(tmp_path, tiny_model):
    f, key = _with_tensor(tmp_path, tiny_model, "f8", lambda w: w.to(torch.float8_e4m3fn))
    run_cli(["inspect", f], EXIT, names=(f.name, key), says=("torch.float8_e4m3fn",))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("qdtype", [torch.qint8, torch.quint8, torch.qint32])
def test_quantized_tensors_are_refused_by_name(tmp_path, tiny_model, qdtype):
    f, _ = _with_tensor(tmp_path, tiny_model, f"q_{str(qdtype)[6:]}",
                        lambda w: torch.quantize_per_tensor(w, 0.01, 0, qdtype))
    with pytest.raises(CheckpointError, match=rf"{f.name}: refused to load: quantized tensors \({qdtype}\)"):
        read_state(f)
    run_cli(["inspect", f], EXIT, names=(f.name,), says=("quantized",))


def test_sparse_tensors_are_refused(tmp_path, tiny_model):
    f, _ = _with_tensor(tmp_path, tiny_model, "sparse", lambda w: w.to_sparse())
    with pytest.raises(CheckpointError, match="sparse.pt: refused to load: .*sparse tensors"):
        read_state(f)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8, torch.int32])
def test_integer_or_bool_where_a_float_weight_is_needed_is_refused(tmp_path, tiny_model, dtype):
    f, key = _with_tensor(tmp_path, tiny_model, f"w_{str(dtype)[6:]}", lambda w: (w > 0).to(dtype))
    read_state(f)  # a readable file (training states carry counters) ...
    with pytest.raises(CheckpointError, match=rf"{f.name}: generator weights must be .*{key} \({dtype}\)"):
        load_generator(f)  # ... but not generator weights


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_supported_float_dtypes_load_as_float32(tmp_path, tiny_model, dtype):
    sd = {k: v.to(dtype) for k, v in tiny_model.state_dict().items()}
    f = tmp_path / f"{str(dtype)[6:]}.pth"
    torch.save(sd, f)
    model, _ = load_generator(f, config=CFG)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].float()), k


@pytest.mark.parametrize("dtype,value", [(torch.float64, 1e300), (torch.float64, float("nan")),
                                         (torch.float16, float("inf")), (torch.bfloat16, float("-inf"))])
def test_non_finite_in_any_float_dtype_or_beyond_float32_range_is_refused(tmp_path, tiny_model, dtype, value):
    sd = {k: v.to(dtype) for k, v in tiny_model.state_dict().items()}
    key = list(sd)[3]
    sd[key].view(-1)[1] = value
    f = tmp_path / "nonfinite.pth"
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=f"nonfinite.pth: NaN or Inf .*{key}"):
        load_generator(f, config=CFG)


def test_nonfinite_helper_covers_every_floating_and_complex_dtype():
    for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
                  *FLOAT8]:
        t = torch.rand(8).add(0.5).to(dtype)
        assert not checkpoints.nonfinite(t), dtype
        bad = torch.full((8,), float("nan")).to(dtype)
        assert checkpoints.nonfinite(bad), dtype
    assert not checkpoints.nonfinite(torch.arange(5))


# ---- absurd configs stored in a checkpoint --------------------------------------------------------
PUBLISHED_WIDTHS = {"lr_width": 64, "lr_max_width": 1024}
ABSURD = [  # (the field the message must name, overrides of the tiny config)
    # within the field ranges, but too large a model
    ("lr_max_width", {"lr_max_width": 65536}), ("lr_width", {"lr_width": 65536}),
    ("lr_depth", {"lr_depth": 256, **PUBLISHED_WIDTHS}), ("hr_width", {"hr_width": 65536}),
    ("label_nc", {"label_nc": 65535}), ("label_nc", {"label_nc": 65535, **PUBLISHED_WIDTHS}),
    ("crop_size", {"crop_size": 65536}), ("hr_depth", {"hr_depth": 256, "hr_width": 4096}),
    ("aspect_ratio", {"aspect_ratio": 1 / 1024}), ("crop_size", {"crop_size": 32768, "learned_ds_factor": 1}),
    # outside them (some would allocate while the config is being read: hr_depth 10^9 as a list)
    ("lr_max_width", {"lr_max_width": 10**9}), ("label_nc", {"label_nc": 10**12}), ("crop_size", {"crop_size": 2**40}),
    ("hr_depth", {"hr_depth": 10**9}), ("lr_depth", {"lr_depth": 10**7}), ("learned_ds_factor", {"learned_ds_factor": 2**60}),
    ("aspect_ratio", {"aspect_ratio": 1e-320}), ("aspect_ratio", {"aspect_ratio": float("nan")}),
    ("aspect_ratio", {"aspect_ratio": float("inf")}),
    # wrong types
    ("label_nc", {"label_nc": 5.5}), ("label_nc", {"label_nc": True}), ("lr_width", {"lr_width": "64"}),
    ("reflection_pad", {"reflection_pad": 1}), ("hr_width", {"hr_width": [64]}),
    ("contain_dontcare_label", {"contain_dontcare_label": "yes"}),
]
ABSURD_IDS = [",".join(f"{k}={str(v)[:10]}" for k, v in o.items()) for _, o in ABSURD]


def _stored_config(tmp: Path, tiny_model, overrides: dict, name: str = "cfg") -> Path:
    f = tmp / f"{name}.pt"
    torch.save({"format": FORMAT, "version": FORMAT_VERSION, "config": {**CFG.to_dict(), **overrides},
                "state_dict": {k: v.clone() for k, v in tiny_model.state_dict().items()}, "extra": {}}, f)
    return f


@pytest.mark.parametrize("field,overrides", ABSURD, ids=ABSURD_IDS)
def test_absurd_stored_config_is_refused_before_any_model_is_built(tmp_path, tiny_model, monkeypatch, field,
                                                                   overrides):
    from asap_deploy import model as model_mod

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(model_mod.LowResStream, "__init__", no_model)
    f = _stored_config(tmp_path, tiny_model, overrides)
    with pytest.raises(CheckpointError, match=rf"cfg.pt: the model config stored in the checkpoint is invalid: .*{field}"):
        load_generator(f)


@pytest.mark.parametrize("field", ["lr_max_width", "crop_size"])
def test_absurd_stored_config_through_the_cli(tmp_path, tiny_model, field):
    f = _stored_config(tmp_path, tiny_model, {field: 65536}, name=field)
    run_cli(["inspect", f], EXIT, names=(f.name,), says=("too large" if field == "lr_max_width" else "activations",))
    run_cli(["export", f, "-o", tmp_path / "b"], EXIT, names=(f.name,))
    assert not (tmp_path / "b").exists()


def test_absurd_config_file_is_a_config_error(tmp_path, checkpoint):
    p = tmp_path / "big.json"
    p.write_text(json.dumps({**CFG.to_dict(), "lr_max_width": 65536, "lr_depth": 64}))
    run_cli(["inspect", checkpoint, "--config", p], ConfigError.exit_code, names=("big.json",), says=("too large",))


def test_absurd_manifest_config_is_refused_before_a_model_is_built(bundle_copy):
    """A manifest within the bundle's field ranges describing a 10^11-parameter model."""
    from asap_deploy.errors import BundleError
    from asap_deploy.export.bundle import load_bundle

    m = bundle_copy / "manifest.json"
    doc = json.loads(m.read_text())
    doc["config"]["lr_max_width"] = 65536
    m.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="manifest.json: invalid model config: the model it describes is too large"):
        load_bundle(bundle_copy)


def test_authors_checkpoint_whose_shapes_describe_too_large_a_model(tmp_path, monkeypatch, plain):
    """The config inferred from shapes goes through the same limits (here lowered to fit a test)."""
    from asap_deploy import config as config_mod

    monkeypatch.setattr(config_mod, "MAX_PARAMETERS", 1000)
    with pytest.raises(CheckpointError, match="plain.pth: invalid model config: the model it describes is too large"):
        load_checkpoint(plain)


def test_hostile_config_values_fail_fast():
    """Sizing is arithmetic on the fields: the absurd configs are refused in well under a second."""
    import time

    t0 = time.perf_counter()
    for _ in range(4):
        for _, overrides in ABSURD:
            with pytest.raises(ConfigError):
                ModelConfig.from_dict({**CFG.to_dict(), **overrides})
    assert time.perf_counter() - t0 < 1.0
