"""``python -m divkernels.benchmarks.dispatch RESULTS.json ...``: the measured ``backend="auto"`` table.

Reads benchmark result files (``python -m divkernels.benchmarks``) that timed both the ``triton``
and ``cuda`` providers on the fused group loss, picks the faster backend per device and shape
class (:mod:`divkernels.dispatch`), prints the choices and merges them into a table file: by
default the one shipped in the package, which ``backend="auto"`` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

from divkernels import dispatch
from divkernels.benchmarks.group_loss import VARIANTS, needs_embeddings

# benchmark family -> public op that has both kernels
FAMILY_OPS = {"group_loss": "group_preference_loss"}


def build_entries(rows: Iterable[dict], device: str, candidates: tuple[str, str] = ("triton", "cuda")) -> list[dict]:
    """Table entries from benchmark rows of one device.

    Each row needs ``op`` (public op name), ``G``, ``D`` (None without embeddings), ``emb_dtype``
    (None without embeddings), ``case`` (any key naming the measured case) ``provider`` and
    ``median_ms``. Cases measured by only one candidate are ignored.
    """
    times: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in rows:
        if row["provider"] not in candidates or row.get("median_ms") is None:
            continue
        key = (row["op"], dispatch.shape_class(row["G"], row["D"], row["emb_dtype"]), row["case"])
        times.setdefault(key, {})[row["provider"]] = float(row["median_ms"])
    log_ratios: dict[tuple[str, str], list[float]] = {}
    for (op, klass, _), by_provider in times.items():
        if all(name in by_provider for name in candidates):
            ratio = by_provider[candidates[1]] / by_provider[candidates[0]]
            log_ratios.setdefault((op, klass), []).append(math.log(ratio))
    entries = []
    for (op, klass), logs in sorted(log_ratios.items()):
        ratio = math.exp(sum(logs) / len(logs))  # geometric mean of time(second) / time(first)
        entries.append({"device": device, "op": op, "class": klass,
                        "backend": candidates[1] if ratio < 1 else candidates[0],
                        f"{candidates[1]}_over_{candidates[0]}": round(ratio, 4), "cases": len(logs)})
    return entries


def merge_entries(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every (device, op, class) that ``new`` measured replaced by the new entry."""
    replaced = {(entry["device"], entry["op"], entry["class"]) for entry in new}
    kept = [entry for entry in old if (entry["device"], entry["op"], entry["class"]) not in replaced]
    return sorted(kept + new, key=lambda entry: (entry["device"], entry["op"], entry["class"]))


def write_table(path: Path, entries: list[dict], sources: list[str]) -> None:
    """Write a table file (and forget cached tables, so the new one is used in this process)."""
    table = {"version": dispatch.TABLE_VERSION, "sources": sources, "entries": entries}
    path.write_text(json.dumps(table, indent=1) + "\n")
    dispatch.forget_cached_tables()


def dispatch_rows(rows: list[dict]) -> list[dict]:
    """Benchmark rows in the form :func:`divkernels.build_entries` reads."""
    result = []
    for row in rows:
        op = FAMILY_OPS.get(row["family"])
        if op is None or row["op"] not in VARIANTS:
            continue
        uses_emb = needs_embeddings(VARIANTS[row["op"]])
        result.append({"op": op, "G": row["G"], "D": row["D"] if uses_emb else None,
                       "emb_dtype": row["dtype"] if uses_emb else None, "provider": row["provider"],
                       "median_ms": row["median_ms"],
                       "case": (row["op"], row["B"], row["G"], row["D"], row["dtype"], row["pass"])})
    return result


def entries_from_files(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """Table entries from result files (files without benchmark rows are skipped)."""
    entries, sources = [], []
    for path in paths:
        data = json.loads(path.read_text())
        if "rows" not in data:
            continue
        new = build_entries(dispatch_rows(data["rows"]), str(data["device"]))
        if new:
            entries = merge_entries(entries, new)
            sources.append(f"{path.name} (commit {str(data.get('commit', 'unknown'))[:12]})")
    return entries, sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m divkernels.benchmarks.dispatch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="benchmark result JSON files")
    parser.add_argument("--table", type=Path, default=dispatch.DEFAULT_TABLE,
                        help=f"table file to merge into (default: the shipped {dispatch.DEFAULT_TABLE.name})")
    args = parser.parse_args(argv)
    entries, sources = entries_from_files(args.results)
    if not entries:
        print("no case was timed with both the triton and cuda providers; the table is unchanged")
        return 1
    for entry in entries:
        ratio = entry["cuda_over_triton"]
        print(f"{entry['device']:<28} {entry['op']:<22} {entry['class']:<22} -> {entry['backend']:<6} "
              f"(cuda/triton time {ratio:.2f}, {entry['cases']} cases)")
    old, old_sources = dispatch.read_entries(args.table)
    write_table(args.table, merge_entries(old, entries),
                         sorted(set(old_sources) | set(sources)))
    print(f"wrote {len(entries)} entries to {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
