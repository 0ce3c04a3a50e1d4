"""``python -m divkernels.benchmarks``: fused kernels vs eager PyTorch vs ``torch.compile``.

Suites:
  fused  the speed targets: fused DDPO + logdet regularizer, bf16 emb, at
         (B, G, D) = (256, 16, 4096) and (4096, 16, 2048), forward and forward+backward
  full   every op family over a sweep of shapes, bf16 and fp32
  headline  the first check on a new GPU: fused DDPO + logdet, bf16, at (8, 8, 384), (256, 16, 4096)
         and (4096, 16, 2048), forward and forward+backward; headline-tiny: the same at (2, 8, 32)
  smoke  tiny shapes, to check the runner itself (CPU is fine, about a minute)
  host   per op and mode: device launches, host syncs and host microseconds of one forward +
         backward (kernels stubbed without a GPU; see host.py); CPU is fine
  linear sequence log-probs through the LM head: fused (chunked) vs unfused logits, peak extra
         memory and time over a token sweep and a chunk sweep, each in a fresh process (linear.py)
  trainer  preference trainers, ours (default, with diversity, with logits) against TRL's DPOTrainer
         at T = 256, 1024, 2048 tokens: peak extra memory and seconds per step (trainer.py)
  judge  DARLING's learned judge: calls per group with and without the short-answer shortcut, reward
         and GRPO seconds per step, batched vs one pair per pass vs embeddings (judge.py); CPU is fine

Each (case, provider) row gets the median time, peak extra memory, the memory floor (bytes that
must move over the measured copy bandwidth) and the ratio to it. Results go to
``<out>/<device>-<suite>-<date>.json`` and ``.csv`` with the device name, versions and git commit.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from divkernels.backend import MAX_KERNEL_GROUP, backend_unavailable_reason
from divkernels.benchmarks import advantages, diversity, group_loss, plots
from divkernels.benchmarks.harness import KERNEL_PROVIDERS, Case, copy_bandwidth, input_sets, measure

PROVIDERS = (*KERNEL_PROVIDERS, "eager", "compile", "liger")
MAIN_SHAPES = [(8, 8, 384), (1024, 8, 1024), (256, 16, 4096), (64, 64, 4096), (4096, 16, 2048)]
GROUP_SWEEP = [(256, group, 1024) for group in (2, 4, 8, 16, 32, 64, 128)]
DIM_SWEEP = [(256, 16, dim) for dim in (256, 1024, 2048, 4096, 8192)]
PAIR_SHAPES = [(16384, 2, 1), (262144, 2, 1)]  # plain DPO on (chosen, rejected) pairs: vs Liger
TARGET_SHAPES = [(256, 16, 4096), (4096, 16, 2048)]
# The first check on a new GPU (benchmarks/device_run.sh): a launch-bound shape and the two targets;
# "headline-tiny" is the same cases at a size the interpreter runs in seconds (its --dry-run).
HEADLINE_SHAPES = [(8, 8, 384), *TARGET_SHAPES]
TINY_SHAPES = [(2, 8, 32)]
# Results go to a folder in the working directory unless --out names another one; the committed results
# live in benchmarks/results/ (--out benchmarks/results).
DEFAULT_OUT = Path("benchmark_results")
CHECKPOINT_ROWS = 10  # rows between partial writes of the result files


SUITES = ("fused", "headline", "headline-tiny", "full", "smoke", "host", "linear", "trainer", "judge")


def suite_cases(suite: str) -> list[Case]:
    """The cases of a suite."""
    both_passes = [False, True]
    if suite == "fused":
        return group_loss.cases(TARGET_SHAPES, [torch.bfloat16], both_passes, ["ddpo+logdet"])
    if suite in ("headline", "headline-tiny"):
        shapes = HEADLINE_SHAPES if suite == "headline" else TINY_SHAPES
        return group_loss.cases(shapes, [torch.bfloat16], both_passes, ["ddpo+logdet"])
    if suite == "smoke":
        shapes = [(4, 8, 32)]
        return (group_loss.cases(shapes, [torch.float32], both_passes, ["ddpo+logdet", "dpo"])
                + diversity.cases(shapes, [torch.float32], [True], ["similarity", "logdet+gains"])
                + advantages.cases(shapes, [torch.float32], ["dqo"]))
    if suite == "full":
        dtypes = [torch.bfloat16, torch.float32]
        shapes = MAIN_SHAPES + [shape for shape in GROUP_SWEEP + DIM_SWEEP if shape not in MAIN_SHAPES]
        return (group_loss.cases(shapes, dtypes, both_passes, list(group_loss.VARIANTS))
                + group_loss.cases(PAIR_SHAPES, [torch.float32], both_passes, ["dpo"])
                + diversity.cases(shapes, dtypes, both_passes, list(diversity.OPS))
                + advantages.cases(shapes, dtypes, ["darling", "dqo", "deviation"]))
    raise ValueError(f"unknown suite {suite!r}")


def provider_skip_reason(provider: str, case: Case, device: torch.device) -> str | None:
    """Why ``provider`` cannot run ``case`` here (None when it can)."""
    if provider in KERNEL_PROVIDERS:
        reason = backend_unavailable_reason(provider, device)
        if reason is None and provider == "cuda" and case.family != "group_loss":
            reason = "the CUDA extension implements the fused group loss only"
        if reason is None and case.group > MAX_KERNEL_GROUP:
            reason = f"G={case.group} exceeds the in-kernel limit {MAX_KERNEL_GROUP}"
        return reason
    if provider == "compile" and device.type != "cuda":
        return "torch.compile is timed on CUDA devices only"
    if provider == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel)"
        if case.family != "group_loss" or case.name != "dpo" or case.group != 2:
            return "Liger-Kernel computes the same loss only for plain DPO on (chosen, rejected) pairs (G = 2)"
    return None


# Dynamo keeps compiled graphs per code object: all variants, dtypes and passes of one reference
# function share one cache, and past the default limit (8) it would silently run eager, which the
# table would then report as torch.compile. The runner raises the limits and makes a hit an error.
COMPILE_LIMITS = {"recompile_limit": 512, "accumulated_recompile_limit": 8192, "fail_on_recompile_limit_hit": True}


def configure_compile() -> None:
    """Dynamo settings for timing many specializations of the same reference functions."""
    import torch._dynamo

    for name, value in COMPILE_LIMITS.items():
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)


def provider_op(provider: str, case: Case, compiled: dict[tuple, Callable], compile_backend: str = "inductor"
                ) -> Callable:
    """The callable a provider runs: the public op on a backend, the reference, or compiled reference."""
    if provider in KERNEL_PROVIDERS:
        return functools.partial(case.public_op, backend=provider)
    if provider == "eager":
        return case.reference_op
    if provider == "liger":
        return group_loss.liger_dpo_loss
    # one compiled callable per variant, dtype and pass; shapes recompile once, then run dynamic
    key = (id(case.reference_op), case.family, case.name, case.dtype, case.backward)
    if key not in compiled:
        compiled[key] = torch.compile(case.reference_op, backend=compile_backend)
    return compiled[key]


def version_of(module: str) -> str:
    """``module.__version__``, or "not installed"."""
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def environment(device: torch.device) -> dict[str, object]:
    """Device, versions and commit recorded with every result file."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("DIVKERNELS_COMMIT", "unknown")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": version_of("triton"),
            "cuda": torch.version.cuda, "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def row_key(row: dict) -> tuple:
    """What identifies a measurement: the case and the provider."""
    return (row["family"], row["op"], row["B"], row["G"], row["D"], row["dtype"], row["pass"], row["provider"])


