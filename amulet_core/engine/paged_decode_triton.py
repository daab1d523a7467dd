"""The Triton kernels of :mod:`amulet_core.engine.paged_decode` (imported only where Triton is installed).

Flash-decoding over the paged KV cache, in two launches:

* :func:`partition_kernel`, one program per (row, KV head, partition of ``PARTITION`` key positions): the
  row's query heads of that KV head (padded to ``GROUP`` rows for ``tl.dot``) attend to the partition's keys,
  read ``BLOCK_N`` positions at a time through the row's block table (position ``n`` lives in slot
  ``table[n // block_size] * block_size + n % block_size``), with an online softmax in float32; it writes the
  partition's normalised output and its log-sum-exp (with one partition, the output itself, in its dtype).
  Positions at or past the row's length, and outside its sliding window, weigh zero; a partition wholly past the
  length writes a log-sum-exp of -inf. With followers (rows whose first ``skip`` positions are in this row's first
  blocks: a request's contrast context shares its conversation with its preference context), the program's
  ``tl.dot`` rows are this row's query heads and then each follower's (``MEMBERS`` groups: free up to 16 rows), the
  followers' rows seeing only their shared positions, written to their partition slots ``shared_slot + part``; a
  follower's own programs start after them. So shared keys and values are read once, not once per context.
* :func:`combine_kernel` (where there are several), one program per (row, query head): the partitions' outputs weighted by their
  ``exp(lse - max lse)``, written in the output's dtype.

and, for prefill chunks, :func:`prefill_kernel`, one program per (span, KV head, tile of ``BLOCK_Q`` new tokens):
the tile's tokens times that KV head's query heads as the rows of one ``tl.dot``, attending causally (and within
the window) to the span's cached and new keys, read through its block table the same way.

The number of partitions is fixed by the launch (by the longest context it may see), not by the rows'
lengths, which the kernels read from device memory: a CUDA graph captured once serves every length below it.
``EXACT`` products are float32 (no TF32: the float32 cache's path, and the interpreter's, whose ``tl.dot`` of
bfloat16 operands is wrong); otherwise the cache's dtype is multiplied on the tensor cores, accumulating in float32,
and the probabilities are rounded to it for the second product, as flash attention does.

With ``TRITON_INTERPRET=1`` in the environment before Triton is first imported, Triton's interpreter runs the
same kernels on CPU tensors (the tests' path).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _keys_and_values(k_ptr, v_ptr, table_ptr, n, n_ok, kv_head, d, d_ok, stride_kh, stride_ks, block_size):
    """One KV head's keys and values at positions ``n`` (where ``n_ok``), read through a block table: position ``n``
    lives in slot ``table[n // block_size] * block_size + n % block_size``."""
    block = tl.load(table_ptr + n // block_size, mask=n_ok, other=0)
    slot = block * block_size + n % block_size
    offsets = kv_head * stride_kh + slot[:, None] * stride_ks + d[None, :]
    ok = n_ok[:, None] & d_ok[None, :]
    return tl.load(k_ptr + offsets, mask=ok, other=0.0), tl.load(v_ptr + offsets, mask=ok, other=0.0)


@triton.jit
def _attend(q, k, v, seen, m_i, l_i, acc, scale, softcap, USE_SOFTCAP: tl.constexpr, EXACT: tl.constexpr):
    """A tile of keys folded into the online softmax ``(m_i, l_i, acc)`` of the rows ``q``; ``seen`` (``[rows,
    keys]``) says which scores count."""
    if EXACT:  # noqa: SIM108 (Triton's branches on a constexpr)
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if USE_SOFTCAP:
        t = tl.exp(2.0 * s / softcap)
        s = softcap * (1.0 - 2.0 / (t + 1.0))  # softcap * tanh(s / softcap)
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if EXACT:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def partition_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [KVH, slots, D]
    v_ptr,
    tables_ptr,  # [B, max_blocks]
    lengths_ptr,  # [B]
    followers_ptr,  # [B, MEMBERS - 1]: rows whose leading positions this row's programs attend for them (-1: none)
    skip_ptr,  # [B]: leading positions of this row its leader's programs attend (0: none)
    part_out_ptr,  # [B, H, P, D] float32 (P: twice the partitions with followers)
    part_lse_ptr,  # [B, H, P] float32
    stride_qb,
    stride_qh,
    stride_kh,
    stride_ks,
    stride_tb,
    stride_fb,
    stride_ob,
    stride_oh,
    stride_op,
    stride_lb,
    stride_lh,
    shared_slot,
    scale,
    softcap,
    window,
    block_size,
    head_dim,
    group_size,
    GROUP: tl.constexpr,
    MEMBERS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    EXACT: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)  # kv_head * stride_kh can pass 2**31 in a large cache
    part = tl.program_id(2)
    length = tl.load(lengths_ptr + row)
    # The dot's rows: this row's query heads of the KV head (member 0), then those of its followers, GROUP each.
    r = tl.arange(0, ROWS)
    member = r // GROUP
    g = r % GROUP
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group_size + g
    d_ok = d < head_dim
    start = part * PARTITION
    own_start = start
    if MEMBERS > 1:
        own_start = tl.maximum(start, tl.load(skip_ptr + row).to(tl.int32))
    own_end = tl.minimum(start + PARTITION, length)
    low = 0
    if USE_WINDOW:
        low = length - window  # keys at positions <= (length - 1) - window are outside the window
        own_start = tl.maximum(own_start, low)
    member_row = tl.where(member == 0, row, -1)
    if MEMBERS > 1:
        followed = tl.load(followers_ptr + row * stride_fb + member - 1, mask=(member > 0) & (member < MEMBERS), other=-1)
        followed = followed.to(tl.int32)
        member_row = tl.where(member == 0, row, followed)
    r_ok = (member_row >= 0) & (member < MEMBERS) & (g < group_size)
    # A follower's queries see the leading positions it shares with this row (its skip), in this partition.
    r_end = own_end
    if MEMBERS > 1:
        shared = tl.load(skip_ptr + member_row, mask=r_ok & (member > 0), other=0).to(tl.int32)
        r_end = tl.where(member == 0, own_end, tl.minimum(start + PARTITION, shared))
    r_end = tl.where(r_ok, r_end, 0)
    r_start = tl.where(member == 0, own_start, start)
    r_start = tl.where(r_ok, r_start, start + PARTITION)
    q_rows = tl.where(r_ok, member_row, 0).to(tl.int64)
    q_offsets = q_rows[:, None] * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    first = tl.min(r_start, axis=0)
    end = tl.max(r_end, axis=0)
    while first < end:  # a while loop: Triton's interpreter cannot range() over a loaded bound
        n = first + tl.arange(0, BLOCK_N)
        n_ok = n < end
        if USE_WINDOW:
            n_ok = n_ok & (n >= low)
        table = tables_ptr + row * stride_tb
        k, v = _keys_and_values(k_ptr, v_ptr, table, n, n_ok, kv_head, d, d_ok, stride_kh, stride_ks, block_size)
        seen = n_ok[None, :] & (n[None, :] >= r_start[:, None]) & (n[None, :] < r_end[:, None])
        m_i, l_i, acc = _attend(q, k, v, seen, m_i, l_i, acc, scale, softcap, USE_SOFTCAP, EXACT)
        first += BLOCK_N
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    slot = tl.where(member == 0, part, shared_slot + part)
    out_offsets = q_rows[:, None] * stride_ob + heads[:, None] * stride_oh + slot[:, None] * stride_op + d[None, :]
    out = out.to(part_out_ptr.dtype.element_ty)  # float32, or the query's dtype when this is the only partition
    tl.store(part_out_ptr + out_offsets, out, mask=r_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + q_rows * stride_lb + heads * stride_lh + slot, lse, mask=r_ok)


@triton.jit
def combine_kernel(
    part_out_ptr,  # [B, H, P, D] float32
    part_lse_ptr,  # [B, H, P] float32
    out_ptr,  # [B, H, D]
    skip_ptr,  # [B] with CASCADE: a row whose leader attended its first positions (> 0) has 2 x parts slots
    stride_ob,
    stride_oh,
    stride_op,
    stride_lb,
    stride_lh,
    stride_yb,
    stride_yh,
    parts,
    head_dim,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CASCADE: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    used = parts
    if CASCADE:  # the slots past a row's own partitions hold what its leader attended for it, if it has one
        used = tl.where(tl.load(skip_ptr + row) > 0, 2 * parts, parts)
    p_ok = p < used
    d_ok = d < head_dim
    lse = tl.load(part_lse_ptr + row * stride_lb + head * stride_lh + p, mask=p_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    live = p_ok & (lse > float("-inf"))  # (a partition with nothing to attend: its output never written)
    weight = tl.where(live, tl.exp(lse - top), 0.0)
    offsets = row * stride_ob + head * stride_oh + p[:, None] * stride_op + d[None, :]
    outs = tl.load(part_out_ptr + offsets, mask=live[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(outs * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + row * stride_yb + head * stride_yh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def prefill_kernel(
    q_ptr,  # [tokens, H, D]: the spans' new tokens, packed
    k_ptr,  # [KVH, slots, D]
    v_ptr,
    tables_ptr,  # [S, max_blocks]
    starts_ptr,  # [S] each span's first packed token
    counts_ptr,  # [S] its new tokens
    contexts_ptr,  # [S] its context length (cached positions and the new ones)
    out_ptr,  # [tokens, H, D]
    stride_qt,
    stride_qh,
    stride_kh,
    stride_ks,
    stride_tb,
    stride_ot,
    stride_oh,
    scale,
    softcap,
    window,
    block_size,
    head_dim,
    group_size,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    EXACT: tl.constexpr,
):
    span = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)  # kv_head * stride_kh can pass 2**31 in a large cache
    tile = tl.program_id(2)
    start = tl.load(starts_ptr + span)
    count = tl.load(counts_ptr + span)
    context = tl.load(contexts_ptr + span)
    first_position = context - count
    r = tl.arange(0, BLOCK_Q * GROUP)
    token = tile * BLOCK_Q + r // GROUP
    g = r % GROUP
    d = tl.arange(0, BLOCK_D)
    rows_ok = (token < count) & (g < group_size)
    d_ok = d < head_dim
    heads = kv_head * group_size + g
    q = tl.load(
        q_ptr + (start + token)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=rows_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    position = first_position + token
    # Keys up to the tile's last query (causal); none for a tile past the span's new tokens.
    last = first_position + tl.minimum((tile + 1) * BLOCK_Q, count)
    end = tl.where(tile * BLOCK_Q < count, last, 0)
    low = 0
    if USE_WINDOW:
        low = tl.maximum(first_position + tile * BLOCK_Q - window + 1, 0)
    m_i = tl.full([BLOCK_Q * GROUP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP, BLOCK_D], tl.float32)
    first = low
    while first < end:
        n = first + tl.arange(0, BLOCK_N)
        n_ok = n < end
        table = tables_ptr + span * stride_tb
        k, v = _keys_and_values(k_ptr, v_ptr, table, n, n_ok, kv_head, d, d_ok, stride_kh, stride_ks, block_size)
        seen = n_ok[None, :] & (n[None, :] <= position[:, None])
        if USE_WINDOW:
            seen = seen & (n[None, :] > position[:, None] - window)
        m_i, l_i, acc = _attend(q, k, v, seen, m_i, l_i, acc, scale, softcap, USE_SOFTCAP, EXACT)
        first += BLOCK_N
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_offsets = (start + token)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])


next_power_of_2 = triton.next_power_of_2
