"""build: the dataset job's entry point (python -m pipeline.build --task canny --input ... --output ...)"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Container, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # a Ctrl-C while the imports below load (seconds): one line, not their traceback
    from pipeline.format import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting()

import fsspec
import numpy as np
import ray
from tqdm import tqdm

from annotate.weights import local_path
from pipeline import format as fmt
from pipeline.config import BuildConfig, parse_config, settings_mismatch, weight_hashes, weights_mismatch
from pipeline.distributor import ModelLoadError, run_pool
from pipeline.lease import OutputBusy, output_lease
from pipeline.reader import InputShard, list_input_shards
from pipeline.worker import identity_changes, input_identity
from pipeline.writer import clear_staging, staging_root


def done_shards(out: str) -> dict[str, str]:
    """Names of committed output shards (those with a stats.json) -> their stats URL."""
    return {shard.name: shard.stats for shard in fmt.committed_shards(out)}


def plan(shards: list[InputShard], done: Container[str], overwrite: bool) -> tuple[list[InputShard], list[str]]:
    """(shards to process, names skipped because they are done)."""
    if overwrite:
        return shards, []
    return [s for s in shards if s.name not in done], [s.name for s in shards if s.name in done]


def recorded_settings(stats: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A committed shard's output settings, to compare with this run's. --latents names a base by its path, which
    moves (a copy on another disk, an s3:// base cached under a hash): where the shard also kept its VAE's hash
    (check_resume_weights compares that), the path is not compared."""
    recorded = stats.get("settings", {})
    if recorded.get("latents") and current.get("latents") and "latents.vae_sha256" in stats.get("weights", {}):
        return {**recorded, "latents": current["latents"]}
    return recorded


def check_resume_settings(cfg: BuildConfig, kept_stats: list[dict[str, Any]]) -> None:
    """Refuse to add to an output whose committed shards were made with other output settings (one line naming
    them): the run would mix two datasets under one manifest. Shards from before settings were recorded pass."""
    current = cfg.output_settings()
    differing: dict[str, int] = {}
    for stats in kept_stats:
        for difference in settings_mismatch(recorded_settings(stats, current), current):
            differing[difference] = differing.get(difference, 0) + 1
    if differing:
        listed = ", ".join(f"{d} ({n} shards)" for d, n in sorted(differing.items()))
        hint = ""
        if any(d.startswith("task ") for d in differing):  # why there is no --add-task: see the README
            hint = (" (a dataset's tasks are fixed when it is built: every tar would be rewritten to add a map, "
                    "so build the new task into another --output, or all tasks together into a new one)")
        raise ValueError(f"{cfg.output} was built with other settings: {listed}; run with the same settings, "
                         f"another --output, or --overwrite to redo those shards{hint}")


def stale_shards(shards: list[InputShard], kept_stats: list[dict[str, Any]]) -> list[str]:
    """Committed shards made from one of these inputs that the plan no longer makes: a folder of images with
    fewer files now, or cut with another --files-per-shard. Their images are in the shards made now, so an
    --overwrite that kept them would hold those samples twice (and the last, held out for validation, would be
    training samples too)."""
    inputs, names = {normalised(shard.url) for shard in shards}, {shard.name for shard in shards}

    def made_from(stats: dict[str, Any]) -> str:
        return normalised(str((stats.get("input") or {}).get("url")))

    return sorted(stats["shard"] for stats in kept_stats
                  if stats.get("shard") not in names and made_from(stats) in inputs)


def remove_shards(output: str, names: list[str]) -> None:
    """Delete output shards, each stats.json first: one whose removal is cut short is no longer committed."""
    fs, _ = fsspec.core.url_to_fs(output)
    for name in names:
        paths = fmt.shard_paths(output, name)
        for part in ("stats", "tar", "index"):
            with suppress(FileNotFoundError):
                fs.rm_file(fsspec.core.url_to_fs(paths[part])[1])


def normalised(url: str) -> str:
    """A local file URL with its '.' and '..' resolved, as pipeline.reader now writes them; others as they are."""
    return "file://" + posixpath.normpath(url.removeprefix("file://")) if url.startswith("file:///") else url


