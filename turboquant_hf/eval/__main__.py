"""``python -m turboquant_hf.eval`` / ``turboquant-eval``: quality, memory and speed of KV caches, side by side.

Subcommands: ppl, needle, generate, speed (measure on a model), report (merge saved --json results).
Run ``python -m turboquant_hf.eval <subcommand> --help`` for the options.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import agreement, needle, perplexity, report, speed
from .footprint import bytes_per_token
from .loading import (DTYPES, PROSE_TEXT, ROPE_SCALINGS, check_rope_scaling, has_weights, load_model, read_text,
                      resolve_device, resolve_dtype)
from .specs import SPEC_HELP, CacheSpec, make_cache, missing_backend, parse_cache_specs

DYNAMIC = CacheSpec("dynamic")


# ------------------------------------------------------------------------------------ argument types
def _caches(text: str) -> list[CacheSpec]:
    try:
        specs = parse_cache_specs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
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
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
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
    outputs.add_argument("--json", type=Path, help="write every setting, versions, machine and results here")
    outputs.add_argument("--markdown", type=Path, help="write command, machine and the table as Markdown here")
    outputs.add_argument("--quiet", action="store_true", help="no progress bars")

    def caches_argument(sub, default: str) -> None:
        # A default baseline this machine lacks (fp8 on transformers without it, e.g. 5.17) is left out, not an error.
        specs = [spec for spec in parse_cache_specs(default) if not missing_backend(spec)]
        sub.add_argument("--caches", type=_caches, default=specs,
                         help=f"comma list of cache specs (default: {default}, less any whose backend is "
                              f"missing); {SPEC_HELP}")

    ppl = commands.add_parser("ppl", parents=[model, outputs], help="teacher-forced perplexity through the cache")
    ppl.add_argument("--text-file", type=_text_file, nargs="+", default=[PROSE_TEXT],
                     help="UTF-8 text file(s) (default: the shipped prose text)")
    ppl.add_argument("--max-tokens", type=_positive_int, default=2048, help="tokens per text (default 2048)")
    ppl.add_argument("--prefill", type=_positive_int, default=256, help="tokens in the first call (default 256)")
    ppl.add_argument("--chunk", type=_positive_int, default=32, help="tokens per later call (default 32)")
    ppl.add_argument("--plot", type=Path, help="write a PNG of ΔPPL %% vs bytes per token here")
    caches_argument(ppl, "dynamic,tq4,tq3,tq2,fp8")
    ppl.set_defaults(run=run_ppl, parser=ppl)

    hay = commands.add_parser("needle", parents=[model, outputs], help="needle-in-a-haystack exact match rate")
    hay.add_argument("--text-file", type=_text_file, default=PROSE_TEXT, help="filler text (default: shipped prose)")
    hay.add_argument("--lengths", type=_int_list, default=[512, 1024, 2048],
                     help="context lengths in tokens (default 512,1024,2048)")
    hay.add_argument("--depths", type=_depth_list, default=[0.1, 0.3, 0.5, 0.7, 0.9],
                     help="needle depths in [0, 1] (default 0.1,0.3,0.5,0.7,0.9)")
    hay.add_argument("--new-tokens", type=_positive_int, default=24, help="answer tokens (default 24)")
    hay.add_argument("--seed", type=int, default=0, help="seed of the hidden numbers (default 0)")
    caches_argument(hay, "dynamic,tq4,tq3,tq2")
    hay.set_defaults(run=run_needle, parser=hay)

    gen = commands.add_parser("generate", parents=[model, outputs], help="greedy agreement with DynamicCache")
    gen.add_argument("--text-file", type=_text_file, nargs="+", default=[PROSE_TEXT],
                     help="text file(s) the prompts are cut from (default: the shipped prose text)")
    gen.add_argument("--prompts", type=_positive_int, default=4, help="prompts per text (default 4)")
    gen.add_argument("--prompt-tokens", type=_positive_int, default=256, help="tokens per prompt (default 256)")
    gen.add_argument("--new-tokens", type=_positive_int, default=32, help="greedy tokens per prompt (default 32)")
    gen.add_argument("--show", type=int, default=1, help="prompts whose generations are printed (default 1)")
    caches_argument(gen, "dynamic,tq4,tq3,tq2,fp8")
    gen.set_defaults(run=run_generate, parser=gen)

    spd = commands.add_parser("speed", parents=[model, outputs], help="prefill/decode tokens/s and memory")
    spd.add_argument("--text-file", type=_text_file, default=PROSE_TEXT, help="prompt source (default: shipped prose)")
    spd.add_argument("--prompt-tokens", type=_positive_int, default=1024, help="prefill length (default 1024)")
    spd.add_argument("--new-tokens", type=_positive_int, default=64, help="decode steps (default 64)")
    spd.add_argument("--batch", type=_positive_int, default=1, help="prompts in the batch (default 1)")
    caches_argument(spd, "dynamic,tq4,tq3")
    spd.set_defaults(run=run_speed, parser=spd)

    rep = commands.add_parser("report", parents=[outputs], help="merge --json results into one table")
    rep.add_argument("results", type=Path, nargs="+", help="JSON files written by --json")
    rep.add_argument("--plot", type=Path, help="write a PNG of ΔPPL %% vs bytes per token here")
    rep.set_defaults(run=run_report, parser=rep)
    return parser


# ------------------------------------------------------------------------------------------ helpers
def _load(args, parser: argparse.ArgumentParser, needs_tokenizer: bool = True):
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model(args.model, args.gguf_file, device, dtype, args.rope_scaling)
    if tokenizer is None and needs_tokenizer:
        parser.error(f"--model {args.model} holds a config.json but no weights or tokenizer: random weights are "
                     "only for the speed command")
    if args.attn_implementation:  # "turboquant" is registered by importing this package
        model.set_attn_implementation(args.attn_implementation)
    return model, tokenizer, device


def _text_info(path: Path, tokens: int) -> dict:
    data = path.read_bytes()
    return {"name": path.name, "path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "tokens": tokens}


def _token_ids(tokenizer, path: Path, vocab_size: int = 0) -> torch.Tensor:
    """(n,) long: the text with the tokenizer's default special tokens; without a tokenizer (random weights),
    one seeded random id per byte of the text."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (len(read_text(path).encode()),), generator=generator)
    return torch.tensor(tokenizer(read_text(path))["input_ids"], dtype=torch.long)


