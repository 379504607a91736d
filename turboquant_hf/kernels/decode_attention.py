"""Attention of a few new query tokens over a compressed KV cache: fused Triton kernel + torch twin.

Layout of the Triton path (three launches, no host sync):

1. ``_rotate_query_kernel``: q_rot = scale * q R^T once per call (fp32), in the key rotation's basis.
2. ``_split_kernel``, grid (splits + 1, batch * kv_heads, row blocks) (on GPUs of compute capability 8.0 and newer,
   4-bit keys and values at head_dim 128 and at least ``FAST_MIN_TOKENS`` packed tokens: the Gluon kernel of
   decode_attention_fast.py for the compressed splits, same arguments and partials, and this one for the window).
   Splits 0..splits-1 each take a slice of the compressed past; a program owns one kv head and all ``group * M``
   query rows that read it (GQA without repeating K/V), so the packed K/V (D * bits / 8 + 4 bytes per vector) is
   read once.
   It scores keys in the rotated domain (norm_k * <q_rot, c[idx_k]>), runs an online softmax in fp32
   and accumulates norm_v * c[idx_v] in the value rotation's basis; at 4 and 2 bits it works on the
   "phases" of the packed bytes (see ``_split_kernel``). The last split attends over the dense residual
   window (model basis). Each writes an unnormalized partial with its row max and sum. Lengths are not
   specialized on (``do_not_specialize``), so a generation compiles each kernel once.
3. ``_merge_kernel``: log-sum-exp merge of the partials, one rotation back to the model basis, the
   residual partial added, (B, Hq, M, D) written in the query dtype.

Numerics: softmax statistics and accumulators are fp32; the two rotations run once per call, as tensor-core dots
with exact products (``rotate.rotate_columns``).
The per-token dots run on fp16 tensor cores at about fp32 accuracy: the decoded centroids are exact fp16
values (``TurboQuantizer`` rounds its codebook to fp16), and the fp32 side (scaled rotated queries,
softmax weights times value norms) is split into fp16 hi + lo, two dots accumulated in fp32. The dense
residual window splits both sides (three dots). So the same math runs on the interpreter and on the GPU,
within ~1e-6 of float64. The fp16 split needs |q|, |q * scale|, |residual K/V| and value norms < 65504 (larger
ones give inf/NaN), and loses relative accuracy where they fall below fp16's normal range (~6e-5; the lo half
bottoms out at ~6e-8 absolute: value norms of 1e-6 carry a few percent of error). Key norms only scale fp32
logits: any finite stored key scale works while the logits stay finite. The torch twin has none of these limits.
"""

from __future__ import annotations

import functools

import torch

from ..quantizer import QuantizedTensor, TurboQuantizer
from ._common import (
    cdiv, check_same_device, check_supported, kernel_state, launch_device, sm_count, tl, triton, use_triton,
)
from .decode_attention_fast import fast_split_covers, fast_split_runs, launch_fast_split
from .dequant import decode_packed, fp16_field, load_packed
from .rotate import column_block, rotate_columns, split_fp16, tile_pieces

_MASK_NONE, _MASK_BOOL, _MASK_ADDITIVE = 0, 1, 2
_MIN_SPLIT_TOKENS = 256
# Packed tokens (every slot, for the static layout) from which the Gluon split kernel replaces _split_kernel where it
# can: on the H200 the whole call took 0.68-0.91x the time with _split_kernel from 32K tokens, 0.95-1.08x at 16K and
# 1.08-1.25x at 4K and 8K (benchmarks/RESULTS.md, "The Gluon split kernel"); 24K lies between, not measured.
FAST_MIN_TOKENS = 24576


@triton.jit
def _dot3(a, b, acc):
    """acc + a @ b for fp32 a (M, K) and b (K, N), about fp32-accurate: both split into fp16 hi + lo,
    three fp16 tensor-core dots accumulated in fp32 (lo @ lo dropped). Needs |a|, |b| < 65504."""
    a_hi, a_lo = split_fp16(a)
    b_hi, b_lo = split_fp16(b)
    acc = tl.dot(a_hi, b_lo, acc)
    acc = tl.dot(a_lo, b_hi, acc)
    return tl.dot(a_hi, b_hi, acc)


@triton.jit
def _dot_split(a_hi, a_lo, b, acc):
    """acc + (a_hi + a_lo) @ b: two fp16 tensor-core dots accumulated in fp32 (see split_fp16)."""
    return tl.dot(a_hi, b, tl.dot(a_lo, b, acc))


@triton.jit
def _masked_logits(
    scores, kv_pos, kv_valid, query_pos, row_valid, mask_rows, stride_mask_n, softcap,
    USE_SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
):
    """scores (R, N) fp32 (already scaled) -> softcapped, causal- and mask-applied logits (-inf = skip)."""
    if USE_SOFTCAP:
        # softcap * tanh(s / softcap), with tanh(t) = 1 - 2 / (exp(2t) + 1) (saturates cleanly at +-1).
        scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
    allowed = kv_valid[None, :] & (kv_pos[None, :] <= query_pos[:, None]) & row_valid[:, None]
    if MASK_KIND == 1:
        mask = tl.load(mask_rows[:, None] + kv_pos[None, :] * stride_mask_n, mask=allowed, other=0)
        allowed = allowed & (mask != 0)
    if MASK_KIND == 2:
        mask = tl.load(mask_rows[:, None] + kv_pos[None, :] * stride_mask_n, mask=allowed, other=0.0)
        scores = scores + mask.to(tl.float32)
    return tl.where(allowed, scores, float("-inf"))


