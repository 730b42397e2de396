"""Every ```python snippet in README.md, docs/instruct.md and the bundled model card runs as written.

Each snippet runs on its own in a fresh interpreter (one torch thread, offline), so a snippet that leans on a name it
does not define (an `image` from nowhere) fails here as it would for a reader.

- README.md and docs/instruct.md snippets run with the repository root as the working directory, as the README tells
  a reader to.
- Model card snippets run as a Hub user runs them: the working directory is an empty temporary folder and this
  repository's packages are blocked (`conftest.outside_repo_env`; `make` installs them editable into the
  environment), so only the folder's own code is used. The one
  change made to them: the card's placeholder "path/to/this/folder" becomes the bundled folder's absolute path.

A snippet fails if it raises, times out, or if a `from_pretrained` in it reports weights it did not load or did not
find (transformers' load report names them MISSING / UNEXPECTED): a folder whose code does not match its weights
still "runs", with random modules.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PACKAGES, outside_repo_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CARD_FOLDER = ROOT / "checkpoints" / "transfusion-tiny"
CARD = CARD_FOLDER / "README.md"
INSTRUCT_FOLDER = ROOT / "checkpoints" / "transfusion-tiny-instruct"
PLACEHOLDER = "path/to/this/folder"
TIMEOUT_S = 240  # per snippet; each takes a few seconds to a few tens of seconds on one thread


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


SNIPPETS = [("README", i, code) for i, code in enumerate(python_blocks(README), 1)]
SNIPPETS += [("card", i, code.replace(PLACEHOLDER, str(CARD_FOLDER))) for i, code in enumerate(python_blocks(CARD), 1)]
SNIPPETS += [("instruct-card", i, code.replace(PLACEHOLDER, str(INSTRUCT_FOLDER)))
             for i, code in enumerate(python_blocks(INSTRUCT_FOLDER / "README.md"), 1)]
SNIPPETS += [("instruct", i, code) for i, code in enumerate(python_blocks(ROOT / "docs" / "instruct.md"), 1)]


def snippet_env(tmp_path: Path, outside_repo: bool = True) -> dict:
    """A snippet's environment; `outside_repo`: as a Hub user's, where this repository is not importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFUSION_THREADS="1", MKL_NUM_THREADS="1",
               HF_MODULES_CACHE=str(tmp_path / "hf-modules"), TQDM_DISABLE="1")  # fmt: skip
    return outside_repo_env(tmp_path, env) if outside_repo else env


def run_snippet(code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    # `python -` puts the working directory first on sys.path, as an interactive session or `python -c` does
    prelude = "import torch; torch.set_num_threads(1)\n"
    return subprocess.run([sys.executable, "-"], input=prelude + code, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)  # fmt: skip


def test_snippets_found():
    names = [name for name, _, _ in SNIPPETS]
    counts = {name: names.count(name) for name in ("README", "card", "instruct-card")}
    assert min(counts.values()) >= 2, f"python snippets found: {names}"
    for name, i, code in SNIPPETS:
        assert PLACEHOLDER not in code, f"{name} snippet {i} still holds {PLACEHOLDER!r}"


def test_card_snippets_cannot_import_the_repository(tmp_path):
    """The card's snippets really run as a Hub user's would: none of this repository's packages is importable."""
    check = f"import importlib.util; print([p for p in {PACKAGES!r} if importlib.util.find_spec(p)])"
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=snippet_env(tmp_path), capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importable from a fresh folder: {out.stdout}"
    assert importlib.util.find_spec("modeling_transfusion") is not None  # while the test process itself can


@pytest.mark.parametrize("name,index,code", SNIPPETS, ids=[f"{n}-{i}" for n, i, _ in SNIPPETS])
def test_snippet_runs(name, index, code, tmp_path):
    cwd = ROOT if not name.endswith("card") else tmp_path / "user"
    cwd.mkdir(exist_ok=True)
    out = run_snippet(code, cwd, snippet_env(tmp_path, outside_repo=name.endswith("card")))
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{name} snippet {index} failed:\n{code}\n--- output ---\n{log[-4000:]}"
    report = [line for line in log.splitlines() if re.search(r"\b(MISSING|UNEXPECTED)\b", line)]
    assert not report, f"{name} snippet {index} loaded weights that do not match the code:\n" + "\n".join(report[:20])
