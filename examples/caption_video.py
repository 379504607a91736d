"""Caption videos with a vision-language model whose KV cache is TurboQuant-compressed.

Video is where the KV cache blows up: every sampled frame becomes hundreds of visual tokens, and each
one is cached in every layer for the whole caption. With ``TurboQuantCache(bits=4)`` those tokens are
held as 4-bit codes instead of 16/32-bit floats. On CPU that memory is what the cache buys (it is not
faster there); speed gains are on GPU, with ``attn_implementation="turboquant"``.

    python examples/caption_video.py clip.mp4 --model Qwen/Qwen2.5-VL-3B-Instruct --compare
    python examples/caption_video.py clips/ --model ./local-qwen2-vl --frames 32 --out captions.jsonl

Models: Qwen2-VL, Qwen2.5-VL, SmolVLM and other image-text-to-text models whose processor takes
videos, from a local folder or a hub id.

Frames are decoded with PyAV (``pip install av``) when it is installed, else with OpenCV
(``pip install opencv-python-headless``), and sampled uniformly in time: ``--frames N`` frames over
the clip, or ``--fps F`` frames per second of video (at most ``--frames``).

Inputs are built by the model's processor (``AutoProcessor``). transformers' video processors need
torchvision; without it, Qwen2-VL / Qwen2.5-VL video inputs are built with the model's image processor
instead (the same patch layout, frames resized with PIL instead of torchvision), and other models stop
with an error that says so.

A folder of videos gives one JSON line per video (to ``--out``, else stdout), with a progress bar on
stderr; a video that cannot be read gets a line with an ``error`` field and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from turboquant_hf import TurboQuantCache
from turboquant_hf.lloyd_max import SUPPORTED_BITS
from turboquant_hf.eval.loading import cache_kwarg

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg"}
DEFAULT_PROMPT = "Describe this video in one or two sentences."
# Models whose video inputs can be built from the image processor when no video processor can load.
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# Qwen2VLVideoProcessor's default pixel budget per frame, used when a model has no video config.
QWEN_VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}


class CaptionError(Exception):
    """A problem with the user's input (file, video, model) that the command line reports in one line."""


# ------------------------------------------------------------------------------------------- frames
def sample_indices(total_frames: int, video_fps: float, frames: int, fps: float | None = None) -> np.ndarray:
    """Indices of frames to keep, uniform in time: ``frames`` of them, or ``fps`` per second (at most ``frames``)."""
    count = frames if fps is None else max(1, round(total_frames / video_fps * fps))
    count = max(1, min(count, frames, total_frames))
    return ((np.arange(count) + 0.5) * total_frames / count).astype(np.int64)


def _read_pyav(path: Path, pick) -> tuple[dict, int, float]:
    """({index: frame}, total frames, fps): decodes up to the last picked frame, converts only the picked."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate or 0) or 25.0
        total = stream.frames
    if not total:  # the container does not say: count packets, which needs no decoding
        with av.open(str(path)) as container:
            total = sum(1 for packet in container.demux(video=0) if packet.size)
    if not total:
        return {}, 0, video_fps
    indices = pick(total, video_fps)
    wanted, frames = set(indices.tolist()), {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= indices[-1]:
                break
    return frames, total, video_fps


def _read_opencv(path: Path, pick) -> tuple[dict, int, float]:
    """Same contract as ``_read_pyav``; skipped frames are grabbed, not decoded to images."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return {}, 0, 0.0
        video_fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:  # unknown: count by grabbing, then start again
            while capture.grab():
                total += 1
            capture.release()
            capture = cv2.VideoCapture(str(path))
        if total <= 0:
            return {}, 0, video_fps
        indices = pick(total, video_fps)
        wanted, frames = set(indices.tolist()), {}
        for index in range(int(indices[-1]) + 1):
            if not capture.grab():
                break
            if index in wanted:
                ok, frame = capture.retrieve()
                if ok:
                    frames[index] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        return frames, total, video_fps
    finally:
        capture.release()


def video_backend() -> str:
    """'pyav' when PyAV is installed, else 'opencv' when OpenCV is, else CaptionError."""
    import importlib.util

    for module, name in (("av", "pyav"), ("cv2", "opencv")):
        if importlib.util.find_spec(module) is not None:
            return name
    raise CaptionError("no video decoder installed: pip install av  (or: pip install opencv-python-headless)")


