"""`asap infer --ray ADDRESS`: the same translation as `asap infer`, spread over a Ray cluster.

Ray Data streams the input paths through `map_batches` with an actor pool: each actor opens one
Engine (a GPU per actor when the backend runs on CUDA) and runs `asap_deploy.app.infer.infer` on its
batch of paths, so decoding, validation, padding, batching, atomic writes and per-file errors are
exactly those of local `asap infer` (outputs are byte-identical). Only small rows travel back to
the driver: input, output, error, note per file. The output folder must be reachable by every
node (local mode, or a shared file system).

ADDRESS: "local" starts a private Ray instance on this machine (num_cpus = --ray-cpus, default all);
"auto" joins the cluster this machine belongs to; "ray://HOST:10001" a remote cluster.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import AsapError, InputError, MissingDependencyError, UsageError
from .infer import (Choice, FileResult, InferOptions, InferSummary, Source, check_out_dir, check_outputs_are_not_inputs,
                    check_skip_existing, choose_backend, discover_inputs, input_identities, output_path,
                    remove_if_empty)


@dataclass
class RayOptions:
    address: str = "local"
    actors: int = 2            # size of the actor pool (one Engine each)
    files_per_batch: int = 16  # paths handed to an actor per call
    num_cpus: int | None = None  # local mode: CPUs Ray may use (None: all)
    cpus_per_actor: float = 1.0

    def check(self) -> None:
        if self.actors < 1:
            raise UsageError(f"--ray-actors must be >= 1 (got {self.actors})")
        if self.files_per_batch < 1:
            raise UsageError(f"files per batch must be >= 1 (got {self.files_per_batch})")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise UsageError(f"--ray-cpus must be >= 1 (got {self.num_cpus})")
        if self.address != "local" and self.address != "auto" and "://" not in self.address and ":" not in self.address:
            raise UsageError(f"--ray {self.address!r}: give local, auto, HOST:PORT or ray://HOST:PORT")


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError("asap infer --ray needs Ray Data: pip install 'asap-deploy[ray]'") from exc
    return ray


def init_ray(opts: RayOptions):
    """ray.init for `opts.address` (reuses an initialised Ray); returns the ray module."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    kwargs = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    try:
        if opts.address == "local":
            ray.init(num_cpus=opts.num_cpus or os.cpu_count(), **kwargs)
        else:
            ray.init(address=opts.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot start or join Ray at {opts.address!r}: {exc}") from exc
    return ray


class _Translator:
    """One Ray actor: one Engine, reused for every batch of paths it is given."""

    def __init__(self, source: Source, options: InferOptions, backend: str, choice: Choice, cpu_threads: int):
        from .infer import open_engine

        self.source, self.options, self.backend, self.choice = source, options, backend, choice
        # --threads, else as many CPU threads as the CPUs Ray reserved for this actor: by default an
        # engine takes every core, and actors sharing a node would oversubscribe it
        self.engine, _ = open_engine(choice, source, options.precision, cpu_threads=cpu_threads)

    def __call__(self, batch: dict) -> dict:
        from .infer import infer

        paths = [str(p) for p in batch["path"]]
        try:
            s = infer(paths, self.source, self.options, self.backend, engine=self.engine, choice=self.choice)
            by_input = {str(r.input): r for r in s.results}
            rows = [by_input.get(p) or FileResult(Path(p), error=f"{p}: not processed") for p in paths]
        except AsapError as exc:  # a failure of the whole call (e.g. output folder): every file of the batch
            rows = [FileResult(Path(p), error=f"{p}: {exc.message}") for p in paths]
        return {"input": [str(r.input) for r in rows], "output": [str(r.output) if r.output else "" for r in rows],
                "error": [r.error or "" for r in rows], "note": [r.note or "" for r in rows],
                "skipped": [bool(r.skipped) for r in rows]}


def ray_infer(inputs: Sequence[str | os.PathLike], source: Source, options: InferOptions, backend: str = "auto",
              ray_options: RayOptions | None = None, progress: Callable[[int, int, FileResult], None] | None = None
              ) -> InferSummary:
    """Translate `inputs` on Ray; the summary has one FileResult per input, like `infer`."""
    ropts = ray_options or RayOptions()
    ropts.check()
    if options.batch_size < 1:
        raise UsageError(f"--batch must be >= 1 (got {options.batch_size})")
    if options.fail_fast:
        raise UsageError("--fail-fast is not available with --ray (files run in parallel on many actors)")
    check_skip_existing(options)
    choice = choose_backend(backend, source, options.precision, options.scale)
    paths, problems = discover_inputs(inputs)
    if not paths and not problems:
        raise UsageError("no inputs given")
    out_dir = Path(options.out_dir)
    check_outputs_are_not_inputs(paths, out_dir, input_identities(paths, source, options))
    created = check_out_dir(out_dir)
    try:
        return _ray_infer(paths, problems, source, options, backend, ropts, progress, choice, out_dir)
    finally:
        remove_if_empty(created)


def _ray_infer(paths, problems, source: Source, options: InferOptions, backend: str, ropts: RayOptions, progress,
               choice: Choice, out_dir: Path) -> InferSummary:
    """`ray_infer` once its output folder exists."""
    t0 = time.perf_counter()
    results: list[FileResult] = [FileResult(Path(spec), error=msg) for spec, msg in problems]
    # outputs are named after the input's stem: same-name inputs would overwrite each other across actors
    owners: dict[str, Path] = {}
    todo: list[str] = []  # absolute paths: actors need not share the driver's working directory
    given: dict[str, Path] = {}
    for p in paths:
        key = output_path(out_dir, p).name
        if key in owners:
            results.append(FileResult(p, error=f"{p}: its output {out_dir / key} would overwrite the output of "
                                               f"{owners[key]} (same file name); rename one of them"))
            continue
        owners[key] = p
        todo.append(str(p.resolve()))
        given[todo[-1]] = p
    total = len(results) + len(todo)
    for i, r in enumerate(results):
        if progress:
            progress(i + 1, total, r)
    if todo:
        ray = init_ray(ropts)
        from ..engines import registry

        gpu = registry.backend(choice.backend).gpu  # None: torch, on the GPU where one is here
        gpu = _cuda_here() if gpu is None else gpu
        ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=min(len(todo), 4 * ropts.actors))
        from dataclasses import replace

        absolute = replace(options, out_dir=out_dir.resolve(),
                           instances=Path(options.instances).resolve() if options.instances else None,
                           hires_labels=Path(options.hires_labels).resolve() if options.hires_labels else None)
        src = Source(*(Path(v).resolve() if v is not None else None for v in (source.model, source.bundle, source.engine)))
        out = ds.map_batches(_Translator, fn_constructor_args=(src, absolute, backend, choice,
                                                                options.cpu_threads or max(1, int(ropts.cpus_per_actor))),
                             batch_size=ropts.files_per_batch, batch_format="numpy", concurrency=ropts.actors,
                             num_cpus=ropts.cpus_per_actor, num_gpus=1 if gpu else 0)
        try:
            for row in out.iter_rows():
                error = row["error"].replace(row["input"], str(given.get(row["input"], row["input"]))) or None
                r = FileResult(given.get(row["input"], Path(row["input"])),
                               output=out_dir / Path(row["output"]).name if row["output"] else None,
                               error=error, note=row["note"] or None, skipped=bool(row["skipped"]))
                results.append(r)
                if progress:
                    progress(len(results), total, r)
        except Exception as exc:  # noqa: BLE001 - Ray wraps actor failures in its own exception types
            raise InputError(f"the Ray job failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500]}") from exc
    order = {p: i for i, p in enumerate([spec for spec, _ in problems] + [str(p) for p in paths])}
    results.sort(key=lambda r: order.get(str(r.input), len(order)))
    return InferSummary(results, choice.backend, f"{choice.reason}; on Ray ({ropts.address}, {ropts.actors} actor(s))",
                        choice.skipped, time.perf_counter() - t0)


def _cuda_here() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
