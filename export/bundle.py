"""The bundle: ONNX graphs + manifest.json, written atomically and verified on load.

Layout of a bundle folder:
  manifest.json                 schema, config, labels + palette, I/O, S, precision, sha256 per file
  predictor.onnx  pixelwise.onnx  asap.onnx            fp32
  predictor.fp16.onnx  pixelwise.fp16.onnx  asap.fp16.onnx   fp16 (unless --no-fp16)
  predictor.int8.onnx  pixelwise.int8.onnx  asap.int8.onnx   int8 QDQ (added by `asap quantize`,
                                                             described by the manifest's `quantization`)

Export is deterministic: the same checkpoint gives byte-identical files (no timestamps, no
absolute paths, fixed node names), so the hashes identify the model. Loading (`load_bundle`)
refuses unknown schemas, missing files and any file whose sha256 differs from the manifest.

A bundle is a closed world: every byte read comes from a regular file inside the bundle folder
(`read_member`: symlinks leading out, FIFOs, devices and files of another size than listed are
refused before reading), graphs keep no external data (`check_no_external_data`), every manifest
value is checked for type, range and finiteness (`strict_json`, `_check_manifest_shape`), and
engines load the checked bytes (`Bundle.graph_bytes` / `graph_model`), never a path.

A precision's files are added to an existing bundle (`add_precision`, used by `asap quantize`) by
building the whole new bundle next to it (every file copied, hash-checked, plus the new files and
the updated manifest) and swapping the folders: an interrupt at any point leaves the old bundle as
it was. Schema version 1 is unchanged: a manifest without int8 files reads as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from asap_deploy.config import DONTCARE_ID, ModelConfig
from asap_deploy.errors import BundleError, ConfigError, OutputError
from asap_deploy.io import check_replaceable, folder_files, staged_dir
from asap_deploy.plugins import spec as plugin_spec
from asap_deploy.precisions import FILE_PRECISIONS, QUANTIZED

from . import graphs
from .stages import Stage
from asap_deploy.palette import DONTCARE_COLOUR, label_palette

SCHEMA = "asap-deploy/bundle"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MANIFEST = "manifest.json"
BUNDLE_KIND = "bundle"  # the ownership marker kind of a bundle folder (io.staged_dir)
PRECISIONS = FILE_PRECISIONS  # fp32, fp16, int8: the precisions a bundle holds graph files of


def file_name(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


# Limits on what a bundle may make us read: protobuf refuses one serialized model above 2 GiB, so
# no graph we can load is larger; a manifest is a few kB.
MAX_FILE_BYTES = (2 << 30) - 1
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILES = 64
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _open_regular(path: Path, what: str, max_bytes: int | None, error: type, follow: bool = True) -> int:
    """An fd of `path`, refused (`error`) unless it is a regular file (a FIFO, device, socket or
    folder is refused before it is opened: /dev/zero would hash forever, a FIFO would block) of at
    most `max_bytes`. `follow=False`: a symlink in the last component is refused by the open."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: the {what} is not a regular file; refusing to read it")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{path}: the {what} is {st.st_size} bytes, more than the limit of {max_bytes}")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise error(f"{path}: the {what} was replaced while it was opened (not the regular file checked); "
                    "refusing to read it")
    return fd


