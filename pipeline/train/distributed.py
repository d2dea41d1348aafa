"""Data-parallel training (PyTorch's own: ``torch.distributed`` + ``torchrun``) for families whose loop is ours.

``train.device: "0,1"`` (GPUs) or ``"cpu:2"`` (processes on the CPU, for tests and CPU-only hosts) makes
:func:`pipeline.train.stage.train_model` start ``torchrun --standalone --nproc-per-node N`` (:func:`launch`); every rank
runs the family's own training function, which asks :func:`context` where it is. The same loop then runs on one
process or many, as in torchvision's detection references. Family-agnostic pieces, each small:

* :func:`device_plan` / :func:`launch` / :func:`main`: parse the device, start the ranks, the ranks' entry point;
* :func:`context`: rank, world size, device; ``init_process_group`` (NCCL on GPUs, gloo on CPU) under torchrun;
* :func:`train_sampler`: torch's ``DistributedSampler`` in every case (``num_replicas`` 1 on one process), so that
  rank r's k-th batch holds positions ``r, r + W, ...`` of the k-th global batch: with ``train.batch`` the *global*
  batch (split evenly over the ranks, as Ultralytics does), the ranks together see exactly the batches one process
  sees;
* :class:`SampleSeeds` / :class:`KeyedSamples`: per-sample randomness (augmentation draws) keyed by (seed, epoch,
  sample index) rather than by the order in which a process meets its samples, so a sample gets the same
  augmentation whichever rank (or data-loader worker) loads it;
* :func:`keyed_detection_sampling`: the same for the positive/negative anchor and proposal sampling of torchvision's
  two-stage detectors (RPN and RoI heads), keyed by each image's id;
* :func:`wrap`: ``DistributedDataParallel`` (rebuilt when the set of trainable tensors changes: progressive
  unfreezing), BatchNorm synchronised across GPUs (``SyncBatchNorm``; torch has none on CPU);
* :func:`mean_across`, :func:`broadcast`, :func:`barrier`, ``Context.main`` (the rank-0 guard).

Equivalence with one process (tests/model/test_ddp.py): the gradients DDP averages equal the one-process gradient of the
global batch when every rank's loss is the mean over as many terms as its share of the batch. For Faster R-CNN
that holds once each image contributes its full quota of sampled anchors (256) and proposals (512), which is the
case at usual input sizes; and only when no BatchNorm computes batch statistics in training (frozen groups run
BatchNorm in eval mode; on GPUs ``SyncBatchNorm`` computes them over the global batch; on CPU, trainable BatchNorm
layers normalise each rank's share alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, DetflowError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.config import Params
    from pipeline.contracts.results import TrainResult

log = logging.getLogger(__name__)
ENV_MARK = "DETFLOW_DDP"  # set by launch(): a rank of a detflow data-parallel run (not any torchrun job)
SPEC_ARG = "spec"


class DistributedTrainingError(DetflowError):
    """A rank failed; the message is the failing rank's error when it reported one."""


@dataclass(frozen=True)
class DevicePlan:
    """``train.device`` as processes: ``cuda`` with GPU indices, or ``cpu`` with a process count."""

    kind: str  # "cuda" | "cpu"
    ids: tuple[int, ...]  # GPU indices (cuda) or 0..N-1 (cpu)

    @property
    def world(self) -> int:
        return len(self.ids)

    @property
    def backend(self) -> str:
        return "nccl" if self.kind == "cuda" else "gloo"


def device_plan(device: str) -> DevicePlan | None:
    """The processes ``train.device`` asks for, or None for a single-process run (``auto``, ``cpu``, ``cuda``, one
    GPU index, ``cpu:1``). GPU indices are checked against the GPUs present
    (:func:`pipeline.train.devices.resolve_device`)."""
    device = str(device).strip()
    if device.startswith("cpu:"):
        n = int(device.removeprefix("cpu:"))
        return DevicePlan("cpu", tuple(range(n))) if n > 1 else None
    if device in ("auto", "cpu", "cuda") or "," not in device:
        return None
    from pipeline.train.devices import resolve_device

    ids = tuple(int(i) for i in resolve_device(device).split(","))
    return DevicePlan("cuda", ids) if len(ids) > 1 else None


