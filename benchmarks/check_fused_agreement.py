"""Greedy agreement of attn_implementation="turboquant" (fused, packed cache) with the default path.

    python benchmarks/check_fused_agreement.py --layers 8 --prompt 4096 --new 64
    python benchmarks/check_fused_agreement.py --smollm2 --prompt 512 --new 64

Default: random 8B-shaped Llama layers (hidden 4096, GQA 32/8, head_dim 128, bf16) on CUDA. --smollm2: the real
SmolLM2-135M-Instruct weights (offline, see turboquant_hf.testing) on CUDA if there is one, else on CPU (float32,
where the fused path runs the kernels' torch twins). The prompt is the start of the shipped prose text. The same TurboQuantCache settings on both paths; prints the share of equal
greedy tokens, the first divergence and the largest difference of the step logits while the paths agree.
"""

import argparse
import json

import torch

from turboquant_hf import TurboQuantCache
from turboquant_hf.eval.loading import PROSE_TEXT, forward
from turboquant_hf.testing import load_smollm2

from bench_generate import build_model  # noqa: E402  (run from benchmarks/ or with it on sys.path)


@torch.no_grad()
def greedy(model, impl, ids, new, bits):
    model.set_attn_implementation(impl)
    cache = TurboQuantCache(bits=bits, residual_length=128)
    logits = forward(model, ids, cache, logits_to_keep=1).logits[:, -1]
    tokens, steps = [], []
    for _ in range(new):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        steps.append(logits.float())
        logits = forward(model, token, cache, logits_to_keep=1).logits[:, -1]
    return torch.cat(tokens, -1), steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--smollm2", action="store_true", help="real SmolLM2-135M weights instead of random ones")
    args = parser.parse_args()
    if args.smollm2:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_smollm2(torch.bfloat16 if device == "cuda" else torch.float32)
        model = model.to(device)
        text = PROSE_TEXT.read_text(encoding="utf-8")
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt].to(device)
    else:
        model = build_model(args.layers)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(0))
    default_tokens, default_logits = greedy(model, "sdpa", ids, args.new, args.bits)
    fused_tokens, fused_logits = greedy(model, "turboquant", ids, args.new, args.bits)
    same = (default_tokens == fused_tokens)[0]
    first = int((~same).nonzero()[0]) if not same.all() else args.new
    diff = max((a - b).abs().max().item() for a, b in zip(default_logits[:first + 1], fused_logits[:first + 1]))
    print(json.dumps({"model": "SmolLM2-135M" if args.smollm2 else f"random 8B-shaped, {args.layers} layers",
                      "device": str(ids.device), "prompt": ids.shape[1], "new": args.new, "bits": args.bits,
                      "match_rate": same.float().mean().item(), "first_divergence": first,
                      "max_logit_diff_until_divergence": diff,
                      "logit_scale": default_logits[0].abs().max().item()}))


if __name__ == "__main__":
    main()
