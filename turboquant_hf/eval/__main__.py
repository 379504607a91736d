"""``python -m turboquant_hf.eval`` / ``turboquant-eval``: quality, memory and speed of KV caches, side by side.

Subcommands: ppl, needle, generate, speed (measure on a model), report (merge saved --json results).
Run ``python -m turboquant_hf.eval <subcommand> --help`` for the options.

This module builds the parser and checks every argument (files, model folder, device, output folders) before
anything is loaded, so a mistake costs seconds, not a model load or a whole run. It imports no torch or
transformers until a command runs (``commands``), so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

# loading and specs import torch and transformers only inside the functions that need them (resolve_device, ...).
from .loading import (DTYPES, PROSE_TEXT, ROPE_SCALINGS, check_rope_scaling, has_tokenizer, has_weights, read_text,
                      resolve_device)
from .specs import DISTRIBUTION, SPEC_HELP, CacheSpec, missing_backend, parse_cache_specs


# ------------------------------------------------------------------------------------ argument types
class _DefaultCaches(str):
    """A --caches default: specs whose backend this machine lacks (fp8 on transformers 5.17) are left out,
    not an error. argparse parses a string default with the argument's type after --help has had its turn."""


def _caches(text: str) -> list[CacheSpec]:
    try:
        specs = parse_cache_specs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if isinstance(text, _DefaultCaches):
        return [spec for spec in specs if not missing_backend(spec)]
    for spec in specs:
        message = missing_backend(spec)
        if message:
            raise argparse.ArgumentTypeError(message)
    return specs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    values = [_positive_int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give a comma list of ints >= 1, e.g. 512,1024")
    return values


def _depth_list(text: str) -> list[float]:
    depths = []
    for part in filter(str.strip, text.split(",")):
        try:
            depth = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"depths are floats in [0, 1], got {part!r}") from None
        if not 0.0 <= depth <= 1.0:
            raise argparse.ArgumentTypeError(f"depths are floats in [0, 1], got {depth}")
        depths.append(depth)
    if not depths:
        raise argparse.ArgumentTypeError("give at least one depth in [0, 1]")
    return depths


def _rope_scaling(text: str) -> tuple[str, float]:
    kind, _, factor = text.partition(":")
    try:
        rope_scaling = (kind, float(factor))
        check_rope_scaling(rope_scaling)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give KIND:FACTOR with KIND one of {', '.join(ROPE_SCALINGS)} and FACTOR > 1 "
                                         f"(e.g. yarn:4), got {text!r}") from None
    return rope_scaling


