"""The torch-cuda backend (engines/torch_cuda.py) without a GPU: the CUDA-graph logic with the graph
operations replaced by a stand-in, the fp16 predictor's placement rules, the whole engine on the CPU
(fused kernel through the Triton interpreter) against the PyTorch fp32 reference at the thresholds
of `asap validate`, the registry's choices with availability stand-ins, and what a CPU-only machine
is told. What only a GPU shows (torch.cuda.graph capture, pinned copies, timings) is checked by
benchmarks/gpu_check.py."""

from __future__ import annotations

import re
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from asap_deploy.config import ModelConfig  # noqa: E402
from asap_deploy.engines import registry  # noqa: E402
from asap_deploy.engines import torch_cuda as tc  # noqa: E402
from asap_deploy.engines.base import IMAGE, IMAGE_FLOAT  # noqa: E402
from asap_deploy.engines.torch_engine import TorchEngine  # noqa: E402
from asap_deploy.engines.validate import THRESHOLDS, cosine, psnr_u8  # noqa: E402
from asap_deploy.errors import InputError, MissingDependencyError, UsageError  # noqa: E402
from asap_deploy.random_model import random_generator, random_label_maps  # noqa: E402

# S = 16, a small low-res stream (the predictor is not what is slow in the interpreter)
CFG = ModelConfig(label_nc=6, crop_size=256, lr_width=16, lr_max_width=32, lr_depth=2)
DONTCARE = ModelConfig(label_nc=5, crop_size=256, lr_width=8, lr_max_width=16, lr_depth=1, contain_dontcare_label=True)