def in_rank() -> bool:
    """True inside a rank that :func:`launch` started."""
    return os.environ.get(ENV_MARK) == "1" and "RANK" in os.environ and "WORLD_SIZE" in os.environ


# --- inside a rank ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run. ``world == 1``: no process group, nothing is communicated."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The rank that validates, logs and writes every file (checkpoints, metrics, the published run)."""
        return self.rank == 0

    def per_rank(self, batch: int) -> int:
        """This rank's share of the global batch ``train.batch`` (checked to divide evenly before launch)."""
        return batch // self.world

    def cpu_threads(self, threads: int) -> int:
        """Intra-op threads for this rank: the process's share of ``threads`` (ranks share the cores)."""
        return max(1, threads // self.world)


def context(device: str, single: Callable[[], torch.device]) -> Context:
    """This process's :class:`Context`: under :func:`launch` (``train.device`` "0,1" or "cpu:N") the process group
    is initialised here (once) and the device is this rank's GPU or the CPU; otherwise one process on the device
    ``single()`` chooses (the family's own rule for ``train.device``)."""
    import torch

    if not in_rank():
        return Context(rank=0, world=1, local_rank=0, device=single())
    import torch.distributed as dist

    plan = device_plan(device)
    if plan is None:
        raise ConfigError(f"a data-parallel rank was started with train.device {device!r}, which asks for one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if plan.kind == "cuda":
        torch.cuda.set_device(local_rank)  # launch() set CUDA_VISIBLE_DEVICES to the plan's GPUs, in order
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=plan.backend, device_id=dev if plan.kind == "cuda" else None)
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast(ctx: Context, value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank: decisions such as early stopping must agree."""
    if not ctx.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(ctx: Context, values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (per-rank mean losses -> the global batch's, for the logs)."""
    if not ctx.distributed or not values:
        return values
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / ctx.world for k, v in zip(keys, t.tolist(), strict=True)}


def train_sampler(dataset: Any, ctx: Context, seed: int) -> torch.utils.data.DistributedSampler:
    """The training order, the same definition on one process and on many: a permutation seeded by
    ``seed + epoch`` (call ``set_epoch`` before each epoch), rank r taking every W-th position. A split that is not a
    multiple of the world size is padded with repeated images (torch's rule; one process needs no padding)."""
    import torch

    return torch.utils.data.DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                               seed=seed, drop_last=False)


def wrap(model: nn.Module, ctx: Context, current: nn.Module | None = None) -> nn.Module:
    """The module to train with: ``model`` itself on one process, else ``DistributedDataParallel`` around it.

    DDP registers gradient hooks only for tensors that require grad when it is built, so ``current`` (the wrapper
    of the previous epoch) is kept only while the set of trainable tensors is the same. Building DDP broadcasts
    rank 0's weights, which are every rank's already (same seed, same steps).
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    if current is not None and getattr(current, "_detflow_trainable", None) == trainable:
        return current
    ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    ddp._detflow_trainable = trainable  # type: ignore[assignment]
    return ddp


def sync_batchnorm(model: nn.Module, ctx: Context) -> nn.Module:
    """BatchNorm over the global batch across GPUs (``SyncBatchNorm``, same state-dict keys); unchanged on CPU, where
    torch has no synchronised BatchNorm, and on one process."""
    if not ctx.distributed or ctx.device.type != "cuda":
        return model
    import torch

    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


# --- randomness keyed by the sample -------------------------------------------------------------------------------


class SampleSeeds:
    """Seeds that depend on (run seed, epoch, what, sample): not on which process meets the sample, or when."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def key(self, what: str, sample: int) -> int:
        blob = f"{self.seed}/{self.epoch}/{what}/{int(sample)}".encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


