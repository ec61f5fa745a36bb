"""The fleet simulator as a benchmark script: the same as `modelfleet sim`.

    python bench/fleet_sim.py --server URL --token T --agents 1000 --transport http \\
        --rollout MODEL:VERSION
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_plane.cli import main

if __name__ == "__main__":
    sys.exit(main(["sim", *sys.argv[1:]]))
