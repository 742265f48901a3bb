"""Checkpoints: ours (config + weights) and the authors' `latest_net_G.pth` (plain state dict).

A checkpoint is untrusted input: it is always read with `torch.load(weights_only=True)`, which
refuses pickles that would run code. Before torch reads any tensor data, `read_state` bounds what
the file can make us allocate (see `prescan`): zip entries (sizes, compression ratio, total), the
pickled structure (only the globals a weights file needs), every storage's declared size against
the bytes that hold it, and every tensor's dtype (supported explicitly or refused by name).
Loading is strict; a mismatch is reported as a readable diff. NaN/Inf weights are refused.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import ModelConfig, infer_config, preset as make_preset
from .errors import CheckpointError, ConfigError, OutputError, require_torch
from .io import atomic_path

FORMAT = "asap-deploy/generator"
FORMAT_VERSION = 1

# ---- what a checkpoint may make us allocate (README, "Trust and safety") --------------------
# A published generator is 333 MB (fp32); a training state with Adam moments about 1 GB.
MAX_CHECKPOINT_BYTES = 8 * 2**30  # all entries of a torch zip together, uncompressed; legacy: the file
MAX_PICKLE_BYTES = 64 * 2**20  # the pickled structure (data.pkl, or the legacy format's header pickles)
MAX_ZIP_ENTRIES = 100_000
MAX_DEFLATE_RATIO = 32  # uncompressed / compressed size of a deflated entry (torch.save stores, never deflates)
RATIO_FREE_BYTES = 2**20  # entries up to this size (uncompressed) may compress better than that

# Every dtype is supported explicitly or refused by name. Any checkpoint (training states too)
# may hold these; generator weights must be one of WEIGHT_DTYPES and are converted to float32.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")
COUNTER_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "bool")
READABLE_DTYPES = WEIGHT_DTYPES + COUNTER_DTYPES

# Globals a weights file needs ("module name", as in the pickle). Storage classes and dtypes are
# checked on their own; anything else is refused by name before torch unpickles the file.
_PLAIN_GLOBALS = frozenset({
    "collections OrderedDict", "collections Counter", "builtins set", "builtins complex", "_codecs encode",
    "torch Size", "torch device", "torch.storage UntypedStorage",
    "torch._utils _rebuild_tensor", "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3",
    "torch._utils _rebuild_parameter", "torch._utils _rebuild_parameter_with_state",
})
# Why the notable others are refused (torch's weights_only loader would accept them).
_REFUSED_GLOBALS = {
    "builtins bytearray": "a bytearray whose size is read from the file",
    "torch._utils _rebuild_qtensor": "quantized tensors",
    **{f"torch {scheme}": "quantized tensors" for scheme in (
        "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
        "per_channel_affine_float_qparams")},
    "torch._utils _rebuild_sparse_tensor": "sparse tensors",
    "torch.serialization _get_layout": "sparse tensors",
    "torch._utils _rebuild_nested_tensor": "nested tensors",
    "torch._utils _rebuild_wrapper_subclass": "tensor subclasses",
    "torch._tensor _rebuild_from_type_v2": "tensor subclasses",
    "torch._utils _rebuild_meta_tensor_no_storage": "tensors without data",
    "torch._utils _rebuild_device_tensor_from_numpy": "numpy-backed tensors",
    "torch._utils _rebuild_device_tensor_from_cpu_tensor": "device tensors",
}
_QUANTIZED = ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")


class _Refused(Exception):
    """Raised inside the pre-scan; read_state turns it into a CheckpointError naming the file."""


@dataclass
class LoadedCheckpoint:
    config: ModelConfig
    state_dict: dict[str, Any]
    kind: str  # "asap-deploy" or "authors"
    config_source: str  # "checkpoint", "inferred", "preset <name>", "given"
    path: Path


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch's load errors advise re-running torch.load with weights_only=False or allow-listing the
# global the file names: both would run code from an untrusted file, so no sentence of that advice
# (nor the pointers to it) is ever passed on; torch's finding itself is.
_TORCH_ADVICE = re.compile(r"weights.only|safe_globals|allowlist|trust|file an issue|documentation of torch\.load|"
                           r"two options|PyTorch 2\.6", re.IGNORECASE)


def torch_message(exc: BaseException, limit: int = 300) -> str:
    """What torch found in a file, from its exception text, without torch's advice to load the
    file unsafely (`weights_only=False`, add_safe_globals); one line of at most `limit` characters."""
    text = _ANSI.sub("", str(exc))
    parts = (p.strip() for p in re.split(r"(?<=[.:])\s+|\n+", text))
    kept = " ".join(p for p in parts if p and not _TORCH_ADVICE.search(p))
    kept = " ".join(kept.split())
    return (kept[:limit - 3] + "..." if len(kept) > limit else kept) or type(exc).__name__


def _refused_unpickling(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused to load: the file is not a plain weights file (it would need to run code "
        f"or is corrupt). Only tensors and plain containers are accepted. Details: {torch_message(exc)}"
    )


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                           f"{type(exc).__name__}: {torch_message(exc)}")


def read_state(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True, after `prescan` bounded what it can allocate; errors name the file."""
    torch = require_torch("reading checkpoints")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    prescan(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused_unpickling(path, exc) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            # damaged bytes reach torch's weights-only unpickler as broken opcodes/arguments:
            LookupError, TypeError, AttributeError, OverflowError, struct.error) as exc:
        raise _corrupt(path, exc) from exc
    check_tensors(obj, path, loaded=True)  # the same rules on what torch built (and no view beyond its storage)
    return obj


