"""find model weights by their published file names: a local folder, any fsspec URL, or the HF hub cache"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import fsspec

DEFAULT_CACHE = Path(os.environ.get("CONTROLNET_WEIGHTS_CACHE", Path.home() / ".cache" / "controlnet-data"))


class MissingWeightsError(FileNotFoundError):
    """A weight file is not where we looked. The message names the file and where to put it."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_PLAIN_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)")
# a variant's weights: <name>.fp16.safetensors, sharded <name>.fp16-00001-of-00002.safetensors (diffusers and
# transformers today) or <name>-00001-of-00002.fp16.safetensors
_VARIANT_WEIGHTS = re.compile(
    r"(diffusion_pytorch_model|model|pytorch_model)(?:-\d+-of-\d+)?\.(\w+)(?:-\d+-of-\d+)?\.(safetensors|bin)")


def weights_variant(model_folder: str, subfolder: str) -> str | None:
    """The variant ("fp16", ...) to load a component of a local diffusers-layout folder with, where it holds only
    that variant's weights (`<name>.fp16.safetensors`: what `from_pretrained(..., variant="fp16")` downloads, for
    half the disk); None where it holds the plain files, several variants, or is not a local folder (a hub id:
    the libraries resolve its files themselves)."""
    local = model_folder.removeprefix("file://")
    folder = Path(local) / subfolder
    if "://" in local or not folder.is_dir():
        return None
    names = [f.name for f in folder.iterdir()]
    if any(_PLAIN_WEIGHTS.fullmatch(n) for n in names):
        return None
    variants = {m.group(2) for n in names if (m := _VARIANT_WEIGHTS.fullmatch(n))}
    return variants.pop() if len(variants) == 1 else None


def pickle_only(model_folder: str, subfolder: str) -> dict[str, bool]:
    """from_pretrained's `use_safetensors=False` for a diffusers component of a local folder that holds its weights
    as .bin files only (an older save): told nothing, diffusers looks for the .safetensors first and logs its
    absence as an error and 'Defaulting to unsafe serialization' for each component. It reads the .bin
    weights-only either way."""
    folder = Path(model_folder.removeprefix("file://")) / subfolder
    if "://" in model_folder.removeprefix("file://") or not folder.is_dir():
        return {}
    names = [f.name for f in folder.iterdir()]
    weights = [n for n in names if _PLAIN_WEIGHTS.fullmatch(n) or _VARIANT_WEIGHTS.fullmatch(n)]
    return {"use_safetensors": False} if weights and not any(n.endswith(".safetensors") for n in weights) else {}


def diffusers_loading() -> dict[str, bool]:
    """from_pretrained's memory mode for diffusers models, said outright. diffusers asks for low-memory loading by
    default, which needs `accelerate` (not one of this project's dependencies); without it every load prints a
    six-line warning and falls back to the plain loading chosen here. With accelerate installed, it is used."""
    from diffusers.utils import is_accelerate_available

    return {"low_cpu_mem_usage": is_accelerate_available()}


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (torch's load_state_dict lists keys over many), cut at `limit`."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_failure(error: BaseException) -> str:
    """torch.load's failure in a line. For a file holding more than tensors, weights_only's refusal is a paragraph
    advising weights_only=False, which would run the file's code: only what it found is kept."""
    text = str(error)
    if "Weights only load failed" in text:
        body = text.split("Check the documentation")[0]
        # an unsafe global follows "WeightsUnpickler error:"; a blocked module's function (os.system, what a
        # malicious file calls) comes after the advice, in torch's last paragraph, which one_line cut off at 200
        found = body.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in body else \
            body.strip().rsplit("\n\n", 1)[-1]
        found = " ".join(found.split()).split(" Please use ")[0]  # the allowlisting advice, for a file one trusts
        return f"holds more than tensors, refused unread: {found}"[:200]
    return one_line(error, 200)


def load_state_dict_file(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A published .pth/.pt's tensors, read without running pickled code (weights_only). A file that is not one
    (cut short, another format, pickled objects) is a one-line ValueError naming the file and `what` it should
    hold, not torch's paragraph."""
    import torch  # here: a Canny job imports this module and never torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError (zip), UnpicklingError (weights_only), EOFError, ...
        raise ValueError(f"{path} is not a readable {what} file ({type(e).__name__}: {load_failure(e)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not the {what} state dict")
    return state


def require_tensors(state: dict[str, Any], path: str | os.PathLike, what: str) -> None:
    """Every value of a published state dict is a tensor: else a one-line ValueError naming the file and the key
    (the loaders' .float() and the like raised an AttributeError about a float)."""
    import torch

    odd = next((key for key, value in state.items() if not isinstance(value, torch.Tensor)), None)
    if odd is not None:
        raise ValueError(f"{path} is not {what}: its {odd!r} holds a {type(state[odd]).__name__}, not a tensor")


def require_finite(model: Any, path: str | os.PathLike, what: str) -> None:
    """Every floating-point parameter and buffer of a loaded `model` (a torch Module) is finite: else a one-line
    ValueError naming the file and how many tensors hold NaN or inf. Such a file loads without complaint, and the
    job wrote blank maps marked ok (HED, MiDaS), filtered every sample (OpenPose) or wrote empty captions (BLIP).
    One pass, no copy of a tensor beyond isfinite's boolean mask of it."""
    import torch

    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{path} is not {what}: NaN or inf in {len(bad)} of its {len(tensors)} tensors "
                         f"(e.g. {bad[:3]})")


@contextmanager
def quiet_transformers() -> Iterator[list[str]]:
    """transformers' log messages kept in the yielded list, not printed, then its logging as it was: a folder holding
    another model's weights printed its load report (~100 lines of missing and unexpected keys, as a warning)
    before our one line, which says the same. Its 'Loading weights' bar is off too: each actor's reached the
    terminal through Ray's log stream, often after the job's summary."""
    import logging

    from transformers.utils import logging as hf_logging

    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    library = hf_logging.get_logger()  # "transformers", whose handler prints
    handlers, propagate, bars = library.handlers[:], library.propagate, hf_logging.is_progress_bar_enabled()
    library.handlers, library.propagate = [Keep()], False
    hf_logging.disable_progress_bar()
    try:
        yield kept
    finally:
        library.handlers, library.propagate = handlers, propagate
        if bars:
            hf_logging.enable_progress_bar()


def report_row(report: str, status: str) -> str | None:
    """The first row of transformers' load report (`key | status | details`) with `status`, as "key: details"."""
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) >= 3 and cells[1] == status:
            return f"{cells[0]}: {cells[2]}"
    return None


