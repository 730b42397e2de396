"""Write the Edit tab's example source images: held-out edits of the shapes world, one per kind, as PNGs beside this
script, and edits.json (file name and instruction of each), which the Space reads. Run once from the repository
(it needs `training/`); the Space itself only reads the files.

    python space/examples/make_examples.py            # → space/examples/{recolour,move,add,remove}.png, edits.json
"""

import argparse
import json
from pathlib import Path

import PIL.Image

from training.datasets.instruct import heldout_edits, render_objects

HERE = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4, help="examples to write, the edit kinds in turn (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out edits (default 0)")
    parser.add_argument("--output", type=Path, default=HERE, help=f"folder to write to (default {HERE})")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    examples = []
    for edit in heldout_edits(args.count, seed=args.seed):
        name = f"{edit.kind}.png"
        PIL.Image.fromarray(render_objects(edit.source)).save(args.output / name)
        examples.append({"image": name, "instruction": edit.instruction})
    (args.output / "edits.json").write_text(json.dumps(examples, indent=2) + "\n")
    print(f"wrote {len(examples)} example images and edits.json to {args.output}")


if __name__ == "__main__":
    main()
