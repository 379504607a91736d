"""Results out: the terminal table, ``--json`` (every setting, versions, machine), ``--markdown``, ``--plot``.

A result is one dict (schema ``SCHEMA``)::

    {"schema", "command", "argv", "settings", "environment", "checks": [...], "rows": [...], "seconds"}

``rows`` hold one dict per (text, cache spec) or per cache spec; ``COLUMNS`` says which row keys each
command shows and how. ``merge`` joins the rows of several results (e.g. ``ppl`` and ``generate`` on the
same texts) into one table, keyed by (text, spec).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCHEMA = "turboquant_hf.eval/1"
# Installed versions looked up by distribution name; turboquant_hf's own comes from its __version__, which
# holds whatever its distribution is called.
PACKAGES = ("torch", "transformers", "optimum-quanto", "hqq", "gguf", "numpy", "scipy", "matplotlib")


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


# (row key, header, format) per command; a row without the key shows "-".
COLUMNS = {
    "ppl": [("text", "text", "{}"), ("spec", "cache", "{}"), ("ppl", "PPL", "{:.4f}"),
            ("delta_ppl_pct", "ΔPPL %", "{:+.2f}"), ("delta_ppl_ci95", "95% CI", _fmt_ci),
            ("kld", "KLD nats", "{:.4f}"), ("top1_agreement", "top-1 agree", "{:.3f}"),
            ("bytes_per_token", "B/token", "{:.1f}"), ("bytes_per_token_used", "B/token used", "{:.1f}"),
            ("compression", "× vs dynamic", "{:.2f}"), ("seconds", "s", "{:.0f}")],
    "generate": [("text", "text", "{}"), ("spec", "cache", "{}"), ("match_rate", "match rate", "{:.3f}"),
                 ("first_divergence_mean", "first divergence", "{:.1f}"), ("identical", "identical", "{}"),
                 ("bytes_per_token", "B/token", "{:.1f}")],
    "needle": [("spec", "cache", "{}"), ("score", "exact match", "{:.3f}"), ("hits", "hits", "{}"),
               ("trials", "trials", "{}"), ("bytes_per_token", "B/token", "{:.1f}")],
    "speed": [("spec", "cache", "{}"), ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
              ("decode_tokens_per_s", "decode tok/s", "{:.2f}"), ("max_memory_mib", "max alloc MiB", "{:.1f}"),
              ("cache_mib", "cache MiB", "{:.3f}"), ("bytes_per_token", "B/token", "{:.1f}")],
    "report": [("text", "text", "{}"), ("spec", "cache", "{}"), ("ppl", "PPL", "{:.4f}"),
               ("delta_ppl_pct", "ΔPPL %", "{:+.2f}"), ("delta_ppl_ci95", "95% CI", _fmt_ci),
               ("kld", "KLD nats", "{:.4f}"), ("top1_agreement", "top-1 agree", "{:.3f}"),
               ("bytes_per_token", "B/token", "{:.1f}"), ("bytes_per_token_used", "B/token used", "{:.1f}"),
               ("compression", "× vs dynamic", "{:.2f}"), ("match_rate", "greedy match", "{:.3f}"),
               ("first_divergence_mean", "first div.", "{:.1f}")],
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | None = None) -> dict:
    """The machine and package versions a result was measured with."""
    import torch

    from .. import __version__

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cuda": torch.version.cuda if cuda else None,
        "packages": {"turboquant_hf": __version__, **{name: _version(name) for name in PACKAGES}},
    }


def command_line(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "turboquant_hf.eval", *argv])


def _cell(row: dict, key: str, fmt) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def _table(result: dict) -> tuple[list[str], list[list[str]]]:
    columns = COLUMNS[result["command"]]
    rows = result["rows"]
    # Drop the text column when every row is from the same text (or none has one).
    if len({row.get("text") for row in rows}) <= 1:
        columns = [c for c in columns if c[0] != "text"]
    return [header for _, header, _ in columns], [[_cell(row, key, fmt) for key, _, fmt in columns] for row in rows]


def format_table(result: dict) -> str:
    """The rows as an aligned plain-text table."""
    headers, cells = _table(result)
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    lines += [f"failed: {error}" for error in _errors(result)]
    return "\n".join(lines)


def _machine_line(env: dict) -> str:
    packages = ", ".join(f"{name} {version}" for name, version in env["packages"].items()
                         if version and name in ("torch", "transformers", "turboquant_hf", "optimum-quanto", "hqq"))
    gpus = f"; GPU: {', '.join(env['gpus'])}" if env.get("gpus") else ""
    return (f"{env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads){gpus}; "
            f"Python {env['python']}; {packages}")


def to_markdown(result: dict) -> str:
    """Command(s), machine, settings and the table, ready to paste into RESULTS.md."""
    headers, cells = _table(result)
    sources = result.get("sources") or [result]
    lines = []
    for source in sources:
        lines.append(f"Command: `{source['argv']}`  ")
    lines.append(f"Machine: {_machine_line(result['environment'])}  ")
    settings = result["settings"]
    described = {k: v for k, v in settings.items() if k not in ("caches", "texts") and v is not None}
    lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in described.items()) + "  ")
    for text in settings.get("texts") or []:
        lines.append(f"Text: `{text['name']}` ({text['tokens']} tokens used, sha256 {text['sha256'][:12]}…)  ")
    for check in result.get("checks") or []:
        verdict = "passed" if check["passed"] else "FAILED"
        lines.append(f"Check ({check.get('text', '')}): {check['name']}: relative difference "
                     f"{check['relative_difference']:.1e} <= {check['tolerance']:.0e}: {verdict}  ")
    kld_note = _kld_note(result["rows"])
    if kld_note:
        lines.append(kld_note + "  ")
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    errors = _errors(result)
    if errors:
        lines += ["", "Failed runs (no figure): " + "; ".join(f"`{e}`" for e in errors)]
    return "\n".join(lines) + "\n"


def _kld_note(rows: list[dict]) -> str | None:
    """What the KLD column measured: exact over the vocabulary, or over the dense top-k plus a tail bucket."""
    measured = [row for row in rows if row.get("kld_exact") is not None]
    if not measured:
        return None
    if all(row["kld_exact"] for row in measured):
        return ("KLD: KL(dense || cache) of the next-token distribution in nats, over the whole vocabulary, mean over "
                "the scored positions; top-1 agree: share of positions whose argmax is the dense one")
    kept = min(row["kld_kept_tokens"] for row in measured)
    tail = max(row["dense_tail_mass_mean"] for row in measured)
    return (f"KLD: KL(dense || cache) in nats over the dense model's top {kept} tokens plus one bucket for the rest "
            f"(a lower bound on the full KL; mean dense mass in that bucket at most {tail:.1e}), mean over the scored "
            "positions; top-1 agree: share of positions whose argmax is the dense one")


def _errors(result: dict) -> list[str]:
    return [f"{row['spec']}" + (f" on {row['text']}" if row.get("text") else "") + f": {row['error'][:160]}"
            for row in result["rows"] if row.get("error")]


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")


def spec_family(spec: str) -> str:
    """The legend group of a spec label: "tq3:residual=128" -> "TurboQuant", "hqq-int4" -> "HQQ", ..."""
    name = spec.split(":")[0]
    if name.startswith(("tq", "k")) and name != "dynamic":
        return "TurboQuant (QJL keys)" if name.endswith("-qjl") else "TurboQuant"
    return {"quanto": "quanto", "hqq": "HQQ", "fp8": "fp8", "dynamic": "dynamic"}.get(name.split("-")[0], name)


def plot(result: dict, path: str | Path) -> None:
    """ΔPPL % vs bytes per token (K+V, per layer per kv head), one point per (text, spec)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("delta_ppl_pct") is not None and r.get("bytes_per_token")]
    if not rows:
        raise ValueError("--plot needs perplexity rows (delta_ppl_pct and bytes_per_token)")
    texts = list(dict.fromkeys(r.get("text") for r in rows))
    families = list(dict.fromkeys(spec_family(r["spec"]) for r in rows))
    markers = "osD^v<>P*X"
    colors = plt.get_cmap("tab10")
    figure, axis = plt.subplots(figsize=(9, 6))
    for row in rows:
        family, text = spec_family(row["spec"]), row.get("text")
        axis.scatter(row["bytes_per_token"], row["delta_ppl_pct"], color=colors(families.index(family) % 10),
                     marker=markers[texts.index(text) % len(markers)], s=40)
        axis.annotate(row["spec"], (row["bytes_per_token"], row["delta_ppl_pct"]), fontsize=7,
                      xytext=(4, 2), textcoords="offset points")
    handles = [plt.Line2D([], [], color=colors(i % 10), marker="o", linestyle="", label=f)
               for i, f in enumerate(families)]
    handles += [plt.Line2D([], [], color="gray", marker=markers[i % len(markers)], linestyle="", label=str(t))
                for i, t in enumerate(texts)]
    axis.legend(handles=handles, fontsize=8)
    axis.set_xscale("log", base=2)
    axis.set_yscale("symlog", linthresh=1.0)
    axis.set_ylim(bottom=min(-1.0, 1.5 * min(r["delta_ppl_pct"] for r in rows)))
    axis.axhline(0, color="black", linewidth=0.5)
    axis.set_xlabel("bytes per token per layer per kv head (K+V, measured)")
    axis.set_ylabel("ΔPPL % vs DynamicCache (symlog)")
    settings = result["settings"]
    model = " / ".join(Path(str(settings[k])).name for k in ("model", "gguf_file") if settings.get(k))
    axis.set_title(f"Quality loss vs cache size: {model}", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def merge(results: list[dict], argv: list[str]) -> dict:
    """One result whose rows join the rows of ``results`` by (text, spec); later values fill gaps only."""
    merged: dict[tuple, dict] = {}
    texts: dict[str, dict] = {}
    for result in results:
        if result.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} result (schema {result.get('schema')!r})")
        for text in result["settings"].get("texts") or []:
            texts.setdefault(text["name"], text)
        for row in result["rows"]:
            target = merged.setdefault((row.get("text"), row["spec"]), {})
            for key, value in row.items():
                target.setdefault(key, value)
    first = results[0]
    return {
        "schema": SCHEMA,
        "command": "report",
        "argv": command_line(argv),
        "settings": {"model": first["settings"].get("model"), "gguf_file": first["settings"].get("gguf_file"),
                     "texts": list(texts.values())},
        "environment": first["environment"],
        "checks": [c for r in results for c in r.get("checks") or []],
        "rows": list(merged.values()),
        "sources": [{"command": r["command"], "argv": r["argv"], "settings": r["settings"]} for r in results],
        "seconds": sum(r.get("seconds") or 0 for r in results),
    }
