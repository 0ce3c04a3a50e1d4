"""Mutation check: do the tests kill seeded bugs? ``python tests/mutation.py`` (CI runs ``--check``).

Each mutant is one small, plausible bug (a sign flip, a dropped factor, an off-by-one loop or
mask, a skipped retry, a wrong offset, a compile error) in the Python reference, the op wrappers,
a Triton kernel or the C++ kernel math. The runner copies the repository to a temporary folder,
applies one mutant at a time there (the working tree is never touched), runs the checks that
should catch it, and prints killed / survived. Every mutant must be killed; the exit status is 1
if one survives or if the unmutated copy fails its checks.

Checks run with CI's strict mode (``DIVKERNELS_REQUIRE_BUILDS=1``: a skip is a failure, so a
broken build cannot hide behind skips) and one seed for the whole run (printed; ``--seed`` replays).
C++ mutants rebuild the host build of ``csrc/`` (about a minute each) in a temporary cache.

    python tests/mutation.py                 # every mutant
    python tests/mutation.py --only triton   # mutants whose name matches a regex
    python tests/mutation.py --list
    python tests/mutation.py --check         # seconds: every mutant applies, and its checks select tests

``--check`` (in CI) keeps the table from rotting as the code moves: each mutant's text occurs exactly once
in its file, the mutated Python still parses (a mutant must be a bug, not a syntax error), and each
mutant's pytest selection collects at least one test in the unmutated tree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


from mutants import MUTANTS, Mutant  # noqa: E402  (tests/ is on sys.path when run as a script)


def copy_repository(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files, laid out as the editable install maps them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    # pyproject maps integration/ and benchmarks/ to divkernels.integration / divkernels.benchmarks
    for package in ("integration", "benchmarks"):
        (destination / "divkernels" / package).symlink_to(Path("..") / package)


NO_TESTS = 5  # pytest's exit status when the selection matched no test: a broken mutant entry, not a kill


def anchor_problems(mutants: list[Mutant], root: Path) -> list[str]:
    """Mutants whose text does not occur exactly once in their file under ``root``, or whose mutated
    Python file does not parse."""
    problems = []
    for mutant in mutants:
        text = (root / mutant.path).read_text()
        count = text.count(mutant.old)
        if count != 1:
            problems.append(f"mutant {mutant.name!r}: its text occurs {count} times in {mutant.path} (must be once)")
        elif mutant.path.endswith(".py"):
            try:
                compile(text.replace(mutant.old, mutant.new), mutant.path, "exec")
            except SyntaxError as error:
                problems.append(f"mutant {mutant.name!r}: the mutated {mutant.path} does not parse ({error})")
    return problems


# Run in one interpreter (imports once): how many tests each pytest selection collects.
COLLECT = """
import json, sys
import pytest

class Count:
    def __init__(self):
        self.items, self.skipped = 0, False
    def pytest_collectreport(self, report):
        self.skipped = self.skipped or report.skipped
    def pytest_collection_finish(self, session):
        self.items = len(session.items)

counts = []
for args in json.loads(sys.argv[1]):
    plugin = Count()
    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[plugin])
    counts.append([plugin.items, plugin.skipped])
