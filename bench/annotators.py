"""Per-annotator throughput at 512 px, batched vs one image at a time, on random weights at the real model sizes"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import write_report
from pipeline.sample_data import PHOTOS, load_photo

TASKS = ("canny", "hed", "midas", "openpose", "blip")
CAPTIONERS = ("blip",)  # built with build_captioner, called without keys
# the constructor argument that caps images per forward, set to --batch so a "batch" is one forward pass
BATCH_KWARG = {"hed": "max_batch", "midas": "batch_size", "blip": "batch_size"}
GPU_IMAGES = 16
CPU_IMAGES = {"blip": 4}  # images per measurement on CPU; other tasks: CPU_DEFAULT_IMAGES
CPU_DEFAULT_IMAGES = 8
BERT_VOCAB = 30522  # bert-base-uncased; BLIP adds [DEC] and [ENC]: 30524, the published text vocab
BLIP_NOTE = "random BLIP weights never predict [SEP]: every caption runs to max_new_tokens (worst-case length)"

Call = Callable[[list[np.ndarray]], list[Any]]


# ---------------------------------------------------------------------------------------------------------
# random weights at the published sizes, in the published layouts


def write_weights(task: str, folder: Path) -> str | None:
    """Write random full-size weights for `task` into `folder`; the --weights value for the registry."""
    if task == "canny":
        return None
    if task == "hed":
        from tests.tiny_weights.hed import write_tiny_hed  # full architecture already

        write_tiny_hed(folder)
    elif task == "openpose":
        from tests.tiny_weights.openpose import write_tiny_openpose  # full architecture already

        write_tiny_openpose(folder)
    elif task == "midas":
        write_dpt_hybrid(folder)
    elif task == "blip":
        write_blip_large(folder)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return str(folder)


def write_dpt_hybrid(folder: Path) -> Path:
    """`folder`/dpt-hybrid-midas: the published DPT-Hybrid config (~123M parameters), random init, HF layout."""
    import torch
    from transformers import DPTForDepthEstimation

    from annotate.midas import HF_FOLDER, dpt_hybrid_config

    torch.manual_seed(0)
    out = folder / HF_FOLDER
    DPTForDepthEstimation(dpt_hybrid_config()).save_pretrained(out)
    return out


def write_bert_sized_tokenizer(out: Path) -> Any:
    """A BertTokenizer with bert-base-uncased's size and special-token ids ([PAD] 0, [SEP] 102) plus [DEC], [ENC].

    tests/tiny_weights/blip.py writes a 43-token vocabulary; the LM head's cost grows with the vocabulary, so this
    pads the same words with filler tokens to BERT's 30522.
    """
    from transformers import BertTokenizer

    from tests.tiny_weights.blip import WORDS

    head = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab = head + [f"w{i}" for i in range(BERT_VOCAB - len(head))]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(out), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tokenizer.save_pretrained(str(out))
    return tokenizer


def blip_large_config(tokenizer: Any) -> Any:
    """Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px, BERT-base decoder (~470M parameters)."""
    from transformers import BlipConfig

    sep = tokenizer.convert_tokens_to_ids("[SEP]")
    text = {
        "vocab_size": len(tokenizer),  # 30524
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
        "sep_token_id": sep,  # generation stops at [SEP]
        "eos_token_id": sep,
        "pad_token_id": tokenizer.convert_tokens_to_ids("[PAD]"),
    }
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 16,
        "initializer_range": 0.02,
    }
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=512, image_text_hidden_size=256)


def write_blip_large(folder: Path) -> Path:
    """`folder`/blip-image-captioning-large: config, random weights (~1.9 GB) and a locally built tokenizer."""
    import torch
    from transformers import BlipForConditionalGeneration

    from annotate.blip import HF_FOLDER

    out = folder / HF_FOLDER
    tokenizer = write_bert_sized_tokenizer(out)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(blip_large_config(tokenizer))
    model.save_pretrained(str(out))  # no preprocessor_config.json: the captioner then uses 384 px and CLIP stats
    del model
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------------------
# inputs, building and timing


def photo_crops(count: int, size: int) -> list[np.ndarray]:
    """`count` (size, size, 3) uint8 RGB: centre squares of scikit-image's photos, resized, mirrored on the 2nd lap."""
    photos = [load_photo(name) for name in PHOTOS]
    crops = []
    for i in range(count):
        image = photos[i % len(photos)]
        h, w = image.shape[:2]
        side = min(h, w)
        square = image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        square = square if (i // len(photos)) % 2 == 0 else square[:, ::-1]
        interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
        crops.append(cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=interpolation))
    return crops


def build_call(task: str, weights: str | None, device: str, batch: int,
               detect_resolution: int | None = None) -> tuple[Call, dict[str, Any]]:
    """The registry's annotator or captioner as an images -> outputs function, and what the row records of it."""
    from annotate import NEURAL_TASKS, build_annotator, build_captioner

    kwargs: dict[str, Any] = {"weights": weights, "device": device}
    if task in BATCH_KWARG:
        kwargs[BATCH_KWARG[task]] = batch
    if task in NEURAL_TASKS and detect_resolution is not None:
        kwargs["detect_resolution"] = detect_resolution
    if task in CAPTIONERS:
        captioner = build_captioner(task, **kwargs)
        return captioner, {"precision": captioner.describe()["precision"], "max_new_tokens": captioner.max_new_tokens}
    annotator = build_annotator(task, **kwargs)

    def call(images: list[np.ndarray]) -> list[Any]:
        return annotator(images, [f"bench{i:04d}" for i in range(len(images))])

    # what the annotator itself runs in (OpenPose stays fp32 on CUDA, the others autocast); Canny's is OpenCV
    return call, {"precision": annotator.describe().get("precision", "OpenCV")}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    """Peak torch-allocated GPU memory since the last reset, weights included; None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def time_mode(call: Call, images: list[np.ndarray], chunk: int, repeats: int, device: str) -> list[float]:
    """Images/s of each of `repeats` passes over `images`, `chunk` images per call."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), chunk):
            call(images[i : i + chunk])
        _synchronize(device)
        rates.append(len(images) / (time.perf_counter() - start))
    return rates


