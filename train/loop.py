"""the per-worker training loop that Ray Train runs on every DDP rank"""
from __future__ import annotations

import dataclasses
import datetime
import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.checkpoints import CONFIG_FILE, CONTROLNET_DIR, DECODER_FILE, PROGRESS_FILE, file_sizes
from train.config import TrainConfig
from train.model import (
    BaseModel,
    ControlledUNet,
    FrozenPromptEncoder,
    build_controlnet,
    diffusion_loss,
    freeze_for_training,
    load_base_model,
    plain_attention_on_cpu,
    unlock_decoder,
)

STATE_FILE = "state.pt"


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights."""

    step: int = 0
    decoder_unlocked: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # (step, loss, ...) of every logged step
    resumed_from: int | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)  # curves with their detected convergence and mAUCC
    validation: dict[str, Any] = field(default_factory=dict)  # the held-out set: its shards and keys (drawn again,
    # identically, at every start from the same data; checkpoints keep its keys' hash, which a resume compares)
    validation_sha256: str = ""  # of the keys the run's curves were scored on ("": none yet, or an older checkpoint)
    train_seconds: float = 0.0  # wall time of the run (loading, validating, training) to its last checkpoint, summed
    # over every segment (resumes)
    samples_seen: int | None = 0  # summed over every segment, whatever its number of ranks (None: a checkpoint
    # from before this count, estimated at the start of the segment)
    gpu_seconds: float | None = 0.0  # train_seconds x the segment's GPUs, summed over segments (None: as above)
    timing: dict[str, Any] = field(default_factory=dict)  # this segment: started/finished (epoch s), devices
    stream: list[list[Any]] = field(default_factory=list)  # where every rank's data stream goes on, by rank, then
    # loader worker (train.data.ShardCursor.at): gathered at each checkpoint, taken up by each rank on resume
    unrecorded: list[str] = field(default_factory=list)  # checkpoints on storage that Ray Train's record lacks
    # (train.checkpoints.unrecorded_checkpoints): rank 0 deletes them as they age out of --keep-checkpoints
    wandb_id: str | None = None  # the W&B run this run logs to (train.tracking.wandb_run_id), kept for its resumes


def segment_seed(seed: int, rank: int, step: int) -> int:
    """Noise and data are reseeded at every checkpoint step from (seed, rank, step), so a run resumed from a
    checkpoint draws exactly what the uninterrupted run drew after that step."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**31 - 1)


def segment_batches(step: int, cfg: TrainConfig) -> int:
    """Batches one rank trains on from `step` to the next checkpoint (or the last step), where its stream restarts."""
    end = min(cfg.max_steps, (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
    return max(0, end - step) * cfg.grad_accum


def epoch_lengths(batches: int, epoch_samples: int, batch_size: int) -> Iterator[int]:
    """Samples in each epoch of a segment of `batches` batches: whole epochs of `epoch_samples`, the last cut where
    the segment ends, then (should anything read on) whole epochs again."""
    per_epoch = epoch_samples // batch_size
    while batches > 0:
        yield min(per_epoch, batches) * batch_size
        batches -= per_epoch
    while True:
        yield per_epoch * batch_size


def moved(cursors: list[tuple[str, int] | None], position: dict[str, Any]) -> None:
    """Note a batch's stream_position: where its loader worker's stream now goes on."""
    worker, at = position["worker"], position["at"]
    cursors.extend([None] * (worker + 1 - len(cursors)))
    cursors[worker] = tuple(at) if at else None  # a pinned batch holds it as a list


def cursors_in(cursors: list[tuple[str, int] | None], urls: list[str]) -> tuple[tuple[str, int] | None, ...]:
    """The cursors that point into the stream's shards (a run resumed on other data starts fresh shards)."""
    known = set(urls)
    return tuple(at if at and at[0] in known else None for at in cursors)


def every_rank(value: Any, group: Any) -> list[Any]:
    """Every rank's `value`, by rank (a collective: every rank calls it), through the gloo `group`
    (rank_zero_wait_group): a few small objects, where NCCL would need them as CUDA tensors."""
    if not distributed():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value, group=group)
    return gathered


def mixed_precision_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None on CPU or with 'no'."""
    if device.type != "cuda" or choice == "no":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def distributed() -> bool:
    """Whether this process is one of several DDP ranks."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def wrap_ddp(module: nn.Module, device: torch.device, previous: nn.Module | None = None) -> nn.Module:
    """DDP when there are several ranks. Re-wrapped when the decoder unlocks (DDP fixes its parameters at birth):
    the `previous` wrapper's reducer is unhooked first, or its autograd hooks stay on the ControlNet's parameters
    (and its buckets in memory) for as long as anything holds the old wrapper.

    The gradients are views into DDP's all-reduce buckets (gradient_as_bucket_view): without it every gradient is
    held twice during a step, once in the parameter's .grad and once in a bucket (for SD 1.5's ControlNet, 361M
    parameters: 1.4 GB of fp32 per GPU), and copied between the two on every step."""
    if isinstance(previous, nn.parallel.DistributedDataParallel):
        previous._remove_autograd_hooks()
    if not distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile's wrapper around the training model, or the model itself. Under DDP the wrapper goes outside,
    as PyTorch advises: dynamo then splits the graph at DDP's gradient buckets, so their all-reduces still overlap
    the backward pass. Parameters are shared: the ControlNet saves, loads and steps as it is."""
    return torch.compile(model) if enabled else model


def uncompiled(model: nn.Module) -> nn.Module:
    """What torch.compile wrapped (the model itself when not compiled)."""
    return getattr(model, "_orig_mod", model)


def rank_zero_wait_group(timeout_s: float) -> Any:
    """A gloo group for the other ranks to wait on while rank 0 validates alone, with its own (long) timeout: the
    training group's collectives (NCCL's 10-30 min) would otherwise time out during a long validation. None with
    one rank. Every rank must call it, in the same order."""
    if not distributed():
        return None
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def wait_for_rank_zero(group: Any) -> None:
    """Every rank meets here after rank 0's validation, before the next collective of training."""
    if group is not None:
        torch.distributed.barrier(group=group)