@triton.jit
def _softmax_step(logits, row_max, row_sum):
    """One online-softmax step: returns weights p (R, N), the new max and sum, and alpha (R,), the factor
    that rescales the accumulators to the new max."""
    new_max = tl.maximum(row_max, tl.max(logits, axis=1))
    # Rows that have attended to nothing yet keep max -inf; subtract 0 there so exp gives 0, not NaN.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp(row_max - safe_max)
    weights = tl.exp(logits - safe_max[:, None])
    row_sum = row_sum * alpha + tl.sum(weights, axis=1)
    return weights, new_max, row_sum, alpha


@triton.jit
def _gather(words, table_ptr, BITS: tl.constexpr, PHASES: tl.constexpr):
    """Packed words of a tile (load_packed) -> what _phase slices: the (N, D) fp16 centroids when PHASES == 1, else
    the centroid_table entry of each byte (the fp16 centroids of its PHASES indices side by side). The 256-entry
    table is looked up with tl.gather, which stages it in shared memory (fewer cycles than gathers through L1;
    benchmarks/RESULTS.md has the measurement)."""
    if PHASES == 1:
        gathered = decode_packed(words, table_ptr, BITS)
    else:
        table = tl.load(table_ptr + tl.arange(0, 256))
        flat = tl.reshape(words.to(tl.int32), (words.shape[0] * words.shape[1],))
        gathered = tl.reshape(tl.gather(table, flat, 0), (words.shape[0], words.shape[1]))
    return gathered


@triton.jit
def _phase(gathered, j: tl.constexpr, PHASES: tl.constexpr):
    """Coordinates j, j + PHASES, j + 2 * PHASES, ... of a _gather result, fp16 (N, D / PHASES)."""
    if PHASES == 1:
        tile = gathered
    else:
        tile = fp16_field(gathered, j)
    return tile


