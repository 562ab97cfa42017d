"""CPU and CUDA give the same condition maps (bench.gpu_check's parity section, asserted); runs only on a GPU"""
import tempfile
from pathlib import Path

import pytest
import torch

from bench.gpu_check import Budget, Context, Sizes, parity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_maps_match_cpu_map_by_map():
    ctx = Context(torch.device("cuda"), Sizes.of(smoke=False), Budget(600), Path(tempfile.mkdtemp()), smoke=False)
    result = parity(ctx)
    failed = [c for c in result["checks"] if not c["passed"]]
    assert not failed, failed
    assert {r["task"] for r in result["rows"]} >= {"hed", "midas", "openpose", "openpose raw"}