def sha256_file(path: Path, max_bytes: int | None = None, error: type = BundleError, what: str = "file") -> str:
    """sha256 of a regular file (anything else is refused before reading; at most `max_bytes`)."""
    h = hashlib.sha256()
    fd = _open_regular(Path(path), what, max_bytes, error)
    seen = 0
    try:
        with os.fdopen(fd, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                seen += len(chunk)
                if max_bytes is not None and seen > max_bytes:
                    raise error(f"{path}: the {what} grew past the limit of {max_bytes} bytes while it was read")
                h.update(chunk)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    return h.hexdigest()


def bundle_member(bundle_dir: Path, name: str) -> Path:
    """The real path of the bundle's file `name`, refused (BundleError) unless it is a regular file
    inside the bundle folder: a symlink may lead to another file of the bundle, never out of it;
    FIFOs, devices, sockets and folders are refused before anything is opened."""
    f = Path(bundle_dir) / name
    try:
        st = os.lstat(f)
    except FileNotFoundError:
        raise BundleError(f"{f}: missing from the bundle (the manifest lists it)") from None
    except OSError as exc:
        raise BundleError(f"{f}: cannot read it ({exc.strerror or exc})") from exc
    real = Path(os.path.realpath(f))
    if stat.S_ISLNK(st.st_mode):
        root = os.path.realpath(bundle_dir)
        if os.path.commonpath([root, str(real)]) != root or str(real) == root:
            raise BundleError(f"{f}: a symlink leading out of the bundle folder (to {str(real)[:200]}); "
                              "refusing to read it")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise BundleError(f"{f}: missing from the bundle (a symlink to nothing)") from None
        except OSError as exc:
            raise BundleError(f"{f}: cannot read it ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise BundleError(f"{f}: {kind}, not a regular file; refusing to read it")
    return real


def read_member(bundle_dir: Path, name: str, max_bytes: int, size: int | None = None,
                sha256: str | None = None) -> bytes:
    """The bytes of the bundle's file `name` (see bundle_member), at most `max_bytes`; with `size`
    and `sha256` (the manifest's), refused before reading on another size and after on another hash."""
    f = Path(bundle_dir) / name
    real = bundle_member(bundle_dir, name)
    fd = _open_regular(real, "bundle file", max_bytes, BundleError, follow=False)
    try:
        with os.fdopen(fd, "rb") as fh:
            have = os.fstat(fh.fileno()).st_size
            if size is not None and have != size:
                raise BundleError(f"{f}: {have} bytes, the manifest says {size}: the file was changed after export")
            data = fh.read(max_bytes + 1 if size is None else size + 1)
    except OSError as exc:
        raise BundleError(f"{f}: cannot read it ({exc.strerror or exc})") from exc
    if len(data) > max_bytes or (size is not None and len(data) != size):
        raise BundleError(f"{f}: changed while it was read ({len(data)} bytes); refusing it")
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise BundleError(f"{f}: sha256 {digest[:16]}... does not match the manifest "
                              f"({sha256[:16]}...): the file was changed after export")
    return data


def weights_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over a state dict (keys sorted; name, dtype, shape and bytes of each tensor)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---- fp16 ------------------------------------------------------------------------------------
FP16_OP_BLOCK_LIST = ("InstanceNormalization",)


def to_fp16(model):
    """fp16 weights and activations with onnxconverter-common; InstanceNormalization, the
    converter's default block list (reductions, Resize, ...) and the uint8 conversion stay fp32
    behind Cast nodes; inputs and outputs keep their types. The SpatialMLP function body is
    type-generic (CastLike), so it runs in fp16."""
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        from asap_deploy.errors import MissingDependencyError

        raise MissingDependencyError(
            "fp16 export needs onnxconverter-common: pip install 'asap-deploy[torch]' (or pass --no-fp16)") from exc
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_OP_BLOCK_LIST))
    with warnings.catch_warnings():
        # weights below fp16's smallest subnormal are flushed, one warning each: expected, not news
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                                node_block_list=list(graphs.FP32_NODES_FOR_FP16))


# ---- manifest --------------------------------------------------------------------------------
def _versions(with_torch: bool = True) -> dict[str, str]:
    import onnx

    out = {"onnx": onnx.__version__}
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return out
    for dist in ("asap-deploy", "torch", "onnxconverter-common"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def label_set(cfg: ModelConfig) -> dict[str, Any]:
    pal = label_palette(cfg.n_label_channels)
    return {
        "ids": f"0..{cfg.n_label_channels - 1}",
        "count": cfg.n_label_channels,
        "dontcare_id": DONTCARE_ID if cfg.accepts_dontcare_id else None,
        "dontcare_channel": cfg.n_label_channels - 1 if cfg.accepts_dontcare_id else None,
        "dtype": cfg.label_dtype,
        "instance_map": "int32 (N,H,W) instance ids; edges computed in the graph" if cfg.instance_edges else None,
        "palette": {str(i): c for i, c in enumerate(pal)} | ({str(DONTCARE_ID): DONTCARE_COLOUR}
                                                             if cfg.accepts_dontcare_id else {}),
    }


def build_manifest(cfg: ModelConfig, files: dict[str, dict[str, Any]], source: dict[str, Any],
                   precisions: tuple[str, ...]) -> dict[str, Any]:
    graphs_info = {}
    for g in graphs.GRAPH_NAMES:
        graphs_info[g] = {**graphs.io_spec(cfg, g),
                          "files": {p: file_name(g, p) for p in precisions}}
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "config": cfg.to_dict(),
        "derived": cfg.describe(),
        "S": cfg.S,
        "labels": label_set(cfg),
        "dynamic_shapes": {"N": "batch, any >= 1", "H": f"any positive multiple of S={cfg.S}",
                           "W": f"any positive multiple of S={cfg.S}", "H/S, W/S": "parameter grid size"},
        "graphs": graphs_info,
        "custom_op": {"domain": plugin_spec.DOMAIN, "op_type": plugin_spec.OP_NAME,
                      "attributes": plugin_spec.node_attributes(cfg),
                      "inputs": ["ids int32 (N,H,W) label channel index", "params (N,P,H/S,W/S)"],
                      "outputs": ["rgb float (N,H,W,3) in [-1,1]"],
                      "body": "model-local ONNX function of the same name (standard ops)"},
        "opset": {"ai.onnx": graphs.OPSET, plugin_spec.DOMAIN: 1},
        "ir_version": graphs.IR_VERSION,
        "precisions": list(precisions),
        "files": files,
        "source": source,
        "versions": _versions(),
    }


# ---- export ----------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]


