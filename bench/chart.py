"""A chart of a benchmark run: every stack against the ceiling, scenario by scenario.

    python bench/run.py --json-out results.json
    python bench/chart.py results.json                 # writes results.png
    python bench/chart.py results.json -o chart.png

One horizontal bar per stack and figure (the rows of run.py's table that have a better
direction), as performance relative to the ceiling on a log scale: the stack's figure over the
ceiling's where higher is better (msgs/s), the ceiling's over the stack's where lower is better
(latency, CPU), so that 1 is the ceiling and shorter is worse, whatever the figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import ALL_STACKS, ROWS  # noqa: E402

#: The stacks drawn against the ceiling, with their colours.
COLOURS = {
    "ours": "#1f77b4",
    "ours-granian": "#17becf",
    "channels": "#d62728",
    "ceiling-tasks": "#7f7f7f",
    "sse-starlette": "#ff7f0e",
}


def relative(value: object, ceiling: object, better: str) -> float | None:
    """Performance relative to the ceiling: 1 is the ceiling, below 1 is worse."""
    if not isinstance(value, int | float) or not isinstance(ceiling, int | float) or value <= 0 or ceiling <= 0:
        return None
    return value / ceiling if better == "higher" else ceiling / value


def bars(results: list[dict[str, Any]]) -> tuple[list[str], dict[str, list[float | None]]]:
    by = {(r["scenario"], r["stack"]): r for r in results}
    stacks = [s for s in ALL_STACKS if s != "ceiling" and s in COLOURS and any(r["stack"] == s for r in results)]
    labels: list[str] = []
    series: dict[str, list[float | None]] = {s: [] for s in stacks}
    for scenario, key, label, better in ROWS:
        ceiling = by.get((scenario, "ceiling"), {}).get(key)
        if not better or ceiling is None:
            continue
        values = {s: relative(by.get((scenario, s), {}).get(key), ceiling, better) for s in stacks}
        if all(v is None for v in values.values()):
            continue
        labels.append(label)
        for s in stacks:
            series[s].append(values[s])
    # A stack with no scenario shared with the ceiling (sse-starlette) has nothing to draw.
    return labels, {s: v for s, v in series.items() if any(x is not None for x in v)}


def draw(data: dict[str, Any], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels, series = bars(data["results"])
    if not labels:
        raise SystemExit("no figure of the ceiling in these results: run the ceiling stack too")
    height = 0.8 / max(1, len(series))
    figure, axes = plt.subplots(figsize=(11, 0.45 * len(labels) * max(1, len(series)) / 2 + 2))
    for index, (stack, values) in enumerate(series.items()):
        positions = [row + index * height for row in range(len(labels))]
        drawn = [(p, v) for p, v in zip(positions, values, strict=True) if v is not None]
        axes.barh([p for p, _ in drawn], [v for _, v in drawn], height=height, label=stack, color=COLOURS[stack])
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xscale("log")
    axes.set_yticks([row + height * (len(series) - 1) / 2 for row in range(len(labels))], labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("relative to the ceiling (1 = the ceiling; below 1 is worse)")
    axes.set_title(f"Each stack against the bare-ASGI ceiling\n{data.get('machine', '')}", fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(axis="x", which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="the --json-out file of bench/run.py")
    parser.add_argument("-o", "--output", type=Path, help="the PNG to write (default: beside the results)")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    draw(data, args.output or args.results.with_suffix(".png"))


if __name__ == "__main__":
    main()