print("COUNTS", json.dumps(counts))
"""


def selection_problems(mutants: list[Mutant], root: Path) -> list[str]:
    """Mutants whose pytest selection (their checks but the shell commands) collects no test. A test
    module that skips itself here (an extra that is not installed: verl) is reported, not failed; CI
    checks those mutants again in the environment that has it (``--only``)."""
    def selection(mutant: Mutant) -> tuple[str, ...]:
        return tuple(check for check in mutant.checks if not check.startswith("!"))

    selections = sorted({selection(m) for m in mutants} - {()})
    result = subprocess.run([sys.executable, "-c", COLLECT, json.dumps(selections)], cwd=root,
                            capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("COUNTS ")]
    if not lines:
        return [f"collecting the mutants' tests failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"]
    counts = dict(zip(selections, json.loads(lines[-1].removeprefix("COUNTS ")), strict=True))
    problems = []
    for mutant in mutants:
        items, skipped = counts.get(selection(mutant), (1, False))
        if items == 0 and skipped:
            print(f"mutant {mutant.name!r}: not checked here (its test module skips itself)")
        elif items == 0:
            problems.append(f"mutant {mutant.name!r}: its checks {' '.join(mutant.checks)} select no test")
    return problems


def run_checks(copy: Path, checks: tuple[str, ...], env: dict[str, str], seed: int,
               log: Path) -> tuple[bool, float]:
    """Run the checks in the copy; ``(all passed, seconds)``. Output goes to ``log``. A pytest
    selection that matches no test raises: it would otherwise count as a kill."""
    start = time.monotonic()
    with log.open("a") as out:
        commands = [check[1:] for check in checks if check.startswith("!")]
        pytest_args = [check for check in checks if not check.startswith("!")]
        runs = [[sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--seed={seed}",
                 *pytest_args]] if pytest_args else []
        runs += [["bash", "-c", command] for command in commands]
        for command in runs:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            result = subprocess.run(command, cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT)
            if result.returncode == NO_TESTS and command[:3] == [sys.executable, "-m", "pytest"]:
                raise RuntimeError(f"no test matches {' '.join(command[3:])} (see {log})")
            if result.returncode != 0:
                return False, time.monotonic() - start
    return True, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run the mutants whose name matches this regex")
    parser.add_argument("--seed", type=int, default=None, help="test seed (default: fresh, printed)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and logs")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant applies and selects tests (seconds; CI runs it)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or re.search(args.only, m.name)]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name:70s} {mutant.path}")
        return 0
    if args.check:
        problems = anchor_problems(mutants, ROOT) or selection_problems(mutants, ROOT)
        print("\n".join(problems) if problems else f"{len(mutants)} mutants: each applies once and selects tests")
        return 1 if problems else 0
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    work = Path(tempfile.mkdtemp(prefix="divkernels-mutation-"))
    copy = work / "repo"
    copy_repository(copy)
    env = {**os.environ, "PYTHONPATH": str(copy), "DIVKERNELS_REQUIRE_BUILDS": "1",
           "DIVKERNELS_CACHE": str(work / "cache"), "HYPOTHESIS_PROFILE": "ci"}
    env.pop("DIVKERNELS_TEST_SEED", None)
    where = subprocess.run([sys.executable, "-c", "import divkernels, divkernels.integration as i; "
                            "print(divkernels.__file__, i.__file__)"], cwd=copy, env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    if not all(path.startswith(str(copy)) for path in where):
        print(f"the copy does not shadow the installed package: {where}", file=sys.stderr)
        return 1
    print(f"{len(mutants)} mutants, seed {seed}, copy in {copy}")
    problems = anchor_problems(mutants, copy)
    if problems:
        print("\n".join(problems))
        return 1

    baseline = sorted({check for mutant in mutants for check in mutant.checks
                       if check.startswith("!") or check.endswith(".py") or "::" in check})
    passed, seconds = run_checks(copy, tuple(baseline), env, seed, work / "baseline.log")
    print(f"baseline (unmutated copy): {'passed' if passed else 'FAILED'} in {seconds:.0f} s")
    if not passed:
        print((work / "baseline.log").read_text()[-4000:])
        return 1

    survived = []
    for index, mutant in enumerate(mutants):
        target = copy / mutant.path
        original = target.read_text()
        target.write_text(original.replace(mutant.old, mutant.new))
        try:
            log = work / f"mutant-{index:02d}.log"
            passed, seconds = run_checks(copy, mutant.checks, env, seed, log)
        finally:
            target.write_text(original)
        verdict = "SURVIVED" if passed else "killed"
        print(f"{verdict:9s} {seconds:6.0f} s  {mutant.name}", flush=True)
        if passed:
            survived.append(mutant.name)
    print(f"\n{len(mutants) - len(survived)} of {len(mutants)} mutants killed (seed {seed})")
    for name in survived:
        print(f"  survived: {name}")
    if args.keep:
        print(f"logs and copy kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
