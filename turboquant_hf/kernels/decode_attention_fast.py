"""GPU-only twin of ``decode_attention._split_kernel`` for 4-bit keys and values (no QJL), written in Gluon.

What it changes (issue 17): the Triton kernel looks every packed byte up in a 256-entry table staged in shared
memory (bank conflicts) and moves the decoded fp16 tiles through shared memory into the tensor cores' operand
layout (STS + LDSM). Here neither happens; the compressed-token loop touches no shared memory at all:

* **Transposed dots.** Scores are computed as S^T = K Q^T (tokens are the mma's M, query rows its N = 8) and the
  output as O^T = V^T P^T (head dims are M). Each warp runs its own online softmax over its own 16-token slices
  (the three-dimensional mma layout puts one warp per batch index), so no step needs another warp's data; the
  four warps' states are merged once at the end.
* **Packed bytes land in the operand layout.** The dot over head dims does not care which coordinate sits at which
  k slot, as long as the query uses the same order. A thread of the mma's A operand holds, per token, 16 k pairs;
  we assign them the 16 *contiguous* packed bytes 16q .. 16q+15 (q = lane % 4), so one 128-bit load per token
  and thread fetches exactly the bytes its operand registers need; the query's columns are loaded in the same
  order (once per program). Values: a thread holds dims t + 8a (t = lane / 4, a = 0..7) of tokens 2q, 2q+1, ...;
  dim t + 8a is assigned packed byte 8t + a (one 64-bit load per token and thread), and the output is stored
  back in coordinate order.
* **Lookups in registers.** A byte's two 4-bit indices become the fp16 pair (c[lo], c[hi]) with byte permutes
  (``prmt``) from eight registers that hold the low and high bytes of the 16 fp16 centroids: 21 integer
  instructions per 4 bytes, no memory. For values, two tokens' pairs are recombined with one ``prmt`` each into
  the (token 2i, token 2i+1) pairs of the even and odd coordinates (the "phases" of ``_split_kernel``).
* **P^T without shared memory.** The softmax weights leave the score mma in the accumulator layout (token =
  lane / 4) and enter the value mma as the B operand (row = lane / 4): an 8x8 transpose per register, done by
  ``movmatrix``; the tensor is then relabelled (reshape / permute: no data moves).

Numerics are those of ``_split_kernel``: centroids are exact fp16, the fp32 side (scaled rotated query, softmax
weights times value norms) is split into fp16 hi + lo, two tensor-core dots accumulate in fp32, softmax in fp32.

Scope: this kernel computes the compressed splits (``split < num_splits``); ``launch_fast_split`` runs
``_split_kernel`` for the dense residual slot (one extra small launch). Masks, softcap, causal positions and the
static layout (DEVICE_LENGTH) are supported. It needs a CUDA device of compute capability >= 8.0 (``mma.sync``
m16n8k16, ``movmatrix`` needs sm_75+) and Triton with Gluon; it never runs in the interpreter. Query rows are
tiled by 8 (the mma's N), so the grid's third dimension is ``cdiv(group * M, 8)``, not the Triton kernel's.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..backend import triton_interpreting, warn_once
from ._common import cdiv

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # Triton without Gluon (or no Triton): fast_split_runs says False
    gluon = gl = mma_v2 = None

# The shape that _fast_split_kernel's layouts are written for (its R, T, W and HEAD_DIM).
ROWS = 8  # query rows per program: the N of mma.m16n8k16
TOKENS_PER_WARP = 16  # tokens per warp and loop step: the M of mma.m16n8k16
HEAD_DIM = 128
WARPS = 4


def fast_split_covers(key_quantizer, value_quantizer, head_dim: int) -> bool:
    """Whether the Gluon kernel computes this case: 4-bit keys and values without QJL, head_dim 128."""
    return head_dim == HEAD_DIM and all(q.mse_bits == 4 and not q.qjl and q.dim == head_dim
                                        for q in (key_quantizer, value_quantizer))


# Devices (str) where the Gluon kernel failed to compile or launch: the Triton split kernel serves them from then on.
_FAILED: set[str] = set()


def fast_split_runs(device: torch.device) -> bool:
    """Whether the Gluon kernel can run on ``device``: CUDA of compute capability >= 8.0, compiled Triton (not the
    interpreter) with Gluon, and no failure there yet (``launch_fast_split``). A CUDA device that cannot gets one
    warning (the Triton split kernel runs instead)."""
    if device.type != "cuda" or triton_interpreting() or str(device) in _FAILED:
        return False
    return _cuda_runs(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_runs(index: int) -> bool:
    """fast_split_runs for CUDA device ``index``, asked once per device (the eager decode step is host-bound)."""
    if gluon is None or torch.cuda.get_device_capability(index) < (8, 0):
        warn_once("turboquant_hf: the fast (Gluon) decode-attention kernel needs a GPU of compute capability 8.0 or "
                  "newer and a Triton with Gluon; the Triton split kernel runs instead")
        return False
    return True


if gluon is not None:
    @gluon.jit
    def _byte_quad(table_ptr, FIRST: gl.constexpr, SHIFT: gl.constexpr):
        """Bits SHIFT..SHIFT+7 of the fp16 centroids c[FIRST .. FIRST+3], one per byte (c[FIRST] in the low byte).
        table_ptr: the 4-bit ``centroid_table`` (int32, entry e = c[e & 15] | c[e >> 4] << 16): entries 0..15 hold
        c[e] in their low half."""
        quad = (gl.load(table_ptr + FIRST) >> SHIFT) & 0xFF
        quad = quad | (((gl.load(table_ptr + FIRST + 1) >> SHIFT) & 0xFF) << 8)
        quad = quad | (((gl.load(table_ptr + FIRST + 2) >> SHIFT) & 0xFF) << 16)
        return quad | (((gl.load(table_ptr + FIRST + 3) >> SHIFT) & 0xFF) << 24)

    @gluon.jit
    def _register_tables(table_ptr):
        """The 8 registers _lookup permutes bytes from: low bytes of c[0..3], c[4..7], c[8..11], c[12..15], then the
        high bytes."""
        return (_byte_quad(table_ptr, 0, 0), _byte_quad(table_ptr, 4, 0), _byte_quad(table_ptr, 8, 0),
                _byte_quad(table_ptr, 12, 0), _byte_quad(table_ptr, 0, 8), _byte_quad(table_ptr, 4, 8),
                _byte_quad(table_ptr, 8, 8), _byte_quad(table_ptr, 12, 8))

    @gluon.jit
    def _step_offsets(W: gl.constexpr, T: gl.constexpr, WORDS: gl.constexpr, layout: gl.constexpr):
        """Token offsets (W, T) of a step (warp w takes tokens w * T .. w * T + T - 1) and word offsets (1, 1, WORDS)
        of a token's packed row, both in ``layout``'s slices."""
        tokens = (gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout))), 1) * T
                  + gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout))), 0))
        words = gl.expand_dims(gl.expand_dims(
            gl.arange(0, WORDS, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout))), 0), 1)
        return tokens, words

    @gluon.jit
    def _value_operand(values, layout: gl.constexpr):
        """fp16 (W, T, 64) value coordinates of one phase, byte b = 8t + a at index b -> the A operand (W, 64, T) of
        O^T = V^T P^T in ``layout``, dim t + 8a holding byte 8t + a (a relabelling: no data moves)."""
        W: gl.constexpr = values.shape[0]
        T: gl.constexpr = values.shape[1]
        BYTES: gl.constexpr = values.shape[2]
        relabelled = gl.reshape(gl.permute(gl.reshape(values, [W, T, 8, BYTES // 8]), [0, 1, 3, 2]), [W, T, BYTES])
        return gl.convert_layout(gl.permute(relabelled, [0, 2, 1]), layout)

    # One 32-bit word of packed bytes ($4: nibbles n0..n7, byte b = n(2b) | n(2b+1) << 4) -> the fp16 pairs
    # (c[n(2b)], c[n(2b+1)]) of its 4 bytes ($0..$3). $5..$8: low bytes of c[0..3], c[4..7], c[8..11], c[12..15];
    # $9..$12 the high bytes.
    # prmt selects bytes by the low 3 bits of each selector nibble (bit 3 would mean sign replication, so it is
    # cleared); the index's bit 3 picks the c[0..7] or the c[8..15] result (lop3 0xD8: m ? b : a), with the byte
    # mask m built by prmt's sign-replication mode from the nibbles' bit 3 (in x << 4 for even nibbles, in x for
    # odd ones).
    _LOOKUP_ASM = gl.constexpr("""{
    .reg .b32 s, sh, x4, m, la, lb, ha, hb, lo, hi;
    and.b32 s, $4, 0x77777777;
    shl.b32 x4, $4, 4;
    shr.b32 sh, s, 16;
    prmt.b32 m, x4, $4, 0xD9C8;
    prmt.b32 la, $5, $6, s;
    prmt.b32 lb, $7, $8, s;
    prmt.b32 ha, $9, $10, s;
    prmt.b32 hb, $11, $12, s;
    lop3.b32 lo, la, lb, m, 0xD8;
    lop3.b32 hi, ha, hb, m, 0xD8;
    prmt.b32 $0, lo, hi, 0x5140;
    prmt.b32 $1, lo, hi, 0x7362;
    prmt.b32 m, x4, $4, 0xFBEA;
    prmt.b32 la, $5, $6, sh;
    prmt.b32 lb, $7, $8, sh;
    prmt.b32 ha, $9, $10, sh;
    prmt.b32 hb, $11, $12, sh;
    lop3.b32 lo, la, lb, m, 0xD8;
    lop3.b32 hi, ha, hb, m, 0xD8;
    prmt.b32 $2, lo, hi, 0x5140;
    prmt.b32 $3, lo, hi, 0x7362;
    }""")
    _LOOKUP_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 9))

    @gluon.jit
    def _lookup(words, tables):
        """int32 (W, T, n) words of 4 packed bytes -> int32 (W, T, 4n) fp16 pairs (c[low nibble], c[high nibble]),
        one per byte in memory order; the 4 pairs of a word are 4 consecutive registers of the result."""
        pairs = gl.inline_asm_elementwise(
            _LOOKUP_ASM, _LOOKUP_CONSTRAINTS,
            [words, tables[0], tables[1], tables[2], tables[3], tables[4], tables[5], tables[6], tables[7]],
            dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)
        # join(join(p0, p2), join(p1, p3))[..., i, j] = p[2i + j]: byte 2i + j of the word, innermost register.
        joined = gl.join(gl.join(pairs[0], pairs[2]), gl.join(pairs[1], pairs[3]))
        return gl.reshape(joined, [words.shape[0], words.shape[1], 4 * words.shape[2]])

    @gluon.jit
    def _as_fp16_pairs(words):
        """int32 (..., n) fp16 pairs -> fp16 (..., 2n), element 2i the low half of word i (no instruction: the
        pair is the register the mma reads)."""
        pairs = gl.reshape(gl.join(words, words), [words.shape[0], words.shape[1], 2 * words.shape[2]])
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [pairs], dtype=gl.float16, is_pure=True,
                                         pack=2)

    @gluon.jit
    def _phase_pairs(words):
        """int32 fp16 pairs (W, tokens, bytes), tokens 2i and 2i+1 in consecutive registers -> fp16 (even, odd)
        coordinates of each byte, same shape; registers then hold (token 2i, token 2i+1) of one coordinate."""
        return gl.inline_asm_elementwise(
            "prmt.b32 $0, $2, $3, 0x5410; prmt.b32 $1, $2, $3, 0x7632;", "=r,=r,r,r", [words],
            dtype=(gl.float16, gl.float16), is_pure=True, pack=2)

    @gluon.jit
    def _transpose_8x8(tile):
        """fp16 (W, T, 8) in the mma accumulator layout -> the same registers transposed per 8x8 block
        (movmatrix), relabelled: (W, T, 8) whose layout is the B operand's (token pairs in a register)."""
        moved = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [tile],
                                          dtype=gl.float16, is_pure=True, pack=2)
        # Register (block, lane) now holds (token 8 * block + 2 * (lane % 4) + {0, 1}, row lane / 4), which the
        # tensor's layout calls (token 8 * block + lane / 4, row 2 * (lane % 4) + {0, 1}): swap the 8x8 indices.
        blocks = gl.reshape(moved, [tile.shape[0], tile.shape[1] // 8, 8, 8])
        return gl.reshape(gl.permute(blocks, [0, 1, 3, 2]), [tile.shape[0], tile.shape[1], 8])

    @gluon.jit
    def _load_step(k_rows, v_rows, k_stride, v_stride, n0, stop, k_tok, k_word, v_tok, v_word):
        """Packed key and value words (4 bytes each) of tokens n0 + (k_tok, v_tok), zeros past ``stop``: int32
        (W, T, 16) each, in the layouts of k_tok / v_tok (see _fast_split_kernel); strides in words."""
        k_pos = n0 + k_tok
        k_words = gl.load(k_rows + gl.expand_dims(k_pos.to(gl.int64) * k_stride, 2) + k_word,
                          mask=gl.expand_dims(k_pos < stop, 2), other=0)
        v_pos = n0 + v_tok
        v_words = gl.load(v_rows + gl.expand_dims(v_pos.to(gl.int64) * v_stride, 2) + v_word,
                          mask=gl.expand_dims(v_pos < stop, 2), other=0)
        return k_words, v_words

    @gluon.jit
    def _split_fp16(x):
        hi = x.to(gl.float16)
        return hi, (x - hi.to(gl.float32)).to(gl.float16)

    # As _split_kernel: lengths change every decode step, and specializing on them would compile mid-generation.
    @gluon.jit(do_not_specialize=["stride_mb", "stride_mh", "stride_mm", "compressed_len", "residual_len",
                                  "num_splits", "split_len", "ring"])
    def _fast_split_kernel(
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
        HEAD_DIM: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_N: gl.constexpr,
        K_BITS: gl.constexpr, V_BITS: gl.constexpr, K_PHASES: gl.constexpr, V_PHASES: gl.constexpr,
        HAS_RESIDUAL: gl.constexpr, MASK_KIND: gl.constexpr, USE_SOFTCAP: gl.constexpr,
        RESIDUAL_BLOCK_N: gl.constexpr, DEVICE_LENGTH: gl.constexpr, HAS_BIAS: gl.constexpr,
    ):
        """``_split_kernel``'s signature and partials, compressed splits only (program_id(0) < num_splits; others
        return at once). Grid (num_splits, batch * kv_heads, cdiv(group * M, 8)); num_warps = 4 (one warp per
        16-token slice of a 64-token step). HEAD_DIM 128, K_BITS = V_BITS = 4; BLOCK_R, BLOCK_N, the phases,
        HAS_RESIDUAL and RESIDUAL_BLOCK_N are ignored (the rows per program are 8)."""
        W: gl.constexpr = 4  # = WARPS
        T: gl.constexpr = 16  # = TOKENS_PER_WARP
        R: gl.constexpr = 8  # = ROWS
        gl.static_assert(HEAD_DIM == 128, "the layouts below are written for head_dim 128")
        BYTES: gl.constexpr = HEAD_DIM // 2
        WORDS: gl.constexpr = BYTES // 4
        split = gl.program_id(0)
        if split >= num_splits:
            return
        if DEVICE_LENGTH:
            total = gl.load(length_ptr).to(gl.int32)
            compressed_len = gl.maximum(gl.maximum(total - ring, gl.load(length_ptr + 1).to(gl.int32)), 0)
            residual_len = total - compressed_len

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        # Packed keys as words (W, T, 16 words): 16 contiguous bytes of one token per thread (one 128-bit load),
        # lanes 0-1 pick the 16-byte quarter, lanes 2-4 the token, a register bit token + 8: the A operand's pattern.
        k_load: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 8, 0]],
            lane_bases=[[0, 0, 4], [0, 0, 8], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
            warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[W, T, WORDS])
        # Packed values as words (W, T, 16 words): 8 contiguous bytes per token and thread; tokens 2i, 2i+1
        # (registers), + 2, + 4 (lanes 0-1), + 8 (register); lanes 2-4 pick the 8-byte group: the A operand of V^T.
        v_load: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 1, 0], [0, 8, 0]],
            lane_bases=[[0, 2, 0], [0, 4, 0], [0, 0, 2], [0, 0, 4], [0, 0, 8]],
            warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[W, T, WORDS])
        # The same registers, token pairs first (for _phase_pairs): a permutation of registers, no data moves.
        v_pairs: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 8, 0]],
            lane_bases=[[0, 2, 0], [0, 4, 0], [0, 0, 8], [0, 0, 16], [0, 0, 32]],
            warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[W, T, BYTES])
        token_vec: gl.constexpr = gl.SliceLayout(2, mma)  # (W, T) per-token values next to scores (W, T, R)
        row_vec: gl.constexpr = gl.SliceLayout(1, mma)  # (W, R) per-row softmax state

        pid_bh = gl.program_id(1)
        b = (pid_bh // kv_heads).to(gl.int64)
        h = (pid_bh % kv_heads).to(gl.int64)
        row_base = gl.program_id(2) * R

        # Rows along the scores' last axis.
        rows_s = row_base + gl.arange(0, R, layout=gl.SliceLayout(0, row_vec))
        rows3 = gl.expand_dims(gl.expand_dims(rows_s, 0), 1)  # (1, 1, R)
        row_valid3 = rows3 < group * n_queries
        query_token3 = rows3 % n_queries
        query_pos3 = compressed_len + residual_len - n_queries + query_token3
        if HAS_BIAS:  # centered keys: each row's q . offset (see _split_kernel)
            row_bias3 = gl.load(bias_ptr + pid_bh.to(gl.int64) * padded_rows + rows3)
        mask_rows3 = (mask_ptr + b * stride_mb + (h * group + rows3 // n_queries) * stride_mh
                      + query_token3 * stride_mm)

        # The scaled rotated query as the B operand (W, 128, R) of S^T = K Q^T, its k axis in the keys' k order:
        # k = e + 2q + 8s + 16j holds coordinate 2 * (16q + s + 2j) + e (see the module docstring).
        kq = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, gl.SliceLayout(2, b_op)))
        q_cols = 2 * (16 * ((kq >> 1) & 3) + ((kq >> 3) & 1) + 2 * (kq >> 4)) + (kq & 1)
        rq = row_base + gl.arange(0, R, layout=gl.SliceLayout(0, gl.SliceLayout(1, b_op)))
        wq = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, b_op)))
        q_offsets = (gl.expand_dims(gl.expand_dims(q_cols, 0), 2)
                     + gl.expand_dims(gl.expand_dims(rq, 0), 1) * HEAD_DIM
                     + gl.expand_dims(gl.expand_dims(wq, 1), 2) * 0)
        q_tile = gl.load(q_rot_ptr + pid_bh.to(gl.int64) * padded_rows * HEAD_DIM + q_offsets)
        q_hi, q_lo = _split_fp16(q_tile)

        k_tables = _register_tables(k_table_ptr)
        v_tables = _register_tables(v_table_ptr)

        # Token and word offsets of a step, per operand layout.
        k_tok, k_word = _step_offsets(W, T, WORDS, k_load)
        v_tok, v_word = _step_offsets(W, T, WORDS, v_load)
        s_tok = (gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(1, token_vec)), 1) * T
                 + gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(0, token_vec)), 0))

        # Packed rows read as int32 words (launch_fast_split checks that bases and strides are 16-byte aligned and
        # the byte stride is 1).
        k_rows = (k_packed_ptr + b * stride_kpb + h * stride_kph).to(gl.pointer_type(gl.int32), bitcast=True)
        v_rows = (v_packed_ptr + b * stride_vpb + h * stride_vph).to(gl.pointer_type(gl.int32), bitcast=True)
        k_stride = gl.multiple_of(stride_kpn // 4, 4)
        v_stride = gl.multiple_of(stride_vpn // 4, 4)
        k_scales = k_scales_ptr + b * stride_ksb + h * stride_ksh
        v_scales = v_scales_ptr + b * stride_vsb + h * stride_vsh

        row_max = gl.full([W, R], float("-inf"), gl.float32, layout=row_vec)
        sum_parts = gl.zeros([W, T, R], gl.float32, layout=mma)  # per-thread partial row sums, reduced at the end
        acc_even = gl.zeros([W, BYTES, R], gl.float32, layout=mma)  # O^T, even coordinates (dims permuted)
        acc_odd = gl.zeros([W, BYTES, R], gl.float32, layout=mma)

        start = split * split_len
        stop = gl.minimum(start + split_len, compressed_len)
        # The packed bytes of the next step are loaded before this step's math (one step in flight per warp).
        k_next, v_next = _load_step(k_rows, v_rows, k_stride, v_stride, start, stop, k_tok, k_word, v_tok, v_word)
        for n0 in range(start, stop, W * T):
            k_packed, v_packed = k_next, v_next
            k_next, v_next = _load_step(k_rows, v_rows, k_stride, v_stride, n0 + W * T, stop, k_tok, k_word,
                                        v_tok, v_word)
            kv_pos = n0 + s_tok
            kv_valid = kv_pos < stop
            pos64 = kv_pos.to(gl.int64)
            key_scales = gl.load(k_scales + pos64 * stride_ksn, mask=kv_valid, other=0.0)
            value_scales = gl.load(v_scales + pos64 * stride_vsn, mask=kv_valid, other=0.0)

            # Keys: fp16 pairs in memory order, relabelled to the A operand's k order (k = e + 2q + 8s + 16j
            # <- byte 16q + 2j + s), then (W, T, 128) fp16.
            k_words = _lookup(k_packed, k_tables)
            k_words = gl.reshape(gl.permute(gl.reshape(k_words, [W, T, 4, 8, 2]), [0, 1, 3, 4, 2]), [W, T, BYTES])
            k_op = gl.convert_layout(_as_fp16_pairs(k_words), a_op)
            scores = mma_v2(k_op, q_lo, gl.zeros([W, T, R], gl.float32, layout=mma))
            scores = mma_v2(k_op, q_hi, scores)
            scores = scores * gl.expand_dims(key_scales, 2)
            if HAS_BIAS:
                scores = scores + row_bias3

            if USE_SOFTCAP:
                scores = softcap * (1.0 - 2.0 / (gl.exp(2.0 * scores / softcap) + 1.0))
            kv_pos3 = gl.expand_dims(kv_pos, 2)
            allowed = gl.expand_dims(kv_valid, 2) & (kv_pos3 <= query_pos3) & row_valid3
            if MASK_KIND == 1:
                mask = gl.load(mask_rows3 + kv_pos3 * stride_mn, mask=allowed, other=0)
                allowed = allowed & (mask != 0)
            if MASK_KIND == 2:
                mask = gl.load(mask_rows3 + kv_pos3 * stride_mn, mask=allowed, other=0.0)
                scores = scores + mask.to(gl.float32)
            logits = gl.where(allowed, scores, float("-inf"))

            new_max = gl.maximum(row_max, gl.max(logits, axis=1))
            safe_max = gl.where(new_max == float("-inf"), 0.0, new_max)
            alpha = gl.exp(row_max - safe_max)
            weights = gl.exp(logits - gl.expand_dims(safe_max, 1))
            row_max = new_max
            alpha3 = gl.expand_dims(alpha, 1)
            sum_parts = sum_parts * alpha3 + weights
            w_hi, w_lo = _split_fp16(weights * gl.expand_dims(value_scales, 2))
            p_hi = gl.convert_layout(_transpose_8x8(w_hi), b_op)
            p_lo = gl.convert_layout(_transpose_8x8(w_lo), b_op)

            # Values: (token 2i, 2i+1) pairs of the even and odd coordinates of each byte, relabelled so that
            # dim t + 8a <- byte 8t + a, then transposed to the A operand (W, 64, T) of O^T = V^T P^T.
            v_words = gl.convert_layout(_lookup(v_packed, v_tables), v_pairs)
            v_even, v_odd = _phase_pairs(v_words)
            v_even = _value_operand(v_even, a_op)
            v_odd = _value_operand(v_odd, a_op)
            acc_even = mma_v2(v_even, p_hi, mma_v2(v_even, p_lo, acc_even * alpha3))
            acc_odd = mma_v2(v_odd, p_hi, mma_v2(v_odd, p_lo, acc_odd * alpha3))

        # Merge the warps' states (the only cross-warp step): rescale each to the common max and add.
        row_sum = gl.sum(sum_parts, axis=1)
        merged_max = gl.max(row_max, axis=0)
        safe_merged = gl.where(merged_max == float("-inf"), 0.0, merged_max)
        warp_scale = gl.exp(row_max - gl.expand_dims(safe_merged, 0))
        merged_sum = gl.sum(row_sum * warp_scale, axis=0)
        warp_scale3 = gl.expand_dims(warp_scale, 1)
        out_even = gl.sum(acc_even * warp_scale3, axis=0)  # (64, R)
        out_odd = gl.sum(acc_odd * warp_scale3, axis=0)

        out_layout: gl.constexpr = gl.SliceLayout(0, mma)
        dims = gl.arange(0, BYTES, layout=gl.SliceLayout(1, out_layout))
        coordinate = 2 * (8 * (dims & 7) + (dims >> 3))  # permuted dim t + 8a holds byte 8t + a
        rows_o = row_base + gl.arange(0, R, layout=gl.SliceLayout(0, out_layout))
        slot_rows_o = (pid_bh.to(gl.int64) * (num_splits + 1) + split) * padded_rows + rows_o
        out_ptrs = part_out_ptr + gl.expand_dims(slot_rows_o, 0) * HEAD_DIM + gl.expand_dims(coordinate, 1)
        out_valid = gl.expand_dims(rows_o < group * n_queries, 0) & gl.expand_dims(dims >= 0, 1)
        gl.store(out_ptrs, out_even, mask=out_valid)
        gl.store(out_ptrs + 1, out_odd, mask=out_valid)
        rows_m = row_base + gl.arange(0, R, layout=gl.SliceLayout(0, row_vec))
        slot_rows_m = (pid_bh.to(gl.int64) * (num_splits + 1) + split) * padded_rows + rows_m
        gl.store(part_max_ptr + slot_rows_m, merged_max, mask=rows_m < group * n_queries)
        gl.store(part_sum_ptr + slot_rows_m, merged_sum, mask=rows_m < group * n_queries)
else:
    _fast_split_kernel = None


@functools.cache
def _positions(split_kernel) -> dict[str, int]:
    """Parameter name -> position in ``split_kernel``'s signature (inspect.signature is slow: once per kernel)."""
    return {name: index for index, name in enumerate(inspect.signature(split_kernel.fn).parameters)}


def launch_fast_split(grid: tuple, split_kernel, *args, **kwargs) -> None:
    """Drop-in for ``split_kernel[grid](*args, **kwargs)`` (``decode_attention._split_kernel``, its arguments up to
    ``ring`` positional, the constexprs and launch options by keyword; same partials written; call it only where
    ``fast_split_covers`` and ``fast_split_runs``): the Gluon kernel for the compressed splits, then ``split_kernel``
    for the dense residual slot alone (grid (1, ...) with num_splits 0 and the partial pointers moved to that slot).
    Packed K/V whose rows are not 16-byte aligned (or whose bytes are not contiguous) run ``split_kernel`` whole, and
    so does a call whose Gluon launch raises (a Triton whose Gluon cannot compile this kernel): one warning, and the
    device stops taking the Gluon kernel."""
    at = _positions(split_kernel)
    aligned = all(packed.data_ptr() % 16 == 0 and packed.stride(0) % 16 == 0 and packed.stride(1) % 16 == 0
                  and packed.stride(2) % 16 == 0 and packed.stride(3) == 1
                  for packed in (args[at["k_packed_ptr"]], args[at["v_packed_ptr"]]))
    if not aligned:
        split_kernel[grid](*args, **kwargs)
        return
    splits, padded, batch_heads = args[at["num_splits"]], args[at["padded_rows"]], grid[1]
    constants = {key: value for key, value in kwargs.items() if key not in ("num_warps", "num_stages")}
    if splits > 0:
        rows = args[at["group"]] * args[at["n_queries"]]
        try:
            _fast_split_kernel[(splits, batch_heads, cdiv(rows, ROWS))](*args, **constants, num_warps=WARPS)
        except Exception as error:  # noqa: BLE001 -- any compile or launch failure: the Triton kernel can do it all
            device = args[at["k_packed_ptr"]].device
            _FAILED.add(str(device))
            warn_once(f"turboquant_hf: the fast (Gluon) decode-attention kernel failed on {device} "
                      f"({type(error).__name__}: {str(error)[:200]}); the Triton split kernel runs instead")
            split_kernel[grid](*args, **kwargs)
            return
    # The residual program writes slot (pid_bh * 1 + 0) * padded' + rows; with padded' = (splits + 1) * padded and
    # the pointers advanced by splits * padded rows, that is slot `splits` of the real layout.
    residual = list(args)
    residual[at["num_splits"]], residual[at["padded_rows"]] = 0, (splits + 1) * padded
    residual[at["part_out_ptr"]] = args[at["part_out_ptr"]].view(-1)[splits * padded * kwargs["HEAD_DIM"]:]
    for name in ("part_max_ptr", "part_sum_ptr"):
        residual[at[name]] = args[at[name]].view(-1)[splits * padded:]
    split_kernel[(1, batch_heads, grid[2])](*residual, **kwargs)