def measure_task(
    task: str, images: list[np.ndarray], weights: str | None, batch: int, repeats: int, device: str,
    detect_resolution: int | None = None,
) -> dict[str, Any]:
    """One table row: the task's images/s with `batch` images per call and with one, median of `repeats`."""
    start = time.perf_counter()
    call, info = build_call(task, weights, device, batch, detect_resolution)
    if detect_resolution is not None:
        info["detect_resolution"] = detect_resolution
    row: dict[str, Any] = {
        "task": task,
        "device": "cpu" if task == "canny" else device,  # OpenCV runs on the CPU whatever --device says
        **info,
        "batch": min(batch, len(images)),  # the batch that ran: fewer images than --batch make one smaller call
        "images": len(images),
        "size": list(images[0].shape[:2]),
        "repeats": repeats,
        "load_s": time.perf_counter() - start,
        "load_avg_1min": os.getloadavg()[0],  # other work on the machine: above its core count, the CPU is shared
    }
    for mode, chunk in (("batched", batch), ("single", 1)):
        outputs = call(images[:chunk])  # warm-up at this mode's shapes (kernels, allocator, caches)
        if task in CAPTIONERS:
            row["caption_tokens"] = statistics.mean(len(text.split()) for text in outputs)
        _reset_peak(device)
        rates = time_mode(call, images, chunk, repeats, device)
        row[mode] = {"images_per_s": statistics.median(rates), "trials": rates, "peak_gpu_mb": _peak_mb(device)}
    row["ratio"] = row["batched"]["images_per_s"] / row["single"]["images_per_s"]
    return row


def default_images(task: str, device: str) -> int:
    return GPU_IMAGES if device.startswith("cuda") else CPU_IMAGES.get(task, CPU_DEFAULT_IMAGES)


def run_task(task: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Write the task's weights to a temporary folder, measure, and delete them (BLIP's are ~1.9 GB)."""
    images = photo_crops(args.images or default_images(task, device), args.size)
    with tempfile.TemporaryDirectory(prefix=f"bench-{task}-") as tmp:
        start = time.perf_counter()
        weights = write_weights(task, Path(tmp))
        write_s = time.perf_counter() - start
        row = measure_task(task, images, weights, args.batch, args.repeats, device, args.detect_resolution)
    row["write_weights_s"] = write_s
    return row


# ---------------------------------------------------------------------------------------------------------
# report


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'task':10}{'device':8}{'precision':15}{'batch':>6}{'images':>7}{'batched/s':>11}{'single/s':>10}"
    lines = [header + f"{'ratio':>7}{'peak GPU MB':>13}"]
    for r in rows:
        peak = r["batched"]["peak_gpu_mb"]
        lines.append(
            f"{r['task']:10}{r['device']:8}{r['precision']:15}{r['batch']:>6}{r['images']:>7}"
            f"{r['batched']['images_per_s']:>11.2f}{r['single']['images_per_s']:>10.2f}{r['ratio']:>7.2f}"
            f"{'-' if peak is None else f'{peak:.0f}':>13}"
        )
    return "\n".join(lines)


def environment(device: str) -> dict[str, Any]:
    import torch

    env = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from " + ",".join(TASKS))
    parser.add_argument("--batch", type=int, default=8, help="images per call (and per forward) when batched")
    images_help = f"images per measurement (default {GPU_IMAGES} on GPU; {CPU_DEFAULT_IMAGES} on CPU, blip 4)"
    parser.add_argument("--images", type=int, default=None, help=images_help)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode; the median is reported")
    parser.add_argument("--size", type=int, default=512, help="input side in px")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1 ...")
    parser.add_argument("--detect-resolution", type=int, default=None,
                        help="the neural annotators' detect resolution (default: theirs, 512)")
    parser.add_argument("--json", default="bench/results/annotators.json")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are written locally; never reach for the hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its save/load bars would break up the progress lines
    from annotate.device import pick_device

    device = str(pick_device(args.device))
    rows = []
    for task in args.tasks:
        print(f"{task}: writing random full-size weights and measuring ...", flush=True)
        rows.append(run_task(task, args, device))
    report = {
        "size": args.size,
        "batch": args.batch,
        "repeats": args.repeats,
        "environment": environment(device),
        "notes": [BLIP_NOTE] if "blip" in args.tasks else [],
        "results": rows,
    }
    threads = report["environment"]["torch_threads"]
    print(f"\nAnnotators at {args.size} px, random weights at the published sizes, median of {args.repeats}, "
          f"{threads} torch threads")
    print(format_table(rows))
    for note in report["notes"]:
        print(f"note: {note}")
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
