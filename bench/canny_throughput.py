"""Canny dataset throughput: our Ray job (1 and 2 workers) vs a plain OpenCV loop vs a plain Ray Data pipeline"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from annotate.canny import draw_thresholds, sample_rng
from pipeline.sample_data import PHOTOS, load_photo

RESOLUTION = 512


def make_inputs(folder: Path, images: int, per_shard: int, seed: int = 0) -> list[Path]:
    """img2dataset-like shards of photo-sized JPEGs (shorter side 400-800 px) cut from skimage's photos."""
    rng = np.random.default_rng(seed)
    photos = [load_photo(name) for name in PHOTOS]
    distinct = []
    for i in range(64):
        image = photos[i % len(photos)]
        h, w = image.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 1)), int(w * rng.uniform(0.7, 1))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = image[top : top + ch, left : left + cw]
        scale = rng.uniform(400, 800) / min(ch, cw)
        crop = cv2.resize(crop, (round(cw * scale), round(ch * scale)), interpolation=cv2.INTER_CUBIC)
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="JPEG", quality=90)
        distinct.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(images // per_shard):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                for ext, data in (("jpg", distinct[(shard * per_shard + i) % len(distinct)]), ("txt", b"a photo")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _square(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    square = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA if s > size else cv2.INTER_CUBIC)


def _canny_record(key: str, jpeg: bytes) -> dict[str, bytes]:
    """The same work per sample as the job: decode -> crop/resize -> Canny (seeded thresholds) -> encode."""
    return _canny_record_decoded(key, cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))


def _canny_record_decoded(key: str, image: np.ndarray) -> dict[str, bytes]:
    bgr = _square(image, RESOLUTION)
    low, high = draw_thresholds(sample_rng(0, key), (50, 150), (50, 150))
    edges = cv2.Canny(bgr, low, high)
    return {
        "jpg": cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
        "canny.png": cv2.imencode(".png", edges, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes(),
        "json": json.dumps({"low": low, "high": high}).encode(),
    }


def plain_loop(inputs: list[Path], out: Path) -> dict:
    """(a) one process, OpenCV on one thread: the practical limit per core."""
    import webdataset as wds

    cv2.setNumThreads(1)
    out.mkdir(parents=True, exist_ok=True)
    n, start = 0, time.perf_counter()
    for path in inputs:
        with tarfile.open(path) as src, open(out / path.name, "wb") as f:
            writer = wds.TarWriter(f, encoder=False)
            for member in src:
                if member.name.endswith(".jpg"):
                    key = member.name[:-4]
                    writer.write({"__key__": key, **_canny_record(key, src.extractfile(member).read())})
                    n += 1
            writer.close()
    cv2.setNumThreads(-1)
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def ray_data_pipeline(inputs: list[Path], out: Path) -> dict:
    """(b) what a Ray user would write: read_webdataset -> map_batches -> write_webdataset."""
    import ray

    def annotate(batch: dict) -> dict:
        # read_webdataset has decoded the JPEGs already (RGB arrays); channel order does not change the cost
        records = [_canny_record_decoded(k, j) for k, j in zip(batch["__key__"], batch["jpg"], strict=True)]
        return {"__key__": batch["__key__"], **{m: [r[m] for r in records] for m in ("jpg", "canny.png", "json")}}

    start = time.perf_counter()
    ds = ray.data.read_webdataset([str(p) for p in inputs], suffixes=["jpg"])
    annotated = ds.map_batches(annotate, batch_size=64, batch_format="numpy")
    annotated.write_webdataset(str(out), encoder=None)  # members are bytes already
    seconds = time.perf_counter() - start
    n = len(inputs) * _per_shard(inputs[0])
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def _per_shard(path: Path) -> int:
    with tarfile.open(path) as tar:
        return sum(m.name.endswith(".jpg") for m in tar)


def our_job(inputs: list[Path], out: Path, workers: int) -> dict:
    """The dataset job's actor pool; steady state = images after the first shard / time after it."""
    from pipeline.config import BuildConfig
    from pipeline.distributor import run_pool
    from pipeline.reader import list_input_shards

    cfg = BuildConfig(task="canny", input=[str(p) for p in inputs], output=str(out), num_workers=workers)
    shards = list_input_shards(cfg.input)
    finished: list[tuple[float, int]] = []
    start = time.perf_counter()
    result = run_pool(shards, cfg, on_done=lambda s: finished.append((time.perf_counter(), s["samples"])))
    seconds = time.perf_counter() - start
    n = sum(s["samples"] for s in result.done)
    first = finished[workers - 1][0] if len(finished) > workers else start
    steady_n = sum(c for t, c in finished if t > first)
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds,
            "steady_images_per_s": steady_n / (finished[-1][0] - first) if steady_n else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4800)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (median reported)")
    parser.add_argument("--json", default="bench/results/canny_throughput.json")
    args = parser.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp) / "in", args.images, args.per_shard)
        runs = {
            "plain loop (1 process, OpenCV)": lambda i: plain_loop(inputs, Path(tmp) / f"plain{i}"),
            "Ray Data read/map/write": lambda i: ray_data_pipeline(inputs, Path(tmp) / f"raydata{i}"),
            "our job, 1 worker": lambda i: our_job(inputs, Path(tmp) / f"ours1_{i}", 1),
        }
        if cpus >= 2:
            runs["our job, 2 workers"] = lambda i: our_job(inputs, Path(tmp) / f"ours2_{i}", 2)
        results = {}
        for name, fn in runs.items():
            trials = [fn(i) for i in range(args.repeats)]
            results[name] = {
                "images": trials[0]["images"],
                "images_per_s": statistics.median(t["images_per_s"] for t in trials),
                "steady_images_per_s": statistics.median(t.get("steady_images_per_s") or t["images_per_s"]
                                                         for t in trials),
                "trials": trials,
            }
    base = results["plain loop (1 process, OpenCV)"]["steady_images_per_s"]
    ray_data = results["Ray Data read/map/write"]["steady_images_per_s"]
    print(f"\nCanny at {RESOLUTION} px, {args.images} images, {cpus} CPUs, median of {args.repeats}")
    print(f"{'':34}{'images/s':>10}{'steady':>10}{'x plain':>10}{'x RayData':>11}")
    for name, r in results.items():
        steady = r["steady_images_per_s"]
        print(f"{name:34}{r['images_per_s']:>10.1f}{steady:>10.1f}{steady / base:>10.2f}{steady / ray_data:>11.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"resolution": RESOLUTION, "cpus": cpus, "results": results}, indent=1))
    print(f"wrote {args.json}")
    ray.shutdown()


if __name__ == "__main__":
    main()
