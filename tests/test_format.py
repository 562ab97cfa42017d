"""the shard contract's one lister: only committed shards (stats.json written last) are read, by every reader"""
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline import format as fmt
from pipeline.preview import TILE, contact_sheet, status_counts
from tests.conftest import copy_dataset, tar_members, with_ctrl_c
from tests.corpus import bomb_png
from train.data import resolve_shards
from train.subsets import read_samples

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(canny64, tmp_path_factory) -> Path:
    """The suite's Canny dataset plus the leftovers of a shard that was never committed (tar and parquet, no
    stats.json), as a killed job leaves them."""
    out = copy_dataset(canny64, tmp_path_factory, "format")
    first = fmt.committed_shards(str(out))[0]
    for member in (first.tar, first.index):
        shutil.copy(member, out / "shards" / ("zz-uncommitted" + Path(member).name[len(first.name):]))
    return out


def test_uncommitted_shards_are_invisible_to_every_reader(dataset):
    shards = fmt.committed_shards(str(dataset))
    assert len(shards) == 4 and not any(s.name.startswith("zz") for s in shards)
    assert all(Path(s.tar).exists() and Path(s.index).exists() and s.stats.endswith(".stats.json") for s in shards)
    stats = fmt.read_stats(shards)
    ok = sum(st["counts"]["ok"] for st in stats)
    assert sorted(st["shard"] for st in stats) == [s.name for s in shards]
    assert status_counts(str(dataset))["ok"] == ok  # the preview counted the stray parquet before
    assert len(read_samples(str(dataset))) == ok
    source = resolve_shards(str(dataset))
    assert source.urls == [s.tar for s in shards] and source.counts["samples"] == ok
    assert fmt.read_manifest(str(dataset))["task"] == "canny" and fmt.read_manifest(str(dataset / "none")) == {}


