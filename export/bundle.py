"""The bundle: ONNX graphs + manifest.json, written atomically and verified on load.

Layout of a bundle folder:
  manifest.json                 schema, config, labels + palette, I/O, S, precision, sha256 per file
  predictor.onnx  pixelwise.onnx  asap.onnx            fp32
  predictor.fp16.onnx  pixelwise.fp16.onnx  asap.fp16.onnx   fp16 (unless --no-fp16)

Export is deterministic: the same checkpoint gives byte-identical files (no timestamps, no
absolute paths, fixed node names), so the hashes identify the model. Loading (`load_bundle`)
refuses unknown schemas, missing files and any file whose sha256 differs from the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from asap_deploy.config import DONTCARE_ID, ModelConfig
from asap_deploy.errors import BundleError, ConfigError
from asap_deploy.io import staged_dir

from . import graphs
from asap_deploy.palette import DONTCARE_COLOUR, label_palette

SCHEMA = "asap-deploy/bundle"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")


def file_name(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
        "custom_op": {"domain": graphs.CUSTOM_DOMAIN, "op_type": graphs.CUSTOM_OP,
                      "attributes": graphs.spatial_mlp_attributes(cfg),
                      "inputs": ["ids int32 (N,H,W) label channel index", "params (N,P,H/S,W/S)"],
                      "outputs": ["rgb float (N,H,W,3) in [-1,1]"],
                      "body": "model-local ONNX function of the same name (standard ops)"},
        "opset": {"ai.onnx": graphs.OPSET, graphs.CUSTOM_DOMAIN: 1},
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
                 overwrite: bool = False, progress: Callable[[str], None] | None = None) -> ExportResult:
    """Write the bundle of an ASAPNetGenerator (CPU, fp32) to `out_dir`, atomically.

    The files go to a hidden temporary folder next to `out_dir`, which is renamed into place only
    when everything is written and checked; on any failure it is removed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir}: already exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise BundleError(f"{out_dir}: a non-empty folder that is not a bundle (no {MANIFEST}); refusing to replace it")
    model = model.cpu().float().eval()
    cfg = model.cfg
    precisions = ("fp32", "fp16") if fp16 else ("fp32",)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    source = dict(source or {})
    source["weights_sha256"] = weights_digest(state)
    with staged_dir(out_dir, "bundle") as tmp:
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
    return export_model(model, out_dir, source=source, fp16=fp16, overwrite=overwrite, progress=progress)


# ---- loading and verification -----------------------------------------------------------------
@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: ModelConfig

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

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
    if not isinstance(precisions, list) or not precisions or any(p not in PRECISIONS for p in precisions):
        raise BundleError(f"{mpath}: 'precisions' must be a non-empty list of {', '.join(PRECISIONS)}, "
                          f"got {precisions!r}")


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and check every file against its sha256 (BundleError naming the file)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing: {path} is not an asap-deploy bundle (export one with `asap export`)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{mpath}: unknown manifest schema {found!r} (expected {SCHEMA!r})")
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleError(f"{mpath}: manifest schema version {version!r} is not supported by this asap-deploy "
                          f"(it reads version(s) {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); "
                          "re-export the bundle or upgrade asap-deploy")
    for key in ("config", "files", "precisions", "graphs"):
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
    if verify:
        for name in sorted(files):
            f = path / name
            if not f.is_file():
                raise BundleError(f"{f}: missing from the bundle (the manifest lists it)")
            digest = sha256_file(f)
            if digest != files[name].get("sha256"):
                raise BundleError(f"{f}: sha256 {digest[:16]}... does not match the manifest "
                                  f"({str(files[name].get('sha256'))[:16]}...): the file was changed after export")
        for prec in manifest["precisions"]:
            check_graph_matches_config(path / file_name("pixelwise", prec), cfg)
    return Bundle(path, manifest, cfg)


def check_graph_matches_config(f: Path, cfg: ModelConfig) -> None:
    """BundleError unless the SpatialMLP node and label input of graph `f` describe the model of
    `cfg`: a manifest edited to describe another model is refused, not trusted, since
    engines pad, check ids and build kernels from the manifest's config."""
    try:
        model = onnx.load(str(f), load_external_data=False)  # never follow paths written in the file
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise BundleError(f"{f}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    nodes = [n for n in model.graph.node if n.op_type == graphs.CUSTOM_OP and n.domain == graphs.CUSTOM_DOMAIN]
    if len(nodes) != 1:
        raise BundleError(f"{f}: expected one {graphs.CUSTOM_DOMAIN}::{graphs.CUSTOM_OP} node, found {len(nodes)}")
    got = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    diffs = []
    for key, want in graphs.spatial_mlp_attributes(cfg).items():
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
    key names) and checked against the manifest's weights_sha256."""
    import onnx
    from onnx import numpy_helper

    f = bundle.file("predictor", "fp32")
    m = onnx.load(str(f), load_external_data=False)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    missing = [k for k in keys if k not in inits]
    if missing:
        raise BundleError(f"{f}: lacks weights {', '.join(missing[:5])}: not exported by this asap-deploy")
    state = {k: inits[k] for k in keys}
    want = bundle.manifest.get("source", {}).get("weights_sha256")
    got = weights_digest(state)
    if want != got:
        raise BundleError(f"{f}: the weights read back hash to {got[:16]}..., the manifest says {str(want)[:16]}...")
    return state