def read_frames(path: str | Path, frames: int = 16, fps: float | None = None, backend: str | None = None):
    """Decode ``path`` and sample frames uniformly in time.

    Returns ``(video, metadata)``: video (frames, height, width, 3) uint8 RGB, and a dict with the
    source's ``total_num_frames``, ``fps``, ``duration`` and the kept ``frames_indices``, ``backend``.
    Only the sampled frames are kept in memory; decoding stops after the last one.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"no such video file: {path}")
    backend = backend or video_backend()
    reader = _read_pyav if backend == "pyav" else _read_opencv
    try:
        decoded, total, video_fps = reader(path, lambda total, video_fps: sample_indices(total, video_fps, frames, fps))
    except Exception as error:  # PyAV raises its own error classes for every kind of bad file
        raise CaptionError(f"cannot decode {path} with {backend}: {error}") from error
    if not decoded:
        raise CaptionError(f"cannot decode {path} with {backend}: no video frames")
    # Frame counts in headers can overstate the frames there are: keep the sampled frames that decoded.
    indices = sorted(decoded)
    video = np.stack([decoded[i] for i in indices])
    metadata = {
        "total_num_frames": total, "fps": video_fps, "duration": total / video_fps, "frames_indices": indices,
        "height": video.shape[1], "width": video.shape[2], "backend": backend,
    }
    return video, metadata


def write_test_video(path: str | Path, frames: int = 16, height: int = 120, width: int = 160, fps: int = 8,
                     backend: str | None = None) -> Path:
    """Write a small synthetic clip (a red square crossing a blue background) as H.264/MPEG-4 ``path``.

    For trying the script without a video at hand, and for the tests. Returns ``path``.
    """
    path = Path(path)
    backend = backend or video_backend()
    clip = np.zeros((frames, height, width, 3), dtype=np.uint8)
    clip[..., 2] = 160  # blue background
    side = height // 3
    for index in range(frames):
        left = (width - side) * index // max(frames - 1, 1)
        clip[index, side:2 * side, left:left + side] = (220, 30, 30)
    if backend == "pyav":
        import av

        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for frame in clip:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    else:
        import cv2

        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        for frame in clip:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
    return path


# ------------------------------------------------------------------------------------------- inputs
class QwenImageProcessorVideo:
    """Qwen2-VL / Qwen2.5-VL video inputs built with the image processor, for when no video processor loads.

    Mirrors ``Qwen2VLVideoProcessor``: each frame is resized (to the model's video pixel budget) and
    normalized like an image, then consecutive frames are paired into the temporal patches of
    ``pixel_values_videos``, and the prompt's video token is repeated once per merged patch.
    """

    def __init__(self, model_id: str):
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.image_processor = AutoImageProcessor.from_pretrained(model_id)
        self.model_type = AutoConfig.from_pretrained(model_id).model_type
        self.video_size = _video_size(model_id)
        self.video_token = "<|video_pad|>"
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(self.video_token)

    def __call__(self, prompt: str, video: np.ndarray, metadata: dict):
        from transformers import BatchFeature

        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        processor = self.image_processor
        pair = processor.temporal_patch_size
        frames = list(video) + [video[-1]] * (-len(video) % pair)  # pad like the video processor: repeat the last
        images = processor(images=frames, size=self.video_size, return_tensors="np")
        grid_h, grid_w = (int(n) for n in images["image_grid_thw"][0, 1:])
        patch = processor.patch_size
        # Image patches hold each frame `pair` times over time: keep one copy, then pair consecutive frames.
        per_frame = images["pixel_values"].reshape(len(frames), grid_h * grid_w, 3, pair, patch, patch)[:, :, :, 0]
        grid_t = len(frames) // pair
        pixel_values = per_frame.reshape(grid_t, pair, grid_h * grid_w, 3, patch, patch).transpose(0, 2, 3, 1, 4, 5)
        pixel_values = np.ascontiguousarray(pixel_values).reshape(grid_t * grid_h * grid_w, -1)
        visual_tokens = grid_t * grid_h * grid_w // processor.merge_size**2
        encoded = self.tokenizer(text.replace(self.video_token, self.video_token * visual_tokens), return_tensors="pt")
        data = {
            **encoded,
            "pixel_values_videos": torch.from_numpy(pixel_values),
            "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]]),
            "mm_token_type_ids": (encoded["input_ids"] == self.video_token_id).long() * 2,  # 2 marks video tokens
        }
        if self.model_type == "qwen2_5_vl":  # seconds per temporal patch, for the time axis of M-RoPE
            sampled_fps = len(video) / metadata["duration"]
            data["second_per_grid_ts"] = torch.tensor([pair / sampled_fps])
        return BatchFeature(data)

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)


def _video_size(model_id: str) -> dict:
    """The per-frame pixel budget from the model's video processor config, else Qwen2-VL's default."""
    from transformers.utils import cached_file

    path = cached_file(model_id, "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return dict(QWEN_VIDEO_SIZE)
    config = json.loads(Path(path).read_text())
    size = dict(config.get("size") or QWEN_VIDEO_SIZE)
    size["shortest_edge"] = config.get("min_pixels", size["shortest_edge"])
    size["longest_edge"] = config.get("max_pixels", size["longest_edge"])
    return size


def load_processor(model_id: str):
    """The model's processor if it takes videos; the image-processor route for Qwen-VL without torchvision."""
    from transformers import AutoConfig, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        if AutoConfig.from_pretrained(model_id).model_type in QWEN_VL_TYPES:
            return QwenImageProcessorVideo(model_id)
        raise CaptionError(
            f"{model_id}: transformers' video processors need torchvision, which is not installed "
            "(install the torchvision build that matches your torch)"
        ) from error
    if getattr(processor, "video_processor", None) is None:
        raise CaptionError(
            f"{model_id} has no video processor ({type(processor).__name__}): it cannot take video input"
        )
    return processor


def build_inputs(processor, video: np.ndarray, metadata: dict, prompt: str = DEFAULT_PROMPT):
    """Chat-formatted model inputs for one sampled video: a BatchFeature of tensors (batch of 1)."""
    if isinstance(processor, QwenImageProcessorVideo):
        return processor(prompt, video, metadata)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    video_metadata = {key: value for key, value in metadata.items() if key != "backend"}
    return processor(text=[text], videos=[video], video_metadata=[video_metadata], do_sample_frames=False,
                     return_tensors="pt")


def visual_token_count(model, input_ids: torch.Tensor) -> int:
    """Prompt tokens that stand for image or video patches."""
    config = model.config
    ids = {getattr(config, name, None) for name in ("video_token_id", "image_token_id", "image_token_index")}
    ids.discard(None)
    return int(sum((input_ids == token).sum() for token in ids))


# ------------------------------------------------------------------------------------------ caption
def resolve_device_dtype(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def load_model(model_id: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, device_map=str(device)).eval()


def _held_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def generate_caption(model, processor, inputs, cache, max_new_tokens: int) -> dict:
    """Greedy caption with ``cache``; text, new tokens, seconds and tokens/s (vision and prefill included)."""
    start = time.perf_counter()
    with torch.inference_mode():
        # cache_kwarg: "cache" on transformers >= 5.23, "past_key_values" before.
        output = model.generate(**inputs, **{cache_kwarg(model): cache}, max_new_tokens=max_new_tokens,
                                do_sample=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return {"caption": processor.decode(new_tokens, skip_special_tokens=True).strip(), "new_tokens": len(new_tokens),
            "seconds": round(seconds, 3), "tokens_per_s": round(len(new_tokens) / seconds, 2)}


def caption_video(path, model, processor, *, bits: int = 4, residual_length: int = 128, frames: int = 16,
                  fps: float | None = None, max_new_tokens: int = 64, prompt: str = DEFAULT_PROMPT,
                  compare: bool = False) -> dict:
    """Caption one video file; returns the JSON-ready record (see ``main`` for the fields)."""
    from transformers import DynamicCache

    video, metadata = read_frames(path, frames, fps)
    inputs = build_inputs(processor, video, metadata, prompt).to(model.device)
    for key in inputs:  # pixels in the model's dtype; ids, grids and timings stay as they are
        if key.startswith("pixel_values"):
            inputs[key] = inputs[key].to(model.dtype)
    cache = TurboQuantCache(bits=bits, residual_length=residual_length, config=model.config)
    result = generate_caption(model, processor, inputs, cache, max_new_tokens)
    report = cache.memory_report()
    record = {
        "video": str(path), "frames": len(video), "frame_size": [int(video.shape[1]), int(video.shape[2])],
        "sampled_fps": round(len(video) / metadata["duration"], 3), "decoder": metadata["backend"],
        "visual_tokens": visual_token_count(model, inputs["input_ids"]), "prompt_tokens": inputs["input_ids"].shape[1],
        "bits": bits, **result,
        "cache": {key: report[key] for key in ("tokens", "compressed_bytes", "dense_bytes", "ratio")},
    }
    if compare:
        dense_cache = DynamicCache(config=model.config)
        dense = generate_caption(model, processor, inputs, dense_cache, max_new_tokens)
        dense_bytes = _held_bytes(dense_cache)
        record["dynamic_cache"] = {**dense, "held_bytes": dense_bytes}
        record["memory_saved_bytes"] = dense_bytes - report["compressed_bytes"]
        record["same_caption"] = dense["caption"] == result["caption"]
    return record


def print_record(record: dict, out=None) -> None:
    """The human-readable summary of a record that ``main`` prints for a single video (to ``out`` or stdout)."""
    out = out or sys.stdout
    mib = 2**20
    cache = record["cache"]
    print(f"{record['video']}: {record['frames']} frames of {record['frame_size'][1]}x{record['frame_size'][0]} "
          f"({record['sampled_fps']} fps, {record['decoder']}) -> {record['visual_tokens']} visual tokens of "
          f"{record['prompt_tokens']} prompt tokens", file=out)
    print(f"  TurboQuant {record['bits']}-bit: {record['caption']!r}", file=out)
    print(f"    cache {cache['compressed_bytes'] / mib:.2f} MiB held for {cache['tokens']} tokens vs "
          f"{cache['dense_bytes'] / mib:.2f} MiB dense: {cache['ratio']:.2f}x smaller; {record['tokens_per_s']} "
          "tokens/s", file=out)
    if "dynamic_cache" in record:
        dense = record["dynamic_cache"]
        print(f"  DynamicCache:   {dense['caption']!r}", file=out)
        print(f"    cache {dense['held_bytes'] / mib:.2f} MiB; memory saved "
              f"{record['memory_saved_bytes'] / mib:.2f} MiB; {dense['tokens_per_s']} tokens/s; same caption: "
              f"{record['same_caption']}", file=out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", help="a video file, or a folder of videos (one JSON line each)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-3B-Instruct", help="hub id or local folder")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS, help="TurboQuant bits per coordinate")
    parser.add_argument("--residual-length", type=int, default=128, help="newest tokens kept in full precision")
    parser.add_argument("--frames", type=int, default=16, help="frames to sample (the maximum with --fps)")
    parser.add_argument("--fps", type=float, default=None, help="sample this many frames per second of video")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--compare", action="store_true", help="also caption with DynamicCache and compare")
    parser.add_argument("--out", default=None, help="JSONL file to append one record per video to")
    args = parser.parse_args(argv)
    if args.frames < 1 or (args.fps is not None and args.fps <= 0) or args.max_new_tokens < 1:
        parser.error("--frames and --max-new-tokens must be >= 1 and --fps > 0")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Caption a file or every video in a folder; returns the records (also printed / written as JSONL).

    Record fields: video, frames, frame_size [h, w], sampled_fps, decoder, visual_tokens, prompt_tokens,
    bits, caption, new_tokens, seconds, tokens_per_s, cache {tokens, compressed_bytes, dense_bytes,
    ratio}; with --compare also dynamic_cache {caption, ..., held_bytes}, memory_saved_bytes,
    same_caption; for a folder, an unreadable video gives {video, error}.
    """
    args = parse_args(argv)
    source = Path(args.video)
    try:
        if source.is_dir():
            videos = sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
            if not videos:
                raise CaptionError(f"no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) in folder {source}")
        elif source.is_file():
            videos = [source]
        else:
            raise CaptionError(f"no such video file or folder: {source}")
        video_backend()  # fail before loading a model when no decoder is installed
        processor = load_processor(args.model)
    except CaptionError as error:
        raise SystemExit(f"error: {error}") from None
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model = load_model(args.model, device, dtype)
    options = dict(bits=args.bits, residual_length=args.residual_length, frames=args.frames, fps=args.fps,
                   max_new_tokens=args.max_new_tokens, prompt=args.prompt, compare=args.compare)

    records = []
    out = open(args.out, "a") if args.out else None
    try:
        if source.is_file():
            try:
                record = caption_video(source, model, processor, **options)
            except CaptionError as error:
                raise SystemExit(f"error: {error}") from None
            print_record(record)
            if device.type == "cpu":
                print(f"On CPU, TurboQuant buys memory: the cache is {record['cache']['ratio']:.2f}x smaller. It is "
                      'not faster here; speed gains are on GPU, with attn_implementation="turboquant".')
            records.append(record)
            if out:
                out.write(json.dumps(record) + "\n")
        else:
            from tqdm.auto import tqdm

            for path in tqdm(videos, desc="captioning", unit="video", file=sys.stderr):
                try:
                    record = caption_video(path, model, processor, **options)
                except CaptionError as error:
                    record = {"video": str(path), "error": str(error)}
                records.append(record)
                print(json.dumps(record), file=out or sys.stdout, flush=True)
    finally:
        if out:
            out.close()
    return records


if __name__ == "__main__":
    main()
