"""the trainer's typed configuration and its presets (debug, toy, sd15, sd21); field docstrings are --help; how its
commands (train/run.py, train/sweep.py) end"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

TINY_SD = "data/tiny-sd"
TOY_BASE = "train/toy_base"  # committed; rebuilt by `make repro` (python -m train.pretrain_base)


PresetName = Literal["debug", "toy", "sd15", "sd21"]  # the keys of PRESETS (a test holds them equal)


@dataclass
class TrainConfig:
    """Train a ControlNet (arXiv 2302.05543) on shards written by the dataset job, with Ray Train DDP."""

    preset: PresetName = "debug"
    """The preset whose values are the defaults of every other flag (read first; see the presets in
    train/config.py)."""
    data: list[str] = field(default_factory=lambda: ["data/demo/canny"])
    """Training shards: a dataset folder/URL (reads its manifest), tar URLs, a glob or brace range, or a subset
    manifest (JSON listing shard URLs and keys)."""
    condition: str | None = None
    """The condition to train on, for a dataset built with several tasks (--task canny,hed,...): hed trains on
    <key>.hed.png, over the samples HED kept; default: the dataset's only condition."""
    run_name: str = "controlnet-debug"
    """Run name: re-submitting a run with the same name resumes it from its last checkpoint."""
    storage_path: str = "data/runs"
    """Where checkpoints and results go (local folder or s3://)."""
    base_model: str = TINY_SD
    """Base model in diffusers layout (a hub id or a local/S3 folder): a latent Stable Diffusion, or a pixel-space
    base without a VAE (the toy's)."""
    controlnet: str | None = None
    """Start from this ControlNet's weights instead of a copy of the base's UNet (diffusers' example's
    --controlnet_model_name_or_path: fine-tune a published one, or go on from an export of ours): a diffusers
    ControlNetModel folder, local, file:// or s3://, or a hub id from the local hub cache (fp16-only ones load as
    fp32). It must fit the base (its UNet's channels, blocks and text width; a 3-channel condition). A resumed run
    starts from its checkpoint instead."""
    resolution: int = 512
    """Training image side in pixels."""
    batch_size: int = 4
    """Samples per worker per step (before gradient accumulation)."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    lr: float = 1e-5
    """AdamW learning rate of the ControlNet (the paper's 1e-5)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    max_steps: int = 10_000
    """Optimizer steps to train for."""
    prompt_dropout: float = 0.5
    """Fraction of captions replaced by the empty prompt (the paper's 50%)."""
    mode: Literal["locked", "middle"] = "locked"
    """locked: SD locked, ControlNet feeds every skip connection and the middle block; middle: the paper's
    small-scale mode, connecting only the middle block."""
    unlock_decoder_at: int | None = None
    """Large-scale mode: from this step on, the SD UNet decoder (up blocks) trains too."""
    decoder_lr: float = 1e-6
    """Learning rate of the unlocked SD decoder."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast dtype on CUDA (auto: bf16 where supported, else fp16 with a grad scaler); CPU runs fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save GPU memory."""
    compile: bool = False
    """torch.compile the UNet and ControlNet of the training step (inductor kernels that fuse its many small ops).
    For long runs: the first step compiles (the debug SD on 2 CPU cores: ~4 min cold, ~15 s from torch's compile
    cache), the steps after it ran 1.23x faster there."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks). 0: Ray Train's local mode, one process training in this one (no Ray cluster
    or worker processes: the quickest start, for a laptop or a one-GPU box); checkpoints, resume and W&B as with
    workers, but a failure ends the run (re-run the command to resume) instead of restarting a worker."""
    cpus_per_worker: int | None = None
    """CPUs reserved for each worker; its torch and OpenCV threads (default: 1 with a GPU; on CPUs, the largest
    node's CPUs shared among the workers; in local mode, this process's CPUs)."""
    use_gpu: bool | None = None
    """One GPU per worker (default: when the cluster, or in local mode this machine, has a GPU)."""
    latents: Literal["auto", "off"] = "auto"
    """auto: train on the latents the dataset job stored (--latents BASE) instead of encoding every image with the
    VAE at every step, when this base's VAE is the one that made them (another VAE is an error) and the run
    trains at the dataset's resolution; off: always encode the images."""
    data_workers: int = 0
    """DataLoader worker processes per rank: decoding beside the training step (they run outside the CPUs Ray
    reserves for the worker; on a CPU-only run they compete with training for the same cores). Each loader worker
    draws and shuffles shards of its own, seeded by its index, so the samples trained on depend on this number (0 and
    1 give the same stream): compare runs, and resume them, at one value (a resume at another says so)."""
    epoch_samples: int = 10_000
    """Samples per rank per data epoch (the stream is resampled to this length)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (reported through ray.train.report)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on storage."""
    max_failures: int = 2
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""
    log_every: int = 10
    """Steps between logged metrics."""
    validate_every: int = 500
    """Steps between validation grids (condition | generated | target) logged to W&B (0: off)."""
    validation_data: list[str] | None = None
    """Validation shards (same forms as --data), held out of training where --data holds them too; default: the last
    training shard, held out of training."""
    validation_samples: int = 4
    """Fixed validation conditions sampled at every validation."""
    validation_steps: int = 20
    """Sampler steps when sampling validation images."""
    validation_sampler: Literal["ddim", "euler_a"] = "ddim"
    """Validation sampler, from the base's training noise schedule: DDIM (eta 0, as the paper samples), or Euler
    ancestral, whose fresh noise at each step hides a small base's denoising errors (the toy's: edge F1 0.87
    against DDIM's 0.76 on one checkpoint, at 10 steps each and the same cost; 0.28 against 0.25 at step 0)."""
    guidance_scales: list[float] = field(default_factory=lambda: [9.0, 1.0])
    """Classifier-free guidance scales sampled at each validation: the paper's 9.0 first, and 1.0, where
    small-scale ControlNets follow their condition more faithfully. The first mode at the first scale is the
    run's primary fidelity curve (and the grid)."""
    prompt_modes: list[Literal["caption", "empty", "default"]] = field(
        default_factory=lambda: ["caption", "empty", "default"])
    """Validation prompt modes: the samples' captions, the empty prompt, the paper's default prompt."""
    control_branches: Literal["cond", "both"] = "both"
    """Where validation sampling applies the control under CFG: both branches (as diffusers' pipeline does at
    inference) or the conditional one only (eps_u from the locked base; small models need it to follow the
    condition under guidance). Not diffusers' guess_mode, which also rescales the residuals."""
    validation_timeout_min: float = 180.0
    """Minutes the other DDP ranks wait for rank 0's validation (on a gloo group of their own, so that a long
    validation cannot hit the training group's collective timeout)."""
    fidelity: bool = True
    """Score condition fidelity at each validation: re-annotate the generated images with the task's annotator,
    set up as the dataset's manifest records (Canny ranges and seed, weights)."""
    annotator_weights: str | None = None
    """Weights folder/URL for the fidelity annotator (HED, MiDaS, OpenPose); default: the dataset job's --weights."""
    seed: int = 0
    """Seed for noise, timesteps, data order and prompt dropout."""
    wandb: Literal["auto", "online", "offline", "off"] = "auto"
    """W&B logging on rank 0: auto is online with an API key, offline otherwise."""
    wandb_project: str = "controlnet"
    """W&B project."""
    wandb_group: str | None = None
    """W&B group: the runs of one dataset-size sweep share it (train/sweep.py sets it to the sweep's prefix)."""
    dataset_size: int | None = None
    """Samples in the training subset, recorded for the sweep report (train/sweep.py sets it)."""

    def __post_init__(self) -> None:
        """Values the run could only fail on later, in a worker after loading the base model: refused up front
        (on the command line, tyro's message and exit status 2)."""
        for flag, value in (("--batch-size", self.batch_size), ("--checkpoint-every", self.checkpoint_every),
                            ("--max-steps", self.max_steps),  # 0 trained nothing and named no checkpoint
                            ("--grad-accum", self.grad_accum), ("--log-every", self.log_every),
                            ("--keep-checkpoints", self.keep_checkpoints), ("--cpus-per-worker", self.cpus_per_worker)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, not {value}")
        for flag, value in (("--warmup-steps", self.warmup_steps),
                            ("--num-workers", self.num_workers), ("--data-workers", self.data_workers),
                            ("--max-failures", self.max_failures), ("--validate-every", self.validate_every),
                            ("--weight-decay", self.weight_decay), ("--max-grad-norm", self.max_grad_norm),
                            ("--decoder-lr", self.decoder_lr), ("--unlock-decoder-at", self.unlock_decoder_at)):
            if value is not None and not 0 <= value < math.inf:  # `not <=`: NaN is refused too
                raise ValueError(f"{flag} must be finite and not negative, not {value}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"--lr must be positive and finite, not {self.lr}")
        if not 0 < self.validation_timeout_min < math.inf:  # 0 timed out the ranks' first barrier (DistStoreError)
            raise ValueError(f"--validation-timeout-min must be positive and finite, not {self.validation_timeout_min}")
        if not all(math.isfinite(scale) for scale in self.guidance_scales):
            raise ValueError(f"--guidance-scales must be finite numbers, not {list(self.guidance_scales)}")
        if self.run_name.strip() in ("", ".", "..") or any(c in self.run_name for c in "/\\"):
            # the run's folder under --storage-path: '' or '..' wrote checkpoints beside other runs or above them
            raise ValueError(f"--run-name names one folder under --storage-path (no '/'), not {self.run_name!r}")
        if not 0 <= self.prompt_dropout <= 1:
            raise ValueError(f"--prompt-dropout is a fraction of captions, from 0 to 1, not {self.prompt_dropout}")
        if self.resolution < 8 or self.resolution % 8:  # SD's VAE and the condition embedding both downsample 8x
            raise ValueError(f"--resolution must be a multiple of 8, not {self.resolution}")
        if self.epoch_samples < self.batch_size:
            raise ValueError(f"--epoch-samples must be at least one batch (--batch-size {self.batch_size}), "
                             f"not {self.epoch_samples}")
        if self.validate_every:
            for flag, values in (("--guidance-scales", self.guidance_scales), ("--prompt-modes", self.prompt_modes)):
                if not values:
                    raise ValueError(f"{flag} needs at least one value while validating (--validate-every 0: off)")
            for flag, value in (("--validation-samples", self.validation_samples),
                                ("--validation-steps", self.validation_steps)):
                if value < 1:
                    raise ValueError(f"{flag} must be at least 1 while validating (--validate-every 0: off), "
                                     f"not {value}")


# what a run trains on and how its fidelity curve is measured: resuming with other values would splice two
# experiments into one history and one curve (the optimizer's saved state would also override a new --lr unseen).
# The others (steps, workers, threads, checkpoints, logging, precision, latents) may change between submissions.
EXPERIMENT_SETTINGS = (
    "data", "condition", "base_model", "controlnet", "resolution", "batch_size", "grad_accum", "lr", "warmup_steps",
    "weight_decay", "max_grad_norm", "prompt_dropout", "mode", "unlock_decoder_at", "decoder_lr", "seed",
    "epoch_samples", "validation_data", "validation_samples", "validation_steps", "validation_sampler",
    "guidance_scales", "prompt_modes", "control_branches", "fidelity", "annotator_weights",
)


def resume_mismatch(saved: dict, current: TrainConfig) -> list[str]:
    """'lr 0.0001 -> 0.001' for each experiment setting the checkpoint's run was started with otherwise (settings a
    checkpoint predates pass)."""
    now = dataclasses.asdict(current)
    return [f"{name} {saved[name]!r} -> {now[name]!r}" for name in EXPERIMENT_SETTINGS
            if name in saved and saved[name] != now[name]]


def stream_changes(saved: dict, current: TrainConfig) -> list[str]:
    """'--data-workers 0 -> 2' for each setting that decides which samples the steps draw, where a resume changes
    it: each rank and each of its loader workers draws shards of its own (0 and 1 of either are one stream). These
    may change (another cluster), unlike the experiment settings, but the samples from then on are not the
    uninterrupted run's."""
    now = dataclasses.asdict(current)
    return [f"{flag} {saved[name]} -> {now[name]}" for name, flag in (("num_workers", "--num-workers"),
                                                                      ("data_workers", "--data-workers"))
            if name in saved and max(saved[name], 1) != max(now[name], 1)]


def debug() -> TrainConfig:
    """The offline embedded default: a tiny random SD built locally, 64 px, a few steps on CPU, in one process
    (Ray Train's local mode)."""
    return TrainConfig(
        base_model=TINY_SD, resolution=64, batch_size=2, lr=1e-4, max_steps=20, checkpoint_every=10, num_workers=0,
        epoch_samples=64, log_every=1, validate_every=10, validation_samples=2, validation_steps=4,
        run_name="controlnet-debug",
    )


def toy() -> TrainConfig:
    """Sudden convergence on a laptop (make repro): the committed pixel-space shapes base at 32 px, Canny shapes
    from pipeline.toy_shapes, batch 32, lr 1e-4, 50% empty prompts; 64 held-out samples scored every 50 steps at
    CFG 1 and 9 with captions and empty prompts (Euler ancestral, 10 steps), the control on the conditional
    branch. One process (Ray Train's local mode): the toy fits one laptop."""
    return TrainConfig(
        data=["data/toy/canny"], base_model=TOY_BASE, storage_path="data/toy/runs", run_name="controlnet-toy",
        num_workers=0,
        resolution=32, batch_size=32, lr=1e-4, max_grad_norm=0.0, max_steps=1200, epoch_samples=6000,
        checkpoint_every=100, log_every=25, validate_every=50, validation_samples=64, validation_steps=10,
        validation_sampler="euler_a",
        guidance_scales=[1.0, 9.0], prompt_modes=["caption", "empty"], control_branches="cond",
    )


def sd15() -> TrainConfig:
    """Stable Diffusion 1.5 with the paper's settings (lr 1e-5, 50% prompt dropout, SD locked)."""
    return TrainConfig(
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512, batch_size=4, lr=1e-5,
        checkpoint_every=1000, epoch_samples=100_000, run_name="controlnet-sd15", data_workers=2,
    )


def sd21() -> TrainConfig:
    """Stable Diffusion 2.1 (v-prediction, 768 px)."""
    return dataclasses.replace(sd15(), base_model="stabilityai/stable-diffusion-2-1", resolution=768,
                               run_name="controlnet-sd21")


PRESETS = {"debug": debug, "toy": toy, "sd15": sd15, "sd21": sd21}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """--preset picks the defaults; every other flag overrides a field (see --help)."""
    from pipeline.format import cli  # here, not at the top: the trainer's workers and the GPU check need the config

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="debug")
    known, _ = pre.parse_known_args(argv)
    preset = known.preset if known.preset in PRESETS else "debug"  # a bad --preset: tyro's message, below
    return cli(
        TrainConfig,
        default=dataclasses.replace(PRESETS[preset](), preset=preset),
        args=argv,
        prog="python train/run.py",
        description=f"Train a ControlNet with Ray Train DDP. --preset (now: {preset}) sets the defaults "
        "below; flags override them.",
    )


def exit_without_collecting(code: int) -> None:
    """Exit once everything is written and closed, with every object moved to the collector's permanent generation
    first: the interpreter's last collections then skip the objects torch, diffusers, transformers and Ray made,
    which take ~2 s of the command's end (0.2 s frozen, measured on 2 cores). After a SIGTERM on Ray workers,
    those collections also aborted a sweep (exit 134) after its stopped line. A stop that cut ray.init short ends
    the process without the interpreter's teardown (end_process)."""
    import gc

    from pipeline.format import end_process

    gc.freeze()
    end_process(code)