def inputs_in_output(shards: list[InputShard], output: str) -> list[str]:
    """The input files that lie in the output's shards folder (--input data/x/shards --output data/x): the job
    writes <out>/shards/<name>.tar for each input shard, named after it, so an input tar there was replaced by its
    own output, and the input was lost. URLs compared as the reader writes them (fsspec's, '..' resolved)."""
    fs, path = fsspec.core.url_to_fs(f"{output.rstrip('/')}/{fmt.SHARDS_DIR}")
    folder = normalised(fs.unstrip_protocol(path)).rstrip("/") + "/"
    return [url for shard in shards for url in (shard.url, *shard.files)
            if normalised(url).rstrip("/") + "/" == folder or normalised(url).startswith(folder)]


def check_resume_inputs(skipped: list[InputShard], skipped_stats: list[dict[str, Any]]) -> None:
    """Refuse to skip a done shard of loose image files whose file list has changed since (files added to or
    removed from the folder, or another glob): its images shifted between shards, so skipping it would lose some
    and a later shard would repeat others. Tar shards are not checked here (that would cost a request per shard)."""
    recorded = {stats.get("shard"): stats.get("input") or {} for stats in skipped_stats}

    def differs(then: dict[str, Any], now: dict[str, Any]) -> bool:  # shards made before files_sha256: the rest
        if not any(then[k] != now[k] for k in then.keys() & now.keys()):
            return False
        ends = ("url", "first", "last")
        if all(normalised(str(then.get(k))) == then.get(k) for k in ends):
            return True
        # recorded before local input paths were normalised ('in/./A'), so its files_sha256 hashed other spellings:
        # the same count and the same first and last file, normalised
        return then.get("files") != now["files"] or any(normalised(str(then.get(k))) != now[k] for k in ends)

    changed = [shard for shard in skipped
               if shard.files and differs(recorded.get(shard.name, {}), input_identity(shard))]
    if changed:
        first, then = changed[0], recorded[changed[0].name]
        raise ValueError(f"the input files of {len(changed)} done shards changed since they were made (e.g. "
                         f"{first.name}: {then.get('files')} files from {then.get('first')} to {then.get('last')} "
                         f"then, {len(first.files)} from {first.files[0]} to {first.files[-1]} now, or other files "
                         "between); resuming would skip some images and repeat others: use --overwrite, or another "
                         "--output")


def regrown_inputs(skipped: list[InputShard], skipped_stats: list[dict[str, Any]]) -> list[InputShard]:
    """The done tar shards whose input was cut short when they were made (committed with the samples before the cut)
    and has changed since (another size or ETag: uploaded again whole, say), which a rerun makes again; a HEAD
    request for each of these only."""
    truncated = {stats.get("shard"): stats.get("input") or {} for stats in skipped_stats if stats.get("truncated")}
    return [shard for shard in skipped if shard.name in truncated and not shard.files
            and identity_changes(truncated[shard.name], input_identity(shard))]


def check_resume_weights(cfg: BuildConfig, models: dict[str, Any], kept_stats: list[dict[str, Any]]) -> None:
    """Refuse to resume onto shards made with other weights, as with other settings (check_resume_settings): the
    same --weights folder may hold other files now. Each shard's stats keep the sha256s of the weights it was made
    with (pipeline.config.weight_hashes); shards from before they were kept pass. Checked once the actors have
    loaded their models, before any shard starts."""
    current = weight_hashes(models)
    differing = Counter(d for stats in kept_stats if "weights" in stats
                        for d in weights_mismatch(stats["weights"], current))
    if differing:
        listed = ", ".join(f"{d} ({n} shards)" for d, n in sorted(differing.items()))
        raise ValueError(f"{cfg.output} was built with other weights: {listed}; run with those weights, another "
                         f"--output, or --overwrite to redo those shards")


def code_version() -> dict[str, str | None]:
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = None  # e.g. a Ray job's working dir has no .git
    try:
        from importlib.metadata import version

        package = version("controlnet-data")
    except Exception:
        package = None
    return {"package": package, "git": sha}


def totals(stats: list[dict[str, Any]]) -> dict[str, int]:
    return {s: sum(st["counts"][s] for st in stats) for s in fmt.STATUSES}


