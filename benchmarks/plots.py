"""Plots of a benchmark run (matplotlib): time vs G, time vs D, and speed-up over eager PyTorch.

Made from the rows the runner writes; a plot whose sweep has no rows in the run is not made.
"""

from __future__ import annotations

from pathlib import Path

from divkernels.benchmarks.harness import KERNEL_PROVIDERS

# The sweeps of the full suite (runner.GROUP_SWEEP / DIM_SWEEP) for the fused DDPO + logdet loss.
FOCUS = {"family": "group_loss", "op": "ddpo+logdet", "pass": "fwd+bwd"}
GROUP_SWEEP_AT = {"B": 256, "D": 1024}
DIM_SWEEP_AT = {"B": 256, "G": 16}


def _select(rows: list[dict], dtype: str, **fixed: object) -> list[dict]:
    return [row for row in rows if row["median_ms"] is not None and row["dtype"] == dtype
            and all(row[key] == value for key, value in {**FOCUS, **fixed}.items())]


def _sweep(axis, rows: list[dict], key: str, title: str) -> bool:
    providers = sorted({row["provider"] for row in rows})
    drawn = False
    for provider in providers:
        points = sorted((row[key], row["median_ms"]) for row in rows if row["provider"] == provider)
        if len(points) >= 2:
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=provider)
            drawn = True
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel(key)
    axis.set_ylabel("median ms")
    axis.set_title(title, fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    if drawn:
        axis.legend(fontsize=8)
    return drawn


def plot_results(rows: list[dict], env: dict, stem: Path) -> list[Path]:
    """Write ``<stem>-sweeps.png`` (time vs G and vs D) and ``<stem>-speedup.png``; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    dtypes = sorted({row["dtype"] for row in rows})
    device = env.get("device", "device")
    for dtype in dtypes:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        drawn = _sweep(axes[0], _select(rows, dtype, **GROUP_SWEEP_AT), "G",
                       f"fused DDPO + logdet, fwd+bwd, {dtype}, B=256 D=1024")
        drawn |= _sweep(axes[1], _select(rows, dtype, **DIM_SWEEP_AT), "D",
                        f"fused DDPO + logdet, fwd+bwd, {dtype}, B=256 G=16")
        figure.suptitle(f"divkernels on {device}")
        figure.tight_layout()
        if drawn:
            path = Path(f"{stem}-sweeps-{dtype}.png")
            figure.savefig(path, dpi=110)
            written.append(path)
        plt.close(figure)

    eager = {_key(row): row["median_ms"] for row in rows if row["provider"] == "eager" and row["median_ms"]}
    bars = [(f"{row['op']} ({row['B']},{row['G']},{row['D']}) {row['dtype']} {row['pass']}", row["provider"],
             eager[_key(row)] / row["median_ms"]) for row in rows
            if row["provider"] in KERNEL_PROVIDERS and row["median_ms"] and _key(row) in eager]
    if bars:
        labels = list(dict.fromkeys(label for label, _, _ in bars))
        providers = list(dict.fromkeys(provider for _, provider, _ in bars))
        figure, axis = plt.subplots(figsize=(10, 0.3 * len(labels) + 1.5))
        height = 0.8 / len(providers)
        for index, provider in enumerate(providers):
            values = {label: value for label, name, value in bars if name == provider}
            axis.barh([position + index * height for position in range(len(labels))],
                      [values.get(label, 0.0) for label in labels], height=height, label=provider)
        axis.set_yticks([position + 0.4 - height / 2 for position in range(len(labels))], labels, fontsize=7)
        axis.axvline(1.0, color="0.3", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlabel("speed-up over eager PyTorch (x)")
        axis.set_title(f"divkernels on {device}", fontsize=9)
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = Path(f"{stem}-speedup.png")
        figure.savefig(path, dpi=110)
        written.append(path)
        plt.close(figure)
    return written


def _key(row: dict) -> tuple:
    return (row["family"], row["op"], row["B"], row["G"], row["D"], row["dtype"], row["pass"])
