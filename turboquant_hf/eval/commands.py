"""The subcommands of ``python -m turboquant_hf.eval``: load the model, run every cache, print and save the results.

``__main__`` builds the parser and checks the arguments without importing torch; it imports this module
only to run a command, once every argument (paths, device, outputs) has been checked.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import agreement, divergence, needle, perplexity, report, speed
from .footprint import bytes_per_token
from .loading import has_weights, load_model, read_text, resolve_device, resolve_dtype
from .specs import CacheSpec, make_cache

DYNAMIC = CacheSpec("dynamic")


# ------------------------------------------------------------------------------------------ helpers
def _load(args, parser: argparse.ArgumentParser):
    from transformers.utils import logging as transformers_logging

    device = resolve_device(args.device)  # checked by __main__.check_arguments
    dtype = resolve_dtype(args.dtype, device)
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    if not _show_progress(args):  # transformers' own "Loading weights" bar
        transformers_logging.disable_progress_bar()
    try:
        model, tokenizer = load_model(args.model, args.gguf_file, device, dtype, args.rope_scaling)
    except OSError as error:  # what from_pretrained raises for a hub id it cannot find or a folder it cannot read
        parser.error(f"argument --model: cannot load {args.model}: {error}")
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()
    if args.attn_implementation:
        from .. import attention  # noqa: F401  (registers "turboquant")

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


def _show_progress(args) -> bool:
    """Progress bars only for a person watching a terminal: in a log file they are noise."""
    return not args.quiet and sys.stderr.isatty()


def _emit(result: dict, args) -> int:
    """Print and write ``result``; exit status 1 if a cache run or a check failed (after writing what succeeded)."""
    print(report.format_table(result))
    if args.json:
        report.write_json(result, args.json)
    if args.markdown:
        args.markdown.write_text(report.to_markdown(result), encoding="utf-8")
    status = 0
    if getattr(args, "plot", None):
        try:
            report.plot(result, args.plot)
        except ValueError as error:  # no perplexity rows to plot
            print(f"--plot {args.plot}: {error}", file=sys.stderr)
            status = 1
    failed_checks = [check for check in result["checks"] if not check["passed"]]
    for check in failed_checks:
        print(f"CHECK FAILED: {check}", file=sys.stderr)
    failed_rows = [row for row in result["rows"] if row.get("error")]
    if failed_rows:
        print(f"{len(failed_rows)} of {len(result['rows'])} cache runs failed (see 'failed:' above)", file=sys.stderr)
    return 1 if failed_checks or failed_rows else status


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
    started = time.perf_counter()
    model, tokenizer, device = _load(args, parser)
    specs = _with_dynamic_first(args.caches)
    progress = _show_progress(args)
    rows, checks, texts = [], [], []
    for path in args.text_file:
        input_ids = _token_ids(tokenizer, path)[: args.max_tokens]
        if input_ids.numel() < args.prefill + 2:
            parser.error(f"{path} has {input_ids.numel()} tokens; --prefill {args.prefill} needs {args.prefill + 2}")
        texts.append(_text_info(path, input_ids.numel()))
        input_ids = input_ids[None].to(device)
        reference, reference_bytes = None, None
        # The dense run's distributions, recorded once per text; every other cache is scored against them.
        dense = divergence.DenseDistributions(positions=input_ids.numel() - args.prefill - 1)
        for spec in tqdm(specs, desc=f"ppl {path.name}", disable=not progress):
            spec_started = time.perf_counter()
            cache = make_cache(spec, model.config)
            observer = dense if spec == DYNAMIC else divergence.Divergence(dense)
            try:
                nlls = perplexity.nlls_through_cache(model, input_ids, cache, args.prefill, args.chunk, progress,
                                                     observe=observer)
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
            # The dense row is the reference itself: KL 0 and full agreement by definition.
            distance = (divergence.Divergence.of_reference(dense) if spec == DYNAMIC else observer.result())
            rows.append({
                "text": path.name, "spec": spec.label, "ppl": perplexity.perplexity(nlls),
                "delta_ppl_pct": delta.percent, "delta_ppl_ci95": list(delta.ci95), **distance,
                "nll_mean": nlls.double().mean().item(), "scored_tokens": nlls.numel(), **footprint,
                "compression": reference_bytes / footprint["bytes_per_token"],
                "memory_report": _memory_report(cache), "seconds": time.perf_counter() - spec_started,
            })
            if not args.quiet:
                tqdm.write(f"{path.name} {spec.label}: PPL {rows[-1]['ppl']:.4f} ({delta.percent:+.2f}%), "
                           f"KLD {distance['kld']:.4f}, top-1 {distance['top1_agreement']:.3f}, "
                           f"{footprint['bytes_per_token']:.1f} B/token, {rows[-1]['seconds']:.0f} s")
            del cache
    settings = _settings(args, model, device, max_tokens=args.max_tokens, prefill=args.prefill, chunk=args.chunk,
                         texts=texts)
    return _emit(_result("ppl", argv, settings, rows, started, device, checks), args)


def run_generate(args, argv: list[str], parser: argparse.ArgumentParser) -> int:
    started = time.perf_counter()
    model, tokenizer, device = _load(args, parser)
    specs = _with_dynamic_first(args.caches)
    progress = _show_progress(args)
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
        for spec in tqdm(specs, desc=f"generate {path.name}", disable=not progress):
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
    progress = _show_progress(args)
    rows = []
    for spec in tqdm(args.caches, desc="needle", disable=not progress):
        results, cache = [], None
        try:
            for trial in tqdm(trials, desc=spec.label, leave=False, disable=not progress):
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
    model, tokenizer, device = _load(args, parser)
    token_ids = _token_ids(tokenizer, args.text_file, model.config.get_text_config().vocab_size)
    if token_ids.numel() < args.prompt_tokens:
        token_ids = token_ids.repeat(args.prompt_tokens // token_ids.numel() + 1)
    prompt = token_ids[: args.prompt_tokens].repeat(args.batch, 1).to(device)
    # Warm-up (kernel selection, allocator, lazy imports), not timed.
    speed.measure(model, prompt[:, :16], make_cache(DYNAMIC, model.config), 2)
    rows = []
    for spec in tqdm(args.caches, desc="speed", disable=not _show_progress(args)):
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
