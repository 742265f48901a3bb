"""`asap inspect`: what an artifact is and holds, for every artifact asap reads or writes.

`inspect_path(path)` tells the kind from the path and returns a plain, JSON-ready dict (its `kind`
key says which):

  checkpoint  ours (.pt) or the authors' latest_net_G.pth: config (stored, inferred or given),
              parameter counts, label set
  bundle      a folder with manifest.json: the manifest's summary and, per listed file, whether
              it is still what the manifest says ("ok", "mismatch", "missing", "refused", "invalid")
  onnx        any ONNX file: opset, I/O names/dtypes/shapes, custom nodes and their domains,
              model-local functions, op histogram, initializer bytes, external-data tensors
  engine      a TensorRT engine and its JSON sidecar (never deserialized: no TensorRT needed):
              flavour, version, SMs, precision, profile, plugin, and whether the engine and its
              source ONNX still match
  kernels     a compiled kernel folder (index.json): each kernel verified against its hashes

Everything read is untrusted and read as the loaders read it: the bundle's manifest and members by
export/bundle.py (regular files inside the folder, bounded; a symlink leading out, a FIFO or a
device is reported, never opened), ONNX bytes bounded and parsed without following external data,
sidecars by engines/build.read_sidecar, kernel folders by plugins/aot, checkpoints by
asap_deploy/checkpoints. Unlike the loaders, inspect reports damage instead of refusing: a bundle
whose files were edited is shown file by file. A path that is named nowhere but in a file (a
sidecar's bundle path) is reported, never read.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import AsapError, BundleError, CheckpointError, EngineError, UsageError

KINDS = ("checkpoint", "bundle", "onnx", "engine", "kernels")
MAX_ENGINE_BYTES = 64 << 30  # hashed in chunks, never held: an engine's size is bounded only by sanity
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training")
# ModelProto's field tags after ir_version (field 1, varint): producer_name .. functions (onnx.proto)
_ONNX_NEXT_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xAA, 0xCA}
_LISTED_MAX = 200  # names of unlisted files a bundle report shows


# ---- which kind -------------------------------------------------------------------------------------
def _error_for(path: Path) -> type:
    """The error type of what `path`'s name promises (a checkpoint unless it says otherwise)."""
    name = path.name
    if name.endswith(".onnx"):
        return BundleError
    if name.endswith(".engine") or name.endswith(".engine.json"):
        return EngineError
    return CheckpointError


def _looks_like_onnx(head: bytes) -> bool:
    """A serialized ModelProto starts with ir_version (tag 0x08, a small varint), then another
    ModelProto field; torch zips start with 'PK', pickles with 0x80."""
    if len(head) < 3 or head[0] != 0x08 or not 1 <= head[1] <= 0x7F:
        return False
    return head[2] in _ONNX_NEXT_TAGS


def _head(path: Path, n: int = 16) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, n)
    except OSError:
        return b""
    finally:
        os.close(fd)