def run_suite(cases: list[Case], providers: list[str], device: torch.device, repeats: int, warmup: int,
              log: Callable[[str], None], *, done: set[tuple] = frozenset(), deadline: float | None = None,
              checkpoint: Callable[[list[dict], float | None], None] | None = None, compile_backend: str = "inductor",
              ) -> tuple[list[dict], float | None, bool]:
    """Time every (case, provider) not in ``done``; stop starting cases at ``deadline`` (``time.monotonic``).

    Returns ``(rows, copy bandwidth, whether every case was reached)``. ``checkpoint(rows, bandwidth)``
    is called every few rows and at the end, so a run cut off by a time limit keeps what it measured.
    """
    bandwidth = copy_bandwidth(device)
    if bandwidth:
        log(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    if "compile" in providers:
        configure_compile()
    compiled: dict[tuple, Callable] = {}
    announced: set[tuple[str, str]] = set()
    rows: list[dict] = []
    complete = True
    for number, case in enumerate(cases):
        if deadline is not None and time.monotonic() > deadline:
            log(f"time budget reached: {number} of {len(cases)} cases run; the next was {case.label}")
            complete = False
            break
        for provider in providers:
            reason = provider_skip_reason(provider, case, device)
            if reason is not None:
                if (provider, reason) not in announced:
                    announced.add((provider, reason))
                    log(f"skipping {provider}: {reason}")
                continue
            row = {"family": case.family, "op": case.name, "B": case.batch, "G": case.group, "D": case.dim,
                   "dtype": str(case.dtype).removeprefix("torch."),
                   "pass": "fwd+bwd" if case.backward else "fwd", "provider": provider}
            if row_key(row) in done:
                continue
            try:
                op = provider_op(provider, case, compiled, compile_backend)
                probe = case.make_inputs(device)
                per_set = sum(t.numel() * t.element_size() for t in probe.values() if t is not None)
                sets = input_sets(lambda case=case: case.make_inputs(device), per_set)
                result = measure(lambda inputs, op=op, case=case: case.run(op, inputs), sets, device,
                                 warmup=warmup, repeats=repeats)
                floor_ms = case.floor_bytes / bandwidth * 1e3 if bandwidth else None
                row.update(median_ms=result.median_ms, peak_extra_mib=result.peak_extra_mib, floor_ms=floor_ms,
                           floor_ratio=result.median_ms / floor_ms if floor_ms else None, error=None)
            except Exception as error:  # a provider that fails on a case is reported, not fatal
                row.update(median_ms=None, peak_extra_mib=None, floor_ms=None, floor_ratio=None,
                           error=f"{type(error).__name__}: {error}"[:300])
            rows.append(row)
            log(_row_line(row))
            sets = probe = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if checkpoint is not None and len(rows) % CHECKPOINT_ROWS == 0:
                checkpoint(rows, bandwidth)
    if checkpoint is not None:
        checkpoint(rows, bandwidth)
    return rows, bandwidth, complete


def _row_line(row: dict) -> str:
    where = f"{row['family']}/{row['op']} ({row['B']},{row['G']},{row['D']}) {row['dtype']} {row['pass']}"
    if row["error"]:
        return f"{where:<58} {row['provider']:<8} FAILED {row['error']}"
    memory = f"{row['peak_extra_mib']:9.1f} MiB" if row["peak_extra_mib"] is not None else ""
    floor = f" {row['floor_ratio']:6.2f}x floor" if row["floor_ratio"] else ""
    return f"{where:<58} {row['provider']:<8} {row['median_ms']:9.4f} ms {memory}{floor}"


def summary_table(rows: list[dict]) -> str:
    """Per case: each provider's time, and the fused kernel's speed-up over eager and compile."""
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = row_key(row)[:-1]  # the case, without the provider
        cases.setdefault(key, {})[row["provider"]] = row
    lines = ["| case | provider | ms | extra MiB | x floor | vs eager | vs compile |", "|---|---|---|---|---|---|---|"]
    for key, by_provider in cases.items():
        label = f"{key[0]}/{key[1]} ({key[2]},{key[3]},{key[4]}) {key[5]} {key[6]}"
        eager = by_provider.get("eager", {}).get("median_ms")
        compiled = by_provider.get("compile", {}).get("median_ms")
        for provider, row in by_provider.items():
            ms = row["median_ms"]
            if ms is None:
                lines.append(f"| {label} | {provider} | failed | | | | |")
                continue
            fmt = lambda value: f"{value:.2f}" if value is not None else ""  # noqa: E731
            fused = provider in KERNEL_PROVIDERS
            speed_eager = f"{eager / ms:.1f}x" if eager and fused else ""
            speed_compile = f"{compiled / ms:.1f}x" if compiled and fused else ""
            lines.append(f"| {label} | {provider} | {ms:.4f} | {fmt(row['peak_extra_mib'])} | "
                         f"{fmt(row['floor_ratio'])} | {speed_eager} | {speed_compile} |")
    return "\n".join(lines)


def result_path(env: dict, out: Path, suite: str) -> Path:
    """``<out>/<device>-<suite>-<date>.json`` (the CSV and plots sit next to it)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(env["device"])).strip("-").lower() or "device"
    return out / f"{slug}-{suite}-{env['date'][:10]}.json"


def write_results(rows: list[dict], env: dict, bandwidth: float | None, json_path: Path, suite: str,
                  complete: bool = True) -> tuple[Path, Path]:
    """The JSON (environment + rows) and the CSV (one line per row, with device and commit)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path = json_path.with_suffix(".csv")
    json_path.write_text(json.dumps({**env, "suite": suite, "complete": complete,
                                     "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, indent=1))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["device", "commit", *rows[0]] if rows else ["device"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"device": env["device"], "commit": env["commit"], **row})
    return json_path, csv_path


def load_resume(path: Path, env: dict, suite: str) -> list[dict]:
    """The rows of an earlier run of the same suite on the same device, to continue it."""
    data = json.loads(path.read_text())
    for key, value in (("device", env["device"]), ("suite", suite)):
        if data.get(key) != value:
            raise SystemExit(f"--resume {path}: it is a run of {key} {data.get(key)!r}, not {value!r}")
    return list(data["rows"])


def host_table(rows: list[dict]) -> str:
    """The host suite as a Markdown table (with the baseline's numbers when it was measured)."""
    baseline = any("baseline_host_us" in row for row in rows)
    head = "| op | mode | device launches: fwd + bwd (aten, Triton) | host syncs | host us / fwd+bwd |"
    rule = "|---|---|---|---|---|"
    if baseline:
        head += " baseline launches | baseline host us | host time / baseline |"
        rule += "---|---|---|"
    lines = [head, rule]
    for row in rows:
        line = (f"| {row['op']} | {row['mode']} | {row['forward_launches']} + {row['backward_launches']} "
                f"({row['aten_launches']}, {row['triton_launches']}) | {row['syncs']} | {row['host_us']:.0f} |")
        if baseline:
            line += (f" {row['baseline_launches']} | {row['baseline_host_us']:.0f} | "
                     f"{row['host_us'] / row['baseline_host_us']:.2f} |")
        lines.append(line)
    return "\n".join(lines)


# Runs host.py's cases against another checkout of divkernels (its package first on sys.path).
_BASELINE_SCRIPT = """
import importlib.util, json, os, sys
tree, host_file, device, repeats = sys.argv[1:5]
sys.path.insert(0, tree)
os.environ["TRITON_INTERPRET"] = "1" if device == "cpu" else os.environ.get("TRITON_INTERPRET", "0")
import torch, divkernels
assert divkernels.__file__.startswith(tree), divkernels.__file__
spec = importlib.util.spec_from_file_location("divkernels_host_baseline", host_file)
host = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = host
spec.loader.exec_module(host)
print(json.dumps(host.run(torch.device(device), int(repeats))))
"""


def baseline_rows(tree: Path, device: torch.device, repeats: int) -> list[dict]:
    """host.py's rows measured on the divkernels package of another checkout ``tree`` (e.g. a
    ``git worktree`` of an older commit), in a fresh process on this machine."""
    from divkernels.benchmarks import host

    result = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, str(tree.resolve()), host.__file__,
                             device.type, str(repeats)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the baseline run in {tree} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_host(device: torch.device, out: Path, repeats: int, log: Callable[[str], None],
             baseline: Path | None = None) -> int:
    """``--suite host``: launches, syncs and host time per fused call (host.py); with ``baseline``
    the same cases on another checkout, measured in the same run."""
    if device.type != "cuda":  # the Triton launch path runs (stubbed) through the interpreter on CPU
        os.environ["TRITON_INTERPRET"] = "1"
    from divkernels.benchmarks import host

    env = environment(device)
    log(f"divkernels host overhead on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
        f"commit {str(env['commit'])[:12]}); kernels {'stubbed' if device.type != 'cuda' else 'real'}")
    repeats = max(repeats, 200)
    rows = host.run(device, repeats)
    if baseline is not None:
        before = {(row["op"], row["mode"]): row for row in baseline_rows(baseline, device, repeats)}
        env["baseline"] = str(baseline)
        env["baseline_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                cwd=baseline, check=False).stdout.strip() or "unknown"
        for row in rows:
            old = before.get((row["op"], row["mode"]))
            if old is not None:
                row.update(baseline_launches=old["launches"], baseline_syncs=old["syncs"],
                           baseline_host_us=old["host_us"])
    json_path, csv_path = write_results(rows, env, None, result_path(env, out, "host"), "host")
    log("\n" + host_table(rows))
    log(f"\nwrote {json_path} and {csv_path}")
    return 0


def matching(cases: list, only: str | None, label: Callable[[object], str], suite: str) -> list:
    """The cases whose ``label`` matches the regex ``only`` (all without one); none matching is an error."""
    if not only:
        return cases
    pattern = re.compile(only)
    selected = [case for case in cases if pattern.search(label(case))]
    if not selected:
        raise SystemExit(f"--only {only!r} matches no case of suite {suite!r}")
    return selected


def run_linear(device: torch.device, out: Path, repeats: int, log: Callable[[str], None],
               only: str | None = None) -> int:
    """``--suite linear``: memory and time of linear log-probs, fused vs unfused (linear.py), with a plot;
    ``only``: the cases whose label (``tokens T=1024 chunk=256``) matches."""
    from divkernels.benchmarks import linear

    env = environment(device)
    log(f"divkernels linear log-probs on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
        f"commit {str(env['commit'])[:12]})")
    selected = matching(linear.cases(device), only, lambda case: f"{case.sweep} T={case.length} chunk={case.chunk}",
                        "linear")
    rows = linear.run(device, min(repeats, 5), log, selected)
    json_path, csv_path = write_results(rows, env, None, result_path(env, out, "linear"), "linear")
    log("\n" + linear.table(rows))
    log(f"\nwrote {json_path} and {csv_path}")
    try:
        log(f"plot: {linear.plot(rows, env, json_path.with_suffix(''))}")
    except ImportError:
        log("plot skipped: matplotlib is not installed")
    return 0


def run_trainer(device: torch.device, out: Path, log: Callable[[str], None], only: str | None = None) -> int:
    """``--suite trainer``: peak memory and seconds per step of the preference trainers (trainer.py), with a
    table and a plot; ``only``: the cases whose label (``ours T=1024``) matches."""
    from divkernels.benchmarks import trainer

    env = {**environment(device), "transformers": version_of("transformers"), "trl": version_of("trl")}
    log(f"divkernels trainer suite on {env['device']} (torch {env['torch']}, transformers {env['transformers']}, "
        f"trl {env['trl']}, commit {str(env['commit'])[:12]})")
    selected = matching(trainer.cases(), only, lambda case: f"{case.trainer} T={case.length}", "trainer")
    rows = trainer.run(device, log, selected)
    json_path, csv_path = write_results(rows, env, None, result_path(env, out, trainer.RESULTS_NAME), "trainer")
    log("\n" + trainer.readme_block(json.loads(json_path.read_text())))
    log(f"\nwrote {json_path} and {csv_path}")
    try:
        log(f"plot: {trainer.plot(rows, env, json_path.with_suffix(''))}")
    except ImportError:
        log("plot skipped: matplotlib is not installed")
    return 0


def run_judge(device: torch.device, out: Path, log: Callable[[str], None]) -> int:
    """``--suite judge``: what DARLING's learned judge costs per step (judge.py), on the CPU."""
    import tempfile

    from divkernels.benchmarks import judge

    env = {**environment(torch.device("cpu")), "transformers": version_of("transformers"), "trl": version_of("trl")}
    log(f"divkernels judge suite on {env['device']} (torch {env['torch']}, transformers {env['transformers']}, "
        f"trl {env['trl']}, commit {str(env['commit'])[:12]})")
    with tempfile.TemporaryDirectory() as scratch:
        rows = judge.run(log, scratch)
    json_path, csv_path = write_results(rows, env, None, result_path(env, out, judge.RESULTS_NAME), "judge")
    log("\n" + judge.readme_block(json.loads(json_path.read_text())))
    log(f"\nwrote {json_path} and {csv_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m divkernels.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="fused")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for <device>-<suite>-<date>.json / .csv and plots (default: ./%(default)s; "
                             "benchmarks/results to update the committed results)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="run only the cases whose label matches, e.g. 'group_loss/dpo' or 'G=2 ' "
                             "(to split a long suite over several device calls)")
    parser.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds (results so far are kept; "
                             "continue with --resume)")
    parser.add_argument("--resume", type=Path, default=None, metavar="JSON",
                        help="continue an earlier run of the same suite and device: skip what it measured, "
                             "add the rest to that file")
    parser.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT",
                        help="--suite host: also measure another checkout's package (e.g. a git worktree of an "
                             "older commit) in the same run")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile provider")
    args = parser.parse_args(argv)
    providers = [name for name in args.providers.split(",") if name]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {PROVIDERS}")
    device = torch.device(args.device)

    def log(line: str) -> None:
        print(line, flush=True)

    if args.suite == "host":
        return run_host(device, args.out, args.repeats, log, args.baseline)
    if args.suite == "linear":
        return run_linear(device, args.out, args.repeats, log, args.only)
    if args.suite == "trainer":
        return run_trainer(device, args.out, log, args.only)
    if args.suite == "judge":
        return run_judge(device, args.out, log)
    env = environment(device)
    log(f"divkernels benchmarks, suite {args.suite}, on {env['device']} (torch {env['torch']}, "
        f"triton {env['triton']}, commit {str(env['commit'])[:12]})")
    cases = suite_cases(args.suite)
    if args.only:
        pattern = re.compile(args.only)
        cases = [case for case in cases if pattern.search(case.label)]
        if not cases:
            parser.error(f"--only {args.only!r} matches no case of suite {args.suite!r}")
    started = time.monotonic()
    previous = load_resume(args.resume, env, args.suite) if args.resume else []
    json_path = args.resume or result_path(env, args.out, args.suite)
    done = {row_key(row) for row in previous}
    if previous:
        log(f"resuming {json_path}: {len(previous)} rows measured before")

    def checkpoint(new_rows: list[dict], bandwidth: float | None) -> None:
        write_results(previous + new_rows, env, bandwidth, json_path, args.suite, complete=False)

    new_rows, bandwidth, complete = run_suite(
        cases, providers, device, args.repeats, args.warmup, log, done=done, compile_backend=args.compile_backend,
        deadline=started + args.budget_s if args.budget_s is not None else None, checkpoint=checkpoint)
    rows = previous + new_rows
    json_path, csv_path = write_results(rows, env, bandwidth, json_path, args.suite, complete)
    if not complete:
        log(f"incomplete: continue with --resume {json_path}")
    log("\n" + summary_table(rows))
    log(f"\nwrote {json_path} and {csv_path}")
    try:
        pictures = plots.plot_results(rows, env, json_path.with_suffix(""))
    except ImportError:
        log("plots skipped: matplotlib is not installed")
    else:
        log("plots: " + (", ".join(str(path) for path in pictures) or "none (no case of the suite has a sweep)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