class FakeGraphOps(tc.GraphOps):
    """Stands in for torch.cuda graphs: `capture` runs fn once (as the capture records it) and keeps
    its outputs; `replay` runs fn again and writes the results INTO those outputs, as a replay
    rewrites the graph's static buffers (so an engine that did not read its static inputs, or
    returned something other than the graph's outputs, would give stale results here).
    `fail_at`: capture number (1-based) that raises half-way, after the work began."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.capturing, self.started, self.released, self.live = fail_at, False, 0, 0, set()

    def capture(self, fn):
        self.started += 1
        self.capturing = True
        try:
            out = fn()
            if self.started == self.fail_at:
                raise RuntimeError("operation not permitted when stream is capturing")
        finally:
            self.capturing = False  # the real capture is ended on the way out too
        g = object()
        self.live.add(g)
        return (g, fn, out), out

    def replay(self, graph):
        g, fn, out = graph
        assert g in self.live, "replay of a released graph"
        for k, v in fn().items():
            out[k].copy_(v)

    def release(self, graph):
        self.live.discard(graph[0])
        self.released += 1


def model(cfg=CFG, seed=0):
    return random_generator(cfg, seed)


# ---- the graph cache alone ---------------------------------------------------------------------------
def test_graph_cache_eager_then_capture_then_replay_bounded():
    ops, notes = FakeGraphOps(), []
    cache = tc.GraphCache(ops, 2, True, lambda k, t: notes.append(t))
    runs = []

    def build(key):
        return lambda: tc.Entry(key, {"x": torch.tensor([float(key[0])])}, {})

    def compute(e):
        runs.append(e.key)
        return {"y": e.dev_in["x"] * 2}

    a = cache.entry((1,), build((1,)))
    assert float(cache.call(a, compute)["y"]) == 2 and cache.eager == 1 and cache.captures == 0
    a.dev_in["x"].fill_(5.0)  # new input in the same static buffer
    assert float(cache.call(a, compute)["y"]) == 10 and cache.captures == 1 and cache.replays == 1
    a.dev_in["x"].fill_(7.0)
    assert float(cache.call(a, compute)["y"]) == 14 and cache.replays == 2 and cache.captures == 1
    b = cache.entry((2,), build((2,)))
    cache.call(b, compute)
    cache.call(b, compute)  # second key captured too: two graphs live
    assert len(ops.live) == 2 and list(cache.entries) == [(1,), (2,)]
    assert cache.entry((1,), build((1,))) is a  # a hit moves it to the end
    c = cache.entry((3,), build((3,)))  # beyond max_entries: the least recently used (2,) is dropped
    assert list(cache.entries) == [(1,), (3,)] and ops.released == 1 and len(ops.live) == 1
    assert c.runs == 0 and not notes
    cache.clear()
    assert not cache.entries and not ops.live


def test_graph_cache_failed_capture_ends_it_and_runs_eagerly_from_then_on():
    ops, notes = FakeGraphOps(fail_at=1), []
    cache = tc.GraphCache(ops, 4, True, lambda k, t: notes.append((k, t)))
    e = cache.entry(("k",), lambda: tc.Entry(("k",), {"x": torch.ones(2)}, {}))

    def compute(entry):
        return {"y": entry.dev_in["x"] + 1}

    for i in range(4):
        e.dev_in["x"].fill_(float(i))
        assert torch.equal(cache.call(e, compute)["y"], torch.full((2,), i + 1.0))
        assert not ops.capturing
    assert ops.started == 1 and not cache.enabled and e.graph is None and cache.eager == 4
    assert len(notes) == 1 and notes[0][0] == "cuda_graph" and "capture failed" in notes[0][1]
    assert "not permitted when stream is capturing" in notes[0][1]
    f = cache.entry(("other",), lambda: tc.Entry(("other",), {"x": torch.ones(2)}, {}))
    for _ in range(3):
        cache.call(f, compute)
    assert ops.started == 1  # a new shape does not try again


# ---- the fp16 predictor ------------------------------------------------------------------------------
def test_fp16_predictor_keeps_every_normalisation_in_fp32():
    m = model()
    half = tc.half_predictor(m.lowres_stream)
    norms = [n for n, x in m.lowres_stream.named_modules() if isinstance(x, torch.nn.InstanceNorm2d)]
    assert norms and tc.fp32_modules(half) == [f"{n}.inner" for n in norms]
    for name, p in half.named_parameters():
        assert p.dtype == (torch.float32 if ".inner." in name else torch.float16), name
    convs = [x for x in half.modules() if isinstance(x, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))
    assert all(p.dtype == torch.float32 for p in m.lowres_stream.parameters())  # the original is untouched
    # the norms see fp32 inputs and give back fp16
    seen = []
    for x in half.modules():
        if isinstance(x, torch.nn.InstanceNorm2d):
            x.register_forward_hook(lambda mod, i, o: seen.append((i[0].dtype, o.dtype)))
    lab, _ = random_label_maps(CFG, 2, 64, 64, seed=3)
    ids = torch.from_numpy(lab.astype(np.int64))
    with torch.inference_mode():
        x = m.lowres_input(ids, None)
        ref = m.lowres_stream(x)
        got = half(x.to(torch.float16, memory_format=torch.channels_last))
    assert got.dtype == torch.float16 and seen and set(seen) == {(torch.float32, torch.float32)}
    c = cosine(ref.numpy(), got.float().numpy())
    assert c >= THRESHOLDS["fp16"].params_cosine, c


# ---- the whole engine on the CPU ---------------------------------------------------------------------
def engine(m, precision, **kw):
    kw.setdefault("graph_ops", FakeGraphOps())
    return tc.TorchCudaEngine(m, precision, "cpu", interpret=precision == "fp16", **kw)


def test_fp16_engine_fused_kernel_in_the_interpreter_matches_the_reference_at_64x64():
    m = model(seed=1)
    ref, e = TorchEngine(m), engine(m, "fp16")
    assert e.fused and e.describe()["pixelwise"] == "fused Triton kernel (interpreter)"
    t = THRESHOLDS["fp16"]
    for seed in range(3):  # eager, capture + replay, replay: each on new label maps of one shape
        lab, _ = random_label_maps(CFG, 1, 64, 64, seed=seed)
        img = e.run(lab)
        want = ref.run(lab)
        assert img.dtype == np.uint8 and img.shape == (1, 64, 64, 3)
        assert psnr_u8(want, img) >= t.psnr_db, (seed, psnr_u8(want, img))
    assert (e.cache.eager, e.cache.captures, e.cache.replays) == (1, 1, 2)
    # the pixelwise stage alone, fed the reference's grid (as validate does)
    lab, _ = random_label_maps(CFG, 1, 64, 64, seed=9)
    params = ref.predict_params(lab)
    got, want = e.pixelwise(lab, params), ref.pixelwise(lab, params)
    err = np.abs(got[IMAGE_FLOAT] - want[IMAGE_FLOAT])
    assert float(err.max()) <= 1.5e-2 and float(err.mean()) <= t.mean_abs, (err.max(), err.mean())
    assert psnr_u8(want[IMAGE], got[IMAGE]) >= t.psnr_db
    p = e.predict_params(lab)
    assert p.dtype == np.float32 and p.shape == params.shape and cosine(params, p) >= t.params_cosine
    assert not e.notes


def test_fp32_engine_equals_the_reference_through_graph_replays_and_evictions():
    m = model(seed=2)
    ref, e = TorchEngine(m), engine(m, "fp32", max_graphs=2)
    assert not e.fused and e.describe()["predictor"] == "fp32 (TF32 off)"
    for i, (n, h, w) in enumerate([(2, 32, 48), (1, 48, 32), (2, 32, 48)]):
        for j in range(2):  # the second call of a signature is captured and replayed
            lab, _ = random_label_maps(CFG, n, h, w, seed=10 + 2 * i + j)
            g, want = e.generate(lab), ref.generate(lab)
            np.testing.assert_allclose(g[IMAGE_FLOAT], want[IMAGE_FLOAT], atol=1e-6, rtol=0)
            assert np.array_equal(g[IMAGE], want[IMAGE])
        np.testing.assert_allclose(e.predict_params(lab), ref.predict_params(lab), atol=1e-6, rtol=0)
    # generate + predictor per shape through a cache of 2: each new shape drops the oldest graph,
    # and the first shape, seen again, is captured again
    assert (e.cache.captures, e.cache.replays, e.cache.ops.released) == (3, 3, 2)
    assert len(e.cache.entries) == 2
    e.close()
    assert not e.cache.entries and not e.cache.ops.live


def test_dontcare_ids_and_instance_free_inputs_on_the_device_path():
    m = model(DONTCARE, seed=4)
    ref, e = TorchEngine(m), engine(m, "fp32")
    lab, _ = random_label_maps(DONTCARE, 1, 32, 48, seed=5)
    lab[0, :8, :8] = 255
    for _ in range(3):
        np.testing.assert_allclose(e.generate(lab)[IMAGE_FLOAT], ref.generate(lab)[IMAGE_FLOAT], atol=1e-6, rtol=0)


def test_a_failing_capture_is_said_once_and_the_engine_runs_on():
    m = model(seed=5)
    ref, e = TorchEngine(m), engine(m, "fp32", graph_ops=FakeGraphOps(fail_at=1))
    lab, _ = random_label_maps(CFG, 1, 32, 32, seed=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [e.run(lab) for _ in range(4)]
        lab2, _ = random_label_maps(CFG, 1, 48, 32, seed=7)
        e.run(lab2)
        e.run(lab2)
    assert all(np.array_equal(o, ref.run(lab)) for o in outs)
    assert not e.cache.ops.capturing and e.cache.ops.started == 1 and not e.cuda_graph
    assert len(e.notes) == 1 and "CUDA graph capture failed" in e.notes[0]
    said = [w for w in caught if "CUDA graph" in str(w.message)]
    assert len(said) == 1 and e.describe()["notes"] == e.notes and e.describe()["cuda_graph"] is False


def test_calls_from_several_threads_share_the_engine_safely():
    m = model(seed=6)
    ref, e = TorchEngine(m), engine(m, "fp32")
    maps = [random_label_maps(CFG, 1, 32, 32, seed=20 + i)[0] for i in range(6)]
    want = [ref.run(x) for x in maps]
    got: dict[int, np.ndarray] = {}

    def work(i):
        got[i] = e.run(maps[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(np.array_equal(got[i], want[i]) for i in range(6))


def test_options_are_checked():
    m = model()
    with pytest.raises(UsageError, match="runs fp32, fp16, not 'int8'"):
        tc.TorchCudaEngine(m, "int8", "cpu", graph_ops=FakeGraphOps())
    with pytest.raises(UsageError, match="max_graphs"):
        tc.TorchCudaEngine(m, "fp32", "cpu", graph_ops=FakeGraphOps(), max_graphs=0)
    with pytest.raises(UsageError, match="needs graph_ops"):
        tc.TorchCudaEngine(m, "fp32", "cpu")
    e = tc.TorchCudaEngine(m, "fp32", "cpu", cuda_graph=False)
    with pytest.raises(UsageError, match="unknown call kind"):
        e.prepared("everything", np.zeros((1, 16, 16), np.uint8))
    with pytest.raises(InputError, match=r"parameter grid has shape \(1, 3, 1, 1\), expected"):
        e.prepared("pixelwise", np.zeros((1, 16, 16), np.uint8), params=np.zeros((1, 3, 1, 1), np.float32))


def test_prepared_calls_run_the_device_work_of_a_stage():
    """What benchmarks time: inputs uploaded once, then eager / capture / replays of one stage."""
    m = model(seed=7)
    ref, e = TorchEngine(m), engine(m, "fp32")
    lab, _ = random_label_maps(CFG, 1, 32, 48, seed=8)
    run = e.prepared("image", lab)
    outs = [run()[IMAGE].clone() for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs) and (e.cache.eager, e.cache.captures) == (1, 1)
    assert np.array_equal(outs[0].numpy(), ref.run(lab))
    params = ref.predict_params(lab)
    pix = e.prepared("pixelwise", lab, params=params)
    assert np.array_equal(pix()[IMAGE].numpy(), ref.pixelwise(lab, params)[IMAGE])
    pred = e.prepared("predictor", lab)
    np.testing.assert_allclose(pred()["params"].numpy(), params, atol=1e-6, rtol=0)


# ---- a machine without a GPU -------------------------------------------------------------------------
def test_cpu_only_machines_are_told_why(monkeypatch):
    ok, why = tc.torch_cuda_runtime()
    if not torch.cuda.is_available():
        assert not ok and ("CPU-only build" in why or "sees no CUDA device" in why), why
        with pytest.raises(MissingDependencyError, match=re.escape("the torch-cuda backend needs PyTorch on a CUDA GPU: " + why)):
            tc.TorchCudaEngine(model(), "fp16")
        assert registry.BY_NAME["torch-cuda"].available() == (False, why)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU-only build" in tc.torch_cuda_runtime()[1]
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tc.torch_cuda_runtime() == (False, f"PyTorch {torch.__version__} (CUDA 13.0) sees no CUDA device "
                                              "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from asap_deploy.engines import machine

    real = machine.importable
    monkeypatch.setattr(machine, "importable", lambda name: name != "triton" and real(name))
    assert tc.torch_cuda_runtime() == (False, "Triton is not installed (pip install 'asap-deploy[gpu]'): the fused "
                                              "pixelwise kernel needs it")


# ---- the registry: auto, validate, bench -------------------------------------------------------------
def stand_ins(monkeypatch, *, cuda: bool, trt: bool = False, ort_cuda: bool = False):
    monkeypatch.setattr(registry, "torch_cuda_runtime", lambda: (cuda, "stand-in GPU" if cuda else "no GPU (stand-in)"))
    monkeypatch.setattr(registry, "tensorrt_usable", lambda b, p: (trt, "engines (stand-in)" if trt else "no engine"))
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if ort_cuda else ["CPUExecutionProvider"]
    monkeypatch.setattr(registry, "_ort_providers", lambda: providers)


def test_registry_row_and_auto_order():
    b = registry.BY_NAME["torch-cuda"]
    assert b.engine == "torch-cuda" and b.selectable and b.gpu is True and b.precisions == ("fp32", "fp16")
    assert "torch-cuda" in registry.ENGINE_NAMES and "torch-cuda" in registry.CHOICES
    order = [x.name for x in registry.auto_order("fp32")]
    assert order.index("tensorrt") < order.index("torch-cuda") < order.index("onnxruntime-cuda") < order.index("onnxruntime")
    assert registry.TORCH_CUDA is b


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_auto_picks_torch_cuda_after_tensorrt_and_before_onnxruntime_cuda(monkeypatch, tmp_path, precision):
    src = registry.Source(bundle=tmp_path)
    stand_ins(monkeypatch, cuda=True, ort_cuda=True)
    c = registry.choose_backend("auto", src, precision)
    assert c.backend == "torch-cuda" and c.reason == "PyTorch on the GPU (fused kernel, CUDA graphs): stand-in GPU"
    assert c.skipped == ["tensorrt: no engine"]
    stand_ins(monkeypatch, cuda=True, trt=True, ort_cuda=True)
    assert registry.choose_backend("auto", src, precision).backend == "tensorrt"
    stand_ins(monkeypatch, cuda=False, ort_cuda=True)
    c = registry.choose_backend("auto", src, precision)
    assert c.backend == "onnxruntime-cuda" and "torch CUDA: no GPU (stand-in)" in c.skipped
    assert registry.choose_backend("torch-cuda", src, precision).backend == "torch-cuda"


def test_model_checkpoints_can_name_torch_cuda(monkeypatch, tmp_path):
    src = registry.Source(model=tmp_path / "model.pt")
    stand_ins(monkeypatch, cuda=True)
    assert registry.choose_backend("auto", src).backend == "torch"  # auto keeps the CPU reference for --model
    c = registry.choose_backend("torch-cuda", src, "fp16")
    assert c.backend == "torch-cuda" and "torch-cuda" in c.reason
    stand_ins(monkeypatch, cuda=False)
    with pytest.raises(MissingDependencyError, match="--model needs the torch-cuda backend: no GPU"):
        registry.choose_backend("torch-cuda", src)
    with pytest.raises(UsageError, match=r"--model runs on the torch \(or torch-cuda\) backend only"):
        registry.choose_backend("onnxruntime", src)


def test_validate_and_bench_take_it(monkeypatch, tmp_path):
    from asap_deploy.engines import bench, validate

    assert validate.validation_backends(["torch-cuda"], "fp16") == ["torch-cuda"]
    assert "torch-cuda" in validate.precision_backends("fp16") and "torch-cuda" in bench.BENCH_BACKENDS
    stand_ins(monkeypatch, cuda=True)
    assert "torch-cuda" in bench.default_backends(tmp_path, "fp16")
    stand_ins(monkeypatch, cuda=False)
    assert "torch-cuda" not in bench.default_backends(tmp_path, "fp16")
    assert not bench.row_threads_apply("torch-cuda")  # a GPU row: --threads does not govern it