def detect_kind(path: str | os.PathLike) -> tuple[str, Path]:
    """(kind, the path to inspect) for `path`: a folder with manifest.json is a bundle, one with
    index.json (or our "kernels" marker) a kernel folder; manifest.json / index.json / an engine's
    `.engine.json` sidecar stand for their folder or engine; `*.onnx` or ONNX bytes are ONNX;
    `*.engine` or a file with a sidecar next to it is an engine; anything else a checkpoint.
    Only stats and reads a file's first bytes (a FIFO or device is refused, never opened)."""
    from ..engines.build import sidecar_path
    from ..export.bundle import MANIFEST
    from ..io import read_marker
    from ..plugins.aot import INDEX, KIND as KERNELS_KIND

    p = Path(path)
    if p.name == MANIFEST and os.path.isdir(p.parent):
        return "bundle", p.parent
    if p.name == INDEX and os.path.isdir(p.parent):
        return "kernels", p.parent
    if p.name.endswith(".engine.json"):
        return "engine", p.with_name(p.name[:-len(".json")])
    try:
        st = os.stat(p)
    except FileNotFoundError:
        kind = {BundleError: "onnx", EngineError: "engine"}.get(_error_for(p), "checkpoint")
        return kind, p  # its loader says "no such ... file" with its own exit code
    except OSError as exc:
        raise _error_for(p)(f"{p}: cannot read it ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        if os.path.lexists(p / MANIFEST):
            return "bundle", p
        marker = read_marker(p)
        if os.path.lexists(p / INDEX) or (marker is not None and marker.get("kind") == KERNELS_KIND):
            return "kernels", p
        raise UsageError(f"{p}: a folder, but neither a bundle (no {MANIFEST}) nor a kernel folder (no {INDEX}); "
                         "asap inspect takes a checkpoint, a bundle folder, an ONNX file, an engine or a kernel folder")
    if not stat.S_ISREG(st.st_mode):
        raise _error_for(p)(f"PATH {p}: not a regular file (a FIFO, device or socket); refusing to read it")
    if p.name.endswith(".onnx"):
        return "onnx", p
    if p.name.endswith(".engine") or os.path.lexists(sidecar_path(p)):
        return "engine", p
    if _looks_like_onnx(_head(p)):
        return "onnx", p
    return "checkpoint", p


def inspect_path(path: str | os.PathLike, *, config=None, preset: str | None = None,
                 bundle: str | os.PathLike | None = None) -> dict[str, Any]:
    """The report of whatever `path` is (see detect_kind). `config`/`preset` apply to a checkpoint
    (UsageError for another kind); `bundle`: the bundle an engine was built from, when it is not
    the engine's own folder (UsageError for another kind)."""
    kind, p = detect_kind(path)
    if (config is not None or preset is not None) and kind != "checkpoint":
        raise UsageError(f"{path}: --preset/--config describe a checkpoint's model; this is {_a(kind)}")
    if bundle is not None and kind != "engine":
        raise UsageError(f"{path}: --bundle names the bundle an engine was built from; this is {_a(kind)}")
    if kind == "bundle":
        return inspect_bundle(p)
    if kind == "kernels":
        return inspect_kernels(p)
    if kind == "onnx":
        return inspect_onnx(p)
    if kind == "engine":
        return inspect_engine(p, bundle)
    return inspect_checkpoint(p, config=config, preset=preset)


def _a(kind: str) -> str:
    return {"bundle": "a bundle", "kernels": "a kernel folder", "onnx": "an ONNX file", "engine": "an engine",
            "checkpoint": "a checkpoint"}[kind]


# ---- checkpoint -------------------------------------------------------------------------------------
def inspect_checkpoint(path: str | os.PathLike, config=None, preset: str | None = None) -> dict[str, Any]:
    """Config (stored, inferred, preset or given), parameter counts per stream and the label set."""
    from ..checkpoints import load_generator

    model, ck = load_generator(path, None if preset else config, preset=preset)
    cfg = ck.config
    n_lr = sum(v.numel() for v in model.lowres_stream.state_dict().values())
    dontcare = {True: "yes (id 255 -> last channel)", False: "no",
                None: "unknown: the checkpoint cannot tell; id 255 maps to the last channel"}[cfg.contain_dontcare_label]
    return {
        "kind": "checkpoint",
        "file": str(ck.path), "format": ck.kind, "config_source": ck.config_source,
        "config": cfg.to_dict(), "derived": cfg.describe(),
        "parameters": {"lowres_stream": n_lr, "pixelwise_stream": 0, "predicted_per_tile": cfg.num_params},
        "labels": {"ids": f"0..{cfg.n_label_channels - 1}", "dontcare": dontcare,
                   "instance_edges": cfg.instance_edges},
    }


# ---- bundle -----------------------------------------------------------------------------------------
def member_status(bundle_dir: Path, name: str, entry: dict) -> dict[str, Any]:
    """One listed file of a bundle against its manifest entry: status "ok", "mismatch" (another
    size or sha256), "missing", or "refused" (a symlink leading out, a folder, FIFO or device:
    never opened). Read as load_bundle reads it (export.bundle.read_member), but reported, not raised."""
    from ..export.bundle import MAX_FILE_BYTES, bundle_member, read_member

    f = bundle_dir / name
    out: dict[str, Any] = {"file": name, "bytes": entry.get("bytes"), "sha256": entry.get("sha256")}
    if not os.path.lexists(f):
        return out | {"status": "missing", "detail": "not in the bundle folder"}
    try:
        real = bundle_member(bundle_dir, name)
        size = os.stat(real).st_size
    except BundleError as exc:
        return out | {"status": "missing" if not os.path.exists(f) else "refused", "detail": exc.message}
    except OSError as exc:
        return out | {"status": "missing", "detail": f"{f}: {exc.strerror or exc}"}
    if size != entry.get("bytes"):
        return out | {"status": "mismatch", "found_bytes": size,
                      "detail": f"{size} bytes, the manifest says {entry.get('bytes')}"}
    try:
        data = read_member(bundle_dir, name, MAX_FILE_BYTES)
    except BundleError as exc:
        return out | {"status": "refused", "detail": exc.message}
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        return out | {"status": "mismatch", "found_sha256": digest,
                      "detail": f"sha256 {digest[:16]}..., the manifest says {str(entry.get('sha256'))[:16]}..."}
    return out | {"status": "ok", "data": data}


def inspect_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest's summary and every listed file's status (see member_status); graph files that
    match their hash are parsed and checked as load_bundle checks them (no external data; the
    pixelwise graph's SpatialMLP node agrees with the manifest's config), else status "invalid".
    A manifest that cannot be read is a BundleError: there is nothing to check the files against."""
    from ..export import graphs
    from ..export.bundle import (MANIFEST, check_graph_matches_config, check_no_external_data, file_name,
                                 load_bundle, parse_graph)
    from ..io import MARKER

    b = load_bundle(path, verify=False)  # the manifest: schema, plain names, value types and ranges
    m = b.manifest
    graph_of = {file_name(g, p): g for p in b.precisions for g in graphs.GRAPH_NAMES}
    files = []
    for name in sorted(m["files"]):
        row = member_status(b.path, name, m["files"][name])
        data = row.pop("data", None)
        if data is not None and name in graph_of:
            try:
                model = parse_graph(data, b.path / name)
                check_no_external_data(model, b.path / name)
                if graph_of[name] == "pixelwise":
                    check_graph_matches_config(b.path / name, b.config, model)
            except BundleError as exc:
                row.update(status="invalid", detail=exc.message)
        del data
        files.append(row)
    try:
        present = sorted(e.name for e in os.scandir(b.path))
    except OSError:
        present = []
    others = [n for n in present if n not in m["files"] and n not in (MANIFEST, MARKER)]
    counts = Counter(r["status"] for r in files)
    cfg = b.config
    return {
        "kind": "bundle",
        "path": str(b.path),
        "schema": f"{m['schema']} v{m['schema_version']}",
        "verified": all(r["status"] == "ok" for r in files),
        "status_counts": dict(counts),
        "config": cfg.to_dict(),
        "S": cfg.S,
        "labels": {k: v for k, v in m.get("labels", {}).items() if k != "palette"},
        "precisions": b.precisions,
        "graphs": m["graphs"],
        "custom_op": {k: v for k, v in m.get("custom_op", {}).items() if k in ("domain", "op_type", "attributes")},
        "opset": m.get("opset"),
        "source": m.get("source"),
        "versions": m.get("versions"),
        "files": files,
        "other_files": others[:_LISTED_MAX],
    }


# ---- ONNX -------------------------------------------------------------------------------------------
def _dtype_name(elem_type: int) -> str:
    import onnx

    try:
        name = onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"unknown({elem_type})"
    return {"float": "float32", "double": "float64"}.get(name, name)  # as numpy and the manifest spell them


def _value_info(v) -> dict[str, Any]:
    t = v.type
    if not t.HasField("tensor_type"):
        return {"name": v.name, "dtype": t.WhichOneof("value") or "unknown", "shape": None}
    tt = t.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return {"name": v.name, "dtype": _dtype_name(tt.elem_type), "shape": shape}


def _item_bytes(elem_type: int) -> int | None:
    import onnx
    from onnx import helper

    if elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def _tensor_bytes(t) -> int:
    """Bytes a TensorProto's data takes (declared, for external data: never read)."""
    if t.raw_data:
        return len(t.raw_data)
    ext = {e.key: e.value for e in t.external_data}
    if "length" in ext and ext["length"].isdigit():
        return int(ext["length"])
    n = 1
    for d in t.dims:
        n *= max(int(d), 0)
    size = _item_bytes(t.data_type)
    if size is None:  # strings: their bytes
        return sum(len(s) for s in t.string_data)
    return n * size


def _graphs_and_nodes(model):
    """Every graph of the model (main graph, then subgraphs of control-flow nodes), each once."""
    pending = [model.graph]
    while pending:
        g = pending.pop()
        yield g
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    pending.append(a.g)
                pending.extend(a.graphs)


def onnx_summary(model) -> dict[str, Any]:
    """The parsed ModelProto as a report (nothing it names is read)."""
    from onnx import helper

    from ..export.bundle import all_tensors

    funcs = {(f.domain, f.name): f for f in model.functions}
    ops: Counter = Counter()
    custom: dict[tuple[str, str], dict[str, Any]] = {}
    n_graphs = 0
    for g in _graphs_and_nodes(model):
        n_graphs += 1
        for n in g.node:
            key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
            ops[key] += 1
            if n.domain not in _STANDARD_DOMAINS:
                c = custom.setdefault((n.domain, n.op_type), {
                    "domain": n.domain, "op_type": n.op_type, "count": 0,
                    "function_body": (n.domain, n.op_type) in funcs, "attributes": {}})
                c["count"] += 1
                if not c["attributes"]:
                    for a in n.attribute:
                        try:
                            v = helper.get_attribute_value(a)
                        except Exception:  # noqa: BLE001 - onnx raises several types for odd attribute protos
                            v = "?"
                        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                        c["attributes"][a.name] = v if isinstance(v, (int, float, str)) or (
                            isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) and len(v) <= 16) \
                            else type(v).__name__
    inits = list(model.graph.initializer)
    by_dtype: Counter = Counter()
    for t in inits:
        by_dtype[_dtype_name(t.data_type)] += _tensor_bytes(t)
    external = []
    for where, t in all_tensors(model):
        if t.data_location == 1 or len(t.external_data):  # TensorProto.EXTERNAL
            loc = {e.key: e.value for e in t.external_data}.get("location", "?")
            external.append({"tensor": where, "location": loc[:200]})
    g = model.graph
    init_names = {t.name for t in inits}
    return {
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "domain": model.domain,
        "model_version": model.model_version,
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "graph": g.name,
        "inputs": [_value_info(v) for v in g.input if v.name not in init_names],
        "outputs": [_value_info(v) for v in g.output],
        "nodes": sum(ops.values()),
        "subgraphs": n_graphs - 1,
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "custom_nodes": list(custom.values()),
        "functions": [{"domain": f.domain, "name": f.name, "nodes": len(f.node),
                       "opset": {(o.domain or "ai.onnx"): o.version for o in f.opset_import}} for f in model.functions],
        "initializers": {"count": len(inits) + len(g.sparse_initializer), "bytes": sum(by_dtype.values()),
                         "bytes_by_dtype": dict(by_dtype)},
        "external_data": external,
        "metadata": {p.key: p.value[:200] for p in model.metadata_props},
    }


