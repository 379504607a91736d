"""Quality vs cache size, from the JSON results of ``python -m turboquant_hf.eval ppl --json``.

    python benchmarks/plot_frontier.py benchmarks/results/cpu_kld_*.json --out benchmarks/results/cpu_kld_frontier.png

One row of panels per model (the GGUF file name, else the --model path); left ΔPPL %, right KLD (nats,
KL(dense || cache) per position, averaged), both against the measured bytes per token per layer per kv head
(K and V together). Colour: cache family; marker: text; filled: every past token compressed (window 0),
hollow: a dense window of recent tokens (``residual=N``). Dotted lines: the window-0 goals of issue 18.
Needs matplotlib (pip install 'turboquant-kvcache[plot]').
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from turboquant_hf.eval.report import spec_family

# Issue 18's goals at window 0: ΔPPL at most +1% (4-bit), +3% (3-bit), +15% (2-bit); KLD at most 0.01 nats (4-bit).
DELTA_GOALS = {"4-bit": 1.0, "3-bit": 3.0, "2-bit": 15.0}
KLD_GOAL = 0.01
MARKERS = "osD^v<>P*X"


def _model_name(settings: dict) -> str:
    return Path(str(settings.get("gguf_file") or settings["model"])).name


def _window(spec: str) -> int:
    options = dict(option.split("=", 1) for option in spec.split(":")[1:])
    return int(options.get("residual", 0))


def load_rows(paths: list[Path]) -> list[dict]:
    """Every perplexity row with a KLD, tagged with its model name."""
    rows = []
    for path in paths:
        result = json.loads(path.read_text(encoding="utf-8"))
        model = _model_name(result["settings"])
        rows += [{**row, "model": model} for row in result["rows"]
                 if row.get("kld") is not None and row.get("bytes_per_token") and not row.get("error")]
    if not rows:
        raise SystemExit(f"no perplexity rows with a KLD in {[str(p) for p in paths]}")
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    texts = list(dict.fromkeys(row["text"] for row in rows))
    families = list(dict.fromkeys(spec_family(row["spec"]) for row in rows))
    colors = plt.get_cmap("tab10")
    figure, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    for model_axes, model in zip(axes, models):
        for axis, key in zip(model_axes, ("delta_ppl_pct", "kld")):
            for row in (r for r in rows if r["model"] == model and r["spec"] != "dynamic"):
                color = colors(families.index(spec_family(row["spec"])) % 10)
                window = _window(row["spec"])
                axis.scatter(row["bytes_per_token"], max(row[key], 1e-5) if key == "kld" else row[key], s=36,
                             marker=MARKERS[texts.index(row["text"]) % len(MARKERS)], edgecolors=color,
                             facecolors=color if window == 0 else "none", linewidths=1.2)
                if window == 0:
                    axis.annotate(row["spec"].replace("quanto-", "q-").replace("hqq-", "h-"),
                                  (row["bytes_per_token"], max(row[key], 1e-5) if key == "kld" else row[key]),
                                  fontsize=6, xytext=(3, 2), textcoords="offset points", alpha=0.8)
            axis.set_xscale("log", base=2)
            axis.set_xticks([32, 48, 64, 96, 128, 192, 256], labels=["32", "48", "64", "96", "128", "192", "256"])
            axis.set_xlim(32, 160)
            axis.set_xlabel("bytes per token per layer per kv head (K+V, measured)")
            axis.grid(True, which="both", alpha=0.3)
            if key == "delta_ppl_pct":
                axis.set_yscale("symlog", linthresh=1.0)
                axis.set_ylim(bottom=-0.5)
                for label, goal in DELTA_GOALS.items():
                    axis.axhline(goal, color="gray", linestyle=":", linewidth=0.8)
                    axis.annotate(f"{label} goal", (1, goal), xycoords=("axes fraction", "data"), fontsize=6,
                                  ha="right", va="bottom", color="gray")
                axis.axhline(0, color="black", linewidth=0.5)
                axis.set_ylabel("ΔPPL % vs DynamicCache (symlog)")
            else:
                axis.set_yscale("log")
                axis.axhline(KLD_GOAL, color="gray", linestyle=":", linewidth=0.8)
                axis.annotate("4-bit goal", (1, KLD_GOAL), xycoords=("axes fraction", "data"), fontsize=6,
                              ha="right", va="bottom", color="gray")
                axis.set_ylabel("KLD to the dense next-token distribution (nats)")
            axis.set_title(f"{model}: {'ΔPPL' if key == 'delta_ppl_pct' else 'KLD'}", fontsize=9)
    handles = [plt.Line2D([], [], color=colors(i % 10), marker="o", linestyle="", label=family)
               for i, family in enumerate(families) if family != "dynamic"]
    handles += [plt.Line2D([], [], color="gray", marker=MARKERS[i % len(MARKERS)], linestyle="", label=text)
                for i, text in enumerate(texts)]
    handles += [plt.Line2D([], [], color="gray", marker="o", linestyle="", label="window 0 (all compressed)"),
                plt.Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="",
                           label="dense window (residual=N)")]
    figure.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0.06 / len(models), 1, 1))
    figure.savefig(out, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="JSON files of the eval's ppl command (--json)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    plot(load_rows(args.results), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