def _settings(args, model, device, **extra) -> dict:
    return {"model": args.model, "gguf_file": args.gguf_file, "random_weights": not has_weights(args.model),
            "rope_scaling": model.config.rope_parameters if args.rope_scaling else None,
            "attn_implementation": model.config._attn_implementation, "device": str(device),
            "dtype": str(model.dtype), **extra, "caches": [spec.describe() for spec in args.caches]}


def _result(command: str, argv: list[str], settings: dict, rows: list[dict], started: float, device=None,
            checks: list[dict] | None = None) -> dict:
    return {"schema": report.SCHEMA, "command": command, "argv": report.command_line(argv), "settings": settings,
            "environment": report.environment(device), "checks": checks or [], "rows": rows,
            "seconds": time.perf_counter() - started}


def _with_dynamic_first(specs: list[CacheSpec]) -> list[CacheSpec]:
    return [DYNAMIC, *(spec for spec in specs if spec != DYNAMIC)]


def _emit(result: dict, args) -> int:
    print(report.format_table(result))
    if args.json:
        report.write_json(result, args.json)
    if args.markdown:
        args.markdown.write_text(report.to_markdown(result), encoding="utf-8")
    if getattr(args, "plot", None):
        report.plot(result, args.plot)
    failed = [check for check in result["checks"] if not check["passed"]]
    for check in failed:
        print(f"CHECK FAILED: {check}", file=sys.stderr)
    return 1 if failed else 0


def _failed(spec: CacheSpec, error: Exception, **where) -> dict:
    """The row of a cache that raised: one failing cache must not end a long run of the others."""
    message = f"{type(error).__name__}: {error}"
    place = f" on {where['text']}" if where.get("text") else ""
    print(f"cache {spec.label}{place} failed: {message}", file=sys.stderr)
    return {**where, "spec": spec.label, "error": message}