def initial_controlnet(cfg: TrainConfig, base: BaseModel) -> nn.Module:
    """The ControlNet a run starts from: a copy of the base's UNet, or the --controlnet given, refused in one line
    (RunRefused) when it is not a whole ControlNet that fits the base (the driver checked a local one already; a
    remote one is first read here). A resume then loads its checkpoint's weights over it (Trainer.load)."""
    if cfg.controlnet is None:
        return build_controlnet(base.unet, base.downsampling)
    try:
        return build_controlnet(base.unet, base.downsampling, pretrained=cfg.controlnet)
    except (FileNotFoundError, ValueError) as e:
        raise RunRefused(f"--controlnet {e}") from None


def base_model_or_refusal(base_model: str) -> BaseModel:
    """load_base_model, whose one-line refusals (ValueError: a component holding NaN, which the driver's check
    reads no tensor to find; a hub id's or a remote base's weights cut short or lacking tensors) are a RunRefused:
    raised as they were, they failed the worker group, which Ray Train restarted --max-failures times, each
    loading the base again, for the same refusal. Other errors (a hub or bucket that does not answer) stay
    failures, which a restart may get past."""
    try:
        return load_base_model(base_model)
    except ValueError as e:
        raise RunRefused(f"--base-model {e}") from None


class Trainer:
    """Holds the models, optimizer and data stream of one rank; `train()` is the whole loop."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device,
                 base: BaseModel | None = None, stored_latents: dict[str, Any] | None = None):
        """`base`: an already built base model (the GPU check's SD 1.5 from its configs); default: cfg.base_model.
        `stored_latents`: the training dataset's record of its stored latents (the manifest's "latents"), checked
        here against the VAE as loaded (annotate.latents.made_the_latents), before the frozen modules are cast to
        the autocast dtype below."""
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.amp_dtype = mixed_precision_dtype(cfg.mixed_precision, device)
        self.base = base if base is not None else base_model_or_refusal(cfg.base_model)
        self.vae_made_the_latents = False
        if stored_latents and self.base.vae is not None:
            from annotate.latents import made_the_latents

            self.vae_made_the_latents = made_the_latents(self.base.vae, stored_latents)
        self.controlnet = initial_controlnet(cfg, self.base)
        freeze_for_training(self.base, self.controlnet, middle_only=cfg.mode == "middle")
        frozen_dtype = self.amp_dtype if self.amp_dtype and cfg.unlock_decoder_at is None else torch.float32
        # nn.Module.to itself: diffusers' override warns on every cast that modules "should be kept in float32",
        # listing none (its check is `is not None`, and these models' list is empty)
        for module in self.base.frozen_modules:
            nn.Module.to(module, device, dtype=frozen_dtype)
        nn.Module.to(self.controlnet, device, dtype=torch.float32)  # master weights stay fp32 under autocast
        plain_attention_on_cpu(device, self.base.unet, self.controlnet)
        if cfg.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
            self.base.unet.enable_gradient_checkpointing()
        self.module = ControlledUNet(self.base.unet, self.controlnet, middle_only=cfg.mode == "middle")
        self.prompts = FrozenPromptEncoder(self.base, device)
        self.model = compiled(wrap_ddp(self.module, device), cfg.compile)
        trainable = [p for p in self.controlnet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           **adamw_implementation(device))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self.cursors: list[tuple[str, int] | None] = []  # where this rank's stream goes on, by loader worker
        self.latents = False  # whether batches carry the dataset's stored latents (use_stored_latents)

    # ---- the paper's large-scale mode

    def unlock_decoder(self) -> None:
        params = unlock_decoder(self.base.unet)
        self.optimizer.add_param_group({"params": params, "lr": self.cfg.decoder_lr})
        self.lr_schedule.base_lrs.append(self.cfg.decoder_lr)
        self.lr_schedule.lr_lambdas.append(self.lr_schedule.lr_lambdas[0])  # the same warm-up (one per group)
        self.model = compiled(wrap_ddp(self.module, self.device, previous=uncompiled(self.model)), self.cfg.compile)
        self.state.decoder_unlocked = True

    # ---- checkpoints

    def save(self, folder: Path) -> None:
        self.controlnet.save_pretrained(folder / CONTROLNET_DIR, safe_serialization=True)
        state = {
            "step": self.state.step,
            "decoder_unlocked": self.state.decoder_unlocked,
            "history": json.dumps(self.state.history),
            "fidelity": json.dumps(self.state.fidelity),
            "stream": json.dumps(self.state.stream),
            "unrecorded": json.dumps(self.state.unrecorded),
            "wandb_id": self.state.wandb_id or "",
            "validation_sha256": self.state.validation_sha256,
            "train_seconds": self.state.train_seconds,
            "samples_seen": self.state.samples_seen,
            "gpu_seconds": self.state.gpu_seconds,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())},
        }
        torch.save(state, folder / STATE_FILE)
        if self.state.decoder_unlocked:
            from safetensors.torch import save_file

            save_file({f"unet.{n}": p.detach().contiguous() for n, p in self.base.unet.named_parameters()
                       if p.requires_grad}, folder / DECODER_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=1))
        # last: it marks the checkpoint complete, and lists its files, so that one damaged since is known
        (folder / PROGRESS_FILE).write_text(json.dumps({"step": self.state.step, "files": file_sizes(folder)}))

    def load(self, folder: Path) -> None:
        from diffusers import ControlNetModel

        from annotate.weights import diffusers_loading

        weights = ControlNetModel.from_pretrained(folder / CONTROLNET_DIR, **diffusers_loading()).state_dict()
        self.controlnet.load_state_dict(weights)
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        if state["decoder_unlocked"]:
            from safetensors.torch import load_file

            self.unlock_decoder()
            decoder = {k.removeprefix("unet."): v for k, v in load_file(folder / DECODER_FILE).items()}
            self.base.unet.load_state_dict(decoder, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if state["scaler"]:  # a run without the grad scaler (CPU, bf16) saved its empty state, which an fp16 resume's
            # enabled scaler refuses: it starts at its initial scale instead
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_tuples(json.loads(state["rng"]["python"])))
        self.state = TrainState(step=state["step"], decoder_unlocked=state["decoder_unlocked"],
                                history=json.loads(state["history"]), resumed_from=state["step"],
                                fidelity=json.loads(state.get("fidelity", "{}")),
                                train_seconds=float(state.get("train_seconds", 0.0)),
                                samples_seen=state.get("samples_seen"), gpu_seconds=state.get("gpu_seconds"),
                                stream=json.loads(state.get("stream", "[]")),
                                unrecorded=json.loads(state.get("unrecorded", "[]")),
                                wandb_id=state.get("wandb_id") or None,
                                validation_sha256=state.get("validation_sha256", ""))
        mine = self.state.stream[self.rank] if self.rank < len(self.state.stream) else []
        self.cursors = [tuple(at) if at else None for at in mine]

    # ---- data

    def batches(self, source) -> Iterator[dict[str, Any]]:
        """The stream from the current step on; restarted (reseeded) at every checkpoint boundary. Its epochs end
        where the segment does, so the last one reads only the samples the segment trains on (see
        train.data.shuffled_once), and each loader worker goes on in the shard where its previous epoch stopped
        (self.cursors, which a checkpoint keeps): however often the stream restarts, the shards are read to the
        end, and a resumed run reads what the uninterrupted one read."""
        from train.data import make_loader

        epochs = epoch_lengths(segment_batches(self.state.step, self.cfg), self.cfg.epoch_samples, self.cfg.batch_size)
        for epoch, samples in enumerate(epochs):
            seed = segment_seed(self.cfg.seed, self.rank, self.state.step) + epoch
            loader = make_loader(
                source, resolution=self.cfg.resolution, batch_size=self.cfg.batch_size, seed=seed,
                prompt_dropout=self.cfg.prompt_dropout, epoch_samples=samples, rank=self.rank,
                world_size=self.world_size, num_workers=self.cfg.data_workers, latents=self.latents,
                pin_memory=self.device.type == "cuda",  # page-locked batches: the copies to the GPU overlap compute
                start=cursors_in(self.cursors, source.urls),
            )
            for batch in loader:
                moved(self.cursors, batch.pop("stream_position"))
                yield batch

    # ---- one optimizer step: Eq. 10 on grad_accum micro-batches

    def train_step(self, micro_batches: list[dict[str, Any]], generator: torch.Generator) -> torch.Tensor:
        """One optimizer step; the mean loss as a device tensor (reading it is a host sync: the loop reads the
        losses of many steps at once, at log steps). The modules keep the modes freeze_for_training gave them (the
        locked base in eval, the ControlNet in train; sampling restores its mode): no per-step walk over them."""
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            pixel_values, latent_dist = (batch[k].to(self.device, non_blocking=True) if k in batch else None
                                         for k in ("pixel_values", "latent_dist"))  # images or stored latents
            condition = batch["conditioning_pixel_values"].to(self.device, non_blocking=True)  # (B, 3, R, R) in [0, 1]
            text = self.prompts(list(batch["caption"]))
            last = i == len(micro_batches) - 1
            sync = self.model.no_sync() if hasattr(self.model, "no_sync") and not last else nullcontext()
            with sync, torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                      enabled=self.amp_dtype is not None):
                loss = diffusion_loss(self.base, self.model, pixel_values, condition, text, generator,
                                      latent_dist=latent_dist)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach().float() / len(micro_batches)
        self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        return total


def stored_latents_plan(stored: dict[str, Any] | None, dataset_resolution: int | None, cfg: TrainConfig,
                        base_has_vae: bool) -> tuple[bool, str]:
    """(whether to train on the dataset's stored latents, why not). Their VAE is checked separately."""
    if not stored:
        return False, ""
    if cfg.latents == "off":
        return False, "stored latents not used (--latents off)"
    if not base_has_vae:
        return False, "stored latents not used: the base is a pixel-space model"
    if dataset_resolution != cfg.resolution:
        return False, f"stored latents not used: they are of {dataset_resolution} px images, training is at " \
                      f"{cfg.resolution} px"
    return True, ""


def use_stored_latents(trainer: Trainer, manifest: dict[str, Any]) -> str:
    """Decide whether the trainer reads the training dataset's stored latents (set trainer.latents); a line for
    the log. Latents from another VAE than the base's would train on the wrong targets: an error, not a fallback.
    The trainer must have been built with the manifest's stored_latents."""
    stored = manifest.get("latents")
    use, why_not = stored_latents_plan(stored, manifest.get("config", {}).get("resolution"), trainer.cfg,
                                       trainer.base.vae is not None)
    if use:
        if not trainer.vae_made_the_latents:
            raise StoredLatentsMismatch(f"the dataset's latents were made by the VAE of {stored.get('base_model')} "
                                        f"(sha256 {str(stored.get('vae_sha256'))[:12]}...), not by this base's "
                                        f"({trainer.cfg.base_model}); train with --latents off to encode the images")
        trainer.latents = True
        return f"training on the dataset's stored latents (VAE of {stored.get('base_model')})"
    return why_not


def adamw_implementation(device: torch.device) -> dict[str, bool]:
    """AdamW's fused kernels: one pass over every parameter instead of a few kernels per tensor (torch has them for
    CPU and CUDA; on this project's 2-core CPU bench, 2.5-3.9 ms against 8.5 ms for foreach and 11 ms for the
    default loop, for the tiny SD's 128 ControlNet tensors)."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}


def _as_tuples(value):
    """json turned random.getstate()'s tuples into lists; setstate wants them back."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def ranks_in_sync(module: nn.Module) -> bool:
    """DDP sanity check: every rank holds bit-identical weights (compared through a float64 checksum)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def split_validation(source, validation_data: list[str] | None):
    """(training source, validation source): the given validation data (its shards held out of training, where
    --data names them too), else the held-out set a subset names
    (shared by every size of a sweep), else the last shard of a whole dataset held out of training (when there
    are several), else the training data itself. A subset trains on every sample it names: one made with nothing
    held out (train.subsets --holdout-shards 0) lost its last shard's samples, a different share at each size."""
    from train.data import resolve_shards, some_shards, without_shards

    if validation_data:
        held_out = resolve_shards(validation_data, source.task, "--validation-data")
        return left_to_train(without_shards(source, held_out), "--validation-data's shards"), held_out
    if source.validation:
        return source, resolve_shards(source.validation, source.task)
    if len(source.urls) < 2 or source.keys is not None:
        return source, source
    return left_to_train(some_shards(source, slice(None, -1)), "the last shard"), some_shards(source, slice(-1, None))


def left_to_train(train, held: str):
    """The training source, refused where the shards it kept hold no sample of its condition by their index (a
    multi-task dataset whose OpenPose kept samples in the last shard alone): its stream drew shard after shard for
    nothing and ended the run in "no sample in 100 shards", blaming missing or broken shards."""
    if train.weights is not None and not any(train.weights):
        raise ValueError(f"no usable {train.task} sample is left to train on: {held}, held out for validation, holds "
                         f"every one (the index says why the others are not: status and error columns); give "
                         f"--validation-data other data")
    return train


def validation_note(trained, held_out) -> str:
    """What the run's first line adds where its validation samples are not held out of training: a curve scored on
    samples the run trains on rises with memorising, not with following the condition."""
    if held_out is not trained:
        return ""
    return ("; validation samples are drawn from the training data (nothing held out: one shard, or a subset "
            "without a held-out set; --validation-data names held-out data)")


@dataclass
class Validation:
    """Rank 0's validation: the fixed set, and the fidelity tracker (None when fidelity is off or no task)."""

    vset: Any
    tracker: Any

    def latest(self) -> str:
        point = self.tracker.latest() if self.tracker else None
        return f"{self.tracker.primary} {point[1]:.3f} (step {point[0]})" if point else ""


class RunRefused(ValueError):
    """A setting the run cannot train with, found on a worker: every rank returns it (agreed_refusal, never raised),
    and the driver says so in one line and exits 2, as for the refusals it finds itself (a traceback and "the same
    command starts it again" promised a run that fails again)."""


class ValidationChanged(RunRefused):
    """A resumed run drew other held-out samples than its checkpoint's curves were scored on."""


class StoredLatentsMismatch(RunRefused):
    """The dataset's stored latents were made by another VAE than the base's."""


def agreed_refusal(refusal: RunRefused | None, group: Any) -> RunRefused | None:
    """The refusal any rank found (the lowest rank's), on every rank: a collective on the gloo `group`
    (rank_zero_wait_group), where the other ranks wait while rank 0 draws the held-out set. Every rank then returns
    it, and the run ends at its first attempt. Raised instead, it failed the worker group, which Ray Train restarts
    --max-failures times (its failure policy retries every worker error, and has no public way to mark one final),
    loading the base model again each time, for the same refusal."""
    return next((found for found in every_rank(refusal, group) if found is not None), None)


def keys_sha256(keys: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def start_validation(trainer: Trainer, source) -> Validation:
    """Draw the validation set (distinct keys, one pass, chosen by key hash) and build the fidelity annotator
    from the validation data's own dataset settings; the tracker continues the curves the state restored."""
    from annotate import annotator_params, build_annotator
    from train.data import job_settings, lowest_key_hashes
    from train.tracking import say
    from train.validate import FidelityTracker, ValidationSet

    cfg = trainer.cfg
    vset = ValidationSet.of(lowest_key_hashes(source, cfg.validation_samples, cfg.resolution))
    trainer.state.validation = {"shards": source.urls, "keys": vset.keys}
    drawn = keys_sha256(vset.keys)
    if trainer.state.validation_sha256 and trainer.state.validation_sha256 != drawn:
        raise ValidationChanged(f"run {cfg.run_name}'s held-out samples changed since step {trainer.state.step} "
                                f"(its data changed: a dataset grown by shards, subsets made again): its curves "
                                f"would join scores on two validation sets; resume it on the data it started on, "
                                f"or start another --run-name")
    trainer.state.validation_sha256 = drawn
    if len(vset.keys) < cfg.validation_samples:
        say(f"validation: only {len(vset.keys)} distinct usable samples in the held-out data "
            f"({cfg.validation_samples} asked for)")
    tracker = None
    if cfg.fidelity and source.task:
        params = annotator_params(source.task, job_settings(source))
        if cfg.annotator_weights:
            params["weights"] = cfg.annotator_weights
        annotator = build_annotator(source.task, device=str(trainer.device), **params)
        tracker = FidelityTracker.restore(source.task, annotator, cfg.prompt_modes, cfg.guidance_scales,
                                          trainer.state.fidelity)
    return Validation(vset, tracker)


def validate(trainer: Trainer, validation: Validation, logger, step: int) -> None:
    """Sample the validation conditions (--validation-sampler, fixed seeds), log the grid and the fidelity scores."""
    from train.sampling import sample
    from train.validate import validation_grid

    cfg = trainer.cfg
    if validation.tracker is not None:
        metrics, image = validation.tracker.evaluate(trainer, validation.vset, step)
        logger.log({"step": step, **metrics}, prefix="")
        trainer.state.fidelity = validation.tracker.summary()
    else:
        vset = validation.vset
        images = sample(trainer.base, trainer.controlnet, vset.conditions, vset.prompts, steps=cfg.validation_steps,
                        sampler=cfg.validation_sampler, guidance_scale=cfg.guidance_scales[0], seed=cfg.seed,
                        branches=cfg.control_branches, middle_only=cfg.mode == "middle", device=trainer.device,
                        amp_dtype=trainer.amp_dtype)
        image = validation_grid(vset, images)
    logger.log_images("validation/grid", [image], ["condition | generated | target"], step=step)


def set_threads(local_cpus: int | None) -> int:
    """Torch and OpenCV use the CPUs this worker was given (Ray starts workers with OMP_NUM_THREADS=1); in Ray
    Train's local mode (the driver, which Ray assigns nothing) the CPUs the run was given, else every core."""
    import os

    import cv2
    import ray

    if local_cpus is None and ray.is_initialized():
        local_cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    threads = max(1, int(local_cpus)) if local_cpus else len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads


def apply_secrets(ref) -> list[str]:
    """Put the driver's secrets (train.run.secrets_ref) in this worker's environment, for W&B; their names."""
    import os

    import ray

    secrets = ray.get(ref) if ref is not None else {}
    os.environ.update(secrets)
    return sorted(secrets)


def restore(trainer: Trainer, cfg: TrainConfig, local: bool) -> None:
    """Resume from the run's last checkpoint: the one Ray Train hands back (a worker group it restarted, a run it
    knows), unless storage holds a newer complete one, which Ray never recorded (a worker that died, or a run state
    Ray could not write, after the checkpoint was published); else the newest complete one on storage (a run of Ray
    Train's local mode, which keeps no record, or one begun in the other mode: both write the same layout).
    A checkpoint damaged since it was written (train.checkpoints.complete_checkpoints) is passed over for the one
    before it, Ray's too. On workers, the checkpoints Ray has no record of are noted, for rank 0 to delete as they
    age out (retire_unrecorded): its num_to_keep never would."""
    import ray.train

    from train.checkpoints import (
        damaged_ones,
        loadable,
        marked_checkpoints,
        newer_than,
        run_url,
        step_of,
        whole_ones,
    )

    run = run_url(cfg.storage_path, cfg.run_name)
    checkpoint = ray.train.get_checkpoint()
    recorded_step = step_of(checkpoint.path) if checkpoint is not None else -1
    marked = marked_checkpoints(run)  # one listing of the run's storage, for every question below
    steps = whole_ones(marked)
    unrecorded = newer_than(steps, recorded_step)
    from_storage, from_ray = (unrecorded[-1] if unrecorded else None), checkpoint is not None
    if from_storage is None and from_ray and recorded_step >= 0 and recorded_step not in steps.values():
        # Ray's is damaged (a file deleted or cut since): the one before
        older = [url for url, step in steps.items() if step < recorded_step]
        from_storage, from_ray = (max(older, key=steps.get) if older else None), False
        if trainer.rank == 0:
            print(f"[{cfg.run_name}] checkpoint {checkpoint.path} lacks a file, or holds one cut short: "
                  f"resuming from {from_storage or 'step 0'}", flush=True)
    if from_storage is not None:
        with loadable(from_storage, f"{run} rank {trainer.rank}") as folder:
            trainer.load(folder)
    elif from_ray:
        with checkpoint.as_directory() as folder:
            trainer.load(Path(folder))
    if not local and (checkpoint is None or recorded_step >= 0):  # (a folder named otherwise, by an older
        # version: which of the run's checkpoints Ray recorded is not known, and none is deleted)
        damaged = [url for url in damaged_ones(marked) if step_of(url) > recorded_step]
        trainer.state.unrecorded = sorted({*trainer.state.unrecorded, *unrecorded, *damaged}, key=step_of)


def report_checkpoint(trainer: Trainer, metrics: dict[str, Any], local: bool) -> None:
    """Save rank 0's checkpoint, publish it to the run's storage (train.checkpoints.publish: one folder per step,
    progress.json last) and report it. On workers Ray Train calls publish as its upload, and records and prunes
    the checkpoint (its own upload copies files in no set order: a worker killed mid-upload could leave a folder
    that has progress.json but not its weights, which local-mode resumes and exports would take as complete).
    Its local mode only remembers the temporary folder, so there rank 0 publishes and prunes to
    --keep-checkpoints itself. Both modes write the same folders, so a run resumes in either."""
    import ray.train

    from train.checkpoints import (
        checkpoint_name,
        for_ray,
        prune,
        publish,
        publish_from_worker,
        retire_unrecorded,
        run_url,
        scratch_folder,
        step_of,
    )

    cfg, step = trainer.cfg, trainer.state.step
    run = run_url(cfg.storage_path, cfg.run_name)
    if not local:  # this step's folder (a damaged one, published again now) is Ray's from here on: never retired
        trainer.state.unrecorded = [url for url in trainer.state.unrecorded if step_of(url) != step]
    with scratch_folder("save", f"{run} rank {trainer.rank}") as folder:
        if trainer.rank == 0:
            trainer.save(folder)
        if local:  # one rank, or several started by torchrun (which local mode also runs under): rank 0 publishes
            checkpoint = None
            if trainer.rank == 0:
                checkpoint = ray.train.Checkpoint(for_ray(publish(Path(folder), run, step)))
                prune(run, cfg.keep_checkpoints)
            ray.train.report(metrics, checkpoint=checkpoint)
        else:
            def upload(saved: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
                # `name` is checkpoint_dir_name below, the folder publish derives from the step
                return ray.train.Checkpoint(for_ray(publish_from_worker(Path(saved.path), run, step)))

            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if trainer.rank == 0
                             else None, checkpoint_dir_name=checkpoint_name(step), checkpoint_upload_fn=upload)
            if trainer.rank == 0 and trainer.state.unrecorded:
                trainer.state.unrecorded = retire_unrecorded(run, trainer.state.unrecorded, cfg.keep_checkpoints)


def prune_when_nothing_to_train(trainer: Trainer, local: bool) -> None:
    """Prune the run's checkpoints to --keep-checkpoints as a new one would (report_checkpoint), on rank 0: a run
    restored at --max-steps publishes none, so what a stop had left past the number (on workers, the checkpoints Ray
    Train was reported but had not recorded yet; in local mode, one published but not pruned yet) stayed for good
    once the same command had finished the run."""
    from train.checkpoints import prune, retire_unrecorded, run_url

    cfg = trainer.cfg
    run = run_url(cfg.storage_path, cfg.run_name)
    if trainer.rank != 0:
        return
    if local:
        prune(run, cfg.keep_checkpoints)
    elif trainer.state.unrecorded:  # (Ray Train's own are Ray's to prune)
        trainer.state.unrecorded = retire_unrecorded(run, trainer.state.unrecorded, cfg.keep_checkpoints)


def pick_device(cfg: TrainConfig, local: bool) -> torch.device:
    """Ray Train's device for this worker; in local mode it takes CUDA whenever there is one, so --use-gpu False
    is honoured here."""
    import ray.train.torch

    return torch.device("cpu") if local and cfg.use_gpu is False else ray.train.torch.get_device()


class LossWindow:
    """The losses of the steps since the last log, kept on the device and read in one host sync at the next log
    step (a per-step .item() makes the CPU wait for the GPU every step); with their throughput, and the share of
    the window the loop spent waiting for its next batch (near 0 when the loader keeps up; where it grows, more
    --data-workers pay). On a GPU the loop may wait while the GPU still runs the step it queued, so this bounds
    the GPU's idle time from above."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.losses: list[tuple[int, torch.Tensor]] = []
        self.data_wait_s = 0.0
        self.started = clock()

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.losses.append((step, loss))

    def waited_for_data(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def read(self, samples_per_step: int) -> tuple[list[dict[str, float]], dict[str, float]]:
        """The window's (step, loss) history, and the throughput over the window; the window starts again."""
        values = torch.stack([loss for _, loss in self.losses]).tolist() if self.losses else []
        seconds = self.clock() - self.started
        history = [{"step": step, "loss": value} for (step, _), value in zip(self.losses, values, strict=True)]
        speed = {"samples_per_s": samples_per_step * len(history) / seconds,
                 "step_time_s": seconds / max(len(history), 1), "data_wait_fraction": self.data_wait_s / seconds}
        self.losses, self.data_wait_s, self.started = [], 0.0, self.clock()
        return history, speed


def results_written_at(cfg: TrainConfig, step: int) -> bool:
    """Whether the run's results.json is there for `step`: a run restored at --max-steps has nothing to train, and
    writing them again said it resumed at its last step and lost its end time (a run that died between its last
    checkpoint and its results writes them)."""
    from train.tracking import read_results

    results = read_results(cfg)
    return bool(results) and results.get("final_step") == step


def train_loop_per_worker(config: dict[str, Any]) -> RunRefused | None:
    """Ray Train's entry on each rank (or, in its local mode, in the driver): resume, train, checkpoint through
    ray.train.report, log on rank 0. Returns a setting the run cannot train with (agreed_refusal), which Ray Train
    hands the driver as its result's return_value (rank 0's), having trained nothing."""
    import ray.train

    secrets = apply_secrets(config.get("secrets"))
    from train.data import dataset_manifest, resolve_shards
    from train.tracking import RunLogger, started_wandb_id, wandb_run_id

    segment_start = time.time()  # the run's wall time from here (loading, validating, training) to each
    # checkpoint counts in train_seconds: what the run holds its devices for
    cfg = TrainConfig(**config["train"])
    local = config.get("local", False)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = pick_device(cfg, local)
    threads = set_threads(cfg.cpus_per_worker if local else None)
    source, held_out = split_validation(resolve_shards(cfg.data, cfg.condition), cfg.validation_data)
    manifest = dataset_manifest(source)
    torch.manual_seed(cfg.seed)
    # rank 0 alone draws the held-out set and validates; the others wait for it on a group of their own, which also
    # tells every rank of a refusal any rank found (agreed_refusal)
    rank_zero = rank_zero_wait_group(cfg.validation_timeout_min * 60)
    trainer, refusal = None, None
    try:
        trainer = Trainer(cfg, rank, world_size, device, stored_latents=manifest.get("latents"))
    except RunRefused as found:  # a base that does not load whole, a remote --controlnet that does not fit it, ...
        refusal = found
    if (refusal := agreed_refusal(refusal, rank_zero)) is not None:
        return refusal
    restore(trainer, cfg, local)
    if trainer.state.step >= cfg.max_steps:
        prune_when_nothing_to_train(trainer, local)
    if trainer.state.step >= cfg.max_steps and results_written_at(cfg, trainer.state.step):
        return  # submitted again once finished: its results and W&B run stand as the run left them
    if cfg.unlock_decoder_at is not None and not trainer.state.decoder_unlocked \
            and trainer.state.step >= cfg.unlock_decoder_at:
        trainer.unlock_decoder()

    latents, validation = "", None
    try:
        latents = use_stored_latents(trainer, manifest)
        validation = start_validation(trainer, held_out) if rank == 0 and cfg.validate_every else None
    except RunRefused as found:
        refusal = found
    refusal = agreed_refusal(refusal, rank_zero)
    if refusal is not None:
        return refusal  # before W&B opens or anything is written: the last checkpoint stands, for a resume once fixed
    if rank == 0 and trainer.state.step == 0 and config.get("wandb_mode", "off") != "off":
        trainer.state.wandb_id = started_wandb_id(cfg)  # the same run started again continues its W&B run
    trainer.state.wandb_id = wandb_run_id(cfg.run_name, trainer.state.wandb_id, resumed=trainer.state.step > 0)
    logger = RunLogger(cfg, config.get("wandb_mode", "off"), config.get("wandb_dir"), trainer.state.wandb_id) \
        if rank == 0 else None
    if logger:
        logger.note(f"{cfg.run_name}: {world_size} rank(s) on {device}, {threads} thread(s) each"
                    + (f"; resumed from step {trainer.state.resumed_from}" if trainer.state.resumed_from else "")
                    + (f"; {latents}" if latents else "")
                    + (validation_note(source, held_out) if cfg.validate_every else "")
                    + (f"; from the driver: {', '.join(secrets)}" if secrets else ""))
    if validation is not None and trainer.state.step == 0 and not (validation.tracker and validation.tracker.has(0)):
        validate(trainer, validation, logger, 0)  # the starting level, which the convergence detector needs
        logger.progress(0, validation.latest())
    wait_for_rank_zero(rank_zero)
    stream = trainer.batches(source)
    generator = torch.Generator(device).manual_seed(segment_seed(cfg.seed, rank, trainer.state.step))
    samples_per_step = cfg.batch_size * cfg.grad_accum * world_size
    window = LossWindow()
    trainer.state.timing = {"started": segment_start, "devices": world_size, "device": device.type,
                            "samples_per_step": samples_per_step}
    gpus = world_size if device.type == "cuda" else 0
    if trainer.state.samples_seen is None:  # a checkpoint from before the counts: this segment's rate throughout
        trainer.state.samples_seen = trainer.state.step * samples_per_step
        trainer.state.gpu_seconds = trainer.state.train_seconds * gpus
    while trainer.state.step < cfg.max_steps:
        waiting = time.perf_counter()
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        window.waited_for_data(time.perf_counter() - waiting)
        loss = trainer.train_step(micro, generator)
        trainer.state.step += 1
        trainer.state.samples_seen += samples_per_step
        step = trainer.state.step
        window.add(step, loss)
        if cfg.unlock_decoder_at is not None and step == cfg.unlock_decoder_at:
            trainer.unlock_decoder()
        validating = bool(cfg.validate_every) and (step % cfg.validate_every == 0 or step == cfg.max_steps)
        checkpointing = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        logging = step % cfg.log_every == 0 or step == cfg.max_steps
        metrics = {}
        if logging or validating or checkpointing:  # read the window before validation's time enters it
            history, speed = window.read(samples_per_step)
            trainer.state.history.extend(history)
            metrics = {"step": step, "loss": history[-1]["loss"], "lr": trainer.lr_schedule.get_last_lr()[0],
                       **speed}
            if device.type == "cuda":
                metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if validating:
            if validation is not None:
                validate(trainer, validation, logger, step)
            wait_for_rank_zero(rank_zero)
        if logger and logging:
            logger.log(metrics)
            logger.progress(step, validation.latest() if validation else "", metrics)
        if checkpointing:
            now = time.time()
            trainer.state.train_seconds += now - segment_start
            trainer.state.gpu_seconds += (now - segment_start) * gpus
            segment_start = trainer.state.timing["finished"] = now
            metrics["ranks_in_sync"] = float(ranks_in_sync(trainer.controlnet))
            trainer.state.stream = every_rank(trainer.cursors, rank_zero)
            report_checkpoint(trainer, metrics, local)
            # a new data/noise segment starts at every checkpoint (the stream going on where it stopped), so
            # resuming here replays nothing
            stream = trainer.batches(source)
            generator = torch.Generator(device).manual_seed(segment_seed(cfg.seed, rank, step))
        if validating or checkpointing:
            window = LossWindow()  # throughput counts training only
    if logger:
        logger.finish(trainer.state)
