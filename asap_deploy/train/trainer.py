"""The training loop: SPADE/pix2pixHD recipe for the ASAP-Net generator (ASAPNET.md, "Training").

One step = one generator update (hinge GAN + feature matching [+ VGG] [+ L1]) then one
discriminator update (hinge) on the same batch. The discriminator step reuses the generator
step's fake image (made before the G update) instead of running G again: it saves a forward pass.

Determinism: every random choice is a function of (--seed, step): model init from the seed, and
the samples of step k (and their crops/flips) from (seed, k). Nothing else draws random numbers,
so `--resume` continues to exactly the state an uninterrupted run reaches, and a data-parallel
run sees the same global batch as a single process.

Data parallel: `--batch-size` is the GLOBAL batch; process r of W takes rows [r*B/W, (r+1)*B/W).
Every loss is a batch mean, the generator and discriminator normalise per sample (instance norm)
and spectral norm's power iteration depends on the weights only, so the averaged gradients of W
processes equal the single-process gradient of the global batch up to float summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import read_state, save_atomic, save_generator
from ..config import ModelConfig
from ..errors import CheckpointError, OutputError, UsageError
from ..io import claim_files, owns_file, write_json, write_text
from ..model import ASAPNetGenerator, init_weights, label_channels
from .discriminator import MultiscaleDiscriminator
from .distributed import DistContext, any_true
from .losses import VGGLoss, feature_matching_loss, hinge_d_parts, hinge_g_loss, load_vgg19_features

STATE_FORMAT = "asap-deploy/train-state"
STATE_VERSION = 1
GENERATOR_FILE = "model.pt"
STATE_FILE = "train_state.pt"
LOG_FILE = "losses.jsonl"
CURVE_FILE = "loss_curve.png"
CONFIG_FILE = "config.json"
RUN_FILES = (GENERATOR_FILE, STATE_FILE, LOG_FILE, CURVE_FILE, CONFIG_FILE)  # what a run writes in --out
RUN_KIND = "training run"  # the ownership marker kind of a run folder (io.claim_files)


@dataclass
class TrainOptions:
    steps: int | None = None  # total steps (of the whole run, resumes included)
    minutes: float | None = None  # wall-clock budget of this invocation
    batch_size: int = 1  # global batch (all processes together)
    seed: int = 0
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    beta1: float = 0.0
    beta2: float = 0.9
    decay_steps: int | None = None  # linear LR decay to 0 over the last N steps; None: steps // 3
    lambda_gan: float = 1.0  # 0 turns the discriminator off (pure reconstruction training)
    lambda_feat: float = 10.0
    lambda_vgg: float = 10.0
    vgg_weights: str | None = None  # local torchvision VGG19 file; None: no perceptual loss
    lambda_l1: float = 0.0  # optional L1 to the target (the authors' --L1_loss); fast convergence on CPU
    ndf: int = 64
    num_d: int = 2
    n_layers_d: int = 4
    load_size: int | None = None
    flip: bool = False
    save_every: int = 500
    log_every: int = 10

    def validate(self) -> None:
        if self.steps is None and self.minutes is None:
            raise UsageError("give --steps or --minutes (or both: whichever comes first)")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be >= 1 (got {self.steps})")
        if self.minutes is not None and self.minutes <= 0:
            raise UsageError(f"--minutes must be > 0 (got {self.minutes})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.save_every < 1 or self.log_every < 1:
            raise UsageError("--save-every and --log-every must be >= 1")
        if self.decay_steps is not None and self.decay_steps < 0:
            raise UsageError(f"--decay-steps must be >= 0 (got {self.decay_steps})")

    @property
    def effective_decay_steps(self) -> int:
        if self.steps is None:
            return 0  # time-bounded runs have no known end: constant LR
        return self.steps // 3 if self.decay_steps is None else min(self.decay_steps, self.steps)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base LR at 0-based `step`: 1, then linear to 0 over the last decay steps."""
        d = self.effective_decay_steps
        if not d or self.steps is None:
            return 1.0
        start = self.steps - d
        return 1.0 if step < start else max(0.0, (self.steps - step) / d)


# Options a resumed run may change; all others come from the saved state.
RESUME_OVERRIDABLE = ("steps", "minutes", "save_every", "log_every")


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[tuple[int, int]]:
    """(sample index, augmentation seed) for the global batch of `step`: epochs of seeded permutations."""
    out = []
    cache: dict[int, np.ndarray] = {}
    for j in range(global_batch):
        pos = step * global_batch + j
        epoch, k = divmod(pos, n)
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed, 7, epoch]).permutation(n)
        out.append((int(cache[epoch][k]), pos))
    return out


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


