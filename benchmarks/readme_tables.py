"""Copy the generated benchmark results into README.md, between markers, so the README's
tables are always the last measured ones and never typed by hand.

    <!-- results:aggregation -->  …  <!-- /results:aggregation -->
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def demote_headings(markdown: str) -> str:
    """The results files start at '#'; inside the README's benchmark section they sit lower."""
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m[1]) + 2) + " ", markdown, flags=re.MULTILINE)


def update(readme: str, name: str) -> str:
    results = RESULTS / f"{name}.md"
    if not results.is_file():
        return readme
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if start not in readme or end not in readme:
        sys.exit(f"README.md lacks the markers {start} … {end}")
    body = demote_headings(results.read_text(encoding="utf-8").strip())
    before, rest = readme.split(start, 1)
    return f"{before}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def main() -> None:
    path = ROOT / "README.md"
    readme = path.read_text(encoding="utf-8")
    for name in sys.argv[1:] or ("aggregation", "perf", "quality", "privacy"):
        readme = update(readme, name)
    path.write_text(readme, encoding="utf-8")


if __name__ == "__main__":
    main()