# ---- the pre-scan: everything torch.load would allocate, bounded from the file first ----------
def prescan(path: str | os.PathLike) -> None:
    """CheckpointError unless `torch.load(path, weights_only=True)` is bounded by the file.

    torch zip (what torch.save writes): at most MAX_ZIP_ENTRIES entries, stored or deflated, not
    encrypted, not overlapping; each entry's declared (uncompressed) size within MAX_CHECKPOINT_BYTES
    in total and, above RATIO_FREE_BYTES, at most MAX_DEFLATE_RATIO times its compressed size;
    data.pkl at most MAX_PICKLE_BYTES; every storage the pickle declares has an entry of exactly
    its size. Legacy format (torch < 1.6): its header pickles within MAX_PICKLE_BYTES, the storages
    they declare laid out in the rest of the file with matching size headers. Both: the pickle
    uses only the globals a weights file needs (`_PLAIN_GLOBALS`, storage classes, dtypes) and is
    unpickled once with every storage on the meta device (nothing allocated), so that every
    tensor's dtype and layout are checked (`check_tensors`) before torch reads any data.
    """
    torch = require_torch("reading checkpoints")
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation notes from torch's own helpers
            if head == b"PK\x03\x04":  # how torch.load tells a zip checkpoint
                obj = _scan_zip(path, size, torch)
            else:
                obj = _scan_legacy(path, size, torch)
    except _Refused as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        raise _refused_unpickling(path, exc) from exc
    except Exception as exc:  # noqa: BLE001 - damaged bytes fail in many ways; only torch's restricted unpickler ran
        raise _corrupt(path, exc) from exc
    check_tensors(obj, path)


def _scan_globals(pkl: io.BytesIO, torch) -> None:
    """Walk one pickle's opcodes (nothing is executed): only the globals a weights file needs.
    The first refused global stops the walk; a quantized one waits for the dtypes to be named."""
    quantized: list[str] = []  # refused globals that mean "quantized tensors"
    dtypes: set[str] = set()

    def refuse(why: str, name: str) -> _Refused:
        module, _, attr = name.partition(" ")
        return _Refused(f"refused to load: {why}: the pickle uses {module}.{attr}. Only dense tensors of the "
                        f"supported dtypes ({', '.join(READABLE_DTYPES)}) in plain containers are accepted")

    try:
        for op, arg, _ in pickletools.genops(pkl):
            if op.name in ("GLOBAL", "INST"):
                name = str(arg)
                dtype = _global_dtype(name, torch)
                if dtype is not None and _dtype_name(dtype) in _QUANTIZED:
                    dtypes.add(str(dtype))
                why = _refused_global(name, torch)
                if why == "quantized tensors":
                    quantized.append(name)
                elif why is not None:
                    raise refuse(why, name)
            elif op.name in ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4"):
                raise _Refused(f"refused to load: the pickle uses opcode {op.name}, which a weights file "
                               "written by torch.save does not need")
    except ValueError:
        if not quantized:
            raise
    if quantized:
        raise refuse(f"quantized tensors ({', '.join(sorted(dtypes)) or 'unknown dtype'})", quantized[0])