def _memory_report(cache) -> dict | None:
    if not hasattr(cache, "memory_report"):
        return None
    return {key: value for key, value in cache.memory_report().items() if key != "layers"}


# -------------------------------------------------------------------------------------- subcommands
def run_ppl(args, argv: list[str], parser: argparse.ArgumentParser) -> int:
    if args.prefill + 2 > args.max_tokens:
        parser.error(f"--prefill ({args.prefill}) must be at most --max-tokens - 2 ({args.max_tokens - 2})")
    started = time.perf_counter()
    model, tokenizer, device = _load(args, parser)
    specs = _with_dynamic_first(args.caches)
    rows, checks, texts = [], [], []
    for path in args.text_file:
        input_ids = _token_ids(tokenizer, path)[: args.max_tokens]
        if input_ids.numel() < args.prefill + 2:
            parser.error(f"{path} has {input_ids.numel()} tokens; --prefill {args.prefill} needs {args.prefill + 2}")
        texts.append(_text_info(path, input_ids.numel()))
        input_ids = input_ids[None].to(device)
        reference, reference_bytes = None, None
        for spec in tqdm(specs, desc=f"ppl {path.name}", disable=args.quiet):
            spec_started = time.perf_counter()
            cache = make_cache(spec, model.config)
            try:
                nlls = perplexity.nlls_through_cache(model, input_ids, cache, args.prefill, args.chunk,
                                                     not args.quiet)
            except Exception as error:
                if spec == DYNAMIC:
                    raise
                rows.append(_failed(spec, error, text=path.name))
                continue
            footprint = bytes_per_token(cache, model.config)
            if spec == DYNAMIC:
                reference, reference_bytes = nlls, footprint["bytes_per_token"]
                checks.append({"text": path.name,
                               **perplexity.sanity_check(model, input_ids, nlls, args.prefill)})
            delta = perplexity.Delta.between(nlls, reference)
            rows.append({
                "text": path.name, "spec": spec.label, "ppl": perplexity.perplexity(nlls),
                "delta_ppl_pct": delta.percent, "delta_ppl_ci95": list(delta.ci95),
                "nll_mean": nlls.double().mean().item(), "scored_tokens": nlls.numel(), **footprint,
                "compression": reference_bytes / footprint["bytes_per_token"],
                "memory_report": _memory_report(cache), "seconds": time.perf_counter() - spec_started,
            })
            if not args.quiet:
                tqdm.write(f"{path.name} {spec.label}: PPL {rows[-1]['ppl']:.4f} ({delta.percent:+.2f}%), "
                           f"{footprint['bytes_per_token']:.1f} B/token, {rows[-1]['seconds']:.0f} s")
            del cache
    settings = _settings(args, model, device, max_tokens=args.max_tokens, prefill=args.prefill, chunk=args.chunk,
                         texts=texts)
    return _emit(_result("ppl", argv, settings, rows, started, device, checks), args)


def run_generate(args, argv: list[str], parser: argparse.ArgumentParser) -> int:
    started = time.perf_counter()
    model, tokenizer, device = _load(args, parser)
    specs = _with_dynamic_first(args.caches)
    rows, texts = [], []
    for path in args.text_file:
        token_ids = _token_ids(tokenizer, path)
        try:
            prompts = agreement.prompt_windows(token_ids, args.prompts, args.prompt_tokens).to(device)
        except ValueError as error:
            parser.error(f"{path}: {error}")
        texts.append(_text_info(path, token_ids.numel()))
        reference = None
        outputs = {}
        first_tokens, prompt_cache = agreement.prefill(model, prompts)
        for spec in tqdm(specs, desc=f"generate {path.name}", disable=args.quiet):
            cache = make_cache(spec, model.config)
            try:
                try:
                    agreement.replay(prompt_cache, cache, args.prompt_tokens)
                except agreement.NotReplayable:  # sliding-window layers: prefill through this cache
                    cache = make_cache(spec, model.config)
                    generated = agreement.greedy_decode(model, prompts, cache, args.new_tokens)
                else:
                    generated = agreement.greedy_continue(model, first_tokens, cache, args.new_tokens)
            except Exception as error:
                if spec == DYNAMIC:
                    raise
                rows.append(_failed(spec, error, text=path.name))
                continue
            if spec == DYNAMIC:
                reference = generated
            outputs[spec.label] = [tokenizer.decode(row, skip_special_tokens=True) for row in generated]
            rows.append({"text": path.name, "spec": spec.label, **agreement.compare(reference, generated),
                         "prompts": args.prompts, **bytes_per_token(cache, model.config, args.prompts),
                         "generations": outputs[spec.label]})
        for index in range(min(args.show, args.prompts)):
            tail = tokenizer.decode(prompts[index, -24:], skip_special_tokens=True).replace("\n", "\\n")
            print(f"\n[{path.name} prompt {index}] ...{tail}")
            for label, generations in outputs.items():
                print(f"  {label:>18} | {generations[index]!r}")
    settings = _settings(args, model, device, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                         new_tokens=args.new_tokens, texts=texts)
    print()
    return _emit(_result("generate", argv, settings, rows, started, device), args)


