"""Two TensorRT-RTX builds in one process never share a kernel pack: the builder hands each parsed
network's SpatialMLP plugins their own pack (plugins/tensorrt.py `attach_kernels`), nothing goes
through the creator or a module global. CPU only (ahead-of-time build)."""

from __future__ import annotations

import json
import struct
import threading

import pytest

from asap_deploy.config import ModelConfig
from asap_deploy.engines import build as eb
from asap_deploy.export.bundle import export_model, load_bundle
from asap_deploy.plugins.plugin_core import KernelPack
from asap_deploy.random_model import random_generator

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'asap-deploy[rtx]')")

CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, crop_size=256, learned_ds_factor=8,
                  lr_width=8, lr_max_width=8, lr_depth=1, hr_width=16, hr_depth=3)  # S=16, tiny MLP


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(export_model(random_generator(CFG, 5), tmp_path_factory.mktemp("iso") / "bundle").path)


@pytest.fixture(scope="module")
def kcache(tmp_path_factory):
    return tmp_path_factory.mktemp("kcache")


def _pack_in(engine: bytes) -> bytes:
    i = engine.find(b"ASAPKPK1")
    assert i >= 0, "no kernel pack in the engine"
    (n,) = struct.unpack("<I", engine[i + 8:i + 12])
    header = json.loads(engine[i + 12:i + 12 + n])
    end = i + 12 + n + sum(e["cubin"][1] + e["ptx"][1] for e in header["kernels"])
    return engine[i:end]


def test_interleaved_networks_keep_their_own_packs(bundle, kcache):
    """Parse A, parse B, then give each its pack and build both: each engine holds exactly its own."""
    from asap_deploy.plugins import tensorrt as tp
    from asap_deploy.plugins import trt_compat

    trt_compat.ensure_rtx_parser_lib()
    tp.register(trt)
    packs = {"fp32": eb.plugin_kernels(CFG, [86], [("fp32", "fp32")], kcache),
             "fp16": eb.plugin_kernels(CFG, [86], [("fp16", "fp16")], kcache)}
    logger = trt.Logger(trt.Logger.ERROR)
    nets = {}
    for prec in packs:  # both parsed before either gets kernels
        builder = trt.Builder(logger)
        net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(net, logger)
        assert parser.parse(bundle.file("pixelwise", prec).read_bytes())
        nets[prec] = (builder, net, parser)
    for prec, (_, net, _) in nets.items():
        assert tp.attach_kernels(trt, net, packs[prec]) == ["spatial_mlp"]
        assert tp.attach_kernels(trt, net, packs[prec]) == []  # given once; a second call changes nothing
    for prec, (builder, net, _) in nets.items():
        config = builder.create_builder_config()
        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.ComputeCapability.SM86, 0)
        prof = builder.create_optimization_profile()
        for i in range(net.num_inputs):
            t = net.get_input(i)
            p = eb.default_profile(CFG.S).for_input(t.name, CFG.S, CFG.num_params)
            prof.set_shape(t.name, p["min"], p["opt"], p["max"])
        config.add_optimization_profile(prof)
        engine = builder.build_serialized_network(net, config)
        assert engine is not None
        assert _pack_in(bytes(engine)) == packs[prec].to_bytes(), prec


def test_two_builds_in_threads_do_not_race(bundle, kcache, tmp_path):
    """build_engines for fp32 and fp16 at the same time in one process: each engine carries the
    kernels of its own precision, as its sidecar says."""
    profile = eb.make_profile(16, "1x16x16", "1x32x32", "1x64x64")
    results, errors = {}, []
    start = threading.Barrier(2)

    def build(fp16: bool) -> None:
        try:
            start.wait()
            opts = eb.BuildOptions(flavor="rtx", stage="pixelwise", fp16=fp16, archs=[86], profile=profile,
                                   out_dir=tmp_path / ("fp16" if fp16 else "fp32"), kernel_cache=kcache)
            (opts.out_dir).mkdir()
            results[fp16] = eb.build_engines(bundle, opts)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(f,)) for f in (False, True)]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert not errors, errors
    for fp16, want in ((False, ("fp32", "fp32")), (True, ("fp16", "fp16"))):
        (built,) = results[fp16]
        pack = _pack_in(built.path.read_bytes())
        assert KernelPack.from_bytes(pack).dtypes() == [want]
        assert eb.sha256_bytes(pack) == built.sidecar["plugin"]["kernel_pack_sha256"]