def _text_file(text: str) -> Path:
    """An existing, non-empty UTF-8 text file (read now: the texts are small, a model load is not)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    try:
        read_text(path)
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return path


def _output_file(text: str) -> Path:
    """A file to write at the end of a run: its folder must exist now, not after an hour of measuring."""
    path = Path(text)
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist (for {text})")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {folder} is not writable (for {text})")
    return path


# --------------------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turboquant-eval", description="Quality, memory and speed of KV caches on your model and text.",
        epilog=f"Cache specs (--caches, comma separated) -- {SPEC_HELP}. Quantized specs compress every "
               "token unless they say residual=N, e.g. tq3:residual=128.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{ppl,needle,generate,speed,report}")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", required=True, help="local folder or hub id of a causal LM")
    model.add_argument("--gguf-file", help="GGUF file name inside --model (dequantized to --dtype)")
    model.add_argument("--rope-scaling", type=_rope_scaling, metavar="KIND:FACTOR",
                       help=f"stretch the model's RoPE FACTOR times beyond its trained context for longer prompts; "
                            f"KIND: {', '.join(ROPE_SCALINGS)} (e.g. yarn:4)")
    model.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    model.add_argument("--attn-implementation", choices=["eager", "sdpa", "turboquant"],
                       help="attention of the model (default: its own); turboquant = the fused kernels, which read "
                            "TurboQuant caches packed and hand every other cache to sdpa")
    model.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                       help="model dtype; auto: float32 on CPU, bfloat16 on GPU")
    outputs = argparse.ArgumentParser(add_help=False)
    outputs.add_argument("--json", type=_output_file,
                         help="write every setting, versions, machine and results here")
    outputs.add_argument("--markdown", type=_output_file,
                         help="write command, machine and the table as Markdown here")
    outputs.add_argument("--quiet", action="store_true",
                         help="no progress bars or per-cache lines (bars are also off when stderr is not a terminal)")

    def texts_argument(sub, what: str) -> None:
        sub.add_argument("--text-file", type=_text_file, nargs="+", default=[PROSE_TEXT],
                         help=f"UTF-8 text file(s) {what} (default: the shipped prose text)")

    def caches_argument(sub, default: str) -> None:
        sub.add_argument("--caches", type=_caches, default=_DefaultCaches(default),
                         help=f"comma list of cache specs (default: {default}, less any whose backend is "
                              f"missing); {SPEC_HELP}")

    ppl = commands.add_parser("ppl", parents=[model, outputs], help="teacher-forced perplexity through the cache")
    texts_argument(ppl, "to score")
    ppl.add_argument("--max-tokens", type=_positive_int, default=2048, help="tokens per text (default 2048)")
    ppl.add_argument("--prefill", type=_positive_int, default=256, help="tokens in the first call (default 256)")
    ppl.add_argument("--chunk", type=_positive_int, default=32, help="tokens per later call (default 32)")
    ppl.add_argument("--plot", type=_output_file, help="write a PNG of ΔPPL %% vs bytes per token here")
    caches_argument(ppl, "dynamic,tq4,tq3,tq2,fp8")
    ppl.set_defaults(parser=ppl)

    hay = commands.add_parser("needle", parents=[model, outputs], help="needle-in-a-haystack exact match rate")
    hay.add_argument("--text-file", type=_text_file, default=PROSE_TEXT, help="filler text (default: shipped prose)")
    hay.add_argument("--lengths", type=_int_list, default=[512, 1024, 2048],
                     help="context lengths in tokens (default 512,1024,2048)")
    hay.add_argument("--depths", type=_depth_list, default=[0.1, 0.3, 0.5, 0.7, 0.9],
                     help="needle depths in [0, 1] (default 0.1,0.3,0.5,0.7,0.9)")
    hay.add_argument("--new-tokens", type=_positive_int, default=24, help="answer tokens (default 24)")
    hay.add_argument("--seed", type=int, default=0, help="seed of the hidden numbers (default 0)")
    caches_argument(hay, "dynamic,tq4,tq3,tq2")
    hay.set_defaults(parser=hay)

    gen = commands.add_parser("generate", parents=[model, outputs], help="greedy agreement with DynamicCache")
    texts_argument(gen, "the prompts are cut from")
    gen.add_argument("--prompts", type=_positive_int, default=4, help="prompts per text (default 4)")
    gen.add_argument("--prompt-tokens", type=_positive_int, default=256, help="tokens per prompt (default 256)")
    gen.add_argument("--new-tokens", type=_positive_int, default=32, help="greedy tokens per prompt (default 32)")
    gen.add_argument("--show", type=int, default=1, help="prompts whose generations are printed (default 1)")
    caches_argument(gen, "dynamic,tq4,tq3,tq2,fp8")
    gen.set_defaults(parser=gen)

    spd = commands.add_parser("speed", parents=[model, outputs], help="prefill/decode tokens/s and memory")
    spd.add_argument("--text-file", type=_text_file, default=PROSE_TEXT, help="prompt source (default: shipped prose)")
    spd.add_argument("--prompt-tokens", type=_positive_int, default=1024, help="prefill length (default 1024)")
    spd.add_argument("--new-tokens", type=_positive_int, default=64, help="decode steps (default 64)")
    spd.add_argument("--batch", type=_positive_int, default=1, help="prompts in the batch (default 1)")
    caches_argument(spd, "dynamic,tq4,tq3")
    spd.set_defaults(parser=spd)

    rep = commands.add_parser("report", parents=[outputs], help="merge --json results into one table")
    rep.add_argument("results", type=Path, nargs="+", help="JSON files written by --json")
    rep.add_argument("--plot", type=_output_file, help="write a PNG of ΔPPL %% vs bytes per token here")
    rep.set_defaults(parser=rep)
    return parser


# ------------------------------------------------------------------------------------- up-front checks
# A hub id: "name" or "owner/name" (huggingface_hub's rule, without importing it).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _check_model(args, parser: argparse.ArgumentParser) -> None:
    folder = Path(args.model)
    if folder.is_dir():
        if args.gguf_file and not (folder / args.gguf_file).is_file():
            parser.error(f"argument --gguf-file: no file {args.gguf_file} in --model folder {folder}")
        if not args.gguf_file and not (folder / "config.json").is_file():
            parser.error(f"argument --model: folder {folder} holds no config.json")
        if args.command != "speed" and not has_weights(args.model) and not has_tokenizer(args.model):
            parser.error(f"argument --model: {folder} holds a config.json but no weights or tokenizer: random "
                         "weights are only for the speed command")
        return
    if folder.exists():
        parser.error(f"argument --model: {folder} is a file; give its folder (and a GGUF file's name as --gguf-file)")
    if not _HUB_ID.fullmatch(args.model) or args.model.startswith((".", "~")):
        parser.error(f"argument --model: no such folder: {args.model}")
    from huggingface_hub import constants, try_to_load_from_cache

    first_file = args.gguf_file or "config.json"
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(args.model, first_file), str):
        parser.error(f"argument --model: {args.model} is neither a local folder nor in the hub cache, and the hub "
                     "is off (HF_HUB_OFFLINE)")


def check_arguments(args, parser: argparse.ArgumentParser) -> None:
    """parser.error (exit 2) for what would fail later: the model path, the device, missing packages."""
    if args.command == "ppl" and args.prefill + 2 > args.max_tokens:
        parser.error(f"--prefill ({args.prefill}) must be at most --max-tokens - 2 ({args.max_tokens - 2})")
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        parser.error(f"argument --plot: needs matplotlib: pip install '{DISTRIBUTION}[plot]'")
    if args.command == "report":
        return
    if args.gguf_file and importlib.util.find_spec("gguf") is None:
        parser.error("argument --gguf-file: needs the gguf package: pip install gguf")
    _check_model(args, parser)
    try:
        resolve_device(args.device)
    except ValueError as error:
        parser.error(f"argument --device: {error}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(args, args.parser)
    from . import commands

    run = getattr(commands, f"run_{args.command}")
    return run(args, argv, args.parser)


if __name__ == "__main__":
    sys.exit(main())