def _global_dtype(name: str, torch):
    """The dtype a storage-class or dtype global stands for (None for other globals)."""
    module, _, attr = name.partition(" ")
    if module != "torch":
        return None
    if attr.endswith("Storage"):
        try:
            return torch.serialization.StorageType(attr).dtype
        except (KeyError, AttributeError, RuntimeError):
            return None
    value = vars(torch).get(attr)  # not getattr: a name from the file must not import a torch submodule
    return value if isinstance(value, torch.dtype) else None


def _refused_global(name: str, torch) -> str | None:
    """Why a global is refused, or None when a weights file may use it. Storage classes and
    dtypes pass (but quantized ones): every tensor's dtype is checked by name once built."""
    if name in _PLAIN_GLOBALS:
        return None
    module, _, attr = name.partition(" ")
    dtype = _global_dtype(name, torch)
    if dtype is not None:
        return "quantized tensors" if _dtype_name(dtype) in _QUANTIZED else None
    if module == "torch" and attr.endswith("Storage"):
        return "an unknown storage class"
    return _REFUSED_GLOBALS.get(name) or (
        "a tensor constructor whose size is read from the file" if module.startswith("torch") and attr.endswith("Tensor")
        else "not something a weights file needs")


class _MetaStorages:
    """persistent_load for the pre-scan: records each declared storage, checks its size with
    `check(key, dtype, numel)` and hands the unpickler an empty meta-device storage."""

    def __init__(self, torch, check):
        self.torch, self.check, self.seen = torch, check, {}

    def typed(self, nbytes: int, dtype):
        t = self.torch
        return t.storage.TypedStorage(wrap_storage=t.UntypedStorage(nbytes, device="meta"), dtype=dtype, _internal=True)

    def __call__(self, pid):
        t = self.torch
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise _Refused(f"refused to load: unexpected persistent id {str(pid)[:80]}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise _Refused(f"refused to load: malformed storage declaration {str(pid)[:80]}")
        dtype = t.uint8 if storage_type is t.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, t.dtype):
            raise _Refused(f"refused to load: storage {key!r} has no dtype ({str(storage_type)[:60]})")
        if key not in self.seen:
            nbytes = numel * t._utils._element_size(dtype)
            self.check(key, dtype, numel, nbytes)
            self.seen[key] = (dtype, numel, self.typed(nbytes, dtype))
        dtype0, numel0, storage = self.seen[key]
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        if (not isinstance(view, tuple) or len(view) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in view[1:])
                or view[1] < 0 or view[2] < 0 or view[1] + view[2] > numel0):
            raise _Refused(f"refused to load: malformed storage view {str(view)[:80]} of storage {key!r}")
        return self.typed(view[2] * t._utils._element_size(dtype0), dtype0)


def _unpickle_meta(pkl: io.BytesIO, torch, storages: _MetaStorages | None) -> Any:
    """One pickle from `pkl`: its globals checked, then built by torch's weights-only unpickler."""
    start = pkl.tell()
    _scan_globals(pkl, torch)
    pkl.seek(start)
    u = torch._weights_only_unpickler.Unpickler(pkl, encoding="utf-8")
    if storages is not None:
        u.persistent_load = storages
    return u.load()


