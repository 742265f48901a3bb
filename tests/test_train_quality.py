"""The quality claim, as a (slow) regression test: the demo recipe on the synthetic set beats the
per-class mean colour by >= 3 dB of held-out PSNR. Step-bounded (not timed) and seeded."""

from __future__ import annotations

import pytest

from asap_deploy.data import PairedDataset, find_samples
from asap_deploy.app.demo import demo_options
from asap_deploy.synthetic_dataset import make_dataset
from asap_deploy.train import small_config
from asap_deploy.train.evaluate import quality_report
from asap_deploy.train.trainer import Trainer


@pytest.mark.slow
def test_small_model_beats_per_class_mean_by_3db(tmp_path):
    make_dataset(tmp_path / "data", n_train=200, n_val=50, size=64, n_classes=6, seed=0)
    cfg = small_config(6, 64)
    train = PairedDataset(find_samples(tmp_path / "data", "train")[1], cfg, augment=True)
    val = PairedDataset(find_samples(tmp_path / "data", "val")[1], cfg)
    t = Trainer(cfg, demo_options(minutes=None, steps=300, seed=0), train, tmp_path / "run")
    before = quality_report(t.g_raw, val, 6)
    assert before["psnr_model"] < before["psnr_class_mean"]  # an untrained model does not
    for _ in range(300):
        t.train_step(*t.local_batch(t.step))
    q = quality_report(t.g_raw, val, 6)
    assert q["psnr_class_mean"] > q["psnr_constant_mean"] + 3  # the classes do carry colour
    assert q["psnr_model"] >= q["psnr_class_mean"] + 3.0, q