def export_model(model, out_dir: str | os.PathLike, *, source: dict[str, Any] | None = None, fp16: bool = True,
                 overwrite: bool = False, progress: Callable[[str], None] | None = None, inputs=()) -> ExportResult:
    """Write the bundle of an ASAPNetGenerator (CPU, fp32) to `out_dir`, atomically.

    The files go to a hidden temporary folder next to `out_dir`, which is renamed into place only
    when everything is written and checked; on any failure it is removed. An existing `out_dir` is
    replaced only with `overwrite` and only if it is an earlier bundle of ours holding nothing
    else (io.check_replaceable); `inputs` (the checkpoint) are never replaced.
    """
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not overwrite:
        raise OutputError(f"{out_dir}: already exists; pass --overwrite to replace it")
    check_replaceable(out_dir, BUNDLE_KIND, "bundle", inputs)  # only an earlier bundle of ours, never an input
    model = model.cpu().float().eval()
    cfg = model.cfg
    precisions = ("fp32", "fp16") if fp16 else ("fp32",)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    source = dict(source or {})
    source["weights_sha256"] = weights_digest(state)
    with staged_dir(out_dir, "bundle", BUNDLE_KIND, inputs) as tmp:
        files: dict[str, dict[str, Any]] = {}
        for g in graphs.GRAPH_NAMES:
            if progress:
                progress(f"building {g}")
            m32 = graphs.build_graph(model, g)
            variants = [("fp32", m32)]
            if fp16:
                variants.append(("fp16", to_fp16(m32)))
            for prec, m in variants:
                name = file_name(g, prec)
                graphs.check_graph(m, name)
                data = m.SerializeToString()
                (tmp / name).write_bytes(data)
                files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "precision": prec,
                               "graph": g}
                if progress:
                    progress(f"wrote {name} ({len(data) / 2**20:.1f} MiB)")
            del m32, variants
        manifest = build_manifest(cfg, files, source, precisions)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return ExportResult(out_dir, manifest)


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, config: ModelConfig | None = None,
                      preset: str | None = None, fp16: bool = True, overwrite: bool = False,
                      progress: Callable[[str], None] | None = None) -> ExportResult:
    """Load a checkpoint (ours or the authors'; config given, preset, stored or inferred) and export it."""
    from asap_deploy.checkpoints import load_generator

    model, ck = load_generator(checkpoint, config, preset)
    source = {"checkpoint": Path(checkpoint).name, "checkpoint_sha256": sha256_file(Path(checkpoint)),
              "kind": ck.kind, "config_source": ck.config_source}
    return export_model(model, out_dir, source=source, fp16=fp16, overwrite=overwrite, progress=progress,
                        inputs=[checkpoint])


# ---- adding a precision's files to a bundle --------------------------------------------------
def _copy_checked(src: Path, dst: Path, sha256: str | None, size: int | None) -> None:
    """Copy the regular file `src` to `dst` (a new file: never a hard link, so nothing written later
    in either bundle reaches the other), checking the copy's size and sha256 against the manifest's
    when given: a file changed since the bundle was loaded is refused, not carried over."""
    h = hashlib.sha256()
    fd = _open_regular(src, "bundle file", MAX_FILE_BYTES, BundleError, follow=False)
    seen = 0
    with os.fdopen(fd, "rb") as fin, open(dst, "xb") as fout:
        for chunk in iter(lambda: fin.read(1 << 22), b""):
            seen += len(chunk)
            if seen > MAX_FILE_BYTES:
                raise BundleError(f"{src}: grew past {MAX_FILE_BYTES} bytes while it was copied")
            h.update(chunk)
            fout.write(chunk)
    if (size is not None and seen != size) or (sha256 is not None and h.hexdigest() != sha256):
        raise BundleError(f"{src}: changed while the bundle was being updated (its size or sha256 no longer matches "
                          "the manifest); nothing was written")
    shutil.copystat(src, dst)  # times and mode as they were: the copy is the same file to every tool


