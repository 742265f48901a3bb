"""`asap export --triton-repo DIR`: a standard Triton Inference Server model repository.

    DIR/
      asap_triton_repo.json       what was written, from which bundle (sha256 of the source graph)
      asap/config.pbtxt           backend "onnxruntime": the end-to-end graph, dynamic batching
      asap/1/model.onnx           the bundle's asap.onnx (its SpatialMLP node is a model-local
                                  function, which ONNX Runtime inlines: no plugin needed)
      asap_tensorrt/...           only when the bundle holds an end-to-end TensorRT engine:
        config.pbtxt              backend "python", KIND_GPU
        1/model.py                runs the engine (+ the SpatialMLP plugin) through asap-deploy
        1/asap_model.json         its settings; 1/bundle/ the bundle with its engine

Start a server on it:  tritonserver --model-repository DIR
The I/O is the same as `asap serve`: labels (uint8, or int32 for > 255 labels) (-1, -1)
[+ instances int32 (-1, -1)] -> image uint8 (-1, -1, 3), H and W multiples of S; every config
is parsed back with Triton's own ModelConfig protobuf (text format) before the folder is renamed
into place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asap_deploy.app.serve import check_batching
from asap_deploy.errors import BundleError, MissingDependencyError, OutputError, UsageError
from asap_deploy.export.bundle import MANIFEST, sha256_file
from asap_deploy.export.stages import Stage
from asap_deploy.io import check_replaceable, staged_dir

ONNX_MODEL, TRT_MODEL = "asap", "asap_tensorrt"
MARKER = "asap_triton_repo.json"  # what the repository holds (the ownership marker is io.MARKER)
REPO_KIND = "model repository"
TRITON_TYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32", "float32": "TYPE_FP32"}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


@dataclass
class RepoOptions:
    max_batch: int = 8
    max_delay_ms: float = 2.0
    instances: int = 1            # model instances per device
    kind: str = "cpu"             # where the ONNX model runs: cpu or gpu
    precision: str = "fp32"
    tensorrt: bool | None = None  # None: add the TensorRT model when the bundle has an engine
    overwrite: bool = False

    def check(self) -> None:
        check_batching(self.max_batch, self.max_delay_ms)
        if self.instances < 1:
            raise UsageError(f"--instances must be >= 1 (got {self.instances})")
        if self.kind not in KINDS:
            raise UsageError(f"instance kind {self.kind!r}: choose cpu or gpu")


@dataclass
class RepoResult:
    path: Path
    models: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)


# ---- config.pbtxt ----------------------------------------------------------------------------------------
def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    return f"  {{\n    name: \"{name}\"\n    data_type: {TRITON_TYPES[dtype]}\n    dims: [ {', '.join(map(str, dims))} ]\n  }}"


def model_io(cfg) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(inputs, outputs) as (name, numpy dtype name, per-request dims) for both models."""
    inputs = [("labels", cfg.label_dtype, [-1, -1])]
    if cfg.instance_edges:
        inputs.append(("instances", "int32", [-1, -1]))
    return inputs, [("image", "uint8", [-1, -1, cfg.output_nc])]


def config_text(name: str, backend: str, cfg, opts: RepoOptions, kind: str) -> str:
    """The config.pbtxt of one model (protobuf text format of inference.ModelConfig)."""
    inputs, outputs = model_io(cfg)
    params = {"S": cfg.S, "label_nc": cfg.n_label_channels, "accepts_dontcare_255": int(cfg.accepts_dontcare_id),
              "source": "asap-deploy"}
    lines = [f"name: \"{name}\"", f"backend: \"{backend}\"", f"max_batch_size: {opts.max_batch}",
             "input [\n" + ",\n".join(_tensor(*t) for t in inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor(*t) for t in outputs) + "\n]",
             "dynamic_batching {\n  max_queue_delay_microseconds: " + str(int(round(opts.max_delay_ms * 1000))) + "\n}",
             f"instance_group [\n  {{\n    count: {opts.instances}\n    kind: {KINDS[kind]}\n  }}\n]"]
    for k, v in params.items():
        lines.append(f"parameters {{\n  key: \"{k}\"\n  value: {{ string_value: \"{v}\" }}\n}}")
    return "\n".join(lines) + "\n"


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse config.pbtxt text into Triton's ModelConfig message (tritonclient ships the proto).

    BundleError naming the file on a syntax or field error; MissingDependencyError without tritonclient."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise MissingDependencyError("checking Triton configs needs tritonclient: pip install 'tritonclient[grpc]' "
                                     "(or 'asap-deploy[serve]')") from exc
    msg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise BundleError(f"{where}: not a valid Triton model config ({exc})") from exc
    return msg


