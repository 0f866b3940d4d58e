"""Each method's aggregation error as the exactness benchmark last measured it.

``benchmarks/exactness.py`` writes ``measured_errors.json`` beside this module from the headline
sweep, and for the methods it leaves out from the quality sweep (the mean over trained rounds and
seeds, with its 95 % interval, per setting); ``fedlora methods`` shows it. Absent until one of
those benchmarks has run.
"""

from __future__ import annotations

import json
from pathlib import Path

MEASURED_FILE = Path(__file__).with_name("measured_errors.json")


def measured_errors() -> dict[str, str]:
    """Method → its measured aggregation error, as text ({} before any measurement)."""
    if not MEASURED_FILE.is_file():
        return {}
    return json.loads(MEASURED_FILE.read_text(encoding="utf-8"))["errors"]