def load_pretrained_folder(load: Callable[[str], Any], folder: str | os.PathLike, what: str,
                           label: str | None = None) -> Any:
    """`load(folder)` (a transformers from_pretrained, its log kept quiet), its failure a one-line ValueError naming
    the folder and `what` it should hold: safetensors' and transformers' own messages do not say which file.
    `label`: how the message names the folder, where the user gave another name for it (`--latents s3://...`,
    copied to a local cache)."""
    with quiet_transformers() as log:
        try:
            return load(str(folder))
        except Exception as e:
            # transformers refuses other shapes with "look at the above report", which we kept from the terminal
            mismatch = report_row("\n".join(log), "MISMATCH")
            # load_failure: a pytorch_model.bin holding code is torch's weights-only refusal, as for a .pth
            detail = f"shapes differ from its config's, e.g. {mismatch}" if mismatch else load_failure(e)
            raise ValueError(f"{label or folder} does not load as {what} ({type(e).__name__}: {detail})") from None


def load_complete_model(load: Callable[..., Any], folder: str | os.PathLike, what: str,
                        unused: tuple[str, ...] = (), label: str | None = None) -> Any:
    """load_pretrained_folder for a model, refused when its file lacks some of the model's weights: transformers
    and diffusers leave those at their random start with a warning in the log, and the job wrote maps, captions and
    latents from them. A file holding NaN or inf is refused too (require_finite).
    `unused`: prefixes of weights the model holds but never runs, which published files may leave out.
    `label`: how the messages name the folder (load_pretrained_folder)."""
    model, info = load_pretrained_folder(partial(load, output_loading_info=True), folder, what, label)
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith(unused))
    if missing:
        raise ValueError(f"{label or folder} is not {what}: its weights lack {len(missing)} of the model's tensors "
                         f"(e.g. {missing[:3]})")
    require_finite(model, label or folder, what)
    return model