def totals_by_task(stats: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, int]]:
    """{task: {status: samples}} over the shards: how many samples hold each task's map, and why the others not."""
    return {task: {s: sum(fmt.task_counts(st, task)[s] for st in stats) for s in fmt.STATUSES} for task in tasks}


def truncated_inputs(stats: list[dict[str, Any]]) -> dict[str, str]:
    """Shards committed short because their input file ends early: name -> what the reader met."""
    return {st["shard"]: st["read_error"] for st in stats if st.get("truncated")}


@dataclass(frozen=True)
class SharedKeys:
    """Keys of written samples that more than one shard holds, and one of them with two of its shards."""

    count: int
    example: tuple[str, str, str] | None = None  # (key, shard, another shard)
    covered: str = ""  # the shards checked: shards_digest of their stats

    def warning(self) -> str:
        key, first, second = self.example
        return (f"warning: {self.count} key(s) name a sample in more than one shard (e.g. {key!r} in {first} and "
                f"{second}: two input tars hold that key): both samples are kept, but train.subsets, which names "
                "samples by key, refuses the dataset; give each input tar its own keys (e.g. prefixed with its name)")


def shards_sharing_keys(hashes_by_shard: list[np.ndarray]) -> dict[int, list[int]]:
    """{key hash: [positions of the shards holding it]} for the hashes in more than one shard (each array unique)."""
    hashes = np.concatenate(hashes_by_shard) if hashes_by_shard else np.empty(0, np.int64)
    owners = np.repeat(np.arange(len(hashes_by_shard)), [len(h) for h in hashes_by_shard])
    order = np.argsort(hashes, kind="stable")
    hashes, owners = hashes[order], owners[order]
    repeated = np.flatnonzero(hashes[1:] == hashes[:-1])
    shared: dict[int, list[int]] = {}
    for i in repeated.tolist():
        holders = shared.setdefault(int(hashes[i]), [int(owners[i])])
        holders.append(int(owners[i + 1]))
    return shared


def keys_in_several_shards(shards: list[fmt.CommittedShard]) -> SharedKeys:
    """The written samples' keys that two shards share: input tars made apart (two cameras' IMG_0001.jpg, tars
    packed from two folders) hold the same keys, the job writes both samples (its actors never see each other's
    shards), and the dataset then cannot be split into subsets; the job says so at its end, not the sweep later.
    The folders' loose images are settled before the job (settle_loose_keys); another input list written into
    one --output is checked here too. Memory stays at ~16 bytes a sample (the keys are hashed)."""
    def ok_keys(index: dict[str, list]) -> list[str]:
        return [key for key, status in zip(index["key"], index["status"], strict=True) if status == fmt.OK]

    def hashed(_: fmt.CommittedShard, index: dict[str, list]) -> np.ndarray:
        return np.unique(np.fromiter((hash(key) for key in ok_keys(index)), dtype=np.int64))

    if len(shards) < 2:
        return SharedKeys(0)
    shared = shards_sharing_keys(fmt.each_index(shards, ["key", "status"], hashed))
    if not shared:
        return SharedKeys(0)
    first_hash, holders = next(iter(shared.items()))
    # the example's own string: the hashes kept no keys, and one index is read again to name it
    key = next(key for key in ok_keys(fmt.read_index(shards[holders[0]], ["key", "status"]))
               if hash(key) == first_hash)
    return SharedKeys(len(shared), (key, shards[holders[0]].name, shards[holders[1]].name))


KEY_CHECK_VERSION = "keys_in_several_shards 1"  # changed with what the check counts: older results are not reused


def shards_digest(all_stats: list[dict]) -> str:
    """The committed shards, as one sha256 of their stats.json: a shard made again (--overwrite, a regrown input)
    commits new stats (its finished_at), after its index, so the same digest means the same indexes."""
    digest = hashlib.sha256(KEY_CHECK_VERSION.encode())
    for text in sorted(json.dumps(stats, sort_keys=True) for stats in all_stats):
        digest.update(b"\n" + text.encode())
    return digest.hexdigest()


