"""The fleet simulator as a benchmark script: the same as `modelfleet sim`, its agents included.

    python -m bench.fleet_sim --server URL --token T --agents 1000 --transport http \\
        --rollout MODEL:VERSION
"""

from __future__ import annotations

import sys

from control_plane.cli import main

if __name__ == "__main__":
    sys.exit(main(["sim", *sys.argv[1:]]))