def inspect_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """Any ONNX file: its bytes read bounded from a regular file and parsed without loading external
    data (tensors that keep data elsewhere are listed, never read). If its folder is a bundle, whether
    the manifest lists it with this sha256."""
    from ..export.bundle import MANIFEST, MAX_FILE_BYTES, load_bundle, parse_graph
    from ..io import read_regular_file

    p = Path(path)
    if not os.path.lexists(p):
        raise BundleError(f"{p}: no such ONNX file")
    data = read_regular_file(p, "ONNX file", MAX_FILE_BYTES, error=BundleError)
    digest = hashlib.sha256(data).hexdigest()
    model = parse_graph(data, p)
    size = len(data)
    del data
    out: dict[str, Any] = {"kind": "onnx", "file": str(p), "bytes": size, "sha256": digest, **onnx_summary(model)}
    folder = p.parent
    if os.path.lexists(folder / MANIFEST):
        try:
            listed = load_bundle(folder, verify=False).manifest["files"].get(p.name)
        except BundleError as exc:
            out["bundle"] = {"path": str(folder), "status": "unreadable manifest", "detail": exc.message}
        else:
            status = "unlisted" if listed is None else "ok" if listed["sha256"] == digest else "mismatch"
            out["bundle"] = {"path": str(folder), "status": status}
    return out


