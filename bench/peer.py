"""peer: what bench.trainer_speed needs to run diffusers' examples/controlnet/train_controlnet.py beside our trainer:
its own virtualenv, our shards in the form its `load_dataset(--train_data_dir)` reads, and its command line.

The script is the user's (--peer-script); nothing of it is copied here. It runs in a virtualenv of its own so that
its dependencies (accelerate, datasets, torchvision, tensorboard) never become ours.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# the torchvision release built for our torch (2.13); the rest are the newest releases that ran the script here
TORCHVISION, ACCELERATE, DATASETS, TENSORBOARD = "0.28.0", "1.15.0", "5.2.0", "2.21.0"
MARKER = ".peer-ready"  # written last, holding the pins: a venv without it (or with other pins) is (re)installed

SITECUSTOMIZE = '''\
# Written by bench/peer.py. The registry's torchvision 0.28.0 is a CUDA build: with CPU torch its import fails
# while registering fake kernels for torchvision::nms and ::qnms, whose schemas only its CUDA library defines.
# Defining the two schemas first, at interpreter start, lets `import torchvision` (and so the peer script) work.
import torch

_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor qdets, Tensor qscores, float dets_scale, float scores_scale, float iou_threshold) -> Tensor")
'''


def _run(argv: list[str], what: str) -> str:
    """Run a step; a failure is one line: what failed and the last lines it printed to stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in proc.stderr.strip().splitlines()[-4:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def build_peer_venv(venv: Path) -> Path:
    """The peer's virtualenv (created or completed if its marker is missing or names other pins); its python.

    torch, diffusers and transformers are pinned to the versions this interpreter runs, so both trainers run
    the same kernels and models and only the training loops differ.
    """
    python = venv / "bin" / "python"
    pins = [f"torch=={md.version('torch').split('+')[0]}", f"torchvision=={TORCHVISION}",
            f"diffusers=={md.version('diffusers')}", f"transformers=={md.version('transformers')}",
            f"accelerate=={ACCELERATE}", f"datasets=={DATASETS}", f"tensorboard=={TENSORBOARD}"]
    marker = venv / MARKER
    if marker.exists() and marker.read_text() == "\n".join(pins):
        return python
    print(f"peer venv: creating {venv}", flush=True)
    _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    print(f"peer venv: pip install {' '.join(pins)}", flush=True)
    _run([str(python), "-m", "pip", "install", "--quiet", *pins], "pip install")
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], "site-packages")
    print("peer venv: writing sitecustomize.py (torchvision op schemas)", flush=True)
    (Path(site.strip()) / "sitecustomize.py").write_text(SITECUSTOMIZE)
    print("peer venv: checking imports", flush=True)
    _run([str(python), "-c", "import torchvision, accelerate, datasets, diffusers, transformers, "
          "torch.utils.tensorboard"], "importing the peer's dependencies")
    marker.write_text("\n".join(pins))
    return python


def _samples(shard: str) -> tuple[list[tuple[bytes, bytes, str]], str | None]:
    """(jpg, <task>.png, caption) per complete sample of a local tar, in tar order, and the condition task."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            if info.isfile() and "." in info.name:
                key, ext = info.name.split(".", 1)  # keys have no dots (pipeline.format)
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    tasks = {ext.split(".")[0] for m in members.values() for ext in m if ext.count(".") == 1 and ext.endswith(".png")}
    if len(tasks) > 1:
        raise ValueError(f"{shard}: condition maps of several tasks {sorted(tasks)}")
    task = tasks.pop() if tasks else None
    cond = f"{task}.png"
    rows = [(m["jpg"], m[cond], m["txt"].decode("utf-8").strip()) for m in members.values()
            if "jpg" in m and cond in m and "txt" in m]  # the members our trainer needs; it skips the others
    return rows, task


def write_peer_dataset(shards: list[str], folder: Path) -> int:
    """Our output shards (local tar paths) as folder/train.parquet: image and conditioning_image as datasets'
    Image() features, text as a string. Returns the number of samples (every complete sample of the shards).

    `datasets` is not a dependency of ours, so this writes the parquet file with pyarrow (ours already) in the
    layout `Dataset.to_parquet` writes: struct<bytes, path> image columns, and the features in the schema's
    "huggingface" metadata, from which `load_dataset(folder)` (the parquet builder) restores the Image features.
    """
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "conditioning_image": {"_type": "Image"},
                "text": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema([("image", image), ("conditioning_image", image), ("text", pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    folder.mkdir(parents=True, exist_ok=True)
    out, tmp, count, tasks = folder / "train.parquet", folder / "train.parquet.tmp", 0, set()
    with pq.ParquetWriter(tmp, schema) as writer:
        for shard in shards:  # a row group per shard: one shard's bytes in memory at a time
            rows, task = _samples(shard)
            tasks.add(task)
            writer.write_table(pa.Table.from_pydict({
                "image": [{"bytes": jpg, "path": None} for jpg, _, _ in rows],
                "conditioning_image": [{"bytes": png, "path": None} for _, png, _ in rows],
                "text": [caption for _, _, caption in rows]}, schema=schema))
            count += len(rows)
    if len(tasks - {None}) > 1:
        tmp.unlink()
        raise ValueError(f"shards of several condition tasks: {sorted(tasks - {None})}")
    os.replace(tmp, out)
    return count


def peer_command(python: Path, script: Path, base_model: Path, data_dir: Path, output_dir: Path, *, steps: int,
                 batch_size: int, resolution: int, lr: float, seed: int, threads: int,
                 ) -> tuple[list[str], dict[str, str]]:
    """argv and environment of one peer run: `steps` optimizer steps, fp32, constant lr without warm-up, 50% empty
    prompts, clipping at 1.0, no validation, one save (the ControlNet, in output_dir) at the end, offline.

    Plain `python script`, not `accelerate launch`: one process on the CPU needs no launcher, and the launcher
    would read ~/.cache/huggingface/accelerate/default_config.yaml when there is one (another machine's settings)
    and warn about every default it fills in. The script's default tracker, tensorboard, logs to output_dir/logs.
    """
    argv = [str(python), str(script), "--pretrained_model_name_or_path", str(base_model),
            "--train_data_dir", str(data_dir), "--image_column", "image", "--conditioning_image_column",
            "conditioning_image", "--caption_column", "text", "--output_dir", str(output_dir),
            "--cache_dir", str(output_dir / "datasets-cache"),  # load_dataset's arrow copy: not in ~/.cache
            "--resolution", str(resolution), "--train_batch_size", str(batch_size), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(steps + 1), "--learning_rate", str(lr), "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--max_grad_norm", "1.0", "--proportion_empty_prompts", "0.5",
            "--mixed_precision", "no", "--dataloader_num_workers", "0", "--seed", str(seed),
            "--report_to", "tensorboard"]
    env = {k: v for k, v in os.environ.items()  # the caller's launcher settings and paths stay out of its venv
           if not k.startswith("ACCELERATE_") and k not in {"PYTHONPATH", "PYTHONHOME"}}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "WANDB_MODE": "disabled", "TQDM_MININTERVAL": "0"})  # tqdm: every step on the console, to time
    return argv, env