class KeyedSamples:
    """A dataset whose item ``i`` is drawn with torch's RNG seeded by ``seeds.key("sample", i)`` (and the caller's
    RNG state left as it was): torchvision's random transforms then give sample ``i`` the same augmentation in
    every process and data-loader worker."""

    def __init__(self, dataset: Any, seeds: SampleSeeds) -> None:
        self.dataset, self.seeds = dataset, seeds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seeds.key("sample", i))
            return self.dataset[i]


class _KeyedBalancedSampler:
    """torchvision's ``BalancedPositiveNegativeSampler`` (detection/_utils.py, same selection rule, re-written here
    because the original draws from the global RNG in batch order) with one generator per image, seeded from the
    image's id: the positives and negatives an image contributes do not depend on the rank it is on."""

    def __init__(self, original: Any, seeds: SampleSeeds, what: str) -> None:
        self.batch_size_per_image = original.batch_size_per_image
        self.positive_fraction = original.positive_fraction
        self.seeds, self.what = seeds, what
        self.image_ids: list[int] = []

    def __call__(self, matched_idxs: list[Any]) -> tuple[list[Any], list[Any]]:
        import torch

        if len(self.image_ids) != len(matched_idxs):
            raise DetflowError(f"{self.what} sampler: {len(matched_idxs)} images but {len(self.image_ids)} ids")
        pos_idx, neg_idx = [], []
        for image_id, matched in zip(self.image_ids, matched_idxs, strict=True):
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            gen = torch.Generator(device=matched.device)
            gen.manual_seed(self.seeds.key(self.what, image_id))
            perm1 = torch.randperm(positive.numel(), device=matched.device, generator=gen)[:num_pos]
            perm2 = torch.randperm(negative.numel(), device=matched.device, generator=gen)[:num_neg]
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[positive[perm1]] = 1
            neg_mask[negative[perm2]] = 1
            pos_idx.append(pos_mask)
            neg_idx.append(neg_mask)
        return pos_idx, neg_idx


def keyed_detection_sampling(model: nn.Module, seeds: SampleSeeds) -> int:
    """Give a torchvision two-stage detector (RPN / RoI heads with a ``fg_bg_sampler``) per-image sampling keyed by
    each target's ``image_id``; returns how many samplers were replaced (0 for a detector without them)."""
    samplers = []
    for owner, what in ((getattr(model, "rpn", None), "rpn"), (getattr(model, "roi_heads", None), "roi")):
        if owner is not None and hasattr(owner, "fg_bg_sampler"):
            owner.fg_bg_sampler = _KeyedBalancedSampler(owner.fg_bg_sampler, seeds, what)
            samplers.append(owner.fg_bg_sampler)
    if samplers:
        def remember_ids(module: nn.Module, args: tuple[Any, ...]) -> None:
            targets = args[1] if len(args) > 1 else None
            if module.training and targets is not None:
                ids = [int(t["image_id"]) for t in targets]
                for s in samplers:
                    s.image_ids = ids

        model.register_forward_pre_hook(remember_ids)
    return len(samplers)


# --- the launcher (parent) and the ranks' entry point ---------------------------------------------------------------


def check_plan(plan: DevicePlan, params: Params) -> None:
    """Refuse, before any process starts, what a data-parallel run cannot do."""
    batch = params.train.batch
    if batch % plan.world:
        raise ConfigError(f"train.batch {batch} is the global batch and must divide evenly over the "
                          f"{plan.world} processes of train.device {params.train.device!r}")


