"""find model weights by their published file names: a local folder, any fsspec URL, or the HF hub cache"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _fetch_remote(url: str, cache_dir: Path) -> Path:
    """Copy a remote file or folder into the local cache once (keyed by its URL) and return the local path."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(url)
    target = cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16] / Path(path).name
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        fs.get(path, str(partial), recursive=fs.isdir(path))
        partial.rename(target)  # a crash mid-copy never leaves a file that looks complete
    return target


def _from_hub_cache(repo_id: str, filename: str) -> Path | None:
    """The file from the Hugging Face hub cache if it is there (or downloadable when online)."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
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

    Looks in `source` (a local folder or fsspec URL prefix), then in the HF hub cache under `hub_repo`.
    """
    looked = []
    if source:
        url = source.rstrip("/") + "/" + filename
        looked.append(url)
        if _is_local(url):
            local = Path(url.removeprefix("file://"))
            if local.exists():
                return local
        else:
            try:
                return _fetch_remote(url, cache_dir / "weights")
            except FileNotFoundError:
                pass
    if hub_repo:
        looked.append(f"the Hugging Face hub cache ({hub_repo})")
        found = _from_hub_cache(hub_repo, filename)
        if found is not None:
            return found
    where = f"the folder or URL given with --weights (e.g. {source or './weights'}/{filename})"
    origin = f" (published at https://huggingface.co/{hub_repo})" if hub_repo else ""
    raise MissingWeightsError(
        f"weight file {filename!r}{origin} not found; looked in: {', '.join(looked) or 'nowhere'}. "
        f"Put it in {where}."
    )