def _scan_zip(path: Path, size: int, torch) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): zip archive: {exc}") from None
    with zf:
        infos = zf.infolist()
        if not infos:
            raise _Refused("not a readable PyTorch checkpoint (truncated or corrupt?): empty zip archive")
        if len(infos) > MAX_ZIP_ENTRIES:
            raise _Refused(f"refused to load: the zip archive has {len(infos):,} entries (limit {MAX_ZIP_ENTRIES:,})")
        entries, total, packed = {}, 0, 0
        for i in infos:
            name = i.filename
            if name in entries:
                raise _Refused(f"refused to load: the zip archive has two entries named {name!r}")
            entries[name] = i
            if i.flag_bits & 0x1:
                raise _Refused(f"refused to load: zip entry {name!r} is encrypted")
            if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _Refused(f"refused to load: zip entry {name!r} uses compression method {i.compress_type} "
                               "(torch reads stored or deflated entries)")
            if i.header_offset < 0 or i.header_offset + i.compress_size > size:
                raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): zip entry {name!r} "
                               f"lies beyond the end of the file ({size:,} bytes)")
            if i.compress_type == zipfile.ZIP_STORED and i.compress_size != i.file_size:
                raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): stored zip entry {name!r} "
                               f"states {i.file_size:,} bytes but holds {i.compress_size:,}")
            total += i.file_size
            packed += i.compress_size
            if i.compress_type == zipfile.ZIP_DEFLATED and i.file_size > RATIO_FREE_BYTES \
                    and i.file_size > MAX_DEFLATE_RATIO * i.compress_size:
                raise _Refused(f"refused to load: zip entry {name!r} would decompress from {i.compress_size:,} to "
                               f"{i.file_size:,} bytes (more than {MAX_DEFLATE_RATIO}x; a zip bomb?)")
        if total > MAX_CHECKPOINT_BYTES:
            raise _Refused(f"refused to load: the zip entries add up to {total:,} bytes uncompressed "
                           f"(limit {MAX_CHECKPOINT_BYTES:,})")
        if packed > size:
            raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): the zip entries' compressed "
                           f"sizes add up to {packed:,} bytes, more than the file ({size:,}): overlapping entries")
        prefix = infos[0].filename.split("/", 1)[0]  # torch's archive name: the first entry's folder
        info = entries.get(f"{prefix}/data.pkl")
        if info is None:
            raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): no {prefix}/data.pkl in the archive")
        if info.file_size > MAX_PICKLE_BYTES:
            raise _Refused(f"refused to load: {prefix}/data.pkl is {info.file_size:,} bytes (limit {MAX_PICKLE_BYTES:,})")
        pkl = io.BytesIO(zf.read(info))
        for i in infos:  # torch inflates into a buffer of the stated size and does not check the rest
            if i.compress_type == zipfile.ZIP_DEFLATED:
                try:
                    with zf.open(i) as fh:
                        while fh.read(1 << 20):
                            pass
                except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
                    raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): zip entry {i.filename!r} "
                                   f"does not inflate to its stated {i.file_size:,} bytes and CRC ({exc})") from None

    def check(key, dtype, numel, nbytes):
        entry = entries.get(f"{prefix}/data/{key}")
        if entry is None:
            raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): the pickle declares "
                           f"storage {key!r} but the archive has no data/{key}")
        if entry.file_size != nbytes:
            raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): storage data/{key} is declared "
                           f"as {numel:,} x {dtype} = {nbytes:,} bytes but its archive entry holds {entry.file_size:,}")

    return _unpickle_meta(pkl, torch, _MetaStorages(torch, check))


def _scan_legacy(path: Path, size: int, torch) -> Any:
    """The legacy format: magic number, protocol, system info, the structure, the storage keys
    (five pickles), then for each key an int64 element count and the data."""
    with open(path, "rb") as f:
        pkl = io.BytesIO(f.read(min(size, MAX_PICKLE_BYTES)))

    def load(storages=None):
        try:
            return _unpickle_meta(pkl, torch, storages)
        except (ValueError, EOFError) as exc:  # ran out of bytes before STOP
            if size > MAX_PICKLE_BYTES and pkl.tell() >= MAX_PICKLE_BYTES - 16:
                raise _Refused(f"refused to load: the pickled structure is larger than {MAX_PICKLE_BYTES:,} bytes") from None
            raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from None

    magic = load()
    if magic != torch.serialization.MAGIC_NUMBER:
        raise _Refused("not a readable PyTorch checkpoint (truncated or corrupt?): neither a torch zip archive "
                       "nor the legacy torch.save format (wrong magic number)")
    if load() != torch.serialization.PROTOCOL_VERSION:
        raise _Refused("not a readable PyTorch checkpoint (truncated or corrupt?): unknown legacy protocol version")
    load()  # system info
    declared: dict[str, tuple[Any, int, int]] = {}
    budget = [size]

    def check(key, dtype, numel, nbytes):
        budget[0] -= 8 + nbytes
        if budget[0] < 0:
            raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): the pickle declares storages "
                           f"of more bytes than the file holds ({size:,}); storage {key!r}: {numel:,} x {dtype}")
        declared[key] = (dtype, numel, nbytes)

    obj = load(_MetaStorages(torch, check))
    keys = load()
    if not isinstance(keys, list) or not all(isinstance(k, str) and k in declared for k in keys) \
            or len(set(keys)) != len(keys):
        raise _Refused("not a readable PyTorch checkpoint (truncated or corrupt?): bad list of storage keys")
    offset = pkl.tell()
    with open(path, "rb") as f:
        for key in keys:
            dtype, numel, nbytes = declared[key]
            f.seek(offset)
            head = f.read(8)
            if len(head) != 8 or struct.unpack("<q", head)[0] != numel or offset + 8 + nbytes > size:
                raise _Refused(f"not a readable PyTorch checkpoint (truncated or corrupt?): storage {key!r} "
                               f"({numel:,} x {dtype}) is not where the file says, or the file ends before it")
            offset += 8 + nbytes
    return obj


