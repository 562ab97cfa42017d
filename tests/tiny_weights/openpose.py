"""random CMU body pose weights in the published body_pose_model.pth layout, for tests"""
from __future__ import annotations

from pathlib import Path

import torch

# The published file's layers, (name, in, out, kernel), written out here rather than read from
# annotate.openpose so that loading it checks the annotator's key mapping against an independent list.
_FRONT = [
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3),
]  # fmt: skip


def published_layers() -> list[tuple[str, int, int, int]]:
    layers = list(_FRONT)
    for branch, out in ((1, 38), (2, 19)):  # L1: part affinity fields, L2: heatmaps
        layers += [(f"conv5_{i}_CPM_L{branch}", 128, 128, 3) for i in (1, 2, 3)]
        layers += [(f"conv5_4_CPM_L{branch}", 128, 512, 1), (f"conv5_5_CPM_L{branch}", 512, out, 1)]
        for stage in range(2, 7):
            layers += [(f"Mconv1_stage{stage}_L{branch}", 185, 128, 7)]
            layers += [(f"Mconv{i}_stage{stage}_L{branch}", 128, 128, 7) for i in (2, 3, 4, 5)]
            layers += [(f"Mconv6_stage{stage}_L{branch}", 128, 128, 1), (f"Mconv7_stage{stage}_L{branch}", 128, out, 1)]
    return layers


def write_tiny_openpose(folder: Path, seed: int = 0) -> Path:
    """Write `folder/body_pose_model.pth`: random weights at the full architecture, published key names.

    He-initialised weights keep activations from vanishing through the 30-odd layers, so the random
    network still yields heatmap peaks and limbs for the decoder to work on.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, cin, cout, k in published_layers():
        std = (2.0 / (cin * k * k)) ** 0.5
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * std
        state[f"{name}.bias"] = torch.randn(cout, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "body_pose_model.pth"
    torch.save(state, path)
    return path