def checked_keys(output: str, shards: list[fmt.CommittedShard], all_stats: list[dict]) -> SharedKeys:
    """keys_in_several_shards of the committed shards, or, when the manifest recorded a check of these very shards
    (a rerun with nothing to do), its result: the check reads every index, ~12 s for 3,000 shards on S3 (bench/
    manifest_scale.py). A rerun that committed a shard checks them all again, so a key that a new shard shares
    with an old one is found."""
    covered = shards_digest(all_stats)
    try:
        manifest = fmt.read_manifest(output)
    except ValueError:  # a manifest cut short or edited: the check is made again, and the manifest rewritten
        manifest = {}
    checked, count = manifest.get("keys_checked") or {}, manifest.get("keys_in_several_shards")
    example = checked.get("example")
    if checked.get("shards") == covered and isinstance(count, int) and (not count or len(example or ()) == 3):
        return SharedKeys(count, tuple(example) if count else None, covered)
    return replace(keys_in_several_shards(shards), covered=covered)


def write_manifest(cfg: BuildConfig, models: dict[str, Any], all_stats: list[dict], failed: dict[str, str],
                   shared_keys: SharedKeys = SharedKeys(0)) -> dict:
    """Rewrite <out>/manifest.json from every committed shard's stats (temp name, then rename). `models`: what this
    run's actors loaded; when none ran, what the last manifest names, or else (a job stopped after its last shard,
    before its manifest) what the newest shard's actor loaded."""
    manifest_url = f"{cfg.output.rstrip('/')}/{fmt.MANIFEST}"
    fs, path = fsspec.core.url_to_fs(manifest_url)
    config = asdict(cfg)
    if not models and fs.exists(path):
        previous = json.loads(fs.cat_file(path))
        models = {k: previous[k] for k in MODEL_ENTRIES if k in previous}
        # and its config: this run's --weights, which no actor loaded, would name other files than the shards' hashes
        # (the trainer's fidelity annotator loads from the manifest's config)
        config = previous.get("config", config)
    if not models:
        models = models_of(all_stats)
    tasks = list(cfg.tasks)
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        **({"task": cfg.task} if len(tasks) == 1 else {}),  # what version 1 readers look for
        "tasks": tasks,
        "config": config,
        "code_version": code_version(),
        **models,
        "totals": totals(all_stats),
        **({"totals_by_task": totals_by_task(all_stats, tasks)} if len(tasks) > 1 else {}),
        "samples": sum(st["samples"] for st in all_stats),
        "shards": {"done": len(all_stats), "failed": failed, "truncated": truncated_inputs(all_stats)},
        "keys_in_several_shards": shared_keys.count,
        # what that count covered, so that a rerun with the same shards reuses it (checked_keys)
        "keys_checked": {"shards": shared_keys.covered, "example": shared_keys.example},
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fmt.write_whole(manifest_url, json.dumps(manifest, indent=1).encode())
    return manifest


MODEL_ENTRIES = ("annotator", "annotators", "captioner", "latents")  # what the manifest says of the models


def models_of(all_stats: list[dict]) -> dict[str, Any]:
    """What the actor of the newest committed shard loaded, from its stats ({} for shards made before the stats
    kept it)."""
    recorded = [stats for stats in all_stats if stats.get("models")]
    newest = max(recorded, key=lambda stats: stats.get("finished_at", 0), default={"models": {}})
    return {k: v for k, v in newest["models"].items() if k in MODEL_ENTRIES}