def _tensors(obj: Any, torch):
    """(name, tensor) for every tensor reachable from a loaded structure, each container once."""
    seen: set[int] = set()
    todo = [("", obj)]
    while todo:
        name, o = todo.pop()
        if isinstance(o, torch.Tensor):
            yield name or "(the whole file)", o
            extra = getattr(o, "__dict__", None)
            todo.extend((f"{name}.{k}", v) for k, v in (extra or {}).items())
            continue
        if not isinstance(o, (dict, list, tuple, set, frozenset)) or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            todo.extend((f"{name}.{k}" if name else str(k), v) for k, v in o.items())
            todo.extend((f"{name}.(key)", k) for k in o if isinstance(k, torch.Tensor))
            if type(o) is not dict:  # OrderedDict state (a state dict's _metadata)
                todo.extend((f"{name}.{k}", v) for k, v in getattr(o, "__dict__", {}).items())
        else:
            todo.extend((f"{name}[{i}]", v) for i, v in enumerate(o))


def _dtype_name(t) -> str:
    """'float32' for a tensor of dtype torch.float32 (or for the dtype itself)."""
    return str(getattr(t, "dtype", t)).removeprefix("torch.")


def check_tensors(obj: Any, path: str | os.PathLike, loaded: bool = False) -> None:
    """CheckpointError naming the file and the tensor(s) unless every tensor in `obj` is dense,
    of a READABLE_DTYPES dtype and (when `loaded`, i.e. real storages) no larger than its storage
    (an expanded view would turn a few stored bytes into a huge tensor at the first copy)."""
    torch = require_torch("reading checkpoints")
    bad_layout, bad_dtype, bad_view = [], [], []
    for name, t in _tensors(obj, torch):
        if t.layout != torch.strided or t.is_quantized:
            bad_layout.append(f"{name} ({t.layout}, {t.dtype})")
        elif _dtype_name(t) not in READABLE_DTYPES:
            bad_dtype.append(f"{name} ({t.dtype})")
        elif loaded and t.numel() * t.element_size() > t.untyped_storage().nbytes():
            bad_view.append(f"{name} ({t.numel():,} elements over {t.untyped_storage().nbytes():,} stored bytes)")

    def shown(items: list[str]) -> str:
        items = sorted(items)
        return ", ".join(items[:5]) + (f" ... ({len(items) - 5} more)" if len(items) > 5 else "")

    if bad_layout:
        raise CheckpointError(f"{path}: refused to load: only dense tensors are supported; found {shown(bad_layout)}")
    if bad_dtype:
        raise CheckpointError(
            f"{path}: refused to load: tensor(s) of an unsupported dtype: {shown(bad_dtype)}. Supported: "
            f"{', '.join(WEIGHT_DTYPES)} (weights) and {', '.join(COUNTER_DTYPES)} (counters)")
    if bad_view:
        raise CheckpointError(f"{path}: refused to load: tensor(s) viewing more elements than their storage holds "
                              f"(expanded or overlapping views): {shown(bad_view)}")


def _state_dict_of(obj: Any, path: Path) -> tuple[dict[str, Any], ModelConfig | None, str]:
    torch = require_torch("reading checkpoints")
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if obj.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {obj.get('version')!r} is not supported "
                                  f"(this asap-deploy reads version {FORMAT_VERSION})")
        try:
            cfg = ModelConfig.from_dict(obj.get("config", {}))
        except ConfigError as exc:  # a damaged or hand-edited checkpoint: say which file
            raise CheckpointError(f"{path}: the model config stored in the checkpoint is invalid: {exc.message}") from exc
        sd, kind = obj.get("state_dict"), "asap-deploy"
    elif isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        sd, cfg, kind = obj, None, "authors"
    else:
        raise CheckpointError(f"{path}: not a generator checkpoint (expected a state dict or an asap-deploy checkpoint, "
                              f"found {type(obj).__name__})")
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: the state dict holds values that are not tensors")
    bad = sorted(f"{k} ({v.dtype})" for k, v in sd.items() if _dtype_name(v) not in WEIGHT_DTYPES)
    if bad:
        raise CheckpointError(f"{path}: generator weights must be {', '.join(WEIGHT_DTYPES)}; found "
                              + ", ".join(bad[:5]) + (f" ... ({len(bad) - 5} more)" if len(bad) > 5 else ""))
    return dict(sd), cfg, kind