def _die_with_parent(sig: int = 15) -> None:
    """Get ``sig`` when the parent process dies (Linux ``PR_SET_PDEATHSIG``), instead of running on as an orphan:
    torchrun gets SIGTERM (15) when ``detflow train`` dies, a rank SIGKILL when torchrun dies (torchrun starts each
    rank in a session of its own, so killing the launcher's process group does not reach the ranks)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG


def launch(plan: DevicePlan, params: Params, *, entry: str, prepared: Path, out_dir: Path, reports_dir: Path,
           workdir: Path, raw_dir: Path, mirrors: list[Path] | None, trust: bool, progress: bool) -> TrainResult:
    """Run the family's training on ``plan.world`` processes under ``torchrun`` and return rank 0's result.

    ``entry`` is the module each rank runs (``python -m entry SPEC``; it calls :func:`rank_main` with the function
    that trains: ``pipeline.train.stage``, which reaches the family's backend, a layer above this module)."""
    from pipeline.contracts.results import TrainResult
    from pipeline.fileio import atomic_write_json, private_workdir, remove_leftovers
    from pipeline.train.devices import cpu_threads

    check_plan(plan, params)
    workdir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(workdir / "ddp")  # the scratch folder of a launcher that was killed
    scratch = private_workdir(workdir, "ddp")
    try:
        spec = {"params": params.model_dump(mode="json"), "prepared": str(Path(prepared).resolve()),
                "out_dir": str(Path(out_dir).resolve()), "reports_dir": str(Path(reports_dir).resolve()),
                "workdir": str(Path(workdir).resolve()), "raw_dir": str(Path(raw_dir).resolve()),
                "mirrors": None if mirrors is None else [str(Path(m).resolve()) for m in mirrors], "trust": trust,
                "progress": progress, "result": str(scratch / "result.json"), "error": str(scratch / "error.json")}
        atomic_write_json(scratch / "spec.json", spec)
        env = {**os.environ, ENV_MARK: "1",
               "OMP_NUM_THREADS": str(max(1, cpu_threads(params.train.cpu_threads) // plan.world))}
        if plan.kind == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            order = visible.split(",") if visible else [str(i) for i in range(max(plan.ids) + 1)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(order[i] for i in plan.ids)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
               str(plan.world), "-m", entry, str(scratch / "spec.json")]
        log.info("data-parallel training on %d processes (%s, %s): %s", plan.world, plan.kind, plan.backend,
                 " ".join(cmd))
        proc = subprocess.run(cmd, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                              check=False)
        error = scratch / "error.json"
        if error.is_file():
            doc = json.loads(error.read_text())
            raise (ConfigError if doc.get("kind") == "ConfigError" else DistributedTrainingError)(doc["message"])
        if proc.returncode != 0 or not (scratch / "result.json").is_file():
            raise DistributedTrainingError(f"data-parallel training failed (torchrun exit {proc.returncode}); the "
                                           "ranks' output above says why")
        doc = json.loads((scratch / "result.json").read_text())
        doc["best"], doc["last"] = Path(doc["best"]), Path(doc["last"])
        return TrainResult(**doc)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def rank_main(train: Callable[..., TrainResult], argv: list[str] | None = None) -> int:
    """A rank: run ``train`` (``train_model``'s signature) with the launcher's spec; rank 0 writes the result, a
    failing rank the error (the parent raises it). Logs and progress bars come from rank 0 only."""
    from pipeline.config import Params
    from pipeline.fileio import atomic_write_json

    args = sys.argv[1:] if argv is None else argv
    if sys.platform == "linux":
        _die_with_parent(9)
        if os.getppid() == 1:  # torchrun died before the line above: nobody would collect this rank
            return 1
    spec = json.loads(Path(args[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=os.environ.get("DETFLOW_LOG", "WARNING") if rank == 0 else "ERROR",
                        format=f"%(levelname)s %(name)s [rank {rank}]: %(message)s")
    try:
        params = Params.model_validate(spec["params"])
        result = train(
            params, Path(spec["prepared"]), Path(spec["out_dir"]), Path(spec["reports_dir"]), Path(spec["workdir"]),
            Path(spec["raw_dir"]), [Path(m) for m in spec["mirrors"]] if spec["mirrors"] is not None else None,
            bool(spec["trust"]), bool(spec["progress"]) and rank == 0)
        if rank == 0:
            atomic_write_json(spec["result"], result.to_dict())
        return 0
    except DetflowError as e:
        atomic_write_json(spec["error"], {"rank": rank, "kind": type(e).__name__, "message": str(e)})
        return 1
    finally:
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