# ---- engine -----------------------------------------------------------------------------------------
def _plain_name(name) -> bool:
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and Path(name).name == name)


def _source_status(sc: dict, bundle_dir: Path | None) -> dict[str, Any]:
    """Whether the ONNX an engine was built from is still the bundle's file: the sidecar's sha256
    against the file itself (read as load_bundle reads it: listed in the manifest, a regular file
    inside the bundle) and against the manifest's entry."""
    from ..export.bundle import MANIFEST, MAX_FILE_BYTES, load_bundle, read_member

    src = sc.get("source_onnx", {})
    name, want = src.get("file"), src.get("sha256")
    out: dict[str, Any] = {"file": name, "sha256": want}
    if bundle_dir is None:
        return out | {"status": "unknown", "detail": "no bundle next to the engine (give --bundle)"}
    out["bundle"] = str(bundle_dir)
    if not os.path.lexists(Path(bundle_dir) / MANIFEST):
        return out | {"status": "unknown", "detail": f"{bundle_dir}: no {MANIFEST}"}
    try:
        b = load_bundle(bundle_dir, verify=False)
    except BundleError as exc:
        return out | {"status": "unknown", "detail": exc.message}
    entry = b.manifest["files"].get(name) if _plain_name(name) else None
    if entry is None:  # only names the manifest lists (plain names inside the bundle) are read
        return out | {"status": "unlisted", "detail": f"the bundle's manifest does not list {str(name)[:120]!r}"}
    out["manifest_sha256"] = entry["sha256"]
    try:
        data = read_member(b.path, name, MAX_FILE_BYTES)
    except BundleError as exc:
        return out | {"status": "missing" if not os.path.exists(b.path / name) else "refused", "detail": exc.message}
    found = hashlib.sha256(data).hexdigest()
    del data
    out["found_sha256"] = found
    if found == want:
        return out | {"status": "ok"} | ({} if entry["sha256"] == want else
                                          {"detail": "the file matches, the manifest lists another sha256"})
    why = ("the bundle was re-exported since" if entry["sha256"] != want
           else "the file was changed after export")
    return out | {"status": "mismatch", "detail": why}