def add_precision(bundle_dir: str | os.PathLike, precision: str, graph_files: Mapping[str, bytes],
                  description: Mapping[str, Any], *, overwrite: bool = False, inputs=(),
                  progress: Callable[[str], None] | None = None) -> Bundle:
    """Add `precision`'s graph files ({graph name: serialized ONNX} for every graph) to the bundle in
    `bundle_dir`, atomically; returns the updated bundle, loaded and verified.

    The bundle must load (every hash checked) and be ours in full (io.check_replaceable: its marker
    lists every file in the folder). The new bundle is built in a hidden folder next to it: every
    file of the old one copied (bytes checked against the manifest as they are copied; engines and
    other files asap wrote there too), the new graph files, and the manifest with their sha256,
    sizes and `description` (the `quantization` object for int8); then the folders are swapped
    (io.staged_dir). A failure or Ctrl-C at any point leaves the old bundle byte-identical and no
    temporary folder. A bundle that already holds `precision` is refused unless `overwrite` (its
    files of that precision are then replaced; every other file is kept byte-identical)."""
    import copy

    bundle_dir = Path(bundle_dir)
    if precision not in PRECISIONS or precision == "fp32":
        raise BundleError(f"cannot add {precision!r} graphs to a bundle (choose from: "
                          f"{', '.join(p for p in PRECISIONS if p != 'fp32')})")
    if set(graph_files) != set(graphs.GRAPH_NAMES):
        raise BundleError(f"{precision} graphs must be given for {', '.join(graphs.GRAPH_NAMES)} "
                          f"(got {', '.join(sorted(graph_files)) or 'none'})")
    bundle = load_bundle(bundle_dir)
    if precision in bundle.precisions and not overwrite:
        raise OutputError(f"{bundle_dir}: already holds {precision} graphs; pass --overwrite to replace them")
    check_replaceable(bundle_dir, BUNDLE_KIND, "bundle", inputs)  # ours, every file listed; no input inside
    new_names = {g: file_name(g, precision) for g in graphs.GRAPH_NAMES}
    entries: dict[str, dict[str, Any]] = {}
    for g, name in new_names.items():  # the new graphs pass the checks load_bundle applies
        data = graph_files[g]
        if len(data) > MAX_FILE_BYTES:
            raise BundleError(f"{name}: {len(data)} bytes, more than a graph may hold ({MAX_FILE_BYTES})")
        model = parse_graph(data, bundle_dir / name)
        check_no_external_data(model, bundle_dir / name)
        if g != Stage.PREDICTOR.graph:
            check_graph_matches_config(bundle_dir / name, bundle.config, model)
        del model
        entries[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "precision": precision,
                         "graph": g}
    manifest = copy.deepcopy(bundle.manifest)
    manifest["precisions"] = [p for p in PRECISIONS if p in set(manifest["precisions"]) | {precision}]
    manifest["files"] = {**{k: v for k, v in manifest["files"].items() if k not in entries}, **entries}
    for g, name in new_names.items():
        manifest["graphs"][g].setdefault("files", {})[precision] = name
    if precision == QUANTIZED:
        manifest["quantization"] = copy.deepcopy(dict(description))
    elif description:
        manifest[precision] = copy.deepcopy(dict(description))
    _check_manifest_shape(manifest, bundle_dir / MANIFEST)  # what we write must load
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{bundle_dir / MANIFEST}: the updated manifest would pass {MAX_MANIFEST_BYTES} bytes")
    try:
        present = folder_files(bundle_dir)
    except OSError as exc:
        raise OutputError(f"{bundle_dir}: cannot read the bundle folder ({exc.strerror or exc})") from exc
    listed = bundle.manifest["files"]
    with staged_dir(bundle_dir, "bundle", BUNDLE_KIND, inputs) as tmp:
        for rel in sorted(present):
            if rel == MANIFEST or rel in entries:
                continue
            src, dst = bundle_dir / rel, tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if os.path.islink(src):  # a link asap listed (export writes none): kept as the same link
                os.symlink(os.readlink(src), dst)
                continue
            if progress:
                progress(f"copying {rel}")
            entry = listed.get(rel)
            _copy_checked(src, dst, entry["sha256"] if entry else None, entry["bytes"] if entry else None)
        for g, name in new_names.items():
            if progress:
                progress(f"writing {name}")
            (tmp / name).write_bytes(graph_files[g])
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
    return load_bundle(bundle_dir)


# ---- loading and verification -----------------------------------------------------------------
@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    # file name -> sha256 of the graph files whose content load_bundle parsed and checked (no
    # external data): bytes read later with the same hash need not be parsed again
    checked: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    def graph_bytes(self, graph: str, precision: str = "fp32") -> bytes:
        """The bytes of a graph file, read only from a regular file inside the bundle, checked
        against the manifest's size and sha256 and refused if it keeps data in external files.
        Engines load these bytes (never the path: the file cannot be swapped after the check, and
        nothing it names is followed)."""
        return self._read_graph(graph, precision, parse=False)[0]

    def graph_model(self, graph: str, precision: str = "fp32"):
        """The parsed ModelProto of a graph file (read and checked as by `graph_bytes`)."""
        return self._read_graph(graph, precision, parse=True)[1]

    def _read_graph(self, graph: str, precision: str, parse: bool):
        self.file(graph, precision)
        name = file_name(graph, precision)
        entry = self.manifest["files"].get(name)
        if not isinstance(entry, dict):
            raise BundleError(f"{self.path / MANIFEST}: the manifest does not list {name}")
        data = read_member(self.path, name, MAX_FILE_BYTES, entry.get("bytes"), entry.get("sha256"))
        model = None
        if parse or self.checked.get(name) != entry.get("sha256"):
            model = parse_graph(data, self.path / name)
            check_no_external_data(model, self.path / name)
            self.checked[name] = entry["sha256"]
        return data, model

    def file(self, graph: str, precision: str = "fp32") -> Path:
        if graph not in graphs.GRAPH_NAMES:
            raise BundleError(f"unknown graph {graph!r}; a bundle holds {', '.join(graphs.GRAPH_NAMES)}")
        if precision not in self.precisions:
            raise BundleError(f"{self.path}: no {precision} graphs in this bundle (it holds {', '.join(self.precisions)})"
                              + ("; re-export without --no-fp16" if precision == "fp16" else ""))
        return self.path / file_name(graph, precision)


