"""Training: losses against hand-computed values, discriminator shapes, the loop (loss goes down,
resume is exact, checkpoints load), VGG weights from a local file only, and data-parallel equivalence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from asap_deploy.checkpoints import load_generator
from asap_deploy.config import ModelConfig
from asap_deploy.errors import CheckpointError, InputError, OutputError, UsageError
from asap_deploy.io import MARKER, read_marker
from asap_deploy.train.discriminator import MultiscaleDiscriminator
from asap_deploy.train.losses import (VGGLoss, feature_matching_loss, hinge_d_loss, hinge_d_parts, hinge_g_loss,
                                      load_vgg19_features, vgg19_features)
from asap_deploy.train.trainer import (RUN_FILES, STATE_FILE, TrainOptions, Trainer, batch_indices, build_trainer,
                                       read_train_state)

TINY = ModelConfig(label_nc=3, crop_size=32, learned_ds_factor=2, lr_width=4, lr_max_width=8, lr_depth=1,
                   hr_width=8, hr_depth=3)


class RandomPairs:
    """In-memory dataset: random label maps and images, deterministic from an index."""

    def __init__(self, n: int = 6, cfg: ModelConfig = TINY, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        h = cfg.crop_size
        self.labels = torch.randint(0, cfg.label_nc, (n, h, h), generator=g)
        self.images = torch.rand((n, 3, h, h), generator=g) * 2 - 1

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return self.labels[i], None, self.images[i]


def tiny_opts(**kw) -> TrainOptions:
    base = dict(steps=4, batch_size=2, ndf=8, num_d=2, n_layers_d=4, save_every=2, log_every=1, decay_steps=2)
    base.update(kw)
    return TrainOptions(**base)


# ---- losses -------------------------------------------------------------------------------------
def test_hinge_losses_hand_computed():
    real = torch.tensor([[0.5, 2.0], [-1.0, 1.0]])
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])
    feat = torch.zeros(1)
    # relu(1 - real) = [.5, 0, 2, 0] -> .625 ; relu(1 + fake) = [0, 1, 1.5, .5] -> .75
    d1 = hinge_d_loss([[feat, real]], [[feat, fake]])
    assert math.isclose(float(d1), 0.625 + 0.75, rel_tol=1e-6)
    r, f = hinge_d_parts([[feat, real]], [[feat, fake]])
    assert math.isclose(float(r), 0.625, rel_tol=1e-6) and math.isclose(float(f), 0.75, rel_tol=1e-6)
    # two scales: the mean over scales; second scale: relu(1-3)=0, relu(1+(-3))=0
    d2 = hinge_d_loss([[feat, real], [feat, torch.full((2, 2), 3.0)]], [[feat, fake], [feat, torch.full((2, 2), -3.0)]])
    assert math.isclose(float(d2), (0.625 + 0.75) / 2, rel_tol=1e-6)
    g = hinge_g_loss([[feat, fake], [feat, torch.full((1, 3), 2.0)]])
    assert math.isclose(float(g), (0.5 + -2.0) / 2, rel_tol=1e-6)  # -mean(fake) = 0.5 ; -2 ; mean


def test_feature_matching_oracle():
    rng = np.random.default_rng(0)
    fake = [[torch.tensor(rng.normal(size=s)) for s in [(2, 4, 5, 5), (2, 8, 3, 3), (2, 1, 4, 4)]] for _ in range(2)]
    real = [[torch.tensor(rng.normal(size=t.shape)) for t in scale] for scale in fake]
    want = 0.0
    for fs, rs in zip(fake, real):
        for f, r in list(zip(fs, rs))[:-1]:  # logits excluded
            want += np.abs(f.numpy() - r.numpy()).mean() * 10.0 / 2
    got = feature_matching_loss(fake, real, 10.0)
    assert math.isclose(float(got), want, rel_tol=1e-9)


@pytest.mark.parametrize("size,num_d", [(32, 2), (64, 2), (64, 3)])
def test_discriminator_shapes(size, num_d):
    cin = TINY.n_lowres_inputs + 3
    d = MultiscaleDiscriminator(cin, num_d=num_d, ndf=8, n_layers=4, ndf_max=32)
    out = d(torch.randn(2, cin, size, size))
    assert len(out) == num_d
    s = size
    for scale in out:
        assert len(scale) == 5  # 4 conv layers + the logit conv, all returned
        # k4 p2: stride 2 -> floor(s/2)+1 ; stride 1 -> s+1
        exp = [s // 2 + 1]
        exp.append(exp[-1] // 2 + 1)
        exp.append(exp[-1] // 2 + 1)
        exp.append(exp[-1] + 1)
        exp.append(exp[-1] + 1)
        assert [t.shape[-1] for t in scale] == exp
        assert [t.shape[1] for t in scale] == [8, 16, 32, 32, 1]
        s = (s + 1) // 2  # avg-pool 3/2/1
    sn = [m for m in d.modules() if hasattr(m, "parametrizations")]
    assert len(sn) == 3 * num_d  # spectral norm on the three middle convs of every scale


def test_vgg_missing_file_names_it(tmp_path):
    missing = tmp_path / "vgg19-dcbb9e9d.pth"
    with pytest.raises(InputError, match="vgg19-dcbb9e9d.pth.*not found"):
        load_vgg19_features(missing)
    with pytest.raises(InputError, match="vgg19-dcbb9e9d.pth"):
        Trainer(TINY, tiny_opts(vgg_weights=str(missing)), RandomPairs(), tmp_path / "run")


def test_vgg_loads_torchvision_layout(tmp_path):
    torch.manual_seed(0)
    feats = vgg19_features()
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    path = tmp_path / "vgg19.pth"
    torch.save(sd, path)
    loaded = load_vgg19_features(path)
    assert [k for k in loaded.state_dict()] == [k for k in feats.state_dict()]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), feats.state_dict().values()))
    loss = VGGLoss(loaded)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == 0.0
    assert float(loss(x, -x)) > 0.0
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="not torchvision VGG19"):
        load_vgg19_features(tmp_path / "bad.pth")


# ---- schedule and sampling ----------------------------------------------------------------------
def test_lr_schedule_linear_decay():
    o = TrainOptions(steps=9, decay_steps=3)
    assert [o.lr_factor(s) for s in range(9)] == [1, 1, 1, 1, 1, 1, 1.0, 2 / 3, 1 / 3]
    assert TrainOptions(steps=9).effective_decay_steps == 3  # default: the last third (200 + 100 epochs)
    assert TrainOptions(minutes=1.0).lr_factor(10**6) == 1.0  # unknown end: constant


def test_batch_indices_cover_each_epoch_once_and_are_deterministic():
    n, gb = 7, 3
    seen = [i for step in range(7) for i, _ in batch_indices(step, n, gb, seed=5)]  # 21 = 3 epochs
    for e in range(3):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
    assert batch_indices(4, n, gb, 5) == batch_indices(4, n, gb, 5)
    assert [i for i, _ in batch_indices(0, 100, 8, 1)] != [i for i, _ in batch_indices(0, 100, 8, 2)]


def test_options_validation():
    with pytest.raises(UsageError, match="--steps or --minutes"):
        TrainOptions().validate()
    with pytest.raises(UsageError, match="divisible"):
        from asap_deploy.train.distributed import DistContext

        Trainer(TINY, tiny_opts(batch_size=3), RandomPairs(), "unused", DistContext(0, 2, 0, "cpu"))


# ---- the loop -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gan", [0.0, 1.0])
def test_training_reduces_loss_on_a_fixed_batch(tmp_path, gan):
    torch.manual_seed(0)
    ds = RandomPairs(n=2)
    # a learnable target: a colour per class
    ds.images = torch.tensor([[-0.8, 0.2, 0.9], [0.5, -0.5, 0.0], [0.9, 0.9, -0.9]])[ds.labels].permute(0, 3, 1, 2)
    t = Trainer(TINY, tiny_opts(steps=40, lr_g=3e-3, lr_d=3e-3, lambda_l1=100.0, lambda_gan=gan, lambda_feat=10 * gan,
                                decay_steps=0, save_every=1000), ds, tmp_path / "run")
    batch = t.local_batch(0)
    first = t.train_step(*batch)
    for _ in range(39):
        last = t.train_step(*batch)
    assert last["G_l1"] < 0.6 * first["G_l1"], (first, last)
    assert set(last) == ({"G_gan", "G_feat", "G_l1", "D_fake", "D_real"} if gan else {"G_l1"})


def _all_tensors(state):
    out = {}
    for part in ("G", "D"):
        for k, v in state[part].items():
            out[f"{part}.{k}"] = v
    for part in ("opt_G", "opt_D"):
        for pid, s in state[part]["state"].items():
            for k, v in s.items():
                out[f"{part}.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def test_resume_reaches_the_uninterrupted_state(tmp_path):
    ds = RandomPairs(n=5)
    opts = tiny_opts(steps=4, batch_size=2, lambda_l1=1.0, seed=3)
    full = Trainer(TINY, opts, ds, tmp_path / "full")
    full.run()
    # The interrupted run: stops after its step-2 checkpoint, then a new process resumes it.
    part = Trainer(TINY, tiny_opts(steps=4, batch_size=2, lambda_l1=1.0, seed=3), ds, tmp_path / "part")
    part.run(stop_at=2)
    assert read_train_state(tmp_path / "part" / STATE_FILE)["step"] == 2
    resumed = build_trainer(None, tiny_opts(steps=4, batch_size=2, seed=999, lambda_l1=0.0), lambda c, o: ds,
                            tmp_path / "part", resume=True)
    assert resumed.step == 2 and resumed.opts.seed == 3 and resumed.opts.lambda_l1 == 1.0  # saved options win
    resumed.run()
    a = _all_tensors(read_train_state(tmp_path / "full" / STATE_FILE))
    b = _all_tensors(read_train_state(tmp_path / "part" / STATE_FILE))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = (tmp_path / "full" / "losses.jsonl").read_text()
    assert la == (tmp_path / "part" / "losses.jsonl").read_text()
    assert [json.loads(x)["step"] for x in la.splitlines()] == [1, 2, 3, 4]


def test_run_writes_loadable_outputs_and_refuses_to_clobber(tmp_path):
    ds = RandomPairs(n=4)
    out = tmp_path / "run"
    s = build_trainer(TINY, tiny_opts(steps=3, save_every=2), lambda c, o: ds, out).run()
    assert s["steps"] == 3
    for name in ("model.pt", "train_state.pt", "losses.jsonl", "loss_curve.png", "config.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != MARKER]  # no temp files left
    assert set(read_marker(out)["files"]) == set(RUN_FILES)  # the run folder says what asap wrote
    model, ck = load_generator(out / "model.pt")
    assert ck.config == TINY
    y = model(torch.randint(0, 3, (1, 32, 32)))
    assert y.shape == (1, 3, 32, 32)
    with pytest.raises(UsageError, match="--resume"):
        build_trainer(TINY, tiny_opts(), lambda c, o: ds, out)
    with pytest.raises(CheckpointError, match="label_nc"):
        build_trainer(TINY.replace(label_nc=4), tiny_opts(), lambda c, o: ds, out, resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        build_trainer(TINY, tiny_opts(), lambda c, o: ds, tmp_path / "empty", resume=True)


def test_same_seed_same_weights_different_seed_different(tmp_path):
    ds = RandomPairs(n=4)
    w = []
    for i, seed in enumerate((1, 1, 2)):
        t = Trainer(TINY, tiny_opts(steps=2, seed=seed, save_every=100), ds, tmp_path / f"r{i}")
        t.run()
        w.append(torch.cat([p.detach().reshape(-1) for p in t.g_raw.parameters()]))
    assert torch.equal(w[0], w[1])
    assert not torch.equal(w[0], w[2])


def test_generator_only_training_has_no_discriminator_losses(tmp_path):
    t = Trainer(TINY, tiny_opts(steps=1, lambda_gan=0, lambda_feat=0, lambda_l1=1.0), RandomPairs(), tmp_path / "r")
    assert set(t.train_step(*t.local_batch(0))) == {"G_l1"}
    t2 = Trainer(TINY, tiny_opts(steps=1, lambda_gan=0, lambda_feat=0), RandomPairs(), tmp_path / "r2")
    with pytest.raises(UsageError, match="switched off"):
        t2.train_step(*t2.local_batch(0))


def test_train_never_replaces_a_users_files(tmp_path):
    """A run folder holding the user's own model.pt / config.json (not written by asap): a new run
    refuses before any work, and so does a resumed one (the files are not in the run's marker)."""
    ds = RandomPairs(n=4)
    rng = np.random.default_rng(3)
    for name in ("model.pt", "config.json", "loss_curve.png"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        mine = rng.bytes(64)
        (d / name).write_bytes(mine)
        with pytest.raises(OutputError, match=f"{name}: already exists"):
            build_trainer(TINY, tiny_opts(steps=1), lambda c, o: ds, d)
        assert (d / name).read_bytes() == mine and sorted(x.name for x in d.iterdir()) == [name]
    # a real run of ours, then a user's file dropped over one of its outputs: --resume refuses it
    run = tmp_path / "run"
    build_trainer(TINY, tiny_opts(steps=1), lambda c, o: ds, run).run()
    (run / "config.json").unlink()
    (run / "config.json").write_text("my own notes")
    claimed = read_marker(run)
    claimed["files"].remove("config.json")
    (run / MARKER).write_text(json.dumps(claimed))
    with pytest.raises(OutputError, match="config.json: exists and was not written by asap train"):
        build_trainer(TINY, tiny_opts(steps=2), lambda c, o: ds, run, resume=True).run()
    assert (run / "config.json").read_text() == "my own notes"


def test_ctrl_c_says_which_step_was_saved_and_how_to_resume(tmp_path, monkeypatch):
    """Issue 14, item 5: Ctrl-C during `asap train` names the saved step and the --resume command."""
    from typer.testing import CliRunner

    from asap_deploy.cli import app
    from asap_deploy.synthetic_dataset import make_dataset
    from asap_deploy.train.trainer import Trainer

    make_dataset(tmp_path / "data", 2, 1, 32, 3, 0)
    real = Trainer.train_step

    def step(self, *a, **kw):
        if self.step == 3:
            raise KeyboardInterrupt  # mid-step 4: the step-2 checkpoint is the one that counts
        return real(self, *a, **kw)

    monkeypatch.setattr(Trainer, "train_step", step)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "data"), "--out", str(out), "--steps", "10",
                                 "--save-every", "2"])
    text = " ".join(r.output.split())
    assert r.exit_code == 130, r.output
    assert f"step 2 is saved in {out / 'train_state.pt'}" in text
    assert f"asap train --out {out} --resume --data {tmp_path / 'data'} --steps 10" in text
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run2"),
                                 "--steps", "10", "--save-every", "5"])
    assert r.exit_code == 130 and "nothing was saved" in " ".join(r.output.split()), r.output