def summary_table(run_stats: list[dict], manifest: dict, seconds: float, failed: dict[str, str]) -> str:
    run_totals = totals(run_stats)
    run_by_task = totals_by_task(run_stats, list(manifest.get("totals_by_task", {})))
    samples = sum(run_totals.values())
    lines = [
        f"{'':16}{'this run':>12}{'dataset':>12}",
        *(f"{s:16}{run_totals[s]:>12}{manifest['totals'][s]:>12}" for s in fmt.STATUSES),
        f"{'samples':16}{samples:>12}{manifest['samples']:>12}",
        *(f"{task + ' maps':16}{run_by_task[task][fmt.OK]:>12}{counts[fmt.OK]:>12}"
          for task, counts in manifest.get("totals_by_task", {}).items()),
        f"{'shards done':16}{len(run_stats):>12}{manifest['shards']['done']:>12}",
        f"{'shards failed':16}{len(failed):>12}",
        f"time {seconds:.1f} s, {samples / max(seconds, 1e-9):.1f} samples/s",
    ]
    lines += [f"FAILED shard {name}: {error}" for name, error in sorted(failed.items())]
    if failed:  # the committed shards stay; a rerun does only these
        lines.append(f"the same command tries the {len(failed)} failed shard(s) again, and keeps the committed ones")
    lines += [f"TRUNCATED input of shard {name} (committed with the samples before the cut): {error}"
              for name, error in sorted(truncated_inputs(run_stats).items())]
    return "\n".join(lines)


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS if set, else start a local one without the dashboard (the job prints its own
    progress; the dashboard's processes add ~2 s to a local start on 2 cores); a caller's session is reused."""
    if not ray.is_initialized():
        # (join_ray keeps SIGTERM Python's, out of the reach of Ray's C++ failure handler: the job ends with its
        # interrupted line and 143, not SIGABRT 3 s after the signal, nor -15 in its ray.shutdown())
        fmt.join_ray(os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True,
                     configure_logging=False)


class StorageSetupError(RuntimeError):
    """Storage refused the job's first reads or writes, before Ray starts (missing credentials, no permission, a
    file where the output folder goes): one line, not a traceback."""


@contextmanager
def storage_setup(output: str) -> Iterator[None]:
    """Around the plan's listing of --input and reading of --output: bad input keeps its own one-line error
    (FileNotFoundError, ValueError); what storage raises otherwise is named, with the exception's type."""
    try:
        yield
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # botocore's NoCredentialsError, PermissionError, FileExistsError, ...
        if not fmt.storage_error(e):
            raise
        first_line = (str(e).splitlines() or [""])[0]
        raise StorageSetupError(f"storage refused the job's setup (listing --input, opening --output {output}): "
                                f"{type(e).__name__}: {first_line}") from e


class ManifestError(RuntimeError):
    """Storage refused the manifest once the shards were done (the folder made read-only, the connection gone):
    nothing is lost, as the manifest is made from the committed shards' stats, which a rerun reads again."""


def make_local_output(output: str) -> None:
    """A local --output's shards folder, made before Ray starts: a file in its way or a folder without write
    permission fails here, in one line, rather than in every shard. (Object stores have no folders to make.)"""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(output)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(f"{path.rstrip('/')}/{fmt.SHARDS_DIR}", exist_ok=True)


def check_local_weights(cfg: BuildConfig) -> None:
    """A local --weights that is not there, or is a file, one line before Ray starts (each actor found the published
    file names missing in it). MiDaS alone also loads its original checkpoint named as a file, as before."""
    local = local_path(cfg.weights) if cfg.weights else None
    if local is None:
        return
    if not local.exists():
        raise FileNotFoundError(f"--weights {cfg.weights}: no such folder")
    midas_checkpoint = (cfg.tasks == ("midas",) and cfg.caption not in {"blip", "auto"}
                        and local.suffix in {".pt", ".pth"})
    if not local.is_dir() and not midas_checkpoint:
        raise ValueError(f"--weights {cfg.weights}: not a folder; pass the folder holding the weights by their "
                         f"published file names")


def run(cfg: BuildConfig) -> int:
    """The job: plan, process the shards on Ray, rewrite the manifest, print a summary. Returns the exit code."""
    check_local_weights(cfg)
    with ExitStack() as held:  # the output's lease, once taken, until the job ends however it ends
        return run_on_output(cfg, held)