def check_keys(path: str | os.PathLike, what: str, expected: set[str], found: set[str]) -> None:
    """The file's keys are the network's: else a one-line ValueError with the first few either way."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(f"{path} is not {what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def local_path(url: str) -> Path | None:
    """The path a weights source names on this machine (a plain path or file://), or None for a remote URL."""
    return Path(url.removeprefix("file://")) if "://" not in url or url.startswith("file://") else None


def remote_state(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """What a remote file or folder holds, as its listing tells it (names, sizes, ETags or mtimes): it changes
    when a file is replaced, without reading any."""
    found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    def version(info: dict[str, Any]) -> str:
        return str(next((info[k] for k in ("ETag", "mtime", "LastModified", "created") if info.get(k)), ""))

    return json.dumps(sorted((name, info.get("size"), version(info)) for name, info in found.items()))


def _fetch_remote(url: str, cache_dir: Path) -> Path:
    """Copy a remote file or folder into the local cache once per version (keyed by its URL and remote_state: a
    copy kept by URL alone went on being used after the weights there were replaced) and return the local path."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(url)
    version = hashlib.sha256(f"{url}\n{remote_state(fs, path)}".encode()).hexdigest()[:16]
    target = cache_dir / version / Path(path).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        clear_abandoned(target.parent, f"{target.name}.partial")
        # one partial per process: workers starting together on a node never write into each other's copy
        partial = target.with_name(claim_name(f"{target.name}.partial"))
        with claimed(partial):
            fs.get(path, str(partial), recursive=fs.isdir(path))
            try:
                partial.rename(target)  # a crash mid-copy never leaves a file that looks complete
            except OSError:  # another worker renamed its complete copy of a folder there first
                if not target.exists():
                    raise
                shutil.rmtree(partial, ignore_errors=True)
    return target


def claim_name(base: str) -> str:
    """A name of this process's own for what it writes under a claim: '<base>@<host>@<random>'."""
    return f"{base}@{socket.gethostname()}@{uuid.uuid4().hex[:8]}"


@contextmanager
def claimed(path: Path) -> Iterator[None]:
    """Hold a lock beside `path` (`<path>.lock`) while it is written: the kernel releases it when the process ends,
    however it ends, which tells what a killed process abandoned from what is being written now (by another actor
    on this node, another container sharing the folder) without looking up any pid."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def clear_abandoned(folder: Path, base: str | None = None) -> None:
    """Remove what processes of this host left in `folder` under a claim (claim_name(base), any base without one) and
    abandoned, their lock free: a partial copy or a checkpoint being saved has a name of its own, and a process
    killed in it (a Ctrl-C as a job starts, a stop on Ray workers, a preemption) left it for good, gigabytes for
    BLIP, an SD base or a checkpoint. Another host's are left to it: a folder on a shared disk may not carry locks
    between hosts."""
    names = glob.escape(base) if base is not None else "*"  # a file's name may hold [ or *
    for lock in folder.glob(f"{names}@{glob.escape(socket.gethostname())}@*.lock"):
        try:
            held = open(lock)  # noqa: SIM115 (closed below; never created here)
        except FileNotFoundError:  # its owner finished in between
            continue
        with held:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # being written now
                continue
            path = lock.with_name(lock.name.removesuffix(".lock"))
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)


def fetch_folder(url: str) -> Path:
    """A remote folder (any fsspec URL) copied into the local cache once; its local path, of the same name."""
    return _fetch_remote(url, DEFAULT_CACHE / "folders")


def _from_hub_cache(repo_id: str, filename: str, download: bool = True) -> Path | None:
    """The file from the Hugging Face hub cache if it is there (or, if `download`, downloadable when online)."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception:  # offline, gated or missing: the caller raises one clear error instead
        return None


def resolve_weight(
    filename: str,
    source: str | None = None,
    hub_repo: str | None = None,
    cache_dir: Path = DEFAULT_CACHE,
) -> Path:
    """Local path of the weight `filename` (a file, or a Hugging Face-format folder).

    Looks in `source` (a local folder or fsspec URL prefix), then in the HF hub cache under `hub_repo`, and
    downloads from the hub only when no `source` was given: weights the user's folder lacks are a mistake to name,
    not a reason to fetch others (and offline, the hub's retries took ~46 s before the error).
    """
    looked = []
    if source:
        url = source.rstrip("/") + "/" + filename
        looked.append(url)
        local = local_path(url)
        if local is not None:
            if local.exists():
                return local
        else:
            try:
                return _fetch_remote(url, cache_dir / "weights")
            except FileNotFoundError:
                pass
    if hub_repo:
        looked.append(f"the Hugging Face hub cache ({hub_repo})")
        found = _from_hub_cache(hub_repo, filename, download=not source)
        if found is not None:
            return found
    where = f"the folder or URL given with --weights (e.g. {source or './weights'}/{filename})"
    origin = f" (published at https://huggingface.co/{hub_repo})" if hub_repo else ""
    raise MissingWeightsError(
        f"weight file {filename!r}{origin} not found; looked in: {', '.join(looked) or 'nowhere'}. "
        f"Put it in {where}."
    )


# the files transformers loads from a folder, most preferred first: a folder's hash covers the first kind present
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder that a loader reads: all *.safetensors if any, else the next kind."""
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    for suffix in WEIGHT_SUFFIXES:
        chosen = sorted(p for p in files if p.name.endswith(suffix))
        if chosen:
            return chosen
    return []


def sha256_folder(path: str | os.PathLike) -> str:
    """A stable sha256 of the weights in a model folder.

    One weight file: its own sha256 (the LFS oid the hub shows, so users can check it). Several (sharded):
    the sha256 of the sorted "relative/path sha256" lines. Configs and tokenizers are not weights.
    """
    folder = Path(path)
    files = _weight_files(folder)
    if not files:
        raise MissingWeightsError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub repo (its refs/main), without touching the network; None if it is not
    cached, or `repo_id` is no repo id."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), not an id (HFValidationError) or a broken cache: the
        # caller raises one clear error
        return None


def _hub_snapshot(repo_id: str) -> Path | None:
    """hub_snapshot, where it holds a Hugging Face model folder (config.json)."""
    folder = hub_snapshot(repo_id)
    return folder if folder is not None and (folder / "config.json").is_file() else None


def offline_hub_folder(model: str, flag: str) -> str:
    """A diffusers model named by hub id ("org/name") while the hub is off (HF_HUB_OFFLINE=1): its cached snapshot
    folder, loaded from then on as a local folder is, so that weights_variant sees an fp16-only download (given the
    id, from_pretrained looked for the plain weights and failed). Not cached: a one-line MissingWeightsError naming
    `flag` (the user's option) and the cache. Local paths, URLs, and every id while online pass unchanged: the
    libraries resolve them as they always have."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE or "://" in model or Path(model).exists():
        return model
    folder = hub_snapshot(model)
    if folder is None:
        raise MissingWeightsError(f"{flag} {model}: not a local folder, nor in the Hugging Face hub cache "
                                  f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids downloading it")
    return str(folder)


def config_names(text: str | bytes, model_type: str) -> bool:
    """A config.json's text names `model_type` ("dpt"): as its model_type, or as the start of an architecture's
    class name (DPTForDepthEstimation), for a config written without model_type. Not JSON: it names nothing."""
    try:
        config = json.loads(text)
    except ValueError:  # UnicodeDecodeError is one too
        return False
    if not isinstance(config, dict):
        return False
    architectures = config.get("architectures") or []
    return config.get("model_type") == model_type or any(
        isinstance(a, str) and a.lower().startswith(model_type) for a in architectures)


def _folder_in_source(names: tuple[str, ...], source: str, cache_dir: Path,
                      model_type: str | None = None) -> Path | None:
    """The first `source/name` of `names`, or `source` itself, that holds config.json; remote folders are copied to
    the cache. With `model_type`, `source` itself counts only where its config.json names that model: a --weights
    folder may hold another model's Hugging Face files at its top level (BLIP's beside MiDaS's .pt), not this one's."""
    candidates = [(source.rstrip("/") + "/" + name, None) for name in names] + [(source.rstrip("/"), model_type)]
    for url, wanted in candidates:
        local = local_path(url)
        if local is not None:
            config = local / "config.json"
            if config.is_file() and (wanted is None or config_names(config.read_bytes(), wanted)):
                return local
            continue
        fs, path = fsspec.core.url_to_fs(url)
        config_url = path.rstrip("/") + "/config.json"
        # read before copying: the folder may be a whole --weights folder
        if fs.exists(config_url) and (wanted is None or config_names(fs.cat_file(config_url), wanted)):
            return _fetch_remote(url, cache_dir / "folders")
    return None


def resolve_folder(
    name: str,
    source: str | None = None,
    hub_repo: str | None = None,
    cache_dir: Path = DEFAULT_CACHE,
    model_type: str | None = None,
    others: tuple[tuple[str, str], ...] = (),
) -> Path:
    """Local path of the Hugging Face-format model folder `name` (a folder holding config.json).

    Looks in `source/name`, then `source` itself (a local folder or fsspec URL; with `model_type`, only if its
    config.json names that model), then the HF hub cache snapshot of `hub_repo` (cache only: nothing is
    downloaded here). `others`: (name, hub_repo) of other published checkpoints that serve as well (BLIP's base
    beside its large), looked for after `name` in each place.
    """
    names = (name, *(other for other, _ in others))
    repos = [repo for repo in (hub_repo, *(repo for _, repo in others)) if repo]
    looked = []
    if source:
        looked.extend(f"{source.rstrip('/')}/{n}/config.json" for n in names)
        looked.append(f"{source.rstrip('/')}/config.json" + (f" (of a {model_type} model)" if model_type else ""))
        found = _folder_in_source(names, source, cache_dir, model_type)
        if found is not None:
            return found
    for repo in repos:
        looked.append(f"the Hugging Face hub cache ({repo})")
        found = _hub_snapshot(repo)
        if found is not None:
            return found
    fetch = f" (e.g. `hf download {hub_repo} --local-dir <weights>/{name}`)" if hub_repo else ""
    wanted = " or ".join(repr(n) for n in names)
    where = " or ".join(f"<weights>/{n}" for n in names)
    raise MissingWeightsError(
        f"model folder {wanted} not found; looked in: {', '.join(looked) or 'nowhere'}. "
        f"Put the Hugging Face-format folder (config.json + weights) at {where}{fetch} "
        f"and pass --weights <weights>."
    )