def inspect_engine(path: str | os.PathLike, bundle: str | os.PathLike | None = None) -> dict[str, Any]:
    """An engine file and its sidecar, never deserialized: sidecar fields, the engine's sha256 against
    the sidecar's, and whether the source ONNX still matches the bundle (the engine's own folder, or
    `bundle`). A missing or malformed sidecar is reported (status and message), not raised."""
    from ..engines.build import read_sidecar, sidecar_path
    from ..engines.engine_file import EngineFile
    from ..export.bundle import MANIFEST, sha256_file
    from ..plugins.spec import PLUGIN_VERSION

    p = Path(path)
    if not os.path.lexists(p):
        raise EngineError(f"{p}: no such engine file")
    try:
        size = os.stat(p).st_size
    except OSError as exc:
        raise EngineError(f"{p}: cannot read the engine ({exc.strerror or exc})") from exc
    digest = sha256_file(p, MAX_ENGINE_BYTES, error=EngineError, what="engine")
    try:
        parts = EngineFile.parse(p)
        name = {"graph": parts.graph, "precision": parts.precision, "flavor": parts.flavor}
    except AsapError:
        name = None
    out: dict[str, Any] = {"kind": "engine", "file": str(p), "bytes": size, "sha256": digest, "name": name,
                           "sidecar_file": str(sidecar_path(p))}
    try:
        sc = read_sidecar(p)
    except EngineError as exc:
        return out | {"sidecar": "missing" if not os.path.lexists(sidecar_path(p)) else "invalid",
                      "detail": exc.message}
    eng = sc["engine"]
    if eng.get("sha256") == digest and eng.get("bytes") == size:
        engine_status = "ok"
    else:
        engine_status = "mismatch"
    if bundle is not None:
        bundle_dir: Path | None = Path(bundle)
    else:
        bundle_dir = p.parent if os.path.lexists(p.parent / MANIFEST) else None
    plugin = sc.get("plugin")
    t, targets = sc["tensorrt"], sc["targets"]
    return out | {
        "sidecar": "ok",
        "engine_matches_sidecar": engine_status,
        "graph": sc.get("graph"),
        "precision": sc.get("precision"),
        "fp16_method": sc.get("fp16_method"),
        "strongly_typed": sc.get("strongly_typed"),
        "tensorrt": {"flavor": t.get("flavor"), "module": t.get("module"), "version": t.get("version")},
        "targets": {"sm": targets.get("sm"), "kind": targets.get("kind"), "gpu": targets.get("gpu"),
                    "built_on_gpu": targets.get("built_on_gpu")},
        "plugin": None if plugin is None else {
            "name": plugin.get("name"), "namespace": plugin.get("namespace"), "version": plugin.get("version"),
            "current": plugin.get("version") == PLUGIN_VERSION, "this_asap_version": PLUGIN_VERSION,
            "kernel_archs": plugin.get("kernel_archs"), "kernel_dtypes": plugin.get("kernel_dtypes"),
            "triton_version": plugin.get("triton_version"), "layers": plugin.get("layers")},
        "profile": sc["profile"],
        "io": sc.get("io"),
        "built_from": {"bundle_path": sc["bundle"].get("path"), "weights_sha256": sc["bundle"].get("weights_sha256"),
                       "S": sc["bundle"].get("S")},
        "source_onnx": _source_status(sc, bundle_dir),
    }