def run_on_output(cfg: BuildConfig, held: ExitStack) -> int:
    """run, from the plan on: the job's lease on the output (pipeline.lease) goes into `held` before the job removes
    or writes anything there (a dry run takes none: it writes nothing)."""
    with storage_setup(cfg.output):
        shards = list_input_shards(cfg.input, cfg.files_per_shard)
        overlap = inputs_in_output(shards, cfg.output)
        if overlap:
            raise ValueError(f"--input {overlap[0]} lies in the folder where --output {cfg.output} writes its shards "
                             f"({fmt.SHARDS_DIR}/<input name>.tar): the job would overwrite its own input; give "
                             "another --output")
        if not cfg.dry_run:
            make_local_output(cfg.output)
            refusal = fmt.write_refusal(cfg.output)  # a bucket that is not there, a read-only key: each shard
            # failed --max-retries times after its work, and the manifest's write then made the bucket
            if refusal:
                raise StorageSetupError(f"--output {cfg.output} cannot be written ({refusal})")
            # before anything is removed or written; the weights' path stands for their hashes, which only the
            # actors know
            sharing = held.enter_context(output_lease(cfg.output, {**cfg.output_settings(), "weights": cfg.weights}))
            clear_staging(cfg.output, job_alone=not sharing)
        committed = {shard.name: shard for shard in fmt.committed_shards(cfg.output)}
        todo, skipped = plan(shards, committed, cfg.overwrite)
        redone = {shard.name for shard in todo}
        # every shard the output keeps, this run's inputs or not: another input list under one --output is one
        # dataset too
        kept_stats = fmt.read_stats([shard for name, shard in committed.items() if name not in redone])
        if cfg.overwrite:
            stale = stale_shards(shards, kept_stats)
            if stale:
                print(f"{'would remove' if cfg.dry_run else 'removing'} {len(stale)} shard(s) these inputs made "
                      f"before but no longer make (images removed, or another --files-per-shard): {', '.join(stale)}")
                if not cfg.dry_run:
                    remove_shards(cfg.output, stale)
            kept_stats = [stats for stats in kept_stats if stats.get("shard") not in stale]
        check_resume_settings(cfg, kept_stats)
        done = set(skipped)
        check_resume_inputs([shard for shard in shards if shard.name in done], kept_stats)
        regrown = regrown_inputs([shard for shard in shards if shard.name in done], kept_stats)
        if regrown:
            print(f"{'would redo' if cfg.dry_run else 'redoing'} {len(regrown)} shard(s) whose input tar was cut short "
                  f"when they were made and has changed since: {', '.join(shard.name for shard in regrown)}")
            todo += regrown
            skipped = [name for name in skipped if name not in {shard.name for shard in regrown}]
    print(f"{cfg.task}: {len(shards)} input shards, {len(skipped)} done, {len(todo)} to do -> {cfg.output}")
    if "://" in cfg.output and not cfg.output.startswith("file://"):
        print(f"shards are staged on each node in {staging_root(cfg.output)} before upload")
    if cfg.dry_run:
        for shard in todo:
            print(f"  todo  {shard.name}  {shard.url}")
        for name in skipped:
            print(f"  done  {name}")
        return 0
    start = time.perf_counter()
    samples = 0
    result = None
    if todo:
        init_ray()
        with tqdm(total=len(todo), unit="shard", desc=f"{cfg.task} shards", dynamic_ncols=True) as bar:

            def on_done(stats: dict[str, Any]) -> None:
                nonlocal samples
                samples += stats["samples"]
                bar.set_postfix(samples=samples, rate=f"{samples / (time.perf_counter() - start):.1f}/s")
                bar.update()

            def on_fail(shard: InputShard, error: str, attempt: int) -> None:
                bar.write(f"shard {shard.name} attempt {attempt} failed: {error}")

            result = run_pool(todo, cfg, on_done, on_fail, on_note=bar.write,
                              check_models=lambda models: check_resume_weights(cfg, models, kept_stats))
    clear_staging(cfg.output)
    failed = result.failed if result else {}

    shared_keys = SharedKeys(0)

    def manifest_from_stats() -> dict[str, Any]:
        nonlocal shared_keys
        shards = fmt.committed_shards(cfg.output)
        all_stats = fmt.read_stats(shards)
        shared_keys = checked_keys(cfg.output, shards, all_stats)
        return write_manifest(cfg, result.models if result else {}, all_stats, failed, shared_keys)

    try:  # storage that fails for a while is waited out (pipeline.format.retried), as for the shards
        manifest = fmt.retried(manifest_from_stats, f"writing the manifest of {cfg.output}")
    except Exception as e:
        if not fmt.storage_error(e):
            raise
        first_line = (str(e).splitlines() or [""])[0]
        raise ManifestError(f"the shards are committed, but storage refused the manifest of {cfg.output} "
                            f"({type(e).__name__}: {first_line}): the same command writes it") from e
    print(summary_table(result.done if result else [], manifest, time.perf_counter() - start, failed))
    if shared_keys.count:
        print(shared_keys.warning())
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BuildConfig, argv, prog="python -m pipeline.build")
    fmt.ctrl_c_as_usual()
    joined_here = not ray.is_initialized()
    signals = fmt.SignalLog()
    try:
        with signals:
            return run(cfg)
    except (FileNotFoundError, ValueError, ModelLoadError, StorageSetupError, ManifestError, OutputBusy,
            fmt.ClusterUnreachable) as e:  # bad input, config, weights, storage or cluster: one line
        leave_ray(joined_here)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except fmt.StorageOutage as e:  # mid-job, past its patience (run_pool): the committed shards stand
        leave_ray(joined_here)
        first_line = (str(e).splitlines() or [""])[0]
        print(f"error: {first_line}; the shards committed before it are kept, and the same command resumes with the "
              f"rest once the storage answers", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as stop:
        signum = stop_signal(stop, signals.seen)
        if signum is None:
            raise
        if joined_here and fmt.started_its_own_cluster():
            # its cluster killed (all stopped first), not left through ray.shutdown(): the same stop may be ending
            # it (a SIGTERM to the process group, a Ctrl-C in its terminal), and the disconnect then waited on it,
            # 8.5-8.8 s from a group SIGTERM to the line (4 of 4); the line counts the shards once none can commit
            fmt.kill_process_trees(fmt.own_cluster_processes())
            fmt.exit_with_last_line(128 + signum, interrupted_line(cfg.output))
        leave_ray(joined_here)  # its actors die with it, so their staging is anyone's to clear
        print(interrupted_line(cfg.output), file=sys.stderr)
        return 128 + signum  # the shell's code for a command ended by that signal


def leave_ray(joined_here: bool) -> None:
    """Shut down the Ray this job joined or started (not a caller's session) before its last line: the cluster's
    log stream stops, so that line is the last one."""
    if joined_here and ray.is_initialized():
        ray.shutdown()


def stop_signal(stop: BaseException, signals: set[int] = frozenset()) -> int | None:
    """The signal behind a stop: SIGINT for Ctrl-C, SIGTERM (`ray job stop`, a pod's eviction) for the
    SystemExit(15) that Ray's driver handler makes of it, or either among the `signals` received (SignalLog): a
    SIGTERM to the process group of a job that started its own cluster stopped the raylet too, and ray.wait's
    SystemExit(1) came first. None for any other exit."""
    if isinstance(stop, KeyboardInterrupt) or signal.SIGINT in signals:
        return signal.SIGINT
    if signal.SIGTERM in signals or (isinstance(stop, SystemExit) and stop.code == signal.SIGTERM):
        return signal.SIGTERM
    return None


def interrupted_line(output: str) -> str:
    """What Ctrl-C or SIGTERM leaves: the shards committed so far, complete (a shard is committed by its stats.json,
    written last), and the staging of those cut short cleared; the same command does the rest."""
    clear_staging(output)
    committed = committed_count(output)
    counted = (f"{committed} shard(s) committed" if committed is not None
               else "the shards committed so far kept (the storage did not answer to count them)")
    return f"interrupted: {counted} in {output}; the same command resumes with the rest"


def committed_count(output: str, timeout_s: float = fmt.STOP_READ_S) -> int | None:
    """The output's committed shards, or None when the storage fails or does not answer within `timeout_s`: a stop
    counted them however long the storage took (7 min on an endpoint that accepts and never answers), and one that
    failed ended in its traceback, not the stop's line."""
    try:
        return len(fmt.answer_within(timeout_s, lambda: fmt.committed_shards(output)))
    except Exception:
        return None


def stop_quietly_from_here() -> None:
    """The job is over and has said so: a Ctrl-C or SIGTERM from here on ends the process as the signal does, in
    silence. Ray's atexit shutdown, which follows, sleeps 0.5 s first, and a stop in it ended in Ray's traceback
    ('Exception ignored in atexit callback', exit 0) or a segfault of its half-shut core worker."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


if __name__ == "__main__":
    code = main()
    stop_quietly_from_here()
    fmt.end_process(code)
