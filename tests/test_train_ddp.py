"""Data-parallel training (DistributedDataParallel, gloo, 2 CPU processes) equals one process on the
same global batch.

Why equality holds in principle: every loss is a batch mean and DDP averages gradients, so with equal
shards the averaged gradient IS the global-batch gradient; the generator and discriminator use
instance norm (per-sample statistics, nothing shared across the batch); spectral norm's power
iteration depends on the weights only (and DDP broadcasts its u/v buffers from rank 0); sample
order and crops are functions of (seed, step). What remains is float summation order, hence a
small tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import TINY, RandomPairs, tiny_opts  # noqa: E402

from asap_deploy.train.distributed import DistContext  # noqa: E402
from asap_deploy.train.trainer import Trainer  # noqa: E402

STEPS = 2


def _opts():
    return tiny_opts(steps=STEPS, batch_size=4, lambda_l1=1.0, save_every=100, seed=7, decay_steps=0)


def _snapshot(t: Trainer) -> dict:
    """Weights and the gradients the last step used (DDP leaves the averaged ones in .grad)."""
    snap = {}
    for net, m in (("G", t.g_raw), ("D", t.d_raw)):
        snap[net] = {k: v.clone() for k, v in m.state_dict().items()}
        snap[net + "_grad"] = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    return snap


def _run(t: Trainer) -> list[dict]:
    snaps = []
    for _ in range(STEPS):
        t.train_step(*t.local_batch(t.step))
        snaps.append(_snapshot(t))
    return snaps


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        t = Trainer(TINY, _opts(), RandomPairs(n=8), Path(out) / "ddp", DistContext(rank, world, rank, "cpu"))
        torch.save(_run(t), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _close(a: dict, b: dict, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{what}.{k}: {m}")


def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
    torch.set_num_threads(1)
    single = _run(Trainer(TINY, _opts(), RandomPairs(n=8), tmp_path / "single"))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for step in range(STEPS):
        for key in r0[step]:
            for k in r0[step][key]:
                assert torch.equal(r0[step][key][k], r1[step][key][k]), f"ranks disagree on {key}.{k}"
    # Gradients of step 1 (G's and D's) and generator weights after every step: equal up to float
    # summation order.
    _close(r0[0]["G_grad"], single[0]["G_grad"], "G grad step 1", rtol=1e-4, atol=1e-7)
    _close(r0[0]["D_grad"], single[0]["D_grad"], "D grad step 1", rtol=1e-4, atol=1e-7)
    for step in range(STEPS):
        _close(r0[step]["G"], single[step]["G"], f"G after step {step + 1}")
    # D's weights after step 1: Adam with beta1 = 0 moves every weight by ~lr * sign(grad) on its
    # first step, so a gradient that is zero up to float noise may move either way: bound by 2 lr_d.
    _close(r0[0]["D"], single[0]["D"], "D after step 1", rtol=0, atol=2 * _opts().lr_d + 1e-6)
    init = Trainer(TINY, _opts(), RandomPairs(n=8), tmp_path / "init").g_raw.state_dict()
    assert sum(int(not torch.equal(init[k], v)) for k, v in single[-1]["G"].items()) > 10  # weights did move


def test_each_process_takes_its_share_of_the_global_batch():
    ds = RandomPairs(n=8)
    full = Trainer(TINY, _opts(), ds, "unused").local_batch(3)[0]
    parts = []
    for r in range(2):
        t = Trainer(TINY, _opts(), ds, "unused")
        t.ctx = DistContext(r, 2, r, "cpu")  # only the sharding is under test here (no process group)
        parts.append(t.local_batch(3)[0])
    assert torch.equal(torch.cat(parts), full)