def test_committed_shards_on_s3_keep_the_url_form(dataset, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-format")
    fs.put(str(dataset), "cnd-format/canny", recursive=True)
    shards = fmt.committed_shards("s3://cnd-format/canny")
    assert [s.name for s in shards] == [s.name for s in fmt.committed_shards(str(dataset))]
    assert all(s.tar.startswith("s3://cnd-format/canny/shards/") for s in shards)
    assert sum(st["counts"]["ok"] for st in fmt.read_stats(shards)) == json.loads(
        (dataset / "manifest.json").read_text())["totals"]["ok"]
    assert fmt.read_index(shards[0], ["status"])["status"]


def test_the_tar_writer_writes_what_webdatasets_writes(tmp_path):
    import io

    import webdataset as wds

    samples = [("00000001", {"jpg": b"\xff\xd8 image", "canny.png": b"\x89PNG map", "txt": b"a cat"}),
               ("00000002", {"txt": b"", "json": b"{}", "latent.npy": bytes(range(256)) * 9})]
    ours, theirs = io.BytesIO(), io.BytesIO()
    with fmt.SampleTarWriter(ours) as tar:
        for key, members in samples:
            tar.write(key, members)
    reference = wds.TarWriter(theirs, encoder=False, mtime=0)
    for key, members in samples:
        reference.write({"__key__": key, **members})
    reference.close()
    assert ours.getvalue() == theirs.getvalue()  # the same bytes: datasets written before and after are alike


def test_a_member_over_the_read_cap_is_named_not_read(tmp_path):
    """The readers of output shards (the trainer's stream, validation, preview, subsets) hold each member in memory:
    one over the cap is skipped in the stream and named on its sample, and the samples after it read as usual."""
    import tracemalloc

    huge = fmt.MAX_MEMBER_BYTES + 1
    with open(tmp_path / "s.tar", "wb") as f, fmt.SampleTarWriter(f) as tar:
        tar.write("a", {"jpg": b"a image", "txt": b"a"})
        tar.write("b", {"jpg": bytes(huge), "txt": b"b"})
        tar.write("c", {"jpg": b"c image", "txt": b"c"})
    tracemalloc.start()
    try:
        samples = list(fmt.shard_samples([{"url": str(tmp_path / "s.tar")}]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s["__key__"] for s in samples] == ["a", "b", "c"]
    assert samples[1][fmt.OVERSIZED] == {"jpg": huge} and "jpg" not in samples[1] and samples[1]["txt"] == b"b"
    assert samples[2]["jpg"] == b"c image" and fmt.OVERSIZED not in samples[2]
    assert peak < huge // 4  # its bytes were passed over, never held
    rest = list(fmt.shard_samples([{"url": str(tmp_path / "s.tar"), "offset": samples[1][fmt.NEXT_OFFSET]}]))
    assert [s["__key__"] for s in rest] == ["c"]  # offsets stay right across a skipped member


def test_the_preview_shows_a_damaged_sample_as_a_note_instead_of_failing(dataset, tmp_path):
    """Unreadable, missing and bomb-sized members and a bad json each become a grey tile or are left out; the
    sheet still renders every row, and the intact members are drawn."""
    samples = tar_members(sorted((dataset / "shards").glob("*.tar"))[0])
    keys = sorted(samples)[:4]
    damaged = [{**samples[keys[0]], "jpg": b"not an image"}, {**samples[keys[1]], "canny.png": bomb_png(5000)},
               {k: v for k, v in samples[keys[2]].items() if k != "jpg"}, {**samples[keys[3]], "json": b"{broken"}]
    with open(tmp_path / "d.tar", "wb") as f, fmt.SampleTarWriter(f) as tar:
        for key, members in zip(keys, damaged, strict=True):
            tar.write(key, members)
    read = list(fmt.shard_samples([{"url": str(tmp_path / "d.tar")}]))
    sheet = contact_sheet(read, {"ok": 4}, "damaged", ["canny"]).convert("RGB")
    assert sheet.size[1] == 28 + 4 * TILE
    grey = (211, 211, 211)  # PIL's lightgrey: the note tiles' background
    corner = [[sheet.getpixel((col * TILE + 200, 28 + row * TILE + 200)) for col in (0, 1)] for row in range(4)]
    assert corner[0][0] == grey and corner[1][1] == grey and corner[2][0] == grey  # the three damaged members
    assert corner[0][1] != grey and corner[1][0] != grey and corner[3] != [grey, grey]  # the intact ones drawn


@pytest.mark.parametrize("command", ["-m pipeline.build", "train/run.py", "train/sweep.py"])
def test_ctrl_c_while_a_command_imports_is_one_line(command, canny64, tmp_path):
    """Ctrl-C in a command's first seconds, while it imports Ray, torch and diffusers (the sweep: the trainer's
    modules, once it has read its arguments), ended it in the traceback of the import it cut short."""
    import signal
    import subprocess
    import sys
    import time

    args = {"-m pipeline.build": ["--input", str(canny64), "--output", str(tmp_path / "out")],
            "train/run.py": ["--data", str(canny64), "--storage-path", str(tmp_path / "runs"), "--run-name", "r"],
            "train/sweep.py": ["--dataset", str(canny64), "--sizes", "8", "--storage-path", str(tmp_path / "runs"),
                               "--subsets-out", str(tmp_path / "subsets")]}[command]
    run = subprocess.Popen(with_ctrl_c([sys.executable, *command.split(), *args]), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while run.poll() is None and time.monotonic() < deadline and b"_raylet" not in Path(
                f"/proc/{run.pid}/maps").read_bytes():  # Ray's core library loaded: torch's and diffusers' to come
            time.sleep(0.005)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130 and stderr.strip() == fmt.STOPPED_STARTING, (run.returncode, stderr[-3000:])


def test_a_canny_job_never_imports_torch(sample_shards, tmp_path):
    """The dataset job's driver and a Canny shard's processing, in a fresh process: importing torch would add 2.5 s
    to the start of every actor and driver. (A process where torch cannot be imported would not show it: webdataset,
    for one, imports torch where it can and carries on where it cannot.)"""
    import subprocess
    import sys

    job = ("import sys; import pipeline.build; from pipeline.config import BuildConfig; "
           "from pipeline.distributor import limit_torch_threads; from pipeline.models import build_models; "
           "from pipeline.reader import list_input_shards; from pipeline.worker import process_shard; "
           f"cfg = BuildConfig(task='canny', output={str(tmp_path / 'out')!r}, resolution=32); "
           "annotators, captioner = build_models(cfg); limit_torch_threads(1); "
           f"[shard] = list_input_shards([{str(sample_shards / '00000.tar')!r}]); "
           "print(process_shard(shard, cfg, annotators, captioner)['counts']['ok'], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", job], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ok, torch_imported = done.stdout.split()[-2:]
    assert int(ok) > 0 and torch_imported == "False"


def test_the_preview_cli_takes_a_manifest_path_and_refuses_what_it_cannot_show_in_one_line(dataset, tmp_path,
                                                                                          capsys):
    """A subset manifest or a missing folder said 'no written samples'; an --out in a new folder ended in a
    traceback after all the reading."""
    from pipeline.preview import main as preview

    out = tmp_path / "new" / "sheet.png"
    preview([str(dataset / "manifest.json"), "--samples", "2", "--out", str(out)])
    assert out.is_file() and "wrote" in capsys.readouterr().out
    for args, message in (([str(dataset / "subsets" / "8.json")], "not a subset manifest"),
                          ([str(tmp_path / "nothing")], "no such dataset folder"),
                          ([str(dataset / "shards")], "not a dataset (no committed shards"),  # it said 'no samples'
                          ([str(dataset), "--samples", "0"], "--samples must be at least 1"),
                          ([str(dataset), "--out", "s3://b/x.png"], "written locally")):
        with pytest.raises(SystemExit) as stop:
            preview(args)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_preview_refuses_an_out_it_cannot_write_an_image_to_before_reading(dataset, tmp_path, capsys):
    """An --out without an image extension, or a folder, ended in PIL's ValueError traceback ('unknown file
    extension') once every index and sample had been read."""
    from pipeline.preview import main as preview

    (tmp_path / "sheets").mkdir()
    for out in ("sheet", "sheets", "sheets/", "sheet.txt"):
        with pytest.raises(SystemExit) as stop:
            preview([str(dataset), "--samples", "1", "--out", str(tmp_path / out)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "give the sheet a file name with an image extension" in err, err
    preview([str(dataset), "--samples", "1", "--out", str(tmp_path / "sheets" / "sheet.JPG")])
    assert (tmp_path / "sheets" / "sheet.JPG").is_file()

def test_a_process_that_read_indexes_exits_with_its_own_code(dataset):
    """pyarrow's read_table of a Python file object left the file's last buffer to an Arrow pool thread, which aborted
    the interpreter's exit when it released it then ("terminate called without an active exception", exit 134): about
    one `python -m train.subsets` in ten ended so after printing its subsets, and one in four of these processes."""
    import subprocess
    import sys

    job = ("import sys; from pipeline import format as fmt; "
           "[fmt.read_index(shard, None) for shard in fmt.committed_shards(sys.argv[1])]")
    for _ in range(40):  # the abort comes at random: 40 processes met it at least once (0.75 ** 40: 1e-5)
        done = subprocess.run([sys.executable, "-c", job, str(dataset)], env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]


def test_a_storage_error_in_the_block_is_one_line_naming_what_failed_and_others_pass():
    """The five commands' except-blocks, said once: a storage error (any OSError, or one of a storage library) is
    StorageFailed with its first line, without its traceback (from None); the errors a command says in its own
    words (`keep`) and a bug of ours pass unchanged."""
    with pytest.raises(fmt.StorageFailed) as refused, fmt.refusing_storage_failures("the storage of s3://b/d"):
        raise ConnectionRefusedError("Could not connect\nthe rest of the report")
    assert str(refused.value) == "the storage of s3://b/d failed: ConnectionRefusedError: Could not connect"
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    kept = fmt.refusing_storage_failures("storage", keep=(FileNotFoundError,))
    with pytest.raises(FileNotFoundError, match="no dataset"), kept:
        raise FileNotFoundError("no dataset")
    with pytest.raises(KeyError), fmt.refusing_storage_failures("storage"):
        raise KeyError("a bug")
