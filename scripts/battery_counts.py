"""Run today's bad-input battery against an earlier commit and count what each case got there.

    python scripts/battery_counts.py --ref a559cb6      # the tree the reliability issue was filed against
    python scripts/battery_counts.py --ref HEAD

The battery (tests/test_bad_inputs_*.py and tests/test_safe_state.py, with tests/conftest.py) is copied into a
temporary worktree of `--ref` and run there with the current environment. Each case is counted as
  clear    the expected error type with a message naming the argument and what is allowed (the test passes);
  unclear  the expected error type, but a message that does not say what is wrong or allowed;
  silent   no error at all (the input ran, or loaded, or wrote);
  crash    another exception, usually from deep inside torch, PIL, transformers or diffusers;
  hang     still running after --timeout seconds;
  setup    the surface the case exercises does not exist at that commit (a fixture or import failed).
"""

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATTERY = ["tests/test_bad_inputs_*.py", "tests/test_safe_state.py"]


def classify(case: ET.Element) -> str:
    failure, error = case.find("failure"), case.find("error")
    if case.find("skipped") is not None:
        return "skipped"
    if error is not None:
        return "setup"
    if failure is None:
        return "clear"
    text = (failure.get("message") or "") + (failure.text or "")
    if "Timeout" in text:
        return "hang"
    if "DID NOT RAISE" in text or "DID NOT WARN" in text:
        return "silent"
    if "Regex pattern did not match" in text:
        return "unclear"
    return "crash"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="HEAD", help="commit to run the battery against (default: HEAD)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds before a case counts as a hang")
    args = parser.parse_args(argv)
    files = sorted({p for pattern in BATTERY for p in ROOT.glob(pattern)})
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.ref], check=True)
        try:
            for source in [*files, ROOT / "tests" / "conftest.py"]:
                shutil.copyfile(source, tree / "tests" / source.name)
            report = Path(tmp) / "report.xml"
            subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                 f"--timeout={args.timeout}", f"--junitxml={report}", *[f"tests/{f.name}" for f in files]],
                cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            counts = collections.defaultdict(collections.Counter)
            for case in ET.parse(report).iter("testcase"):
                counts[case.get("classname", "").rsplit(".", 1)[-1]][classify(case)] += 1
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    kinds = ["clear", "unclear", "silent", "crash", "hang", "setup", "skipped"]
    print(f"battery at {args.ref}: cases by outcome")
    print(f"{'file':32s} {'cases':>5s} " + " ".join(f"{k:>7s}" for k in kinds))
    total = collections.Counter()
    for name, c in sorted(counts.items()):
        total.update(c)
        print(f"{name:32s} {sum(c.values()):5d} " + " ".join(f"{c[k]:7d}" for k in kinds))
    print(f"{'total':32s} {sum(total.values()):5d} " + " ".join(f"{total[k]:7d}" for k in kinds))


if __name__ == "__main__":
    main()
