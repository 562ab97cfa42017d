"""python -m tests.tiny_weights OUT: tiny random HED, OpenPose, MiDaS (DPT) and BLIP weights in the published file
layouts, as the tests load them, so that `make dataset TASK=hed WEIGHTS=OUT` runs the neural tasks' plumbing
offline. Their maps and captions are noise: real weights are the published files (README, 'Neural annotators')."""
import sys
from pathlib import Path

from tests.tiny_weights.blip import write_tiny_blip
from tests.tiny_weights.hed import write_tiny_hed
from tests.tiny_weights.midas import write_tiny_dpt
from tests.tiny_weights.openpose import write_tiny_openpose


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    if out.exists() and not out.is_dir():
        print(f"error: {out}: a file is in the way of the folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for write in (write_tiny_hed, write_tiny_openpose, write_tiny_dpt, write_tiny_blip):
        write(out)
    print(f"tiny random weights in {out}: make dataset TASK=canny,hed,midas,openpose CAPTION=blip WEIGHTS={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
