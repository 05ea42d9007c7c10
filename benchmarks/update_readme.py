"""Copy the latest benchmark tables (benchmarks/results/*.md) into README.md, between
the markers ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``.

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def splice(readme: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
    if not pattern.search(readme):
        raise KeyError(f"README has no <!-- results:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), readme)


def main() -> int:
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    for md in sorted(RESULTS.glob("*.md")):
        if f"<!-- results:{md.stem} -->" in readme:
            readme = splice(readme, md.stem, md.read_text())
            print(f"README: {md.stem} updated")
    tmp = readme_path.with_name(".README.md.tmp")
    tmp.write_text(readme)
    tmp.replace(readme_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