def _check_manifest_shape(manifest: dict, mpath: Path) -> None:
    """BundleError unless `files` maps plain file names (inside the bundle folder: no folders, no
    '..', no absolute paths) to entries with a sha256, and `precisions` lists known precisions. A
    manifest is untrusted: a name like '../../dev/zero' must not make us read outside the bundle."""
    files, precisions = manifest["files"], manifest["precisions"]
    if not isinstance(files, dict):
        raise BundleError(f"{mpath}: 'files' must map file names to their sha256, got {type(files).__name__}")
    for name, entry in files.items():
        if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
                or "\0" in name or Path(name).name != name):
            raise BundleError(f"{mpath}: the manifest lists {name!r}, which is not a plain file name inside the "
                              "bundle folder; refusing to read it")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{mpath}: the manifest entry of {name} has no sha256")
        if not _SHA256.fullmatch(entry["sha256"]):
            raise BundleError(f"{mpath}: the sha256 of {name} is not 64 lowercase hex digits: "
                              f"{entry['sha256'][:70]!r}")
        size = entry.get("bytes")
        if not _is_int(size) or not 0 <= size <= MAX_FILE_BYTES:
            raise BundleError(f"{mpath}: the size ('bytes') of {name} must be a whole number 0..{MAX_FILE_BYTES}, "
                              f"got {str(size)[:40]!r}")
        for key in ("precision", "graph"):
            if key in entry and not isinstance(entry[key], str):
                raise BundleError(f"{mpath}: the {key!r} of {name} must be a string, got {str(entry[key])[:40]!r}")
    if len(files) > MAX_FILES:
        raise BundleError(f"{mpath}: the manifest lists {len(files)} files, more than a bundle holds ({MAX_FILES})")
    if (not isinstance(precisions, list) or not precisions or any(p not in PRECISIONS for p in precisions)
            or len(set(map(str, precisions))) != len(precisions)):
        raise BundleError(f"{mpath}: 'precisions' must be a non-empty list of {', '.join(PRECISIONS)} "
                          f"(each once), got {str(precisions)[:80]!r}")
    _check_manifest_values(manifest, mpath)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int in Python


# Bounds on the manifest's model config: generous for real models, small enough that nothing
# computed from the config before the graphs are checked against it (channel lists, palettes) is big.
_CONFIG_INTS = {"label_nc": (1, 65535), "crop_size": (1, 1 << 16), "learned_ds_factor": (1, 1 << 16),
                "lr_width": (1, 1 << 16), "lr_max_width": (1, 1 << 16), "lr_depth": (0, 256),
                "hr_width": (1, 1 << 16), "hr_depth": (2, 256), "output_nc": (1, 64)}
_CONFIG_BOOLS = ("instance_edges", "reflection_pad")
_MAX_ASPECT = 1024.0  # and at least 1/_MAX_ASPECT: 5e-324 would make S = crop_size // (16 * ar) infinite


def _check_config_values(config, mpath: Path) -> None:
    """BundleError unless every value of the manifest's config has its type (an integer is not a
    boolean or a float, a boolean not 0/1) and lies in a sane range (finite, bounded)."""
    if not isinstance(config, dict):
        raise BundleError(f"{mpath}: 'config' must be a JSON object, got {type(config).__name__}")
    for key, value in config.items():
        shown = str(value)[:40]
        if key in _CONFIG_INTS:
            lo, hi = _CONFIG_INTS[key]
            if not _is_int(value) or not lo <= value <= hi:
                raise BundleError(f"{mpath}: config.{key} must be a whole number {lo}..{hi}, got {shown!r}")
        elif key in _CONFIG_BOOLS:
            if not isinstance(value, bool):
                raise BundleError(f"{mpath}: config.{key} must be true or false, got {shown!r}")
        elif key == "contain_dontcare_label":
            if value is not None and not isinstance(value, bool):
                raise BundleError(f"{mpath}: config.{key} must be true, false or null, got {shown!r}")
        elif key == "aspect_ratio":
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or not 1 / _MAX_ASPECT <= value <= _MAX_ASPECT):
                raise BundleError(f"{mpath}: config.{key} must be a finite number in [1/{_MAX_ASPECT:g}, "
                                  f"{_MAX_ASPECT:g}], got {shown!r}")


