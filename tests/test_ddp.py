"""the trainer under DDP with 2 ranks on gloo, without Ray (two spawned processes): the decoder unlocked mid-run,
the middle-only mode, and rank 0's validation outlasting the process group's timeout"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# the "training" group's collectives give up after this; rank 0's "validation" below takes longer. Only that
# scenario's group is this short: the default group's steps, on a loaded 2-core machine, can leave one rank behind
# the other by more than 2 s (building a ControlNet, DDP's first broadcast), and a timed-out gloo collective
# aborts its process
PG_TIMEOUT_S = 2
SLOW_VALIDATION_S = 2 * PG_TIMEOUT_S
DEFAULT_TIMEOUT_S = 300


def checksum(params) -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)


def same_on_every_rank(params) -> bool:
    mine = checksum(params)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, mine) for g in gathered)


def trainer_for(base_model: str, rank: int, world: int, **overrides):
    from train.config import debug
    from train.loop import Trainer

    cfg = dataclasses.replace(debug(), base_model=base_model, batch_size=2, **overrides)
    torch.manual_seed(0)  # every rank builds the same ControlNet, as Ray Train's workers do
    return Trainer(cfg, rank, world, torch.device("cpu"))


def train_steps(trainer, rank: int, steps: int) -> list[float]:
    from bench.gpu_check import synthetic_batch

    generator = torch.Generator().manual_seed(rank)
    # each rank sees its own data, so unreduced gradients would leave the ranks apart
    return [trainer.train_step([synthetic_batch(2, 64, seed=10 * rank + s)], generator).item()
            for s in range(steps)]


def unlocked_decoder(base_model: str, rank: int, world: int) -> dict:
    from train.model import decoder_parameters

    trainer = trainer_for(base_model, rank, world, unlock_decoder_at=1)
    train_steps(trainer, rank, 1)
    old_wrapper = weakref.ref(trainer.model)
    decoder = decoder_parameters(trainer.base.unet)
    before = checksum(decoder)
    trainer.unlock_decoder()
    gc.collect()
    losses = train_steps(trainer, rank, 2)
    return {"old_wrapper_freed": old_wrapper() is None, "wrapped": type(trainer.model).__name__,
            "decoder_trained": not torch.equal(before, checksum(decoder)),
            "in_sync": same_on_every_rank([*trainer.controlnet.parameters(), *decoder]), "losses": losses}


def middle_only(base_model: str, rank: int, world: int) -> dict:
    trainer = trainer_for(base_model, rank, world, mode="middle")
    skips = list(trainer.controlnet.controlnet_down_blocks.parameters())
    train_steps(trainer, rank, 2)  # a DDP waiting for the frozen skip convs' gradients fails at the 2nd step
    return {"in_sync": same_on_every_rank(trainer.controlnet.parameters()),
            "skips_zero": all(p.abs().sum() == 0 for p in skips),
            "middle_trained": trainer.controlnet.controlnet_mid_block.weight.abs().sum().item() > 0}


def gradients_after_backward(base_model: str, rank: int, world: int) -> dict:
    """One backward pass under DDP, each rank on its own batch: where the ControlNet's gradients live."""
    from bench.gpu_check import synthetic_batch
    from train.model import diffusion_loss

    trainer = trainer_for(base_model, rank, world)
    batch = synthetic_batch(2, 64, seed=rank)
    loss = diffusion_loss(trainer.base, trainer.model, batch["pixel_values"], batch["conditioning_pixel_values"],
                          trainer.prompts(list(batch["caption"])), torch.Generator().manual_seed(rank))
    loss.backward()
    grads = [p.grad for p in trainer.controlnet.parameters() if p.requires_grad]
    return {"gradients": len(grads), "storages": len({g.untyped_storage().data_ptr() for g in grads}),
            "in_sync": same_on_every_rank(grads)}


def slow_validation(rank: int, wait: bool, training) -> dict:
    """Rank 0 validates for longer than the training group's timeout, then every rank runs a collective on it."""
    from train.loop import rank_zero_wait_group, wait_for_rank_zero

    group = rank_zero_wait_group(timeout_s=60)
    if rank == 0:
        time.sleep(SLOW_VALIDATION_S)
    if wait:
        wait_for_rank_zero(group)
    try:
        dist.all_reduce(torch.ones(1), group=training)
        return {"collective": "ok"}
    except RuntimeError as e:
        return {"collective": f"failed: {str(e).splitlines()[0][:200]}"}


def stream_cursors_gathered(rank: int) -> list:
    """What rank 0 saves at a checkpoint: every rank's stream cursors (train.loop.every_rank on the gloo group)."""
    from train.loop import every_rank, rank_zero_wait_group

    return every_rank([(f"shard-{rank}.tar", 1024 * rank), None], rank_zero_wait_group(timeout_s=60))


def rank_main(rank: int, world: int, init_file: str, base_model: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
    results = {"unlock": unlocked_decoder(base_model, rank, world), "middle": middle_only(base_model, rank, world),
               "gradients": gradients_after_backward(base_model, rank, world),
               "cursors": stream_cursors_gathered(rank)}
    training = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    results["slow_validation"] = slow_validation(rank, wait=True, training=training)
    # last: without the wait, the late collective times out (this may leave the group unusable)
    results["slow_validation_without_wait"] = slow_validation(rank, wait=False, training=training)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    from train.tiny_sd import build_tiny_sd

    tmp = tmp_path_factory.mktemp("ddp")
    base = build_tiny_sd(tmp / "tiny-sd")
    mp.start_processes(rank_main, args=(2, str(tmp / "init"), str(base), str(tmp)), nprocs=2, join=True,
                       start_method="spawn")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_unlocking_the_decoder_rewraps_once_and_keeps_ranks_identical(ranks):
    for rank in ranks:
        unlock = rank["unlock"]
        assert unlock["wrapped"] == "DistributedDataParallel" and unlock["old_wrapper_freed"]  # no second reducer
        assert unlock["decoder_trained"] and unlock["in_sync"]


def test_middle_only_mode_trains_under_ddp(ranks):
    for rank in ranks:
        assert rank["middle"] == {"in_sync": True, "skips_zero": True, "middle_trained": True}


def test_gradients_are_averaged_in_place_in_the_all_reduce_buckets(ranks):
    for rank in ranks:
        gradients = rank["gradients"]
        # a few flat buckets hold every gradient (no second copy per parameter), averaged over the ranks
        assert gradients["storages"] * 10 <= gradients["gradients"] and gradients["in_sync"]


def test_ranks_wait_for_a_validation_longer_than_the_collective_timeout(ranks):
    assert [r["slow_validation"]["collective"] for r in ranks] == ["ok", "ok"]
    # the premise: had they not waited on the long-timeout group, the collective would have timed out
    assert any(r["slow_validation_without_wait"]["collective"].startswith("failed") for r in ranks)


def test_every_ranks_stream_cursors_reach_every_rank(ranks):
    expected = [[[f"shard-{r}.tar", 1024 * r], None] for r in range(2)]  # as JSON keeps them
    assert [r["cursors"] for r in ranks] == [expected, expected]