# ---- kernel folder ----------------------------------------------------------------------------------
def inspect_kernels(path: str | os.PathLike) -> dict[str, Any]:
    """A compiled kernel folder: index.json and every kernel it lists, each read from inside the
    folder and verified against its hashes (status "ok" or "damaged" with the reason). A folder of
    ours without index.json is an unfinished `asap compile-kernels` run."""
    from ..errors import KernelError
    from ..io import read_marker
    from ..plugins.aot import INDEX, load_index, load_kernel

    folder = Path(path)
    marker = read_marker(folder)
    out: dict[str, Any] = {"kind": "kernels", "path": str(folder),
                           "owner": (marker or {}).get("kind") if marker else None}
    try:
        from importlib.metadata import PackageNotFoundError, version

        out["triton_here"] = version("triton")
    except (ImportError, PackageNotFoundError):
        out["triton_here"] = None
    if not os.path.lexists(folder / INDEX):
        return out | {"index": "missing", "detail": f"no {INDEX}: an unfinished `asap compile-kernels` run",
                      "verified": False, "kernels": []}
    index = load_index(folder)  # KernelError: nothing to check the files against
    rows = []
    for e in index["kernels"]:
        row: dict[str, Any] = {"kind": e["kind"], "arch": e["arch"], "json": e["json"]}
        row.update({k: e[k] for k in ("S", "HID", "N_HIDDEN", "OUT", "EXTRA", "params_dtype", "out_dtype",
                                      "src_dtype", "dst_dtype") if k in e})
        try:
            meta, cubin, ptx = load_kernel(folder, e)
        except KernelError as exc:
            rows.append(row | {"status": "damaged", "detail": exc.message})
            continue
        rows.append(row | {"status": "ok", "kernel_name": meta["kernel_name"], "shared": meta["shared"],
                           "num_warps": meta["num_warps"], "ptx_version": meta.get("ptx_version"),
                           "cubin_bytes": len(cubin), "ptx_bytes": len(ptx),
                           "hidden_args": [h["name"] for h in meta["hidden_args"]]})
    return out | {"index": "ok", "triton_version": index["triton_version"],
                  "verified": all(r["status"] == "ok" for r in rows), "kernels": rows}