def _check_manifest_values(manifest: dict, mpath: Path) -> None:
    """BundleError unless the manifest's other values have the types and ranges export writes
    (strict_json already refused NaN/Infinity anywhere in it)."""
    _check_config_values(manifest["config"], mpath)
    g = manifest["graphs"]
    if not isinstance(g, dict) or any(not isinstance(v, dict) for v in g.values()):
        raise BundleError(f"{mpath}: 'graphs' must map graph names to their inputs and outputs")
    for key in ("source", "labels", "custom_op", "opset", "versions", "derived", "dynamic_shapes"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise BundleError(f"{mpath}: {key!r} must be a JSON object, got {type(manifest[key]).__name__}")
    for key in ("S", "ir_version"):
        if key in manifest and (not _is_int(manifest[key]) or not 0 < manifest[key] <= 1 << 16):
            raise BundleError(f"{mpath}: {key!r} must be a whole number 1..{1 << 16}, got {str(manifest[key])[:40]!r}")
    source = manifest.get("source", {})
    for key in ("weights_sha256", "checkpoint_sha256"):
        if key in source and not (isinstance(source[key], str) and _SHA256.fullmatch(source[key])):
            raise BundleError(f"{mpath}: source.{key} is not 64 lowercase hex digits: {str(source[key])[:70]!r}")
    palette = manifest.get("labels", {}).get("palette")
    if palette is not None:
        from asap_deploy.errors import UsageError
        from asap_deploy.palette import from_json_obj

        try:
            from_json_obj(palette, "labels.palette") if palette else None
        except UsageError as exc:
            raise BundleError(f"{mpath}: {exc.message}") from exc
    if QUANTIZED in manifest["precisions"] or "quantization" in manifest:
        if QUANTIZED not in manifest["precisions"]:
            raise BundleError(f"{mpath}: 'quantization' describes {QUANTIZED} graphs the manifest does not list")
        check_quantization(manifest.get("quantization"), mpath)


# ---- the manifest's `quantization` object (written by `asap quantize`) ---------------------------
# Bounds: a manifest is untrusted input; nothing read from it may be large or deep.
MAX_QUANT_ITEMS = 4096  # entries of one list (nodes, maps, sensitivity rows)
MAX_QUANT_TEXT = 1024  # characters of one string
MAX_QUANT_DEPTH = 6
MAX_QUANT_VALUES = 100_000  # values in the whole object
_NODE_KEYS = ("graph", "name", "op_type")


def _bounded_json(value, where: str, mpath: Path, depth: int = 0, count: list | None = None) -> None:
    """BundleError unless `value` is plain JSON within the bounds above (strict_json has already
    refused NaN, Infinity and duplicate keys)."""
    count = count if count is not None else [0]
    count[0] += 1
    if count[0] > MAX_QUANT_VALUES:
        raise BundleError(f"{mpath}: {where.split('.')[0]} holds more than {MAX_QUANT_VALUES} values")
    if depth > MAX_QUANT_DEPTH:
        raise BundleError(f"{mpath}: {where} is nested deeper than {MAX_QUANT_DEPTH} levels")
    if isinstance(value, str):
        if len(value) > MAX_QUANT_TEXT:
            raise BundleError(f"{mpath}: {where} is a string of {len(value)} characters (at most {MAX_QUANT_TEXT})")
    elif isinstance(value, dict):
        if len(value) > MAX_QUANT_ITEMS:
            raise BundleError(f"{mpath}: {where} has {len(value)} keys (at most {MAX_QUANT_ITEMS})")
        for k, v in value.items():
            if len(k) > MAX_QUANT_TEXT:
                raise BundleError(f"{mpath}: {where} has a key of {len(k)} characters")
            _bounded_json(v, f"{where}.{k}", mpath, depth + 1, count)
    elif isinstance(value, list):
        if len(value) > MAX_QUANT_ITEMS:
            raise BundleError(f"{mpath}: {where} lists {len(value)} entries (at most {MAX_QUANT_ITEMS})")
        for i, v in enumerate(value):
            _bounded_json(v, f"{where}[{i}]", mpath, depth + 1, count)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise BundleError(f"{mpath}: {where} is not a JSON value")


def check_quantization(q, mpath: Path) -> None:
    """BundleError unless `q` is the `quantization` object `asap quantize` writes: method and tool
    (name, version) as strings, the sample count, each calibration (and evaluation) map's name,
    sha256 and size, the int8 and float nodes ({graph, name, op_type}), the fidelity gate's result
    (`passed` a boolean); every other value plain, bounded JSON."""
    if not isinstance(q, dict):
        raise BundleError(f"{mpath}: the manifest lists {QUANTIZED} graphs but no 'quantization' object describing "
                          "how they were made (write them with `asap quantize`)")
    _bounded_json(q, "quantization", mpath)
    for key in ("method", "tool", "samples", "calibration_maps", "int8_nodes", "float_nodes", "fidelity"):
        if key not in q:
            raise BundleError(f"{mpath}: quantization lacks the field {key!r}")
    if not isinstance(q["method"], str) or not q["method"]:
        raise BundleError(f"{mpath}: quantization.method must be a non-empty string, got {str(q['method'])[:40]!r}")
    tool = q["tool"]
    if not isinstance(tool, dict) or not all(isinstance(tool.get(k), str) and tool.get(k) for k in ("name", "version")):
        raise BundleError(f"{mpath}: quantization.tool must name the tool and its version (strings), "
                          f"got {str(tool)[:80]!r}")
    if not _is_int(q["samples"]) or not 1 <= q["samples"] <= MAX_QUANT_ITEMS:
        raise BundleError(f"{mpath}: quantization.samples must be a whole number 1..{MAX_QUANT_ITEMS}, "
                          f"got {str(q['samples'])[:40]!r}")
    for key in ("calibration_maps", "evaluation_maps"):
        maps = q.get(key, [])
        if not isinstance(maps, list) or (key == "calibration_maps" and len(maps) != q["samples"]):
            raise BundleError(f"{mpath}: quantization.{key} must list "
                              + (f"the {q['samples']} calibration maps" if key == "calibration_maps" else "maps"))
        for i, m in enumerate(maps):
            size = m.get("size") if isinstance(m, dict) else None
            if (not isinstance(m, dict) or not isinstance(m.get("name"), str)
                    or not (isinstance(m.get("sha256"), str) and _SHA256.fullmatch(m["sha256"]))
                    or not (isinstance(size, list) and len(size) == 2
                            and all(_is_int(v) and 0 < v <= 1 << 20 for v in size))):
                raise BundleError(f"{mpath}: quantization.{key}[{i}] must hold a name, a sha256 (64 lowercase hex "
                                  f"digits) and a size [H, W], got {str(m)[:120]!r}")
    for key in ("int8_nodes", "float_nodes"):
        nodes = q[key]
        if not isinstance(nodes, list) or not all(
                isinstance(n, dict) and all(isinstance(n.get(k), str) for k in _NODE_KEYS) for n in nodes):
            raise BundleError(f"{mpath}: quantization.{key} must list nodes as {{graph, name, op_type}} strings")
    if not isinstance(q["fidelity"], dict) or not isinstance(q["fidelity"].get("passed"), bool):
        raise BundleError(f"{mpath}: quantization.fidelity must be an object with 'passed' true or false")


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and check every file against its sha256 (BundleError naming the file)."""
    from asap_deploy.palette import strict_json

    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    if not os.path.lexists(mpath):
        raise BundleError(f"{mpath}: missing: {path} is not an asap-deploy bundle (export one with `asap export`)")
    data = read_member(path, MANIFEST, MAX_MANIFEST_BYTES)  # a regular file inside the bundle, bounded
    manifest = strict_json(data, f"{mpath}: not valid JSON", BundleError)  # NaN, Infinity, duplicate keys refused
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{mpath}: unknown manifest schema {found!r} (expected {SCHEMA!r})")
    version = manifest.get("schema_version")
    if not _is_int(version) or version not in SUPPORTED_SCHEMA_VERSIONS:  # true and 1.0 are not 1
        raise BundleError(f"{mpath}: manifest schema version {version!r} is not supported by this asap-deploy "
                          f"(it reads version(s) {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); "
                          "re-export the bundle or upgrade asap-deploy")
    for key in ("config", "files", "precisions", "graphs", "source"):
        if key not in manifest:
            raise BundleError(f"{mpath}: manifest lacks the field {key!r}")
    _check_manifest_shape(manifest, mpath)
    try:
        cfg = ModelConfig.from_dict(manifest["config"])
    except ConfigError as exc:
        raise BundleError(f"{mpath}: {exc.message}") from exc
    files = manifest["files"]
    for prec in manifest["precisions"]:
        for g in graphs.GRAPH_NAMES:
            if file_name(g, prec) not in files:
                raise BundleError(f"{mpath}: the manifest does not list {file_name(g, prec)}")
    checked: dict[str, str] = {}
    if verify:
        for name in sorted(files):  # every file: regular, inside the bundle, listed size, then sha256
            bundle_member(path, name)
        graph_files = {file_name(g, p): (g, p) for p in manifest["precisions"] for g in graphs.GRAPH_NAMES}
        for name in sorted(files):
            f = path / name
            data = read_member(path, name, MAX_FILE_BYTES, files[name]["bytes"], files[name]["sha256"])
            if name in graph_files:  # parsed without following anything it names; no external data
                model = parse_graph(data, f)
                del data
                check_no_external_data(model, f)
                if graph_files[name][0] == "pixelwise":
                    check_graph_matches_config(f, cfg, model)
                checked[name] = files[name]["sha256"]
                del model
    return Bundle(path, manifest, cfg, checked)


def parse_graph(data: bytes, f: Path):
    """ModelProto from a graph file's bytes (BundleError naming the file if protobuf refuses them)."""
    try:
        return onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise BundleError(f"{f}: not a readable ONNX file ({type(exc).__name__}: {str(exc)[:200]})") from exc


def all_tensors(model):
    """(where, TensorProto) of every tensor a model holds: initializers, sparse initializers and
    tensor attributes of every node, in subgraphs and model-local functions too."""
    pending_graphs, pending_nodes = [model.graph], [(f"function {fn.name}", n) for fn in model.functions
                                                    for n in fn.node]
    while pending_graphs or pending_nodes:
        if pending_graphs:
            g = pending_graphs.pop()
            for t in g.initializer:
                yield f"initializer {t.name}", t
            for sp in g.sparse_initializer:
                yield f"sparse initializer {sp.values.name}", sp.values
                yield f"sparse initializer {sp.values.name}", sp.indices
            pending_nodes.extend((f"node {n.name or n.op_type}", n) for n in g.node)
            continue
        where, n = pending_nodes.pop()
        for a in n.attribute:
            at = f"{where} attribute {a.name}"
            if a.HasField("t"):
                yield at, a.t
            for t in a.tensors:
                yield at, t
            sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
            for sp in sparse:
                yield at, sp.values
                yield at, sp.indices
            if a.HasField("g"):
                pending_graphs.append(a.g)
            pending_graphs.extend(a.graphs)


def check_no_external_data(model, f: Path) -> None:
    """BundleError if any tensor of `model` keeps its data in another file: asap export writes every
    weight inside the graph file, and a location written in the file (resolved against the model's
    folder or the current directory by onnx and ONNX Runtime) could name any file on the machine."""
    for where, t in all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            loc = {e.key: e.value for e in t.external_data}.get("location", "?")
            raise BundleError(f"{f}: {where} keeps its data in an external file ({loc[:120]!r}); a bundle "
                              "holds every weight inside its graph files: refusing to read it (re-export the bundle)")


def check_graph_matches_config(f: Path, cfg: ModelConfig, model=None) -> None:
    """BundleError unless the SpatialMLP node and label input of graph `f` (or of `model`, its
    parsed content) describe the model of `cfg`: a manifest edited to describe another model is
    refused, not trusted, since engines pad, check ids and build kernels from the manifest's config."""
    f = Path(f)
    if model is None:  # a regular file inside its folder, parsed without following anything it names
        model = parse_graph(read_member(f.parent, f.name, MAX_FILE_BYTES), f)
        check_no_external_data(model, f)
    nodes = [n for n in model.graph.node
             if n.op_type == plugin_spec.OP_NAME and n.domain == plugin_spec.DOMAIN]
    if len(nodes) != 1:
        raise BundleError(f"{f}: expected one {plugin_spec.DOMAIN}::{plugin_spec.OP_NAME} node, "
                          f"found {len(nodes)}")
    try:
        got = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    except Exception as exc:  # noqa: BLE001 - onnx raises ValueError/TypeError for odd attribute protos
        raise BundleError(f"{f}: the {plugin_spec.OP_NAME} node has an unreadable attribute ({exc})") from exc
    diffs = []
    for key, want in plugin_spec.node_attributes(cfg).items():
        have = got.get(key)
        have = have.decode("utf-8", "replace") if isinstance(have, bytes) else have
        if isinstance(want, float):
            same = isinstance(have, float) and abs(have - want) <= 1e-6
        else:
            same = (list(have) if isinstance(have, list) else have) == want
        if not same:
            diffs.append(f"{key} is {have!r} in the graph, {want!r} by the manifest's config")
    labels = [i for i in model.graph.input if i.name == "labels"]
    want_type = helper.np_dtype_to_tensor_dtype(np.dtype(cfg.label_dtype))
    if not labels or labels[0].type.tensor_type.elem_type != want_type:
        diffs.append(f"the label input is not {cfg.label_dtype}, as the manifest's config implies")
    if diffs:
        raise BundleError(f"{f}: the graph does not match the model config in manifest.json: "
                          + "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "") + " (re-export the bundle)")


def state_dict_from_bundle(bundle: Bundle, keys) -> dict[str, np.ndarray]:
    """The generator's weights, read back from predictor.onnx (initializers carry the state-dict
    key names) and checked against the manifest's weights_sha256. `keys`: the state-dict keys, or a
    mapping key -> (shape, numpy dtype) that every weight must have (checked from the tensor's
    header before its data is decoded: a reshaped or retyped weight is a BundleError naming it).
    The graph is read as the engines read it (Bundle.graph_model: a regular file inside the bundle,
    size and sha256 checked, no external data), never from the current directory."""
    from onnx import numpy_helper

    f = bundle.file("predictor", "fp32")
    m = bundle.graph_model("predictor", "fp32")
    specs = dict(keys) if isinstance(keys, Mapping) else {k: None for k in keys}
    inits: dict[str, Any] = {}
    for t in m.graph.initializer:
        if t.name in specs and t.name in inits:
            raise BundleError(f"{f}: the weight {t.name} appears twice")
        inits[t.name] = t
    missing = [k for k in specs if k not in inits]
    if missing:
        raise BundleError(f"{f}: lacks weights {', '.join(missing[:5])}: not exported by this asap-deploy")
    state = {}
    for k, spec in specs.items():
        t = inits[k]
        if spec is not None:
            shape, dtype = tuple(spec[0]), np.dtype(spec[1])
            try:
                have = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
            except Exception:  # noqa: BLE001 - an unknown TensorProto data type (KeyError/ValueError)
                have = f"data type {t.data_type}"
            if tuple(t.dims) != shape or have != dtype:
                raise BundleError(f"{f}: the weight {k} is {have} {list(t.dims)} in the graph, the model of the "
                                  f"manifest's config needs {dtype} {list(shape)} (re-export the bundle)")
        try:
            a = numpy_helper.to_array(t)
        except Exception as exc:  # noqa: BLE001 - data of another length than its dims (ValueError) and friends
            raise BundleError(f"{f}: the weight {k} cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})") from exc
        if spec is not None and a.shape != tuple(spec[0]):
            raise BundleError(f"{f}: the weight {k} decodes to shape {list(a.shape)}, not {list(spec[0])}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise BundleError(f"{f}: the weight {k} holds NaN or Inf values; refusing it")
        state[k] = a
    want = bundle.manifest.get("source", {}).get("weights_sha256")
    got = weights_digest(state)
    if want != got:
        raise BundleError(f"{f}: the weights read back hash to {got[:16]}..., the manifest says {str(want)[:16]}...")
    return state
