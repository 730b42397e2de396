"""Tables and curves of the LMFusion experiment (experiments/lmfusion/run.sh) from its evaluation JSONs and logs.

    python experiments/lmfusion/report.py --runs runs/lmfusion --out docs/lmfusion

Writes OUT/results.md (the last evaluation of every leg, with training tokens, wall time and the 6·N·D FLOP estimate,
and each leg's numbers at every evaluated step) and OUT/curves.png (every metric over training steps).
"""

import argparse
import json
from pathlib import Path

LEGS = {
    "text": "text model (dense, text only): the pretrained LLM",
    "mot": "MoT from the text model, text frozen (LMFusion)",
    "dense": "dense from scratch",
    "dense-init": "dense from the text model, nothing frozen",
    "mot-scratch": "MoT from scratch",
}
METRICS = {  # report key → (label, higher is better)
    "fashion_accuracy": ("Fashion accuracy", True),
    "fashion_fd": ("Fashion FD", False),
    "shapes_overall": ("shapes GenEval overall", True),
    "caption_fashion_class": ("caption Fashion class", True),
    "caption_shapes_attribute": ("caption shapes per attribute", True),
    "text_perplexity": ("held-out text perplexity", False),
}


def metrics_of(report: dict) -> dict:
    """The experiment's metrics from one evaluation JSON (None where the task did not run)."""
    get = lambda *keys: _dig(report["results"], keys)  # noqa: E731
    return {
        "fashion_accuracy": get("fashion", "accuracy"),
        "fashion_fd": get("fashion", "fd"),
        "shapes_overall": get("shapes", "overall"),
        "caption_fashion_class": get("caption", "fashion", "class_name"),
        "caption_shapes_attribute": get("caption", "shapes", "per_attribute"),
        "text_perplexity": get("text", "perplexity"),
    }


def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def leg_runs(root: Path) -> dict:
    legs = {}
    for leg in LEGS:
        evals = sorted((root / leg / "eval").glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))
        if not evals:
            continue
        log = [json.loads(line) for line in (root / leg / "log.jsonl").read_text().splitlines() if line.strip()]
        run = json.loads((root / leg / "run.json").read_text()) if (root / leg / "run.json").exists() else {}
        legs[leg] = {
            "points": [(int(p.stem.split("-")[1]), metrics_of(json.loads(p.read_text()))) for p in evals],
            "tokens": sum(r["tokens"] for r in log) or None,
            "seconds": sum(r["step_s"] for r in log) or None,
            "parameters": run.get("transformer_parameters"),
            "trainable": run.get("trainable_parameters"),
        }
    return legs


def fmt(value, key=None) -> str:
    if value is None:
        return "–"
    if key == "text_perplexity" or key == "fashion_fd":
        return f"{value:.1f}" if key == "text_perplexity" else f"{value:.2f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/lmfusion", help="the experiment's output folder (run.sh's OUT)")
    parser.add_argument("--out", default="docs/lmfusion", help="folder for results.md and curves.png")
    args = parser.parse_args(argv)
    legs = leg_runs(Path(args.runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = "| leg | step | " + " | ".join(label for label, _ in METRICS.values()) + " |"
    lines = ["# LMFusion at toy scale: results", "",
             "Last evaluation of every leg (`experiments/lmfusion/run.sh`).", "",
             header, "|" + "---|" * (len(METRICS) + 2)]  # fmt: skip
    for leg, r in legs.items():
        step, m = r["points"][-1]
        lines.append(f"| {LEGS[leg]} | {step} | " + " | ".join(fmt(m[k], k) for k in METRICS) + " |")
    # every token runs through one expert: a MoT model costs the dense model's FLOPs per token (6·N·D, N dense)
    dense = next((r["parameters"] for leg, r in legs.items() if leg in ("text", "dense")), None)
    lines += ["",
              "| leg | parameters | trainable | training tokens | training wall time (s) "
              "| 6·N_dense·D (TFLOP, estimate) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for leg, r in legs.items():
        flops = 6 * dense * r["tokens"] / 1e12 if dense and r["tokens"] else None
        seconds = f"{r['seconds']:.0f}" if r["seconds"] else "–"
        lines.append(f"| {leg} | {fmt(r['parameters'])} | {fmt(r['trainable'])} | {fmt(r['tokens'])} | {seconds} | "
                     f"{fmt(flops)} |")  # fmt: skip
    lines += ["", "## Every evaluated step", ""]
    for leg, r in legs.items():
        lines += [f"### {leg}", "", "| step | " + " | ".join(label for label, _ in METRICS.values()) + " |",
                  "|" + "---|" * (len(METRICS) + 1)]  # fmt: skip
        lines += [f"| {step} | " + " | ".join(fmt(m[k], k) for k in METRICS) + " |" for step, m in r["points"]]
        lines.append("")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, (label, higher)) in zip(axes.flat, METRICS.items()):
        for leg, r in legs.items():
            points = [(s, m[key]) for s, m in r["points"] if m[key] is not None]
            if points and (leg != "text" or key == "text_perplexity"):
                ax.plot(*zip(*points), marker="o", label=leg)
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)")
        ax.set_xlabel("training step")
        if key == "text_perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print(f"wrote {out / 'results.md'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
