"""A long document, encoded once: SmolLM2 reads it, the compressed cache is saved, a fresh process answers questions.

The document is the essay shipped with the evaluation texts (``turboquant_hf/eval/texts/prose_harbour_almanac.txt``)
cut at a paragraph boundary to at most ``--doc-tokens`` tokens. Offline, CPU.

    python examples/long_document.py [--doc-tokens 1024] [--bits 4] [--max-new-tokens 24] [--cache-file PATH]

1. This process prefills the document into a ``TurboQuantCache`` and saves it (``cache.save(path)``).
2. A fresh process (this script with ``--answer``) loads the model and the file
   (``TurboQuantCache.load(path, model_config=model.config)``) and answers three questions, each from its own
   ``cache.copy()``: only the question's tokens go through the model, the document is never read again.

Printed: the prefill time against the load time, and the file size against the bytes a DynamicCache holds for the
same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

from turboquant_hf import TurboQuantCache  # noqa: E402
from turboquant_hf.eval.loading import cache_kwarg, forward, prose_document  # noqa: E402
from turboquant_hf.testing import load_smollm2  # noqa: E402

QUESTIONS = (
    "Who kept the light on Gannet Point, and for how many years?",
    "By how much is the tide later each day, and why?",
    "What did a fast fall of the barometer mean?",
)
_QUESTION_SLOT = "<<question>>"


def prompt_parts(tokenizer, max_tokens: int) -> tuple[torch.Tensor, str]:
    """(the chat prompt up to the end of the document as (1, n) token ids, the text that follows it with a slot for
    the question). Tokenized apart, so that every question continues exactly the saved tokens."""
    document = prose_document(tokenizer, max_tokens)
    messages = [{"role": "user", "content": f"{document}\n\n{_QUESTION_SLOT}"}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head, tail = chat.split(_QUESTION_SLOT)
    return tokenizer(head, add_special_tokens=False, return_tensors="pt")["input_ids"], _QUESTION_SLOT + tail


def ask(model, tokenizer, cache: TurboQuantCache, prefix: torch.Tensor, follow: str, question: str,
        max_new_tokens: int) -> dict:
    """Greedy answer to ``question`` after the document that ``cache`` holds (``prefix``, ``follow``: from
    ``prompt_parts``): {"question", "answer", "seconds"}. Generates from ``cache.copy()``, so ``cache`` keeps the
    document alone for the next question; only the question's tokens go through the model."""
    question_ids = tokenizer(follow.replace(_QUESTION_SLOT, f"Question: {question}"), add_special_tokens=False,
                             return_tensors="pt")["input_ids"]
    ids = torch.cat([prefix, question_ids], dim=1)
    start = time.perf_counter()
    output = model.generate(ids, attention_mask=torch.ones_like(ids), **{cache_kwarg(model): cache.copy()},
                            max_new_tokens=max_new_tokens, do_sample=False)
    text = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return {"question": question, "answer": text, "seconds": time.perf_counter() - start}


def encode(args) -> dict:
    """Step 1: prefill the document, save the cache, run step 2 in a fresh process."""
    model, tokenizer = load_smollm2()
    prefix, _ = prompt_parts(tokenizer, args.doc_tokens)
    cache = TurboQuantCache(bits=args.bits, model_config=model.config)
    start = time.perf_counter()
    with torch.no_grad():
        forward(model, prefix, cache)
    prefill_s = time.perf_counter() - start
    folder = None if args.cache_file else tempfile.TemporaryDirectory()
    path = Path(args.cache_file or Path(folder.name) / "long_document.safetensors")
    cache.save(path)
    file_bytes, dense_bytes = path.stat().st_size, cache.memory_report()["dense_bytes"]
    print(f"document: {prefix.shape[1]} tokens, prefilled in {prefill_s:.1f} s")
    print(f"saved {path.name}: {file_bytes / 2**20:.2f} MiB (a DynamicCache holds {dense_bytes / 2**20:.2f} MiB for "
          f"these tokens: {dense_bytes / file_bytes:.1f}x smaller)\n")
    sys.stdout.flush()
    try:
        result_file = path.with_suffix(".result.json")
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--answer", "--cache-file", str(path),
                        "--doc-tokens", str(args.doc_tokens), "--max-new-tokens", str(args.max_new_tokens),
                        "--prefill-seconds", str(prefill_s), "--result-file", str(result_file)], check=True)
        answered = json.loads(result_file.read_text())
        result_file.unlink()
    finally:
        if folder is not None:
            folder.cleanup()
    return {"prompt_tokens": prefix.shape[1], "prefill_s": prefill_s, "file_bytes": file_bytes,
            "dense_bytes": dense_bytes, **answered}


def answer(args) -> dict:
    """Step 2 (a fresh process): load the model and the saved cache; answer each question from a copy of it."""
    model, tokenizer = load_smollm2()
    prefix, follow = prompt_parts(tokenizer, args.doc_tokens)
    start = time.perf_counter()
    cache = TurboQuantCache.load(args.cache_file, model_config=model.config)
    load_s = time.perf_counter() - start
    if cache.get_seq_length() != prefix.shape[1]:
        raise SystemExit(f"{args.cache_file} holds {cache.get_seq_length()} tokens, the document has "
                         f"{prefix.shape[1]}: it was saved for another --doc-tokens")
    saved = args.prefill_seconds - load_s
    print(f"fresh process: loaded the cache in {load_s:.2f} s instead of a {args.prefill_seconds:.1f} s prefill "
          f"({saved:.1f} s saved each time the document is reused)\n")
    answers = []
    for question in QUESTIONS:
        answers.append(ask(model, tokenizer, cache, prefix, follow, question, args.max_new_tokens))
        print(f"Q: {question}\nA: {answers[-1]['answer']}  ({answers[-1]['seconds']:.1f} s)\n")
    result = {"load_s": load_s, "saved_s": saved, "answers": answers}
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc-tokens", type=int, default=1024, help="document length cap, in tokens")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--cache-file", help="where to save the cache (default: a temporary folder)")
    parser.add_argument("--answer", action="store_true", help=argparse.SUPPRESS)  # step 2, run by step 1
    parser.add_argument("--prefill-seconds", type=float, default=float("nan"), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.disable_progress_bar()  # quiet: no weight-loading bars
    if args.answer and not args.cache_file:
        parser.error("--answer needs --cache-file")
    return answer(args) if args.answer else encode(args)


if __name__ == "__main__":
    main()