# ---- the TensorRT (Python backend) model ------------------------------------------------------------------
PYTHON_MODEL = '''"""Triton Python-backend model written by `asap export --triton-repo`.

Runs the end-to-end TensorRT engine of ./bundle (the asap SpatialMLP plugin is registered by
asap-deploy) on the GPU of this model instance. The server's Python environment needs
asap-deploy with its TensorRT extra ([tensorrt] or [rtx]) and numpy<2 (the Python backend stub).
Requests of the same size are run as one batch; a bad request gets its own error response.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
SETTINGS = json.loads((HERE / "asap_model.json").read_text(encoding="utf-8"))


class TritonPythonModel:
    def initialize(self, args):
        from asap_deploy.engines import create_engine
        from asap_deploy.export.bundle import load_bundle

        device = int(args.get("model_instance_device_id") or 0)
        self.engine = create_engine("tensorrt", load_bundle(HERE / "bundle"), SETTINGS["precision"],
                                    flavor=SETTINGS["flavor"], graphs=("asap",), device=device)

    def execute(self, requests):
        import numpy as np

        from asap_deploy.errors import AsapError
        from asap_deploy.app.serve import validate_request

        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            arrays = {}
            for name in SETTINGS["inputs"]:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            try:
                labels, instances = validate_request(arrays, self.engine.config, SETTINGS["max_pixels"])
            except AsapError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.message))
                continue
            groups.setdefault(labels.shape[1:], []).append((i, labels, instances))
        for members in groups.values():
            labels = np.concatenate([m[1] for m in members])
            instances = np.concatenate([m[2] for m in members]) if members[0][2] is not None else None
            try:
                images = self.engine.run(labels, instances)
            except AsapError as exc:
                for i, _, _ in members:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.message))
                continue
            start = 0
            for i, lab, _ in members:
                n = lab.shape[0]
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", images[start:start + n])])
                start += n
        return responses

    def finalize(self):
        self.engine.close()
'''


def _trt_engine(bundle, precision: str) -> tuple[str, Path] | None:
    """(flavor, path) of the bundle's end-to-end engine at `precision`, if any."""
    from asap_deploy.engines.engine_file import engine_name
    from asap_deploy.plugins.trt_compat import FLAVORS

    for flavor in FLAVORS:
        p = bundle.path / engine_name(Stage.END_TO_END.graph, precision, flavor)
        if p.is_file():
            return flavor, p
    return None


# ---- writing -----------------------------------------------------------------------------------------------
def check_repo_args(max_batch: int, max_delay_ms: float, instances: int) -> None:
    """`asap export --triton-repo`'s numbers, checked before the export (not after it)."""
    from asap_deploy.limits import MAX_BATCH, check_range

    check_range("--triton-max-batch", max_batch, 1, MAX_BATCH)
    check_range("--triton-max-delay-ms", max_delay_ms, 0.0, 10_000.0, unit="ms")
    check_range("--triton-instances", instances, 1, 64)


def write_repo_for(bundle_dir: str | Path, out_dir: str | Path, opts: RepoOptions) -> RepoResult:
    """The repository of the bundle folder `bundle_dir` (loaded, its files hash-checked)."""
    from asap_deploy.export.bundle import load_bundle

    return write_triton_repo(load_bundle(bundle_dir), out_dir, opts)


def is_bundle(path: str | Path) -> bool:
    """A folder with a bundle manifest (what `asap export` writes)."""
    return (Path(path) / MANIFEST).is_file()