@triton.jit
def _rotate_query_kernel(
    query_ptr, stride_qb, stride_qh, stride_qm, stride_qd,
    rot_ptr, q_rot_ptr,
    offset_ptr, stride_ob, stride_oh, stride_od, bias_ptr,
    kv_heads, group, n_queries, padded_rows, scale, bias_scale,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr,
    TILE_PIECES: tl.constexpr, ROT_PIECES: tl.constexpr, HAS_OFFSET: tl.constexpr,
):
    """q_rot[b * kv_heads + h, r] = scale * q[b, h * group + r // M, r % M] @ R^T (fp32; rot_ptr: the pieces of
    R^T, their scale folded into ``scale``); padding rows read row 0. HAS_OFFSET: also bias[b * kv_heads + h, r] =
    bias_scale * q . offset[b, h] (fp32), what the packed keys' scores lack when they were stored centered."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // kv_heads).to(tl.int64)
    h = (pid_bh % kv_heads).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Padding rows (r >= group * M) alias a real row: their results are never stored to the output.
    real_rows = tl.where(rows < group * n_queries, rows, 0)
    q_rows = (query_ptr + b * stride_qb + (h * group + real_rows // n_queries) * stride_qh
              + (real_rows % n_queries) * stride_qm)
    query = tl.load(q_rows[:, None] + tl.arange(0, HEAD_DIM)[None, :] * stride_qd)
    q_hi, q_lo = query, query  # fp16: exact as it is
    if TILE_PIECES > 1:
        q_hi, q_lo = split_fp16(query.to(tl.float32))
    if HAS_OFFSET:
        offset = tl.load(offset_ptr + b * stride_ob + h * stride_oh + tl.arange(0, HEAD_DIM) * stride_od)
        bias = tl.sum(query.to(tl.float32) * offset[None, :], axis=1) * bias_scale
        tl.store(bias_ptr + pid_bh.to(tl.int64) * padded_rows + rows, bias)
    out_rows = q_rot_ptr + (pid_bh.to(tl.int64) * padded_rows + rows) * HEAD_DIM
    cols = tl.arange(0, BLOCK_COL)
    for col0 in tl.static_range(0, HEAD_DIM, BLOCK_COL):
        q_rot = rotate_columns(q_hi, q_lo, rot_ptr, col0, HEAD_DIM, BLOCK_COL, TILE_PIECES, ROT_PIECES)
        tl.store(out_rows[:, None] + (col0 + cols)[None, :], q_rot * scale)


# Lengths change every decode step: specializing on them (Triton's default for ints) would recompile mid-generation.
@triton.jit(do_not_specialize=["stride_mb", "stride_mh", "stride_mm", "compressed_len", "residual_len", "num_splits",
                               "split_len", "ring"])
def _split_kernel(
    query_ptr, stride_qb, stride_qh, stride_qm, stride_qd,
    q_rot_ptr, bias_ptr,
    k_packed_ptr, stride_kpb, stride_kph, stride_kpn, stride_kpbyte,
    k_scales_ptr, stride_ksb, stride_ksh, stride_ksn,
    v_packed_ptr, stride_vpb, stride_vph, stride_vpn, stride_vpbyte,
    v_scales_ptr, stride_vsb, stride_vsh, stride_vsn,
    k_table_ptr, v_table_ptr,
    rk_ptr, stride_rkb, stride_rkh, stride_rkn, stride_rkd,
    rv_ptr, stride_rvb, stride_rvh, stride_rvn, stride_rvd,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    kv_heads, group, n_queries, compressed_len, residual_len, num_splits, split_len, padded_rows,
    scale, softcap, length_ptr, ring,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_PHASES: tl.constexpr, V_PHASES: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, MASK_KIND: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    RESIDUAL_BLOCK_N: tl.constexpr, DEVICE_LENGTH: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One (split, batch * kv head, row block): unnormalized partial attention with its row max and sum.

    At 4 and 2 bits the compressed splits work on "phases" (K_PHASES, V_PHASES of 2 or 4, else 1): phase j holds
    coordinates j, j + P, j + 2P, ..., the j-th index of each packed byte, and one table lookup per byte yields
    all P phases. Scores add up over the key phases against the matching columns of the rotated query; each value
    phase has its own accumulator (acc0..acc3). Tiles in coordinate order would have to be interleaved in
    registers first, which costs Triton more register shuffles than all the rest of the step.

    Splits < num_splits cover compressed tokens [split * split_len, ...) in the rotated domain (partial
    output in the value rotation's basis); split == num_splits covers the dense residual window (model
    basis). Partials: (batch * kv_heads, num_splits + 1, padded_rows, HEAD_DIM) fp32.

    DEVICE_LENGTH (the static layout, captured in CUDA graphs): the lengths are not arguments but read from
    length_ptr (int64 [L, F]: L cached tokens including the new ones, F the first position the ring still holds):
    tokens from max(L - ring, F, 0) on are the dense window, stored in a ring (token p at row p % ring of rk/rv), the
    rest are read packed; splits past them are empty.

    HAS_BIAS: bias_ptr (batch * kv_heads, padded_rows) fp32 is added to every packed key's logit of its row (the
    scaled q . key offset of centered keys, from _rotate_query_kernel).
    """
    if DEVICE_LENGTH:
        total = tl.load(length_ptr).to(tl.int32)
        compressed_len = tl.maximum(tl.maximum(total - ring, tl.load(length_ptr + 1).to(tl.int32)), 0)
        residual_len = total - compressed_len
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // kv_heads).to(tl.int64)
    h = (pid_bh % kv_heads).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < group * n_queries
    query_token = rows % n_queries
    query_head = h * group + rows // n_queries
    query_pos = compressed_len + residual_len - n_queries + query_token
    dims = tl.arange(0, HEAD_DIM)
    mask_rows = mask_ptr + b * stride_mb + query_head * stride_mh + query_token * stride_mm
    kv_offsets = tl.arange(0, BLOCK_N)
    row_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_R,), tl.float32)
    slot_rows = (pid_bh.to(tl.int64) * (num_splits + 1) + split) * padded_rows + rows

    if split < num_splits:
        K_WIDTH: tl.constexpr = HEAD_DIM // K_PHASES
        V_WIDTH: tl.constexpr = HEAD_DIM // V_PHASES
        q_rot_rows = q_rot_ptr + (pid_bh.to(tl.int64) * padded_rows + rows) * HEAD_DIM
        k_columns = tl.arange(0, K_WIDTH) * K_PHASES
        v_columns = tl.arange(0, V_WIDTH) * V_PHASES
        acc0 = tl.zeros((BLOCK_R, V_WIDTH), tl.float32)
        acc1 = tl.zeros((BLOCK_R, V_WIDTH), tl.float32)
        acc2 = tl.zeros((BLOCK_R, V_WIDTH), tl.float32)
        acc3 = tl.zeros((BLOCK_R, V_WIDTH), tl.float32)
        k_rows = k_packed_ptr + b * stride_kpb + h * stride_kph
        v_rows = v_packed_ptr + b * stride_vpb + h * stride_vph
        k_scales = k_scales_ptr + b * stride_ksb + h * stride_ksh
        v_scales = v_scales_ptr + b * stride_vsb + h * stride_vsh
        # The scaled rotated query, phase by phase, split into fp16 hi + lo once (loop-invariant).
        q_hi0, q_lo0 = split_fp16(tl.load(q_rot_rows[:, None] + k_columns[None, :]))
        q_hi1, q_lo1 = q_hi0, q_lo0
        q_hi2, q_lo2 = q_hi0, q_lo0
        q_hi3, q_lo3 = q_hi0, q_lo0
        if K_PHASES > 1:
            q_hi1, q_lo1 = split_fp16(tl.load(q_rot_rows[:, None] + (k_columns + 1)[None, :]))
        if K_PHASES > 2:
            q_hi2, q_lo2 = split_fp16(tl.load(q_rot_rows[:, None] + (k_columns + 2)[None, :]))
            q_hi3, q_lo3 = split_fp16(tl.load(q_rot_rows[:, None] + (k_columns + 3)[None, :]))
        if HAS_BIAS:
            row_bias = tl.load(bias_ptr + pid_bh.to(tl.int64) * padded_rows + rows)
        start = split * split_len
        stop = tl.minimum(start + split_len, compressed_len)
        for n0 in range(start, stop, BLOCK_N):
            kv_pos = n0 + kv_offsets
            kv_valid = kv_pos < stop
            pos64 = kv_pos.to(tl.int64)
            k_words = load_packed(k_rows + pos64 * stride_kpn, kv_valid, stride_kpbyte, K_BITS, HEAD_DIM)
            v_words = load_packed(v_rows + pos64 * stride_vpn, kv_valid, stride_vpbyte, V_BITS, HEAD_DIM)
            key_scales = tl.load(k_scales + pos64 * stride_ksn, mask=kv_valid, other=0.0)
            value_scales = tl.load(v_scales + pos64 * stride_vsn, mask=kv_valid, other=0.0)
            key_entries = _gather(k_words, k_table_ptr, K_BITS, K_PHASES)
            scores = _dot_split(q_hi0, q_lo0, tl.trans(_phase(key_entries, 0, K_PHASES)),
                                tl.zeros((BLOCK_R, BLOCK_N), tl.float32))
            if K_PHASES > 1:
                scores = _dot_split(q_hi1, q_lo1, tl.trans(_phase(key_entries, 1, K_PHASES)), scores)
            if K_PHASES > 2:
                scores = _dot_split(q_hi2, q_lo2, tl.trans(_phase(key_entries, 2, K_PHASES)), scores)
                scores = _dot_split(q_hi3, q_lo3, tl.trans(_phase(key_entries, 3, K_PHASES)), scores)
            scores = scores * key_scales[None, :]
            if HAS_BIAS:
                scores += row_bias[:, None]
            logits = _masked_logits(scores, kv_pos, kv_valid, query_pos, row_valid, mask_rows, stride_mn, softcap,
                                    USE_SOFTCAP, MASK_KIND)
            weights, row_max, row_sum, alpha = _softmax_step(logits, row_max, row_sum)
            w_hi, w_lo = split_fp16(weights * value_scales[None, :])
            value_entries = _gather(v_words, v_table_ptr, V_BITS, V_PHASES)
            acc0 = _dot_split(w_hi, w_lo, _phase(value_entries, 0, V_PHASES), acc0 * alpha[:, None])
            if V_PHASES > 1:
                acc1 = _dot_split(w_hi, w_lo, _phase(value_entries, 1, V_PHASES), acc1 * alpha[:, None])
            if V_PHASES > 2:
                acc2 = _dot_split(w_hi, w_lo, _phase(value_entries, 2, V_PHASES), acc2 * alpha[:, None])
                acc3 = _dot_split(w_hi, w_lo, _phase(value_entries, 3, V_PHASES), acc3 * alpha[:, None])
        # Padding rows (r >= group * M) are never stored nor read back: partial traffic scales with real rows.
        out_rows = part_out_ptr + slot_rows[:, None] * HEAD_DIM + v_columns[None, :]
        tl.store(out_rows, acc0, mask=row_valid[:, None])
        if V_PHASES > 1:
            tl.store(out_rows + 1, acc1, mask=row_valid[:, None])
        if V_PHASES > 2:
            tl.store(out_rows + 2, acc2, mask=row_valid[:, None])
            tl.store(out_rows + 3, acc3, mask=row_valid[:, None])
    else:
        acc = tl.zeros((BLOCK_R, HEAD_DIM), tl.float32)
        if HAS_RESIDUAL:
            q_rows = query_ptr + b * stride_qb + query_head * stride_qh + query_token * stride_qm
            q = tl.load(q_rows[:, None] + dims[None, :] * stride_qd, mask=row_valid[:, None], other=0.0)
            q = q.to(tl.float32) * scale
            rk_rows = rk_ptr + b * stride_rkb + h * stride_rkh
            rv_rows = rv_ptr + b * stride_rvb + h * stride_rvh
            for n0 in range(0, residual_len, RESIDUAL_BLOCK_N):
                offsets = n0 + tl.arange(0, RESIDUAL_BLOCK_N)
                kv_valid = offsets < residual_len
                if DEVICE_LENGTH:  # ring rows
                    offsets64 = ((compressed_len + offsets) % ring).to(tl.int64)
                else:
                    offsets64 = offsets.to(tl.int64)
                keys = tl.load(rk_rows + offsets64[:, None] * stride_rkn + dims[None, :] * stride_rkd,
                               mask=kv_valid[:, None], other=0.0)
                scores = _dot3(q, tl.trans(keys.to(tl.float32)), tl.zeros((BLOCK_R, RESIDUAL_BLOCK_N), tl.float32))
                logits = _masked_logits(scores, compressed_len + offsets, kv_valid, query_pos, row_valid, mask_rows,
                                        stride_mn, softcap, USE_SOFTCAP, MASK_KIND)
                weights, row_max, row_sum, alpha = _softmax_step(logits, row_max, row_sum)
                values = tl.load(rv_rows + offsets64[:, None] * stride_rvn + dims[None, :] * stride_rvd,
                                 mask=kv_valid[:, None], other=0.0)
                acc = _dot3(weights, values.to(tl.float32), acc * alpha[:, None])
        tl.store(part_out_ptr + slot_rows[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_valid[:, None])
    tl.store(part_max_ptr + slot_rows, row_max, mask=row_valid)
    tl.store(part_sum_ptr + slot_rows, row_sum, mask=row_valid)


@triton.jit(do_not_specialize=["num_splits", "split_len", "ring"])
def _merge_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, rot_ptr,
    out_ptr, stride_ob, stride_oh, stride_om, stride_od,
    kv_heads, group, n_queries, num_splits, padded_rows, rot_scale, length_ptr, ring, split_len,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr, ROT_PIECES: tl.constexpr,
    DEVICE_LENGTH: tl.constexpr,
):
    """Log-sum-exp merge of the partials of one (batch * kv head, row block), then out = merged @ R + residual
    (rot_ptr: the fp16 pieces of R, times rot_scale). DEVICE_LENGTH: only the splits that hold valid tokens (see
    _split_kernel) are read; the others are empty."""
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < group * n_queries
    dims = tl.arange(0, HEAD_DIM)
    first_slot = pid_bh.to(tl.int64) * (num_splits + 1)
    active = num_splits
    if DEVICE_LENGTH:
        total = tl.load(length_ptr).to(tl.int32)
        compressed_len = tl.maximum(tl.maximum(total - ring, tl.load(length_ptr + 1).to(tl.int32)), 0)
        active = tl.minimum(tl.cdiv(compressed_len, split_len), num_splits)
    residual_rows = (first_slot + num_splits) * padded_rows + rows
    residual_max = tl.load(part_max_ptr + residual_rows, mask=row_valid, other=float("-inf"))
    row_max = residual_max
    for s in range(active):
        slot_max = tl.load(part_max_ptr + (first_slot + s) * padded_rows + rows, mask=row_valid, other=float("-inf"))
        row_max = tl.maximum(row_max, slot_max)
    # Rows that attended to nothing keep max -inf: subtract 0 there so exp gives 0, not NaN.
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.zeros((BLOCK_R,), tl.float32)
    merged = tl.zeros((BLOCK_R, HEAD_DIM), tl.float32)
    for s in range(active):
        slot_rows = (first_slot + s) * padded_rows + rows
        weight = tl.exp(tl.load(part_max_ptr + slot_rows, mask=row_valid, other=float("-inf")) - safe_max)
        row_sum += weight * tl.load(part_sum_ptr + slot_rows, mask=row_valid, other=0.0)
        slot_out = tl.load(part_out_ptr + slot_rows[:, None] * HEAD_DIM + dims[None, :], mask=row_valid[:, None],
                           other=0.0)
        merged += weight[:, None] * slot_out
    residual_weight = tl.exp(residual_max - safe_max)
    row_sum += residual_weight * tl.load(part_sum_ptr + residual_rows, mask=row_valid, other=0.0)
    # A row that attended to nothing (every key masked) has sum 0 and gives 0, like the torch twin.
    inverse_sum = 1.0 / tl.where(row_sum > 0, row_sum, 1.0)
    b = (pid_bh // kv_heads).to(tl.int64)
    h = (pid_bh % kv_heads).to(tl.int64)
    out_rows = out_ptr + b * stride_ob + (h * group + rows // n_queries) * stride_oh + (rows % n_queries) * stride_om
    # Normalized before the rotation: |merged| stays below the largest value norm (< 65504, see split_fp16).
    merged_hi, merged_lo = split_fp16(merged * inverse_sum[:, None])
    residual_scale = residual_weight * inverse_sum
    cols = tl.arange(0, BLOCK_COL)
    for col0 in tl.static_range(0, HEAD_DIM, BLOCK_COL):
        out = rotate_columns(merged_hi, merged_lo, rot_ptr, col0, HEAD_DIM, BLOCK_COL, 2, ROT_PIECES) * rot_scale
        residual = tl.load(part_out_ptr + residual_rows[:, None] * HEAD_DIM + (col0 + cols)[None, :],
                           mask=row_valid[:, None], other=0.0)
        out = out + residual_scale[:, None] * residual
        tl.store(out_rows[:, None] + (col0 + cols)[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None])


def _check(query, keys, values, key_quantizer, value_quantizer, residual_keys, residual_values, attention_mask,
           length=None, key_offset=None):
    if query.dim() != 4:
        raise ValueError(f"query must be (batch, q_heads, M, head_dim), got shape {tuple(query.shape)}")
    key_quantizer._check_quantized(keys)
    value_quantizer._check_quantized(values)
    check_same_device("decode attention", query.device, key_packed=keys.packed_indices, key_scales=keys.scales,
                      value_packed=values.packed_indices, value_scales=values.scales, residual_keys=residual_keys,
                      residual_values=residual_values, attention_mask=attention_mask, length=length,
                      key_offset=key_offset)
    batch, q_heads, n_queries, dim = query.shape
    if keys.scales.dim() != 3 or tuple(values.scales.shape) != tuple(keys.scales.shape):
        raise ValueError(f"keys and values must share a (batch, kv_heads, n) leading shape, got "
                         f"{tuple(keys.scales.shape)} and {tuple(values.scales.shape)}")
    kv_heads = keys.scales.shape[1]
    if keys.scales.shape[0] != batch or q_heads % kv_heads or key_quantizer.dim != dim or value_quantizer.dim != dim:
        raise ValueError(f"query {tuple(query.shape)} does not fit keys of leading shape {tuple(keys.scales.shape)} "
                         f"with head_dim {key_quantizer.dim} (q_heads must be a multiple of kv_heads)")
    if (residual_keys is None) != (residual_values is None):
        raise ValueError("residual_keys and residual_values must both be tensors or both be None")
    if key_offset is not None:
        if length is not None:
            raise ValueError("key_offset is for the dynamic layout's centered keys; the static layout (length=) has "
                             "none")
        if tuple(key_offset.shape) != (batch, kv_heads, 1, dim) or key_offset.dtype != torch.float32:
            raise ValueError(f"key_offset must be a float32 (batch, kv_heads, 1, head_dim) = "
                             f"{(batch, kv_heads, 1, dim)} tensor, got {key_offset.dtype} {tuple(key_offset.shape)}")
    if residual_keys is not None:
        expected = (batch, kv_heads, residual_keys.shape[2], dim)
        if tuple(residual_keys.shape) != expected or tuple(residual_values.shape) != expected:
            raise ValueError(f"residual_keys/values must be (batch, kv_heads, R, head_dim) = {expected}, got "
                             f"{tuple(residual_keys.shape)} and {tuple(residual_values.shape)}")
    kv_len = keys.scales.shape[2] + (0 if residual_keys is None else residual_keys.shape[2])
    if length is not None:  # static layout: slots cover every position, the ring only repeats the newest ones
        kv_len = keys.scales.shape[2]
        if not isinstance(length, torch.Tensor) or tuple(length.shape) != (2,) or length.dtype != torch.int64:
            raise ValueError(f"length must be an int64 tensor [cached tokens, first ring position], got {length!r}")
    elif kv_len < n_queries:
        raise ValueError(f"the kv length ({kv_len}) must include the M={n_queries} query tokens")
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[-1] < kv_len or attention_mask.shape[-2] != n_queries:
            raise ValueError(f"attention_mask must be (batch, 1, M={n_queries}, >= kv length {kv_len}), got "
                             f"{tuple(attention_mask.shape)}")


def _prepare_mask(attention_mask: torch.Tensor, batch: int, q_heads: int, n_queries: int, kv_len: int):
    """(B|1, 1|Hq, M, >=L) bool or additive float -> (B, Hq, M, L) view; bool read as uint8."""
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask.expand(batch, q_heads, n_queries, kv_len)


def decode_attention_torch(
    query: torch.Tensor, keys: QuantizedTensor, values: QuantizedTensor, key_quantizer: TurboQuantizer,
    value_quantizer: TurboQuantizer, residual_keys: torch.Tensor | None, residual_values: torch.Tensor | None, *,
    scale: float, softcap: float | None = None, attention_mask: torch.Tensor | None = None,
    length: torch.Tensor | None = None, key_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of M new query tokens over compressed + dense keys/values (torch reference).

    query: (batch, q_heads, M, head_dim) fp16/bf16/fp32; keys, values: QuantizedTensor with leading shape
    (batch, kv_heads, Nc), the compressed past, oldest first; residual_keys, residual_values:
    (batch, kv_heads, R, head_dim) model dtype or None, the dense window that ends with the M query tokens.
    With L = Nc + R, query token i sits at position L - M + i and attends to positions <= L - M + i.
    q_heads = group * kv_heads; query head h reads kv head h // group. softcap: scores become
    softcap * tanh(scores / softcap) before masking. attention_mask: (batch, 1, M, >= L) bool (True =
    attend) or additive float, on top of the causal mask. A row with no attended key gives zeros.
    Returns (batch, q_heads, M, head_dim) in query.dtype; math in fp32.

    length (the static layout, read on the device; no host sync): int64 [L, F]. keys/values are then every slot of
    the layout (leading shape (batch, kv_heads, N), the first L valid), residual_keys/values its ring of W rows
    (token p at row p % W) whose tokens from max(L - W, F) on are exact and replace their packed copies (F: the
    first position the ring still holds after a crop); the queries sit at positions L - M .. L - 1, and
    attention_mask, if any, is (batch, 1, M, >= N).

    key_offset (the dynamic layout's centered keys): (batch, kv_heads, 1, head_dim) fp32, what the packed keys were
    stored without: the packed keys read are the decoded ones plus it (the residual keys are exact as given).
    """
    _check(query, keys, values, key_quantizer, value_quantizer, residual_keys, residual_values, attention_mask,
           length, key_offset)
    if length is not None:
        dense_keys, dense_values = static_dense(keys, values, key_quantizer, value_quantizer, residual_keys,
                                                residual_values, length, torch.float32)
        return attention_fp32(query, dense_keys, dense_values, scale=scale, softcap=softcap, causal=False,
                              attention_mask=static_mask(attention_mask, length, query.shape[2], keys.scales.shape[2]))
    dense_keys = key_quantizer.dequantize(keys, torch.float32)
    if key_offset is not None:
        dense_keys = dense_keys + key_offset
    dense_values = value_quantizer.dequantize(values, torch.float32)
    if residual_keys is not None:
        dense_keys = torch.cat([dense_keys, residual_keys.float()], dim=2)
        dense_values = torch.cat([dense_values, residual_values.float()], dim=2)
    return attention_fp32(query, dense_keys, dense_values, scale=scale, softcap=softcap,
                          attention_mask=attention_mask, causal=True)


def static_dense(keys: QuantizedTensor, values: QuantizedTensor, key_quantizer: TurboQuantizer,
                 value_quantizer: TurboQuantizer, ring_keys: torch.Tensor | None, ring_values: torch.Tensor | None,
                 length: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot of the static layout dequantized, (B, H, N, D) in ``dtype``, with the ring's exact copies of the
    newest tokens at their positions (see ``decode_attention_torch``'s ``length``). Traceable: no host sync."""
    dense = [key_quantizer.dequantize(keys, dtype), value_quantizer.dequantize(values, dtype)]
    if ring_keys is not None and ring_keys.shape[2]:
        ring = ring_keys.shape[2]
        positions = torch.arange(keys.scales.shape[2], device=length.device)
        in_window = ((positions >= torch.maximum(length[0] - ring, length[1])) & (positions < length[0]))[:, None]
        for index, window in enumerate((ring_keys, ring_values)):
            dense[index] = torch.where(in_window, window.to(dtype)[:, :, positions % ring], dense[index])
    return dense[0], dense[1]


def static_mask(attention_mask: torch.Tensor | None, length: torch.Tensor, n_queries: int, slots: int) -> torch.Tensor:
    """The causal pattern of the static layout ((1, 1, M, N) bool: query i at position L - M + i sees positions <= it,
    so never an empty slot) combined with ``attention_mask`` ((B, 1, M, >= N) bool or additive float)."""
    positions = torch.arange(slots, device=length.device)
    query_positions = length[0] - n_queries + torch.arange(n_queries, device=length.device)
    allowed = (positions[None, :] <= query_positions[:, None])[None, None]
    if attention_mask is None:
        return allowed
    mask = attention_mask[..., :slots]
    return mask & allowed if mask.dtype == torch.bool else mask.float().masked_fill(~allowed, float("-inf"))


def attention_fp32(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, scale: float,
                   softcap: float | None = None, attention_mask: torch.Tensor | None = None,
                   causal: bool = True) -> torch.Tensor:
    """Reference attention in fp32: query (B, Hq, M, D), keys/values (B, Hkv, L, D) -> (B, Hq, M, D) in query.dtype.

    GQA without repeating K/V (query head h reads kv head h // (Hq / Hkv)). softcap: scores become
    softcap * tanh(scores / softcap) before masking. causal: the M queries are the last M of the L positions
    and see no later position. attention_mask: (B|1, 1|Hq, M, >= L) bool (True = attend) or additive float,
    applied on top. A row with no allowed key gives zeros (not NaN).
    """
    batch, q_heads, n_queries, dim = query.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    # (B, Hkv, group * M, D): the query heads of one kv head are contiguous, so no K/V repeat is needed.
    grouped_query = query.float().reshape(batch, kv_heads, group * n_queries, dim)
    scores = (grouped_query @ keys.float().transpose(-1, -2) * scale).reshape(batch, q_heads, n_queries, kv_len)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if causal and n_queries > 1:
        positions = torch.arange(kv_len, device=query.device)
        query_positions = kv_len - n_queries + torch.arange(n_queries, device=query.device)
        scores = scores.masked_fill(positions[None, :] > query_positions[:, None], float("-inf"))
    if attention_mask is not None:
        mask = attention_mask[..., :kv_len]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    weights = torch.softmax(scores, dim=-1)
    weights = weights.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    out = weights.reshape(batch, kv_heads, group * n_queries, kv_len) @ values.float()
    return out.reshape(batch, q_heads, n_queries, dim).to(query.dtype)


def _phases(bits: int, head_dim: int) -> int:
    """Coordinates per table entry that the split kernel keeps apart (see _split_kernel): 2 at 4 bits, 4 at 2 bits,
    while each phase is still >= 16 wide (tl.dot's minimum); else 1 (tiles in coordinate order)."""
    phases = {4: 2, 2: 4}.get(bits, 1)
    return phases if head_dim // phases >= 16 else 1


def _attention_config(head_dim: int, rows: int, batch_heads: int, phased: bool, device: torch.device) -> dict:
    """Launch shape from head_dim, query rows per kv head (group * M), batch * kv heads, and whether both K and V
    tiles are phased (4 or 2 bits).

    BLOCK_R rows (>= 16 for tl.dot; <= 32 keeps Hopper on mma.sync, where Triton fails to lay out the gathered
    operand for wgmma); BLOCK_N tokens per step of the compressed loop, RESIDUAL_BLOCK_N of the dense window's (32:
    its fp32 tiles then need fewer registers than the compressed loop, which sets the kernel's count); "waves" is
    programs per SM that the split count aims for: 2 (one wave at the two programs per SM that the registers allow;
    fewer splits, less merge work) when programs per split (batch * kv heads * row blocks) are at most a quarter of
    the SMs, else 16; software pipelining (num_stages 2) for phased tiles at head_dim <= 128 only. Chosen from
    ``benchmarks/bench_attention.py --sweep`` (the figures are in benchmarks/RESULTS.md).
    """
    block_r = max(16, min(1 << (rows - 1).bit_length(), 32))
    waves = 2 if batch_heads * cdiv(rows, block_r) * 4 <= sm_count(device) else 16
    stages = 2 if phased and head_dim <= 128 else 1  # head_dim 256, fp32 window: 2 stages overflow shared memory
    return {"BLOCK_R": block_r, "BLOCK_N": 128, "RESIDUAL_BLOCK_N": 32, "num_warps": 4, "num_stages": stages,
            "waves": waves}


def _num_splits(compressed_len: int, programs: int, block_n: int, waves: int, device: torch.device) -> tuple[int, int]:
    """(splits, tokens per split): about ``waves`` programs per SM, at least _MIN_SPLIT_TOKENS per split."""
    if compressed_len == 0:
        return 0, block_n
    wanted = cdiv(waves * sm_count(device), programs)
    splits = max(1, min(wanted, cdiv(compressed_len, _MIN_SPLIT_TOKENS)))
    split_len = cdiv(cdiv(compressed_len, splits), block_n) * block_n
    return cdiv(compressed_len, split_len), split_len


def decode_attention_triton(
    query: torch.Tensor, keys: QuantizedTensor, values: QuantizedTensor, key_quantizer: TurboQuantizer,
    value_quantizer: TurboQuantizer, residual_keys: torch.Tensor | None, residual_values: torch.Tensor | None, *,
    scale: float, softcap: float | None = None, attention_mask: torch.Tensor | None = None,
    length: torch.Tensor | None = None, key_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``decode_attention_torch`` (fused Triton kernel, split over the sequence; with ``length``, the
    splits cover every slot and those past the valid tokens do nothing: one launch shape for a whole generation).

    ValueError for QJL keys or values and head dims that are not a power of two >= 16 (``decode_attention`` sends
    them to the torch twin).
    """
    check_supported("decode attention", key_quantizer, value_quantizer)
    _check(query, keys, values, key_quantizer, value_quantizer, residual_keys, residual_values, attention_mask,
           length, key_offset)
    batch, q_heads, n_queries, dim = query.shape
    device = query.device
    kv_heads, compressed_len = keys.scales.shape[1], keys.scales.shape[2]
    residual_len = 0 if residual_keys is None else residual_keys.shape[2]
    group = q_heads // kv_heads
    rows = group * n_queries
    key_phases, value_phases = _phases(key_quantizer.mse_bits, dim), _phases(value_quantizer.mse_bits, dim)
    config = _attention_config(dim, rows, batch * kv_heads, min(key_phases, value_phases) > 1, device)
    block_r, block_n = config["BLOCK_R"], config["BLOCK_N"]
    row_blocks = cdiv(rows, block_r)
    padded_rows = row_blocks * block_r
    splits, split_len = _num_splits(compressed_len, batch * kv_heads * row_blocks, block_n, config["waves"], device)
    slots = splits + 1  # the last slot holds the residual window (all -inf/0 without one)

    # Queries meet keys in the key basis; the output leaves the value basis (the two may differ).
    key_operands, value_operands = kernel_state(key_quantizer, device), kernel_state(value_quantizer, device)
    part_out = torch.empty((batch * kv_heads, slots, padded_rows, dim), device=device, dtype=torch.float32)
    part_max = torch.empty((batch * kv_heads, slots, padded_rows), device=device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    out = torch.empty_like(query)

    if attention_mask is None:
        mask_kind, mask, mask_strides = _MASK_NONE, query, (0, 0, 0, 0)
    else:
        mask = _prepare_mask(attention_mask, batch, q_heads, n_queries,
                             compressed_len + (residual_len if length is None else 0))
        mask_kind = _MASK_BOOL if mask.dtype == torch.uint8 else _MASK_ADDITIVE
        mask_strides = mask.stride()
    if residual_keys is None:
        residual_keys = residual_values = query
        rk_strides = rv_strides = (0, 0, 0, 0)
    else:
        rk_strides, rv_strides = residual_keys.stride(), residual_values.stride()

    q_rot = torch.empty((batch * kv_heads, padded_rows, dim), device=device, dtype=torch.float32)
    # Centered keys: each row's packed logits get q . offset * scale (q_bias), computed with the query rotation.
    q_bias = q_rot if key_offset is None else torch.empty((batch * kv_heads, padded_rows), device=device,
                                                          dtype=torch.float32)
    offset, offset_strides = (q_rot, (0, 0, 0)) if key_offset is None else (key_offset, key_offset[:, :, 0].stride())
    with launch_device(device):
        _rotate_query_kernel[(batch * kv_heads, row_blocks)](
            query, *query.stride(),
            key_operands.rotate, q_rot,
            offset, *offset_strides, q_bias,
            kv_heads, group, n_queries, padded_rows, float(scale) * key_operands.rotate_scale, float(scale),
            HEAD_DIM=dim, BLOCK_R=block_r, BLOCK_COL=column_block(dim),
            TILE_PIECES=tile_pieces(query.dtype), ROT_PIECES=key_operands.rotate.shape[0],
            HAS_OFFSET=key_offset is not None, num_warps=4,
        )
        fast = (compressed_len >= FAST_MIN_TOKENS and fast_split_covers(key_quantizer, value_quantizer, dim)
                and fast_split_runs(device))
        split_grid = (slots, batch * kv_heads, row_blocks)
        launch_split = (functools.partial(launch_fast_split, split_grid, _split_kernel) if fast
                        else _split_kernel[split_grid])
        launch_split(
            query, *query.stride(),
            q_rot, q_bias,
            keys.packed_indices, *keys.packed_indices.stride(),
            keys.scales, *keys.scales.stride(),
            values.packed_indices, *values.packed_indices.stride(),
            values.scales, *values.scales.stride(),
            key_operands.table, value_operands.table,
            residual_keys, *rk_strides,
            residual_values, *rv_strides,
            mask, *mask_strides,
            part_out, part_max, part_sum,
            kv_heads, group, n_queries, compressed_len, residual_len, splits, split_len, padded_rows,
            float(scale), float(softcap) if softcap is not None else 1.0,
            query if length is None else length, 0 if length is None else residual_len,
            HEAD_DIM=dim, BLOCK_R=block_r, BLOCK_N=block_n, RESIDUAL_BLOCK_N=config["RESIDUAL_BLOCK_N"],
            K_BITS=key_quantizer.mse_bits, V_BITS=value_quantizer.mse_bits,
            K_PHASES=key_phases, V_PHASES=value_phases,
            HAS_RESIDUAL=residual_len > 0,
            MASK_KIND=mask_kind, USE_SOFTCAP=softcap is not None, DEVICE_LENGTH=length is not None,
            HAS_BIAS=key_offset is not None, num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
        _merge_kernel[(batch * kv_heads, row_blocks)](
            part_out, part_max, part_sum, value_operands.unrotate,
            out, *out.stride(),
            kv_heads, group, n_queries, splits, padded_rows, value_operands.unrotate_scale,
            query if length is None else length, 0 if length is None else residual_len, split_len,
            HEAD_DIM=dim, BLOCK_R=block_r, BLOCK_COL=column_block(dim), ROT_PIECES=value_operands.unrotate.shape[0],
            DEVICE_LENGTH=length is not None, num_warps=4,
        )
    return out


def decode_attention(
    query: torch.Tensor, keys: QuantizedTensor, values: QuantizedTensor, key_quantizer: TurboQuantizer,
    value_quantizer: TurboQuantizer, residual_keys: torch.Tensor | None, residual_values: torch.Tensor | None, *,
    scale: float, softcap: float | None = None, attention_mask: torch.Tensor | None = None,
    length: torch.Tensor | None = None, key_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over a compressed cache with the backend for query.device (see decode_attention_torch)."""
    fused = use_triton(query.device, "decode attention", key_quantizer, value_quantizer)
    run = decode_attention_triton if fused else decode_attention_torch
    return run(query, keys, values, key_quantizer, value_quantizer, residual_keys, residual_values,
               scale=scale, softcap=softcap, attention_mask=attention_mask, length=length, key_offset=key_offset)
