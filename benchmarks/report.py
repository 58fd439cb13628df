"""Assemble benchmarks/README.md from the sections the benchmark scripts wrote."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, RESULTS_DIR

ORDER = [
    "quality",
    "training_train",
    "training_sample",
    "embedding",
    "incremental",
    "lsh",
    "search",
    "latency",
    "duplicates",
    "duplicates_train",
    "graph",
    "map",
]

HEADER = """# imgsim benchmarks

Reproduce everything here with `make bench` (each script can also run alone; the command is
in each section). Figures are medians measured side by side in one run on the machine named
in each section; these shared machines swing 2-3x between runs, so compare the **ratios**
within a section, not absolute figures across sections or machines.
"""


def main() -> None:
    parts = [HEADER]
    names = [n for n in ORDER if (RESULTS_DIR / f"{n}.md").exists()]
    names += sorted(p.stem for p in RESULTS_DIR.glob("*.md") if p.stem not in ORDER)
    for name in names:
        section = (RESULTS_DIR / f"{name}.md").read_text().rstrip()
        data = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        m = data.get("machine", {})
        parts.append(section)
        parts.append(
            f"\n_Measured {m.get('date_utc', '?')} on {m.get('cpu', '?')}, {m.get('cores', '?')} "
            f"cores, {m.get('memory_gib', '?')} GiB (commit {m.get('git_commit', '?')}). "
            f"Command: `{data.get('command', '?')}`; raw numbers: "
            f"[results/{name}.json](results/{name}.json)._\n"
        )
    out = BENCH_DIR / "README.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n\n".join(parts).rstrip() + "\n")
    os.replace(tmp, out)
    print(f"wrote {out} ({len(names)} sections)")


if __name__ == "__main__":
    main()