def nonfinite(t) -> bool:
    """Whether tensor `t` holds a NaN or an Inf: every floating and complex dtype (complex: either
    part; dtypes isfinite does not take are widened to float32 first). Integer tensors: False."""
    torch = require_torch("checking weights")
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    if not t.is_floating_point():
        return False
    if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return not bool(torch.isfinite(t).all())


def load_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None,
                    preset: str | None = None) -> LoadedCheckpoint:
    """Read a checkpoint and settle its config: given > preset > stored > inferred from shapes."""
    path = Path(path)
    sd, stored, kind = _state_dict_of(read_state(path), path)
    if config is not None:
        cfg, source = config, "given"
    elif preset is not None:
        cfg, source = make_preset(preset), f"preset {preset}"
    elif stored is not None:
        cfg, source = stored, "checkpoint"
    else:
        try:
            cfg = infer_config({k: tuple(v.shape) for k, v in sd.items()})
        except (CheckpointError, ConfigError) as exc:  # ConfigError: shapes of a model above the limits
            raise CheckpointError(f"{path}: {exc.message}") from exc
        source = "inferred"
    return LoadedCheckpoint(cfg, sd, kind, source, path)


def state_dict_diff(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Readable lines: missing keys, unexpected keys, shape mismatches."""
    lines = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            lines.append(f"{len(keys)} {title} key(s): {shown}")
    for k in shapes[:8]:
        lines.append(f"shape mismatch at {k}: model {tuple(expected[k].shape)}, checkpoint {tuple(found[k].shape)}")
    if len(shapes) > 8:
        lines.append(f"... and {len(shapes) - 8} more shape mismatches")
    return lines


def load_generator(path: str | os.PathLike, config: ModelConfig | None = None, preset: str | None = None):
    """Build the generator for a checkpoint and load its weights strictly. Returns (model, LoadedCheckpoint)."""
    torch = require_torch("loading a generator")
    from .model import ASAPNetGenerator

    ck = load_checkpoint(path, config, preset)
    # Weights become float32 (the model's dtype) first, so that a float64 value beyond float32's
    # range counts as the Inf it would become; refused before the model is allocated.
    ck.state_dict = {k: v.to(torch.float32) for k, v in ck.state_dict.items()}
    bad = [k for k, v in ck.state_dict.items() if nonfinite(v)]
    if bad:
        raise CheckpointError(f"{ck.path}: NaN or Inf values in {len(bad)} tensor(s) (as float32): {', '.join(bad[:5])}")
    try:
        model = ASAPNetGenerator(ck.config)  # sizes the model from its config first (ModelConfig.check_cost)
    except ConfigError as exc:
        if ck.config_source in ("given",) or ck.config_source.startswith("preset"):
            raise
        raise CheckpointError(f"{ck.path}: {exc.message}") from exc
    diff = state_dict_diff(model.state_dict(), ck.state_dict)
    if diff:
        raise CheckpointError(f"{ck.path}: the weights do not match the model config ({ck.config_source}):\n  "
                              + "\n  ".join(diff))
    model.load_state_dict(ck.state_dict, strict=True)
    return model.eval(), ck


def save_generator(model, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write our checkpoint format atomically: {format, version, config, state_dict, extra}."""
    obj = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.cfg.to_dict(),
           "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
           "extra": dict(extra or {})}
    save_atomic(obj, path)
    return Path(path)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file renamed over `path`; a failed write (disk full: torch raises
    RuntimeError, not OSError) is an OutputError naming `path` and leaves no file behind."""
    torch = require_torch("saving checkpoints")
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            raise OutputError(f"{path}: cannot write ({str(exc).strip().splitlines()[-1]}); nothing was written") from exc
    return Path(path)
