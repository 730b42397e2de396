"""Reports of `evaluation.evaluate`: the summary table of one report, side-by-side tables and bar charts of several,
and labelled sample grids.

    python -m evaluation.evaluate --compare results/a.json results/b.json --plot results/ab.png
"""

import math
from pathlib import Path


def summary_rows(report: dict) -> dict[str, object]:
    """The headline numbers of a report, as ordered {label: value}; what the markdown tables and --compare show."""
    cfg, res = report.get("config", {}), report.get("results", {})
    info = report.get("model_info", {})
    rows = {
        "model": report.get("model"),
        "image attention / patching": f"{info.get('image_attention', '?')} / {info.get('patch_encoder', '?')} "
        f"p{info.get('patch_size', '?')}",
        "λ / noise limit": f"{info.get('diffusion_loss_weight', '?')} / {info.get('noise_limit_timestep')}",
        "sampler": f"{cfg.get('scheduler_class')}"
        + (f" ({cfg['scheduler_variant']})" if cfg.get("scheduler_variant") else "")
        + f" {cfg.get('steps')} steps"
        + "".join(f", {k}={v}" for k, v in cfg.get("scheduler_config", {}).items() if k != "algorithm_type")
        + f", guidance {cfg.get('guidance')}",
    }
    if "fashion" in res:
        f = res["fashion"]
        rows |= {
            "fashion: images": f["n_generated"],
            "fashion: prompted-class accuracy": f["accuracy"],
            "fashion: FD (generated vs real)": f["fd"],
            "fashion: FD of VAE reconstructions": f["fd_vae_reconstruction"],
            "fashion: FD real vs real (floor)": f["fd_real_vs_real"],
            "fashion: FD / FD(VAE) (target ≤ 1.5)": f["fd_ratio_to_vae"],
        }
    if "shapes" in res:
        s = res["shapes"]
        rows["shapes: GenEval overall"] = s["overall"]
        rows |= {f"shapes: {c.replace('_', ' ')}": v for c, v in s["categories"].items()}
    if "caption" in res:
        c = res["caption"]
        if "fashion" in c:
            rows["caption fashion: exact"] = c["fashion"]["exact"]
            rows["caption fashion: class name"] = c["fashion"]["class_name"]
        if "shapes" in c:
            rows["caption shapes: exact"] = c["shapes"]["exact"]
            rows["caption shapes: per attribute"] = c["shapes"]["per_attribute"]
    if "text" in res:
        t = res["text"]
        rows |= {"text: held-out perplexity": t["perplexity"], "text: bits per byte": t["bits_per_byte"]}
        if "baseline" in t:
            rows |= {
                "text: text-only baseline perplexity": t["baseline"]["perplexity"],
                "text: perplexity ratio (model / text-only)": t["perplexity_ratio"],
                "text: bits-per-byte ratio": t["bits_per_byte_ratio"],
            }
    if "vae" in res:
        v = res["vae"]
        rows |= {
            "vae: accuracy real → reconstructed": f"{v['accuracy_real']:.3f} → {v['accuracy_reconstruction']:.3f}",
            f"vae: FD of reconstructions (n={v['n']})": v["fd_vae_reconstruction"],
        }
    from evaluation.instruct import summary_rows as instruction_rows

    rows |= instruction_rows(res)
    rows["wall time (s)"] = report.get("wall_seconds")
    return rows


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def markdown_table(report: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary_rows(report).items()]
    return "\n".join(lines) + "\n"


def compare_table(reports: list[dict], names: list[str]) -> str:
    """Side by side: one column per report, one row per headline metric present in any of them. Reports that share a
    name (the same model at several noise seeds) are one column: the mean ± the standard deviation over them (n − 1),
    the sampling noise a difference between columns is read against."""
    rows = [summary_rows(r) for r in reports]
    labels = list(dict.fromkeys(k for r in rows for k in r))
    columns = list(dict.fromkeys(names))
    groups = {c: [r for r, n in zip(rows, names) if n == c] for c in columns}

    def cell(group, key):
        values = [r.get(key) for r in group]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(group) == 1 or len(numbers) != len(values) or key == "wall time (s)" or (
                all(isinstance(v, int) for v in numbers) and len(set(numbers)) == 1):  # fmt: skip
            return _fmt(values[0])
        mean = sum(numbers) / len(numbers)
        sd = math.sqrt(sum((v - mean) ** 2 for v in numbers) / (len(numbers) - 1))
        return f"{_fmt(float(mean))} ± {_fmt(float(sd)) if sd else '0'}"

    header = [f"{c} (n={len(groups[c])})" if len(groups[c]) > 1 else c for c in columns]
    lines = ["| metric | " + " | ".join(header) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {k} | " + " | ".join(cell(groups[c], k) for c in columns) + " |" for k in labels]
    return "\n".join(lines) + "\n"


PLOT_METRICS = (
    "fashion: prompted-class accuracy",
    "fashion: FD / FD(VAE) (target ≤ 1.5)",
    "shapes: GenEval overall",
    "caption fashion: class name",
    "caption shapes: exact",
    "text: held-out perplexity",
)


def compare_plot(reports: list[dict], names: list[str], path: str) -> None:
    """Bar charts of the headline metrics that every report has, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [summary_rows(r) for r in reports]
    metrics = [m for m in PLOT_METRICS if all(isinstance(r.get(m), (int, float)) for r in rows)]
    if not metrics:
        raise ValueError(f"the reports share none of the plotted metrics {PLOT_METRICS}")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(names) + 1.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [r[metric] for r in rows]
        ax.barh(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        ax.set_yticks(range(len(names)), names if ax is axes[0][0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
        ax.margins(x=0.25)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grid(images, labels: list[str], path: Path, columns: int = 10, scale: int = 3) -> None:
    """A PNG grid of uint8 (N, 32, 32, 3) images with their labels underneath."""
    from PIL import Image, ImageDraw

    size = images.shape[1] * scale
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (columns * size, rows * (size + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * size, (i // columns) * (size + 14)
        canvas.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (x, y))
        draw.text((x + 1, y + size + 1), label[:16], fill="black")
    canvas.save(path)
