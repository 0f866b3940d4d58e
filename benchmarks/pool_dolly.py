"""Write the Dolly client files pooled into one JSON list, for the RoLoRA scaling sweep to re-split.

    python benchmarks/pool_dolly.py benchmarks/runs/dolly-pooled.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import pool_dolly, require_shared_data

if __name__ == "__main__":
    require_shared_data()
    destination = Path(sys.argv[1])
    destination.parent.mkdir(parents=True, exist_ok=True)
    pool_dolly(destination)