def init_discriminator(d: nn.Module, gain: float = 0.02) -> None:
    """Xavier-normal (gain 0.02) on every conv, zero biases; spectral-norm convs initialise their
    original weight (the normalised one is derived from it)."""
    for m in d.modules():
        if isinstance(m, nn.Conv2d):
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.xavier_normal_(w, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Trainer:
    """Builds G, D, optimisers and losses; `run()` trains and writes checkpoints to `out_dir`."""

    def __init__(self, cfg: ModelConfig, opts: TrainOptions, dataset, out_dir: str | Path,
                 ctx: DistContext | None = None):
        opts.validate()
        self.cfg, self.opts, self.dataset = cfg, opts, dataset
        self.out = Path(out_dir)
        self.ctx = ctx or DistContext()
        if opts.batch_size % self.ctx.world_size:
            raise UsageError(f"--batch-size {opts.batch_size} must be divisible by the number of processes "
                             f"({self.ctx.world_size})")
        self.device = torch.device(self.ctx.device)
        torch.manual_seed(opts.seed)
        g = ASAPNetGenerator(cfg)
        init_weights(g)
        self.use_d = opts.lambda_gan > 0 or opts.lambda_feat > 0
        d = MultiscaleDiscriminator(cfg.n_lowres_inputs + cfg.output_nc, opts.num_d, opts.ndf, opts.n_layers_d)
        init_discriminator(d)
        self.g_raw, self.d_raw = g.to(self.device), d.to(self.device)
        self.opt_g = torch.optim.Adam(self.g_raw.parameters(), lr=opts.lr_g, betas=(opts.beta1, opts.beta2))
        self.opt_d = torch.optim.Adam(self.d_raw.parameters(), lr=opts.lr_d, betas=(opts.beta1, opts.beta2))
        self.vgg = VGGLoss(load_vgg19_features(opts.vgg_weights)).to(self.device) if opts.vgg_weights else None
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g = DDP(self.g_raw, device_ids=ids)
            self.d = DDP(self.d_raw, device_ids=ids) if self.use_d else self.d_raw
        else:
            self.g, self.d = self.g_raw, self.d_raw
        self.step = 0
        self.history: list[dict[str, float]] = []

    # ---- one step ------------------------------------------------------------------------------
    def local_batch(self, step: int):
        from ..data import collate

        idx = batch_indices(step, len(self.dataset), self.opts.batch_size, self.opts.seed)
        per = self.opts.batch_size // self.ctx.world_size
        mine = idx[self.ctx.rank * per:(self.ctx.rank + 1) * per]
        labels, inst, image = collate([self.dataset[(i, [self.opts.seed, 11, pos])] for i, pos in mine])
        return (labels.to(self.device), None if inst is None else inst.to(self.device), image.to(self.device))

    def _set_lr(self, step: int) -> None:
        f = self.opts.lr_factor(step)
        for group in self.opt_g.param_groups:
            group["lr"] = self.opts.lr_g * f
        for group in self.opt_d.param_groups:
            group["lr"] = self.opts.lr_d * f

    def train_step(self, labels: torch.Tensor, instances: torch.Tensor | None, real: torch.Tensor) -> dict[str, float]:
        o = self.opts
        self.g.train()
        self.d_raw.train()
        self._set_lr(self.step)
        sem = self.g_raw.encode(label_channels(labels, self.cfg), instances)  # one-hot (+ edges)
        fake = self.g(labels, instances)
        losses: dict[str, torch.Tensor] = {}
        if self.use_d:
            # Fake and real go through D as one batch (one spectral-norm power iteration per step).
            # The G step uses the unwrapped D: its gradients are not wanted (backward(inputs=G)).
            preds = self.d_raw(torch.cat([torch.cat([sem, fake], 1), torch.cat([sem, real], 1)], 0))
            n = fake.shape[0]
            pred_fake = [[t[:n] for t in p] for p in preds]
            pred_real = [[t[n:] for t in p] for p in preds]
            if o.lambda_gan > 0:
                losses["G_gan"] = hinge_g_loss(pred_fake) * o.lambda_gan
            if o.lambda_feat > 0:
                losses["G_feat"] = feature_matching_loss(pred_fake, pred_real, o.lambda_feat)
        if self.vgg is not None:
            losses["G_vgg"] = self.vgg(fake, real) * o.lambda_vgg
        if o.lambda_l1 > 0:
            losses["G_l1"] = F.l1_loss(fake, real) * o.lambda_l1
        if not losses:
            raise UsageError("every generator loss is switched off (GAN, feature matching, VGG and L1 weights are 0)")
        g_total = sum(losses.values())
        self.opt_g.zero_grad(set_to_none=True)
        g_total.backward(inputs=list(self.g_raw.parameters()))
        self.opt_g.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        if self.use_d:
            fake_d = fake.detach()
            preds = self.d(torch.cat([torch.cat([sem, fake_d], 1), torch.cat([sem, real], 1)], 0))
            n = fake_d.shape[0]
            d_real, d_fake = hinge_d_parts([[t[n:] for t in p] for p in preds], [[t[:n] for t in p] for p in preds])
            self.opt_d.zero_grad(set_to_none=True)
            (d_fake + d_real).backward()
            self.opt_d.step()
            out["D_fake"], out["D_real"] = float(d_fake.detach()), float(d_real.detach())
        self.step += 1
        return out

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step,
                "config": self.cfg.to_dict(), "options": dataclasses.asdict(self.opts),
                "G": self.g_raw.state_dict(), "D": self.d_raw.state_dict(),
                "opt_G": self.opt_g.state_dict(), "opt_D": self.opt_d.state_dict(),
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g_raw.load_state_dict(state["G"])
        self.d_raw.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_G"])
        self.opt_d.load_state_dict(state["opt_D"])
        self.step = int(state["step"])
        self.history = [dict(h) for h in state["history"]]

    def save(self) -> dict[str, Path]:
        """Write model.pt, train_state.pt, losses.jsonl and loss_curve.png (atomically; main process only)."""
        paths = {"generator": self.out / GENERATOR_FILE, "state": self.out / STATE_FILE,
                 "log": self.out / LOG_FILE, "curve": self.out / CURVE_FILE, "config": self.out / CONFIG_FILE}
        if not self.ctx.is_main:
            return paths
        self._make_out_dir()
        self.check_run_files()  # a file may have appeared since the run started
        claim_files(self.out, RUN_KIND, RUN_FILES)  # before writing: an interrupted save is still ours
        save_generator(self.g_raw, paths["generator"], extra={"step": self.step, "seed": self.opts.seed})
        save_atomic(self.state_dict(), paths["state"])
        write_text(paths["log"], "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history))
        write_json(paths["config"], self.cfg.to_dict())
        if self.history:
            from .plot import plot_losses

            plot_losses(self.history, paths["curve"])
        return paths

    def _make_out_dir(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot create the run folder ({exc.strerror or exc})") from exc

    def check_run_files(self) -> None:
        """OutputError unless every file a save would replace in the run folder was written by asap
        (listed in the folder's ownership marker): a user's own model.pt/config.json is never replaced."""
        for name in RUN_FILES:
            p = self.out / name
            if os.path.lexists(p) and not owns_file(p):
                raise OutputError(f"{p}: exists and was not written by asap train; refusing to replace it: "
                                  "move it or choose another --out")

    # ---- the loop --------------------------------------------------------------------------------
    def _saved(self) -> None:
        self.save()
        self.saved_step = self.step

    @staticmethod
    @contextlib.contextmanager
    def _sigint_at_step_boundary():
        """A first Ctrl-C only sets a flag (checked between steps, so the state that is saved is never
        half a step: G updated but not D, or a checkpoint half written); a second one interrupts at
        once. Off the main thread (signals cannot be caught there) nothing changes."""
        pending = []
        if threading.current_thread() is not threading.main_thread():
            yield pending
            return

        def on_sigint(signum, frame):
            pending.append(signum)
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C: the usual KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield pending
        finally:
            signal.signal(signal.SIGINT, previous)

    def run(self, on_step: Callable[[int, int | None, dict[str, float]], None] | None = None,
            stop_at: int | None = None) -> dict[str, Any]:
        """Train until `opts.steps` (or the time budget, or `stop_at`); checkpoint every save_every steps,
        at the end, and on Ctrl-C. Returns a summary."""
        o = self.opts
        t0 = time.monotonic()
        start = self.step
        last: dict[str, float] = {}
        self.saved_step = start if start > 0 else None  # a resumed run starts from its saved state
        consistent = True  # False while a step or a checkpoint is half done
        if self.ctx.is_main:
            self._make_out_dir()  # an unwritable --out fails now, not at the first checkpoint
            self.check_run_files()
        try:
            with self._sigint_at_step_boundary() as pending:
                while True:
                    if pending:
                        raise KeyboardInterrupt
                    consistent = False
                    if o.steps is not None and self.step >= o.steps:
                        break
                    if stop_at is not None and self.step >= stop_at:
                        break
                    if o.minutes is not None and any_true(time.monotonic() - t0 >= o.minutes * 60, self.ctx):
                        break
                    last = self.train_step(*self.local_batch(self.step))
                    if self.step % o.log_every == 0 or self.step == 1:
                        self.history.append({"step": self.step, **last})
                    if self.step % o.save_every == 0:
                        self._saved()
                    consistent = True
                    if on_step is not None:
                        on_step(self.step, o.steps, last)
        except KeyboardInterrupt:
            if consistent:  # the work so far survives Ctrl-C; --resume continues from here
                self._saved()
            # else (a second Ctrl-C mid-step): the last complete checkpoint stays as it is
            raise TrainingInterrupted(self.saved_step, self.out / STATE_FILE) from None
        if last and (not self.history or self.history[-1]["step"] != self.step):
            self.history.append({"step": self.step, **last})
        paths = self.save()
        elapsed = time.monotonic() - t0
        return {"steps": self.step, "steps_this_run": self.step - start, "seconds": elapsed,
                "last_losses": last, "paths": {k: str(v) for k, v in paths.items()}}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `Trainer.run`: `step` is the step saved in `state_path` (None: no checkpoint
    yet, the run starts over), the one `--resume` continues from."""

    def __init__(self, step: int | None, state_path: Path):
        super().__init__(f"interrupted; saved step: {step}")
        self.step, self.state_path = step, Path(state_path)


def read_train_state(path: str | Path) -> dict[str, Any]:
    state = read_state(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not an asap-deploy training state (expected {STATE_FILE} written by asap train)")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {state.get('version')!r} is not supported")
    return state


def resume_options(state: dict[str, Any], given: TrainOptions) -> TrainOptions:
    """The saved options, with only the RESUME_OVERRIDABLE fields taken from `given`."""
    saved = dict(state["options"])
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    saved = {k: v for k, v in saved.items() if k in known}
    for k in RESUME_OVERRIDABLE:
        saved[k] = getattr(given, k)
    return TrainOptions(**saved)


def check_training_data(dataset, progress: Callable[[int, int], None] | None = None) -> None:
    """Check a folder data set before step 1 (PairedDataset.check: one DatasetError naming every bad
    file). Other datasets (in-memory ones in tests) have nothing to read and pass as they are."""
    from ..data import PairedDataset

    if isinstance(dataset, PairedDataset):
        dataset.check(progress)


def build_trainer(cfg: ModelConfig | None, opts: TrainOptions, dataset_factory, out_dir: str | Path,
                  ctx: DistContext | None = None, resume: bool = False,
                  on_check: Callable[[int, int], None] | None = None) -> Trainer:
    """A Trainer, fresh or resumed from `out_dir/train_state.pt`. `dataset_factory(cfg, opts)` makes the data.

    A folder data set (PairedDataset) is checked in full first, resumes included: every pair read once,
    every problem in one DatasetError (exit 5), before any model is allocated or anything is written
    to `out_dir` (a bad pair drawn at step 5000 would lose the steps since the last checkpoint).
    `on_check(done, total)` reports the check's progress."""
    out = Path(out_dir)
    state = None
    if resume:
        path = out / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: nothing to resume (no training state in {out})")
        state = read_train_state(path)
        saved_cfg = ModelConfig.from_dict(state["config"])
        if cfg is not None and cfg != saved_cfg:
            diff = [f"{k}: run {v!r}, given {cfg.to_dict()[k]!r}" for k, v in saved_cfg.to_dict().items()
                    if cfg.to_dict()[k] != v]
            raise CheckpointError(f"{path}: the run was trained with another model config: " + "; ".join(diff))
        cfg = saved_cfg
        opts = resume_options(state, opts)
    elif cfg is None:
        raise UsageError("give --preset or --config (or --resume a run)")
    elif (out / STATE_FILE).exists():
        raise UsageError(f"{out} already holds a training run ({STATE_FILE}); pass --resume to continue it "
                         "or choose another --out")
    else:  # a fresh run replaces nothing, ours or not
        for name in RUN_FILES:
            if os.path.lexists(out / name):
                raise OutputError(f"{out / name}: already exists; a new run never replaces files (asap train "
                                  "--resume continues a run of asap's): choose another --out")
    dataset = dataset_factory(cfg, opts)
    check_training_data(dataset, on_check)
    trainer = Trainer(cfg, opts, dataset, out, ctx)
    if state is not None:
        trainer.load_state_dict(state)
    return trainer

