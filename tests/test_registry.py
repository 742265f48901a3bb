"""The backend registry (engines/registry.py), the stage spellings (export/stages.py) and the engine
file name (engines/engine_file.py): one table each, and every command reads it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from asap_deploy.engines import registry
from asap_deploy.engines.engine_file import EngineFile, engine_glob, engine_name
from asap_deploy.errors import UsageError
from asap_deploy.export.stages import GRAPHS, KEYS, Stage
from asap_deploy.precisions import PRECISIONS


def test_every_backend_has_every_field():
    assert registry.NAMES == ("torch", "onnxruntime", "onnxruntime-cuda", "tensorrt", "openvino", "torch-cuda")
    for b in registry.BACKENDS:
        assert b.name and b.label and b.engine in registry.ENGINE_NAMES, b
        assert b.precisions and set(b.precisions) <= set(PRECISIONS) and "fp32" in b.precisions, b
        assert b.stages == tuple(Stage), b
        assert isinstance(b.scale, bool) and b.gpu in (True, False, None), b
        assert callable(b.check) and callable(b.opener) and b.auto_reason, b
        assert b.providers == () or b.engine == "onnxruntime", b  # providers are ONNX Runtime's
    assert registry.ENGINE_NAMES == ("torch", "onnxruntime", "tensorrt", "openvino", "torch-cuda")
    assert registry.CHOICES == ("auto", "torch", "onnxruntime", "tensorrt", "openvino", "torch-cuda")
    assert registry.SCALE_ENGINES == ("torch", "onnxruntime", "openvino")
    assert registry.BY_NAME["onnxruntime-cuda"].providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert registry.BY_NAME["torch"].precisions == ("fp32",)
    assert registry.BY_NAME["openvino"].precisions == ("fp32", "bf16", "int8")  # bf16: the fp32 graphs + a hint


def test_auto_order_is_fastest_first():
    assert [b.name for b in registry.AUTO_ORDER] == ["tensorrt", "torch-cuda", "onnxruntime-cuda", "onnxruntime", "openvino",
                                                    "torch"]
    # the same order at every precision but int8, where OpenVINO goes ahead of ONNX Runtime on the CPU
    # (measured; the registry's comment)
    assert all(registry.auto_order(p) == registry.AUTO_ORDER for p in PRECISIONS if p != "int8")
    assert [b.name for b in registry.auto_order("int8")] == ["tensorrt", "torch-cuda", "onnxruntime-cuda", "openvino",
                                                            "onnxruntime", "torch"]
    assert len({b.auto_rank for b in registry.BACKENDS}) == len(registry.BACKENDS)  # no ties


def test_availability_reasons_on_this_machine(tmp_path):
    """Every check answers (ok, reason) without raising; what is missing says why."""
    for b in registry.BACKENDS:
        for where in (None, tmp_path):
            ok, why = b.available(where, "fp32")
            assert isinstance(ok, bool) and isinstance(why, str), (b.name, where)
            assert ok or why, (b.name, where)
    providers = registry.ort_providers()
    assert registry.BY_NAME["onnxruntime"].available() == (True, "CPUExecutionProvider available")
    cuda_ok, why = registry.BY_NAME["onnxruntime-cuda"].available()
    assert cuda_ok == ("CUDAExecutionProvider" in providers)
    if not cuda_ok:
        assert why == "CUDAExecutionProvider not available (pip install onnxruntime-gpu)"
    torch_ok, why = registry.BY_NAME["torch"].available()
    assert torch_ok == (importlib.util.find_spec("torch") is not None) and (torch_ok or "PyTorch" in why)
    # TensorRT with a bundle folder: its engines come first (an empty folder has none)
    assert registry.TENSORRT.available(tmp_path, "fp16") == (
        False, f"no fp16 engine in {tmp_path} (build one with: asap build-engine {tmp_path})")
    (tmp_path / engine_name("asap", "fp16", "rtx")).write_bytes(b"")
    ok, why = registry.TENSORRT.available(tmp_path, "fp16")
    assert ok == registry.tensorrt_runtime()[0]
    assert why == (f"1 engine(s) in {tmp_path}, GPU present" if ok else registry.tensorrt_runtime()[1])
    assert registry.usable_backends() == [b.name for b in registry.BACKENDS if b.available()[0]]


def test_names_and_capabilities_are_checked():
    with pytest.raises(UsageError, match=r"did you mean 'onnxruntime'.*choose from: torch, onnxruntime, tensorrt, "
                                         r"openvino, torch-cuda"):
        registry.check_backend("onnxruntme")
    with pytest.raises(UsageError, match="choose from: torch, onnxruntime, onnxruntime-cuda, tensorrt, openvino, torch-cuda"):
        registry.backend("tvm")
    registry.check_scale_capable("onnxruntime")
    with pytest.raises(UsageError, match=r"^--scale runs on the torch, onnxruntime and openvino backends, not "
                                         r"tensorrt \(pass --backend openvino or --backend onnxruntime or --backend "
                                         r"torch\)$"):
        registry.check_scale_capable("tensorrt")


def test_bench_and_doctor_read_the_registry(tmp_path, monkeypatch):
    from asap_deploy.engines import bench

    assert bench.BENCH_BACKENDS == ("authors",) + registry.NAMES
    monkeypatch.setattr(registry, "_ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(registry, "tensorrt_usable", lambda b, p: (False, "no engine"))
    assert bench.default_backends(tmp_path, "fp32") == ["torch", "onnxruntime", "onnxruntime-cuda"]
    assert bench.default_backends(tmp_path, "fp32", engine_given=True)[-1] == "tensorrt"
    monkeypatch.setattr(registry, "_ort_providers", lambda: ["CPUExecutionProvider"])
    assert bench.default_backends(tmp_path, "fp32") == ["torch", "onnxruntime"]
    from asap_deploy.app.doctor import check_onnxruntime

    c = check_onnxruntime()
    assert c.detail == "providers: CPUExecutionProvider" and "onnxruntime-gpu" in c.fix


# ---- stages ---------------------------------------------------------------------------------------
def test_stage_spellings_are_written_once():
    assert [(s.cli, s.key, s.graph) for s in Stage] == [("predictor", "predictor", "predictor"),
                                                         ("pixelwise", "pixelwise", "pixelwise"),
                                                         ("end-to-end", "end_to_end", "asap")]
    assert KEYS == ("predictor", "pixelwise", "end_to_end") and GRAPHS == ("predictor", "pixelwise", "asap")
    for s in Stage:
        assert Stage.from_graph(s.graph) is s and Stage.from_key(s.key) is s
    from asap_deploy.engines import bench, build, validate
    from asap_deploy.export import graphs

    assert bench.STAGES == validate.STAGES == KEYS and graphs.GRAPH_NAMES == GRAPHS
    assert build.STAGES == {"predictor": ("predictor",), "pixelwise": ("pixelwise",), "end-to-end": ("asap",),
                            "all": ("predictor", "pixelwise", "asap")}
    assert build.rebuild_command({"graph": "asap", "bundle": {"path": "B"}, "tensorrt": {"flavor": "rtx"},
                                  "precision": "fp16"}) == "asap build-engine B --stage end-to-end --flavor rtx --fp16 --overwrite"


# ---- engine file names -------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("flavor", ["tensorrt", "rtx"])
def test_engine_name_round_trip(stage, precision, flavor, tmp_path):
    ef = EngineFile(stage.graph, precision, flavor)
    assert ef.name == engine_name(stage.graph, precision, flavor) == f"{stage.graph}.{precision}.{flavor}.engine"
    assert EngineFile.parse(ef.name) == ef and EngineFile.parse(tmp_path / ef.name) == ef
    assert (tmp_path / ef.name).match(engine_glob(precision))
    assert ef.graphs == ((stage.graph,) if stage is Stage.END_TO_END else ("predictor", "pixelwise"))


@pytest.mark.parametrize("name", ["asap.fp32.engine", "asap.fp32.rtx.plan", "a.asap.fp32.rtx.engine", "asap"])
def test_engine_name_parser_refuses_other_names(name):
    with pytest.raises(UsageError, match=rf"^{name}: not an engine written by asap build-engine "
                                         r"\(GRAPH\.PRECISION\.FLAVOR\.engine\)$"):
        EngineFile.parse(Path(name))