def write_triton_repo(bundle, out_dir: str | Path, opts: RepoOptions | None = None) -> RepoResult:
    """Write the model repository for `bundle` (a loaded Bundle) to `out_dir`, atomically."""
    opts = opts or RepoOptions()
    opts.check()
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not opts.overwrite:
        raise OutputError(f"{out_dir}: already exists; pass --overwrite to replace it")
    # only an earlier repository of ours holding nothing else, never the bundle it is made from
    check_replaceable(out_dir, REPO_KIND, REPO_KIND, [bundle.path])
    cfg = bundle.config
    onnx_src = bundle.file(Stage.END_TO_END.graph, opts.precision)
    trt = _trt_engine(bundle, opts.precision)
    if opts.tensorrt and trt is None:
        raise BundleError(f"{bundle.path}: no end-to-end {opts.precision} TensorRT engine to put in the repository; "
                          f"build one with: asap build-engine {bundle.path} --stage {Stage.END_TO_END.cli}"
                          + (" --fp16" if opts.precision == "fp16" else ""))
    with_trt = trt is not None and opts.tensorrt is not False
    notes: list[str] = []
    if trt is None and opts.tensorrt is None:
        notes.append(f"no {opts.precision} end-to-end TensorRT engine in {bundle.path}: only the ONNX Runtime model "
                     f"was written (asap build-engine {bundle.path} --stage {Stage.END_TO_END.cli} adds one)")
    with staged_dir(out_dir, REPO_KIND, inputs=[bundle.path]) as tmp:
        models: dict[str, dict[str, Any]] = {}
        configs = {ONNX_MODEL: config_text(ONNX_MODEL, "onnxruntime", cfg, opts, opts.kind)}
        (tmp / ONNX_MODEL / "1").mkdir(parents=True)
        shutil.copyfile(onnx_src, tmp / ONNX_MODEL / "1" / "model.onnx")
        models[ONNX_MODEL] = {"backend": "onnxruntime", "kind": opts.kind, "source": onnx_src.name,
                              "sha256": sha256_file(onnx_src)}
        if with_trt:
            flavor, engine_path = trt
            vdir = tmp / TRT_MODEL / "1"
            vdir.mkdir(parents=True)
            shutil.copytree(bundle.path, vdir / "bundle", ignore=shutil.ignore_patterns(".*", "*.partial-*"))
            (vdir / "model.py").write_text(PYTHON_MODEL, encoding="utf-8")
            inputs, _ = model_io(cfg)
            from asap_deploy.app.serve import DEFAULT_MAX_PIXELS

            settings = {"precision": opts.precision, "flavor": flavor, "inputs": [n for n, _, _ in inputs],
                        "max_pixels": DEFAULT_MAX_PIXELS}
            (vdir / "asap_model.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
            configs[TRT_MODEL] = config_text(TRT_MODEL, "python", cfg, opts, "gpu")
            models[TRT_MODEL] = {"backend": "python", "kind": "gpu", "engine": engine_path.name, "flavor": flavor,
                                 "sha256": sha256_file(engine_path)}
        for name, text in configs.items():
            parse_config(text, f"{name}/config.pbtxt")  # Triton's own schema, before anything is renamed into place
            (tmp / name / "config.pbtxt").write_text(text, encoding="utf-8")
        marker = {"written_by": "asap-deploy", "bundle": str(bundle.path), "bundle_manifest_sha256":
                  sha256_file(bundle.path / MANIFEST), "precision": opts.precision, "models": models,
                  "start": f"tritonserver --model-repository {out_dir}"}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return RepoResult(out_dir, models, notes)


def check_onnx_matches_config(model_path: Path, config) -> None:
    """BundleError unless every input/output of a parsed config exists in the ONNX graph with the
    same element type (what Triton's onnxruntime backend checks when it loads the model)."""
    import onnx
    from onnx import helper

    g = onnx.load(str(model_path), load_external_data=False).graph
    onnx_types = {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in list(g.input) + list(g.output)}
    from tritonclient.grpc import model_config_pb2

    for t in list(config.input) + list(config.output):
        want = model_config_pb2.DataType.Name(t.data_type)
        if t.name not in onnx_types:
            raise BundleError(f"{model_path}: the config declares {t.name!r}, which the graph lacks "
                              f"(it has {', '.join(sorted(onnx_types))})")
        got = TRITON_TYPES.get(np.dtype(onnx_types[t.name]).name)
        if got != want:
            raise BundleError(f"{model_path}: {t.name!r} is {got} in the graph, {want} in the config")
