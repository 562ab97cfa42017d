"""W&B logging on rank 0 (online with an API key, offline otherwise, or off), and the run's results JSON"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from train.config import TrainConfig


def wandb_mode(choice: str) -> tuple[str, str]:
    """(mode, message) decided on the driver: 'auto' is online only when an API key is configured."""
    if choice != "auto":
        return choice, f"W&B: {choice}"
    if os.environ.get("WANDB_MODE") in {"offline", "disabled"}:
        mode = "off" if os.environ["WANDB_MODE"] == "disabled" else "offline"
        return mode, f"W&B: {mode} (WANDB_MODE={os.environ['WANDB_MODE']})"
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb():
        return "online", "W&B: online"
    return "offline", "W&B: no API key found, logging offline; upload later with `wandb sync <dir>/offline-run-*`"


def _netrc_has_wandb() -> bool:
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def run_id(run_name: str) -> str:
    """A stable W&B run id from the run name, so a resumed run continues the same W&B run."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


class RunLogger:
    """Rank 0's logger. With mode 'off' it only keeps the results JSON."""

    def __init__(self, cfg: TrainConfig, mode: str, directory: str | None):
        self.cfg = cfg
        self.run = None
        if mode != "off":
            import wandb

            os.makedirs(directory or "wandb", exist_ok=True)
            self.run = wandb.init(
                project=cfg.wandb_project, name=cfg.run_name, id=run_id(cfg.run_name), resume="allow",
                mode=mode, dir=directory, config=dataclasses.asdict(cfg), group=cfg.wandb_group,
            )

    def log(self, metrics: dict[str, Any], prefix: str = "train/") -> None:
        if self.run is not None:
            step = metrics["step"]
            self.run.log({f"{prefix}{k}": v for k, v in metrics.items() if k != "step"}, step=step)

    def log_images(self, name: str, images: list, captions: list[str], step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: [wandb.Image(i, caption=c) for i, c in zip(images, captions, strict=True)]},
                         step=step)

    def note(self, text: str) -> None:
        print(text, flush=True)
        if self.run is not None:
            self.run.summary["note"] = text

    def finish(self, state) -> None:
        write_results(self.cfg, state)
        if self.run is not None:
            self.run.summary.update({"final_step": state.step, "resumed_from": state.resumed_from})
            for name, curve in state.fidelity.items():  # the sudden-convergence step and mAUCC of each curve
                self.run.summary[f"{name}/convergence_step"] = curve.get("step")
                self.run.summary[f"{name}/mauc"] = curve.get("mauc")
            self.run.finish()


def results_url(cfg: TrainConfig) -> str:
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}/results.json"


def write_results(cfg: TrainConfig, state) -> None:
    """The run's results JSON next to its checkpoints: config, per-step losses, where it resumed from."""
    import fsspec

    results = {"config": dataclasses.asdict(cfg), "final_step": state.step, "resumed_from": state.resumed_from,
               "history": state.history, "fidelity": state.fidelity}
    with fsspec.open(results_url(cfg), "w") as f:
        json.dump(results, f, indent=1)