def run_needle(args, argv: list[str], parser: argparse.ArgumentParser) -> int:
    started = time.perf_counter()
    model, tokenizer, device = _load(args, parser)
    try:
        trials = needle.build_trials(tokenizer, read_text(args.text_file), args.lengths, args.depths, args.seed)
    except ValueError as error:
        parser.error(str(error))
    filler_tokens = _token_ids(tokenizer, args.text_file).numel()
    rows = []
    for spec in tqdm(args.caches, desc="needle", disable=args.quiet):
        results, cache = [], None
        try:
            for trial in tqdm(trials, desc=spec.label, leave=False, disable=args.quiet):
                cache = make_cache(spec, model.config)
                results.append(needle.run_trial(model, tokenizer, trial, cache, args.new_tokens, device))
        except Exception as error:
            rows.append(_failed(spec, error))
            continue
        hits = sum(result["hit"] for result in results)
        rows.append({"spec": spec.label, "score": hits / len(results), "hits": hits, "trials": len(results),
                     **bytes_per_token(cache, model.config), "per_trial": results})
    settings = _settings(args, model, device, lengths=args.lengths, depths=args.depths, new_tokens=args.new_tokens,
                         seed=args.seed, texts=[_text_info(args.text_file, filler_tokens)])
    return _emit(_result("needle", argv, settings, rows, started, device), args)


def run_speed(args, argv: list[str], parser: argparse.ArgumentParser) -> int:
    started = time.perf_counter()
    model, tokenizer, device = _load(args, parser, needs_tokenizer=False)
    token_ids = _token_ids(tokenizer, args.text_file, model.config.get_text_config().vocab_size)
    if token_ids.numel() < args.prompt_tokens:
        token_ids = token_ids.repeat(args.prompt_tokens // token_ids.numel() + 1)
    prompt = token_ids[: args.prompt_tokens].repeat(args.batch, 1).to(device)
    # Warm-up (kernel selection, allocator, lazy imports), not timed.
    speed.measure(model, prompt[:, :16], make_cache(DYNAMIC, model.config), 2)
    rows = []
    for spec in tqdm(args.caches, desc="speed", disable=args.quiet):
        try:
            speed.measure(model, prompt[:, :16], make_cache(spec, model.config), 2)
            measured = speed.measure(model, prompt, make_cache(spec, model.config), args.new_tokens)
        except Exception as error:
            rows.append(_failed(spec, error))
            continue
        peak = measured["max_memory_allocated"]
        rows.append({"spec": spec.label, **measured, "max_memory_mib": peak / 2**20 if peak is not None else None,
                     "cache_mib": measured["cache_bytes"] / 2**20})
    settings = _settings(args, model, device, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                         batch=args.batch, texts=[_text_info(args.text_file, args.prompt_tokens)])
    return _emit(_result("speed", argv, settings, rows, started, device), args)


def run_report(args, argv: list[str], parser: argparse.ArgumentParser) -> int:
    import json

    try:
        results = [json.loads(path.read_text(encoding="utf-8")) for path in args.results]
        merged = report.merge(results, argv)
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"cannot merge {[str(p) for p in args.results]}: {error}")
    return _emit(merged, args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, argv, args.parser)


if __name__ == "__main__":
    sys.exit(main())
