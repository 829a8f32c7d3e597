"""The ``triton`` backend's GPU kernels (``@triton.jit`` only; launch code lives in ``host.py``).

FlashAttention-2 (Dao, 2023) with every rule of docs/api.md, in the names of the paper and
of ``backends/tiled.py``: ``m_i`` (running row maximum), ``l_i`` (running row sum), ``acc``
(unnormalised output), ``BLOCK_M`` query rows, ``BLOCK_N`` keys. Scores are in natural-log units
and the row maximum (or the lse) is subtracted before the ``log2(e)`` factor of each ``exp2``, so
a score near the float32 maximum (a bias of 3e38) never overflows; a softcap of any float32
size is applied without overflow or denormal factors (``_softcap``).

Kernels, top to bottom:
  ``attn_fwd``        online softmax over key tiles; writes ``out`` and the natural-log lse.
  ``attn_decode``     the same over one split of the keys for few queries (flash-decoding): all
                      query heads of a key/value head share one program; ``decode_combine``
                      merges the splits by their lse.
  ``bwd_preprocess``  ``delta_i = rowsum(dO_i * O_i) - dlse_i`` and the lse (+inf where empty).
  ``bwd_dkdv``        per key tile: dK, dV, summed over the query heads of its group (no atomics).
  ``bwd_dq``          per query tile: dQ, and the gradients of ``bias`` and ALiBi slopes.
  ``attn_probs``      the softmax probabilities of chosen rows and heads (``attention_weights``),
                      or their column sums / maxima and row entropies (``attention_stats``).
Each kernel stands after its inner loop (``_fwd_inner``, ``_dkdv_inner``, ``_dq_inner``,
``_probs_tile``); ``_attend``, the body of both forward kernels, comes before ``attn_fwd``. What
several kernels share comes first: tile loads and stores, the K/V tile of a loop step
(``_load_kv``), the scores of a tile of rows (``_row_scores``), the stretches of keys a tile
visits (``_span``, ``_phases``, ``_stretch``) and ``_row_tile``, everything a tile of query
rows sets up before its loop over keys (forward, decode, dQ and probabilities start alike).

Visibility. Query row ``i`` sits at position ``i' = i + OFF`` (``OFF = Nk - Nq``). For a tile of
rows, ``_span`` turns causal/window bounds and the per-row segment ranges computed by the host
into ``[lo, hi)`` (keys any row may see) and ``[full_lo, full_hi)`` (keys every row sees);
``_phases`` cuts the loop into masked / unmasked / masked stretches of whole tiles, so tiles
the rules leave empty are never visited and full ones run without mask arithmetic. The bool
``mask`` tensor is applied in every tile (it has no summary). The three stretches are one
``tl.static_range(3)`` loop: unrolled at compile time, so each stretch is its own
specialisation of the inner loop (``MASKED`` is a compile-time constant).

Non-finite keys. When some rule may hide keys, masked tiles zero non-finite entries of k and v,
so padding garbage never reaches a row that cannot see it (``0 * NaN`` in a matrix product).
A key whose k row is not finite gets NaN scores where visible, so the rows that see it are NaN.
In the forward a non-finite ``v[j, c]`` leaves the scores alone: ``_bad_values`` adds it back
to column ``c`` of the rows that see key ``j`` (NaN, or +-inf as ``p * v`` says), so it never
touches other columns or the lse (docs/api.md; as ``engine.tiles.bad_values``). The backward
treats a bad value row like a bad key: the gradients of the rows that see it are NaN.

Quantized keys and values (``selfattn.QuantizedKV``). With ``K_BITS`` / ``V_BITS`` (8 or 4;
0 for float tensors, which compiles the plain kernels unchanged) the forward and decode kernels
read int8 codes, or 4-bit codes two per byte, and their float32 group scales, and dequantize
each tile in registers (``_load_codes``) to exactly the values ``dequantize(rotated=True)``
gives; the host rotates q and the output for rotated codes. The backward kernels take float
tensors (the host dequantizes for them).

Dropout uses the counter-based hash of ``selfattn._rng`` in uint32 arithmetic, so every backend
draws the same mask for the same seed and backward regenerates it.

Hopper: the forward and decode kernels can read K/V through TMA descriptors (``USE_TMA``); the
matrix products compile to ``wgmma`` on sm_90 (see ``benchmarks/triton_aot_check.py``). Under
Triton's interpreter, bfloat16 operands are widened to float32 before ``tl.dot`` (``UPCAST``),
which the interpreter cannot multiply (triton-lang/triton#11584).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ... import constants

LOG2E: tl.constexpr = tl.constexpr(constants.LOG2E)
LN2: tl.constexpr = tl.constexpr(constants.LN2)
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
# Stands in for -inf in m_i so that exp2(-inf - m_i) is 0 rather than NaN for rows that have
# seen no key yet; every finite score is at least -FLT_MAX.
M_FLOOR: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


# --------------------------------------------------------------------------------------------
# Small pieces shared by every kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _mix32(x):
    """The 32-bit finaliser of ``_rng._mix32_`` on uint32 (products wrap modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def _row_hash(rows, seed0):
    """``mix32(row * 0x9E3779B9 + seed0)`` for global row ids ``(b * Hq + h) * Nq + i`` (int64)."""
    x = rows.to(tl.uint32) * tl.full(rows.shape, 0x9E3779B9, tl.uint32)
    return _mix32(x + seed0)


@triton.jit
def _col_hash(cols, seed1):
    """``col * 0x85EBCA6B + seed1`` (uint32) for key indices."""
    return cols.to(tl.uint32) * tl.full(cols.shape, 0x85EBCA6B, tl.uint32) + seed1


@triton.jit
def _keep(hr, hc, thresh):
    """Dropout keep mask from broadcast-shaped row and column hashes."""
    return _mix32(hr ^ hc) >= thresh


@triton.jit
def _softcap(y, cap):
    """``cap * tanh(y / cap)`` and ``tanh(y / cap)`` for natural-log scores ``y``, any float32 cap.

    For ``|y / cap| < 1/8`` the odd series ``tanh(u) = u (1 - u^2/3 + 2u^4/15 - 17u^6/315)``
    (relative error < 2e-9) multiplies ``y`` itself: no cancellation in ``1 - exp(-2|u|)`` and
    no denormal ``u`` for caps near FLT_MAX. Elsewhere ``sign(u) (1 - e) / (1 + e)``,
    ``e = exp(-2|u|)``. ``1 / cap`` is clamped to FLT_MAX so that ``0 / cap`` stays 0 for caps
    below 2**-126 (the scores are then within ``2 cap`` of each other: the clamp moves nothing
    the softmax can see).
    """
    inv = tl.minimum(1.0 / cap, FLT_MAX)
    u = y * inv
    u2 = u * u
    poly = 1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 - u2 * 0.05396825396825397))
    e = tl.math.exp2(tl.abs(u) * -2.8853900817779268)  # -2 log2(e)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(u < 0, -big, big)
    small = tl.abs(u) < 0.125
    t = tl.where(small, u * poly, big)
    return tl.where(small, y * poly, cap * big), t


@triton.jit
def _load_tile(
    rows, ok, stride_d, D, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr
):
    """A (R, BLOCK_D) tile of q, k, v, dO or O; ``rows`` (R,) points at each row's first entry.

    ``MASKED`` tiles read only the rows marked ``ok`` and the columns below ``D`` (zeros
    elsewhere); others lie inside the tensor and check the columns only, unless ``EVEN_D``.
    """
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = rows[:, None] + offs_d[None, :] * stride_d
    if MASKED:
        x = tl.load(ptrs, mask=ok[:, None] & (offs_d < D)[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(rows, x, ok, stride_d, D, BLOCK_D: tl.constexpr):
    """Store the (R, BLOCK_D) tile ``x`` in its destination's dtype: rows ``ok``, columns < D."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(
        rows[:, None] + offs_d[None, :] * stride_d,
        x.to(rows.dtype.element_ty),
        mask=ok[:, None] & (offs_d < D)[None, :],
    )


@triton.jit
def _zero_bad(x):
    """``x`` with its non-finite entries set to 0, and which of its rows held one."""
    fin = tl.abs(x.to(tl.float32)) < float("inf")
    return tl.where(fin, x, 0.0), tl.min(fin.to(tl.int32), 1) == 0


@triton.jit
def _load_codes(
    rows, srows, ok, stride_d, stride_sd, D, f_base,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """A (BLOCK_R, BLOCK_D) tile of quantized keys or values, dequantized in registers to
    ``f_base``'s dtype exactly as ``QuantizedKV.dequantize(rotated=True)`` does (float32
    code * scale, then rounded once), so a kernel reading the codes sees the same operands as
    one reading the dequantized copy.

    ``rows`` (BLOCK_R,) point at each row's first code byte, ``srows`` at its first float32
    scale. 8 bits: int8 codes; 4 bits: uint8 bytes holding ``code + 8`` of the even channel in
    the low nibble, of the odd one in the high nibble (``selfattn.quant``): a byte is read once
    and its two nibbles interleaved. ``GROUP`` channels share a scale; 0 means one scale for the
    whole row (the 8-bit default): one load per row. A power-of-two group loads (rows, groups)
    scales and broadcasts them; any other group gathers a scale per element. Masked entries
    read code 0 and scale 0, i.e. zero.
    """
    offs_d = tl.arange(0, BLOCK_D)
    if MASKED:  # noqa: SIM108 (a compile-time branch, as in _load_tile)
        row_m = ok
    else:
        row_m = ok | True
    if BITS == 8:
        cptrs = rows[:, None] + offs_d[None, :] * stride_d
        if MASKED or not EVEN_D:
            c = tl.load(cptrs, mask=row_m[:, None] & (offs_d < D)[None, :], other=0)
        else:
            c = tl.load(cptrs)
        c = c.to(tl.float32)
    else:
        HALF: tl.constexpr = BLOCK_D // 2
        offs_h = tl.arange(0, HALF)
        bptrs = rows[:, None] + offs_h[None, :] * stride_d
        if MASKED or not EVEN_D:
            byte = tl.load(bptrs, mask=row_m[:, None] & (offs_h * 2 < D)[None, :], other=136)
        else:
            byte = tl.load(bptrs)
        byte = byte.to(tl.int32)  # 136 = 0x88: codes 0 and 0 where masked
        lo = (byte & 15) - 8
        hi = (byte >> 4) - 8
        c = tl.join(lo, hi).reshape(BLOCK_R, BLOCK_D).to(tl.float32)  # channels 2i, 2i + 1
    if GROUP == 0:  # one scale per row
        if MASKED:  # noqa: SIM108 (a compile-time branch)
            sc = tl.load(srows, mask=ok, other=0.0)
        else:
            sc = tl.load(srows)
        x = c * sc[:, None]
    elif (GROUP & (GROUP - 1)) == 0:  # power-of-two groups: (rows, groups) scales, broadcast
        NG: tl.constexpr = BLOCK_D // GROUP
        offs_g = tl.arange(0, NG)
        gm = row_m[:, None] & (offs_g * GROUP < D)[None, :]
        sc = tl.load(srows[:, None] + offs_g[None, :] * stride_sd, mask=gm, other=0.0)
        x = (c.reshape(BLOCK_R, NG, GROUP) * sc[:, :, None]).reshape(BLOCK_R, BLOCK_D)
    else:  # a scale per element
        sm = row_m[:, None] & (offs_d < D)[None, :]
        sptrs = srows[:, None] + (offs_d // GROUP)[None, :] * stride_sd
        sc = tl.load(sptrs, mask=sm, other=0.0)
        x = c * sc
    return x.to(f_base.dtype.element_ty)


@triton.jit
def _load_kv(
    k_base, v_base, desc_k, desc_v, kv_b, kv_h, start_n, offs_n,
    stride_kn, stride_kd, stride_vn, stride_vd, Nk, D, DV,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, CLEAN: tl.constexpr, UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ks_base, vs_base, stride_ksn, stride_ksd, stride_vsn, stride_vsd, f_base,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
):  # fmt: skip
    """The key and value tiles of keys ``offs_n`` (from ``start_n``), and which keys are bad.

    With ``USE_TMA`` they come through the tensor-memory accelerator (4-D descriptors over
    (B, Hkv, Nk, D); rows past Nk and columns past D read as zero). With ``CLEAN``, non-finite
    entries are zeroed and ``bad_k`` / ``bad_v`` mark the keys whose k / v row held one (see
    the module docstring).

    ``K_BITS`` / ``V_BITS`` (8 or 4; 0 for float tensors) read quantized codes from
    ``k_base`` / ``v_base`` and their scales from ``ks_base`` / ``vs_base`` (``_load_codes``;
    never through TMA), dequantized to ``f_base``'s dtype. A quantized value row has no float
    row for ``_bad_values`` to re-read, so a non-finite one (a NaN scale) is treated as a bad
    key: the rows that see it are NaN in every column.
    """
    if USE_TMA:
        k = desc_k.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = desc_v.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        col_ok = offs_n < Nk
        if K_BITS == 0:
            k = _load_tile(
                k_base + offs_n * stride_kn, col_ok, stride_kd, D, BLOCK_D, MASKED, EVEN_D
            )
        else:
            k = _load_codes(
                k_base + offs_n * stride_kn, ks_base + offs_n * stride_ksn, col_ok, stride_kd,
                stride_ksd, D, f_base, K_BITS, K_GROUP, BLOCK_N, BLOCK_D, MASKED, EVEN_D,
            )  # fmt: skip
        if V_BITS == 0:
            v = _load_tile(
                v_base + offs_n * stride_vn, col_ok, stride_vd, DV, BLOCK_DV, MASKED, EVEN_D
            )
        else:
            v = _load_codes(
                v_base + offs_n * stride_vn, vs_base + offs_n * stride_vsn, col_ok, stride_vd,
                stride_vsd, DV, f_base, V_BITS, V_GROUP, BLOCK_N, BLOCK_DV, MASKED, EVEN_D,
            )  # fmt: skip
    bad_k = offs_n  # unused without CLEAN
    bad_v = offs_n
    if CLEAN:
        k, bad_k = _zero_bad(k)
        v, bad_v = _zero_bad(v)
        if V_BITS != 0:  # no float row to re-read: poison the key instead (see above)
            bad_k = bad_k | bad_v
            bad_v = offs_n < 0
    if UPCAST:  # the interpreter cannot multiply bfloat16 (triton-lang/triton#11584)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v, bad_k, bad_v


@triton.jit
def _scores(
    qk, qk_scale, cap, bias_ptrs, ld_ok, slope, dist,
    SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
):  # fmt: skip
    """Steps 1-4 of the contract in natural-log units: scale, softcap, bias, ALiBi.

    ``qk`` is the raw ``q . k`` tile (float32), ``qk_scale`` the scale, ``cap`` the softcap
    (unused without one). Returns the scores and the softcap's tanh (for its derivative; ``qk``
    when there is no softcap).
    """
    s = qk * qk_scale
    t = qk
    if SOFTCAP:
        s, t = _softcap(s, cap)
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=ld_ok, other=0.0).to(tl.float32)
    if HAS_ALIBI:
        s -= slope * tl.abs(dist).to(tl.float32)
    return s, t


@triton.jit
def _visible(
    pos, jj, Nk, win_left, win_right, qid, kvid, mask_ptrs, ld_ok, row_ok,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Visibility of a tile; ``pos``, ``jj``, ``row_ok`` etc. come pre-shaped.

    ``MASKED`` tiles check causal, window and segments; key bounds, row bounds (so rows past
    Nq never carry a NaN into a sum over rows) and the bool mask are checked in every tile.
    The orientation (rows x keys or keys x rows) is the caller's.
    """
    vis = (jj < Nk) & row_ok
    if MASKED:
        if CAUSAL:
            vis = vis & (jj <= pos)
        if HAS_RIGHT:
            vis = vis & (jj <= pos + win_right)
        if HAS_LEFT:
            vis = vis & (jj >= pos - win_left)
        if HAS_SEG:
            vis = vis & (qid == kvid) & (qid >= 0)
    if HAS_MASK:
        vis = vis & (tl.load(mask_ptrs, mask=ld_ok, other=0) != 0)
    return vis


@triton.jit
def _row_scores(
    q, k, bad, offs_n, pos, row_ok, Nk,
    bias_rows, stride_bias_n, slope, mask_rows, stride_mask_n, qid, kvid_base, stride_kvid_n,
    qk_scale, cap, win_left, win_right,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, CLEAN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Scores of a (rows x keys) tile after steps 1-4, hidden entries -inf; and the
    softcap's tanh (see ``_scores``). The forward, dQ and probability kernels share it.

    ``pos``, ``bias_rows``, ``mask_rows``, ``slope`` and ``qid`` are per row, ``offs_n`` and
    ``bad`` per key. Only tiles that mask something (``MASKED`` or a bool mask) check
    visibility; there, with ``CLEAN``, scores of bad keys become NaN before masking.
    """
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_M, BLOCK_N)
    ld_ok = row_ok[:, None] & (offs_n < Nk)[None, :]
    s, t = _scores(
        qk, qk_scale, cap,
        bias_rows[:, None] + offs_n[None, :] * stride_bias_n, ld_ok,
        slope[:, None], pos[:, None] - offs_n[None, :],
        SOFTCAP, HAS_BIAS, HAS_ALIBI,
    )  # fmt: skip
    if MASKED or HAS_MASK:
        if CLEAN:
            s = tl.where(bad[None, :], float("nan"), s)
        kvid = offs_n
        if HAS_SEG and MASKED:
            kvid = tl.load(kvid_base + offs_n * stride_kvid_n, mask=offs_n < Nk, other=-1)
        vis = _visible(
            pos[:, None], offs_n[None, :], Nk, win_left, win_right, qid[:, None], kvid[None, :],
            mask_rows[:, None] + offs_n[None, :] * stride_mask_n, ld_ok, row_ok[:, None],
            MASKED, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_SEG, HAS_MASK,
        )  # fmt: skip
        s = tl.where(vis, s, float("-inf"))
    return s, t


FIX_N: tl.constexpr = tl.constexpr(16)  # keys per step of _fix_bad_values


@triton.jit
def _bad_values(
    acc, p, s, offs_n, bad_v, v_base, stride_vn, stride_vd, DV,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``acc`` (BLOCK_M, BLOCK_DV) plus what the non-finite entries of a tile's value rows add to
    ``p @ v``, for the rows that see them only.

    ``p`` (BLOCK_M, BLOCK_N) float32 probabilities after dropout, ``s`` the scores (-inf where
    hidden), ``bad_v`` (BLOCK_N,) the keys whose value row holds NaN/inf. For each such key
    ``j``, the rows that see it get ``p[:, j] * v[j, c]`` for its non-finite ``v[j, c]``: NaN
    for NaN or for +-inf times a zero probability, +-inf otherwise (+inf and -inf meeting in
    the sum make NaN), as ``engine.tiles.bad_values``.
    """
    offs_dv = tl.arange(0, BLOCK_DV)
    for jj in range(0, BLOCK_N):
        sel = tl.arange(0, BLOCK_N) == jj
        if tl.max(tl.where(sel & bad_v, 1, 0), 0) > 0:
            j = tl.max(tl.where(sel, offs_n, 0), 0)
            p_j = tl.sum(tl.where(sel[None, :], p, 0.0), 1)  # (BLOCK_M,)
            seen = tl.max(tl.where(sel[None, :] & (s != float("-inf")), 1, 0), 1) > 0
            row = tl.load(v_base + j * stride_vn + offs_dv * stride_vd, mask=offs_dv < DV)
            row = row.to(tl.float32)
            row = tl.where(tl.abs(row) < float("inf"), 0.0, row)  # its NaN/inf entries only
            acc += tl.where(seen[:, None], p_j[:, None] * row[None, :], 0.0)
    return acc


@triton.jit
def _fix_bad_values(
    acc, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start, end,
    Nk, D, DV, pos, row_ok, bias_rows, stride_bias_n, slope, mask_rows, stride_mask_n,
    qid, kvid_base, stride_kvid_n, hr, seed1, thresh, drop_scale, qk_scale, cap, win_left,
    win_right,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ks_base, vs_base, stride_ksn, stride_ksd, stride_vsn, stride_vsd, f_base,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
):  # fmt: skip
    """Add back to ``acc`` the non-finite values that cleaned tiles zeroed (``_bad_values``)
    over the keys ``[start, end)``, after the online softmax: the probabilities are relative to
    the final row maximum ``m_i``, the units ``acc`` is in by then.

    Run only when a row saw such a value. It steps over ``FIX_N`` keys at a time and recomputes
    the scores only of steps holding one, so that it costs the online-softmax loop neither
    registers nor shared memory (its tiles are (BLOCK_M, FIX_N)). Every step is masked; keys
    that the loop read unmasked kept their NaN/inf in the product, and adding the same NaN or
    same-signed inf again changes nothing.
    """
    for start_n in range(start, end, FIX_N):
        offs_n = start_n + tl.arange(0, FIX_N)
        k, _v, bad_k, bad_v = _load_kv(
            k_base, v_base, k_base, v_base, 0, 0, start_n, offs_n,  # no TMA here
            stride_kn, stride_kd, stride_vn, stride_vd, Nk, D, DV,
            True, EVEN_D, True, UPCAST, False, FIX_N, BLOCK_D, BLOCK_DV,
            ks_base, vs_base, stride_ksn, stride_ksd, stride_vsn, stride_vsd, f_base, K_BITS, V_BITS, K_GROUP, V_GROUP,
        )  # fmt: skip
        if tl.max(bad_v.to(tl.int32), 0) > 0:
            s, _t = _row_scores(
                q, k, bad_k, offs_n, pos, row_ok, Nk, bias_rows, stride_bias_n, slope,
                mask_rows, stride_mask_n, qid, kvid_base, stride_kvid_n, qk_scale, cap,
                win_left, win_right, True, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI,
                HAS_MASK, HAS_SEG, SOFTCAP, True, PREC,
            )  # fmt: skip
            p = tl.math.exp2((s - m_i[:, None]) * LOG2E)
            if DROPOUT:
                keep = _keep(hr[:, None], _col_hash(offs_n, seed1)[None, :], thresh)
                p = tl.where(keep, p * drop_scale, 0.0)
            acc = _bad_values(
                acc, p, s, offs_n, bad_v, v_base, stride_vn, stride_vd, DV, FIX_N, BLOCK_DV
            )
    return acc


@triton.jit
def _add_sink(m_i, l_i, sink):
    """Fold the sink logit (one per row, natural log) into the row maxima and sums: the sink
    is one more logit with no value (docs/api.md, step 6). Returns ``(m, l, alpha)``; the
    caller scales its accumulated output by ``alpha``. A ``-inf`` sink changes nothing; a row
    that saw no key gets ``m = sink``, ``l = 1`` (output 0, lse ``sink``)."""
    m_new = tl.maximum(m_i, sink)
    alpha = tl.math.exp2((m_i - m_new) * LOG2E)
    l_new = l_i * alpha + tl.math.exp2((sink - m_new) * LOG2E)
    return m_new, l_new, alpha


# --------------------------------------------------------------------------------------------
# Which tiles a program visits
# --------------------------------------------------------------------------------------------


@triton.jit
def _segments(RNG, IDS, stride_idb, stride_idn, b, B, N, idx, ok, n_other, HAS_SEG: tl.constexpr):
    """Segment bounds of a tile of positions ``idx`` of batch ``b`` and their segment ids.

    ``RNG`` (4, B, N) holds, per position, the first and one past the last position of the
    other side with the same id, and the same span where all of it matches (computed by the
    host). The tile's bounds reduce them over its positions ``ok``: min of lo, max of hi, max of
    full lo, min of full hi. Without segments: ``n_other, 0, 0, n_other`` and ids ``idx``.
    """
    lo = n_other
    hi = 0
    flo = 0
    fhi = n_other
    ids = idx
    if HAS_SEG:
        rng = RNG + b * N + idx
        lo = tl.min(tl.load(rng, mask=ok, other=n_other), 0)
        hi = tl.max(tl.load(rng + B * N, mask=ok, other=0), 0)
        flo = tl.max(tl.load(rng + 2 * B * N, mask=ok, other=0), 0)
        fhi = tl.min(tl.load(rng + 3 * B * N, mask=ok, other=n_other), 0)
        ids = tl.load(IDS + b * stride_idb + idx * stride_idn, mask=ok, other=-1)
    return lo, hi, flo, fhi, ids


@triton.jit
def _close_span(lo, hi, flo, fhi, seg_lo, seg_hi, seg_flo, seg_fhi, HAS_SEG: tl.constexpr):
    """The last steps of ``_span`` and ``_row_span``: segment bounds, an empty span becomes
    ``lo = hi = 0``, and the fully visible part is kept inside the span."""
    if HAS_SEG:
        lo = tl.maximum(lo, seg_lo)
        hi = tl.minimum(hi, seg_hi)
        flo = tl.maximum(flo, seg_flo)
        fhi = tl.minimum(fhi, seg_fhi)
    empty = hi <= lo
    lo = tl.where(empty, 0, lo)
    hi = tl.where(empty, 0, hi)
    flo = tl.maximum(flo, lo)
    fhi = tl.minimum(fhi, hi)
    return lo, hi, flo, fhi


@triton.jit
def _span(
    p_lo, p_hi, k_lo, k_hi, win_left, win_right, seg_lo, seg_hi, seg_flo, seg_fhi,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SEG: tl.constexpr,
):  # fmt: skip
    """Keys ``[lo, hi)`` of ``[k_lo, k_hi)`` that rows at positions ``p_lo..p_hi`` may see,
    ``[flo, fhi)`` those all of them see.

    ``seg_*`` are the rows' segment bounds (``_segments``). ``[k_lo, k_hi)`` is the program's
    share of the keys (all of them but in the decode kernel). An empty span comes back as
    ``lo = hi = 0``.
    """
    lo = p_lo * 0 + k_lo
    hi = p_lo * 0 + k_hi
    flo = lo
    fhi = hi
    if CAUSAL:
        hi = tl.minimum(hi, p_hi + 1)
        fhi = tl.minimum(fhi, p_lo + 1)
    if HAS_RIGHT:
        hi = tl.minimum(hi, p_hi + win_right + 1)
        fhi = tl.minimum(fhi, p_lo + win_right + 1)
    if HAS_LEFT:
        lo = tl.maximum(lo, p_lo - win_left)
        flo = tl.maximum(flo, p_hi - win_left)
    return _close_span(lo, hi, flo, fhi, seg_lo, seg_hi, seg_flo, seg_fhi, HAS_SEG)


@triton.jit
def _row_span(
    j_lo, j_hi, OFF, n_rows, win_left, win_right, seg_lo, seg_hi, seg_flo, seg_fhi,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SEG: tl.constexpr,
):  # fmt: skip
    """Query rows ``[lo, hi)`` that may see some key of ``j_lo..j_hi``, ``[flo, fhi)`` all of them.

    The transpose of ``_span``: causal and the right window bound a row from below
    (``i + OFF >= j - right``), the left window from above (``i + OFF - left <= j``).
    """
    lo = j_lo * 0
    hi = lo + n_rows
    flo = lo
    fhi = hi
    if CAUSAL:
        lo = tl.maximum(lo, j_lo - OFF)
        flo = tl.maximum(flo, j_hi - OFF)
    if HAS_RIGHT:
        lo = tl.maximum(lo, j_lo - win_right - OFF)
        flo = tl.maximum(flo, j_hi - win_right - OFF)
    if HAS_LEFT:
        hi = tl.minimum(hi, j_hi + win_left - OFF + 1)
        fhi = tl.minimum(fhi, j_lo + win_left - OFF + 1)
    return _close_span(lo, hi, flo, fhi, seg_lo, seg_hi, seg_flo, seg_fhi, HAS_SEG)


@triton.jit
def _phases(lo, hi, flo, fhi, n_keys, BLOCK: tl.constexpr):
    """Tile starts: masked ``[a, f0)``, unmasked ``[f0, f1)``, masked ``[f1, hi)``.

    Unmasked tiles lie wholly inside ``[flo, fhi)`` and inside the tensor (no bounds checks).
    """
    a = (lo // BLOCK) * BLOCK
    hi_up = ((hi + BLOCK - 1) // BLOCK) * BLOCK
    f0 = ((flo + BLOCK - 1) // BLOCK) * BLOCK
    f0 = tl.minimum(tl.maximum(f0, a), hi_up)
    f1 = (tl.minimum(fhi, n_keys) // BLOCK) * BLOCK
    f1 = tl.minimum(tl.maximum(f1, f0), hi_up)
    return a, f0, f1


@triton.jit
def _stretch(phase: tl.constexpr, a, f0, f1, hi):
    """``[start, end)`` of stretch ``phase`` of ``_phases``: 0 and 2 masked, 1 unmasked.

    Kernels loop ``for phase in tl.static_range(3)`` and pass ``phase != 1`` as ``MASKED``:
    masked tiles before the fully visible ones (the window's left edge, segment starts), the
    fully visible tiles (no causal/window/segment arithmetic, no bounds checks), masked tiles
    after them (the causal diagonal, the window's right edge, the last tile).
    """
    if phase == 0:
        start = a
        end = f0
    elif phase == 1:
        start = f0
        end = f1
    else:
        start = f1
        end = hi
    return start, end


@triton.jit
def _row_tile(
    Q, BIAS, SLOPES, MASK, QIDS, QRNG,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_biasb, stride_biash, stride_biasm,
    stride_maskb, stride_maskh, stride_maskm,
    stride_sb, stride_sh, stride_qidb, stride_qidm,
    b, h, i, row_ok, p_lo, p_hi, k_lo, k_hi,
    B, H, Nq, Nk, D, win_left, win_right, seed0, seed1, thresh,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """What a tile of query rows needs before its loop over keys.

    The rows are queries ``i`` (BLOCK_M,) of batch ``b`` and head ``h`` (one for the tile, or
    one per row: each a real head, rows that do not exist included, since the ALiBi slope is
    read unmasked), ``row_ok`` those that exist, at positions ``p_lo..p_hi``; the program covers
    keys ``[k_lo, k_hi)``. Returns ``q`` (BLOCK_M, BLOCK_D); the rows' segment ids ``qid``;
    the stretches ``a, f0, f1, hi`` of ``_phases``; per row the bias and mask row pointers and
    the ALiBi slope; and the dropout row hash, column seed and threshold (uint32).
    """
    q = _load_tile(
        Q + b * stride_qb + h * stride_qh + i * stride_qm, row_ok, stride_qd, D, BLOCK_D, True,
        False,
    )  # fmt: skip
    if UPCAST:  # the interpreter cannot multiply bfloat16 (triton-lang/triton#11584)
        q = q.to(tl.float32)

    # the keys this tile of rows may see, and those every row sees
    seg_lo, seg_hi, seg_flo, seg_fhi, qid = _segments(
        QRNG, QIDS, stride_qidb, stride_qidm, b, B, Nq, i, row_ok, Nk, HAS_SEG
    )
    lo, hi, flo, fhi = _span(
        p_lo, p_hi, k_lo, k_hi, win_left, win_right, seg_lo, seg_hi, seg_flo, seg_fhi,
        CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_SEG,
    )  # fmt: skip
    a, f0, f1 = _phases(lo, hi, flo, fhi, Nk, BLOCK_N)

    bias_rows = i
    if HAS_BIAS:
        bias_rows = BIAS + b * stride_biasb + h * stride_biash + i * stride_biasm
    mask_rows = i
    if HAS_MASK:
        mask_rows = MASK + b * stride_maskb + h * stride_maskh + i * stride_maskm
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope += tl.load(SLOPES + b * stride_sb + h * stride_sh).to(tl.float32)
    hr = i.to(tl.uint32)
    s1 = seed0
    th = seed0
    if DROPOUT:
        hr = _row_hash((b * H + h) * Nq + i, seed0.to(tl.uint32))
        s1 = seed1.to(tl.uint32)
        th = thresh.to(tl.uint32)
    return q, qid, a, f0, f1, hi, bias_rows, mask_rows, slope, hr, s1, th


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, flag, q,
    k_base, v_base, desc_k, desc_v, kv_b, kv_h, stride_kn, stride_kd, stride_vn, stride_vd,
    start, end, Nk, D, DV,
    pos, row_ok, bias_rows, stride_bias_n, slope, mask_rows, stride_mask_n,
    qid, kvid_base, stride_kvid_n, hr, seed1, thresh, drop_scale,
    qk_scale, cap, win_left, win_right,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, CLEAN: tl.constexpr,
    PREC: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ks_base, vs_base, stride_ksn, stride_ksd, stride_vsn, stride_vsd, f_base,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
):  # fmt: skip
    """One stretch of key tiles ``[start, end)`` of the online softmax (rows x keys). ``flag``
    (int32) becomes 1 when a row saw a value that a cleaned tile zeroed (``_fix_bad_values``)."""
    APPLY: tl.constexpr = MASKED or HAS_MASK  # does this stretch mask anything?
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, bad_k, bad_v = _load_kv(
            k_base, v_base, desc_k, desc_v, kv_b, kv_h, start_n, offs_n,
            stride_kn, stride_kd, stride_vn, stride_vd, Nk, D, DV,
            MASKED, EVEN_D, CLEAN and APPLY, UPCAST, USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV,
            ks_base, vs_base, stride_ksn, stride_ksd, stride_vsn, stride_vsd, f_base, K_BITS, V_BITS, K_GROUP, V_GROUP,
        )  # fmt: skip
        s, _t = _row_scores(
            q, k, bad_k, offs_n, pos, row_ok, Nk, bias_rows, stride_bias_n, slope, mask_rows,
            stride_mask_n, qid, kvid_base, stride_kvid_n, qk_scale, cap, win_left, win_right,
            MASKED, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG, SOFTCAP,
            CLEAN, PREC,
        )  # fmt: skip
        if CLEAN and APPLY:  # noqa: SIM102 (compile-time test, then a run-time one)
            if tl.max(bad_v.to(tl.int32), 0) > 0:  # its zeroed NaN/inf: seen by a row?
                seen = bad_v[None, :] & (s > float("-inf"))
                flag = tl.maximum(flag, tl.max(tl.max(seen.to(tl.int32), 1), 0))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2((m_i - m_new) * LOG2E)
        p = tl.math.exp2((s - m_new[:, None]) * LOG2E)  # the maximum first: no overflow
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep(hr[:, None], _col_hash(offs_n, seed1)[None, :], thresh)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = acc * alpha[:, None]
        p = p.to(f_base.dtype.element_ty)  # P in the dtype of V, as FlashAttention does
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i, flag


@triton.jit
def _attend(
    Q, K, V, BIAS, SLOPES, MASK, QIDS, KVIDS, QRNG, DESC_K, DESC_V, KS, VS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_sb, stride_sh,
    stride_qidb, stride_qidm, stride_kvidb, stride_kvidn,
    stride_ksb, stride_ksh, stride_ksn, stride_ksd, stride_vsb, stride_vsh, stride_vsn, stride_vsd,
    b, h, hk, i, row_ok, p_lo, p_hi, k_lo, k_hi,
    B, H, Nq, Nk, D, DV, OFF,
    qk_scale, cap, win_left, win_right,
    seed0, seed1, thresh, drop_scale,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, CLEAN: tl.constexpr,
    PREC: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
):  # fmt: skip
    """The online softmax of a tile of query rows (see ``_row_tile``) over the keys of key/value
    head ``hk`` in ``[k_lo, k_hi)``: ``acc`` (BLOCK_M, BLOCK_DV) unnormalised, the row sums
    ``l_i`` and maxima ``m_i``. The body of ``attn_fwd`` and ``attn_decode``."""
    q, qid, a, f0, f1, hi, bias_rows, mask_rows, slope, hr, s1, th = _row_tile(
        Q, BIAS, SLOPES, MASK, QIDS, QRNG, stride_qb, stride_qh, stride_qm, stride_qd,
        stride_biasb, stride_biash, stride_biasm, stride_maskb, stride_maskh, stride_maskm,
        stride_sb, stride_sh, stride_qidb, stride_qidm, b, h, i, row_ok, p_lo, p_hi, k_lo, k_hi,
        B, H, Nq, Nk, D, win_left, win_right, seed0, seed1, thresh,
        CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG, DROPOUT, UPCAST,
        BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    pos = i + OFF
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kv_b = b.to(tl.int32)  # TMA coordinates
    kv_h = hk.to(tl.int32)
    kvid_base = KVIDS + b * stride_kvidb
    ks_base = KS + b * stride_ksb + hk * stride_ksh  # scales of quantized keys/values (K_BITS)
    vs_base = VS + b * stride_vsb + hk * stride_vsh
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + M_FLOOR
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    flag = tl.full([], 0, tl.int32)
    for phase in tl.static_range(3):  # masked, unmasked, masked stretches (see _stretch)
        start, end = _stretch(phase, a, f0, f1, hi)
        acc, l_i, m_i, flag = _fwd_inner(
            acc, l_i, m_i, flag, q, k_base, v_base, DESC_K, DESC_V, kv_b, kv_h,
            stride_kn, stride_kd, stride_vn, stride_vd, start, end, Nk, D, DV, pos, row_ok,
            bias_rows, stride_biasn, slope, mask_rows, stride_maskn, qid, kvid_base,
            stride_kvidn, hr, s1, th, drop_scale, qk_scale, cap, win_left, win_right,
            phase != 1, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG,
            SOFTCAP, DROPOUT, CLEAN, PREC, EVEN_D, UPCAST, USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV,
            ks_base, vs_base, stride_ksn, stride_ksd, stride_vsn, stride_vsd, Q, K_BITS, V_BITS,
            K_GROUP, V_GROUP,
        )  # fmt: skip
    if CLEAN:  # noqa: SIM102 (compile-time test, then a run-time one)
        if flag > 0:  # rare: a value row some row may not see holds NaN/inf
            acc = _fix_bad_values(
                acc, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, a, hi,
                Nk, D, DV, pos, row_ok, bias_rows, stride_biasn, slope, mask_rows, stride_maskn,
                qid, kvid_base, stride_kvidn, hr, s1, th, drop_scale, qk_scale, cap, win_left,
                win_right, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG,
                SOFTCAP, DROPOUT, PREC, EVEN_D, UPCAST, BLOCK_D, BLOCK_DV, ks_base, vs_base,
                stride_ksn, stride_ksd, stride_vsn, stride_vsd, Q, K_BITS, V_BITS, K_GROUP,
                V_GROUP,
            )  # fmt: skip
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed0", "seed1", "thresh", "OFF", "win_left", "win_right"])
def attn_fwd(
    Q, K, V, O, LSE, BIAS, SLOPES, MASK, QIDS, KVIDS, QRNG, KS, VS, SINKS, stride_sinks,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_sb, stride_sh,
    stride_qidb, stride_qidm, stride_kvidb, stride_kvidn,
    stride_ksb, stride_ksh, stride_ksn, stride_ksd, stride_vsb, stride_vsh, stride_vsn, stride_vsd,
    B, H, G, Nq, Nk, D, DV, OFF,
    qk_scale, cap, win_left, win_right,
    seed0, seed1, thresh, drop_scale,
    DESC_K, DESC_V,
    TUNE_Q, TUNE_K,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, CLEAN: tl.constexpr,
    PREC: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """One program = ``BLOCK_M`` query rows of one (batch, query head); grid (M tiles, B * Hq).

    Consecutive programs are tiles of the same head (its keys and values stay in L2). With
    ``REVERSE`` the last (longest, under causal) row tiles start first.
    """
    pid_m = tl.program_id(0)
    if REVERSE:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Nq
    acc, l_i, m_i = _attend(
        Q, K, V, BIAS, SLOPES, MASK, QIDS, KVIDS, QRNG, DESC_K, DESC_V, KS, VS,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_biasb, stride_biash, stride_biasm,
        stride_biasn, stride_maskb, stride_maskh, stride_maskm, stride_maskn, stride_sb,
        stride_sh, stride_qidb, stride_qidm, stride_kvidb, stride_kvidn,
        stride_ksb, stride_ksh, stride_ksn, stride_ksd, stride_vsb, stride_vsh, stride_vsn,
        stride_vsd,
        b, h, h // G, offs_m, row_ok, m0 + OFF, tl.minimum(m0 + BLOCK_M, Nq) - 1 + OFF, 0, Nk,
        B, H, Nq, Nk, D, DV, OFF, qk_scale, cap, win_left, win_right,
        seed0, seed1, thresh, drop_scale, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI,
        HAS_MASK, HAS_SEG, SOFTCAP, DROPOUT, CLEAN, PREC, EVEN_D, UPCAST, USE_TMA,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, K_BITS, V_BITS, K_GROUP, V_GROUP,
    )  # fmt: skip

    if HAS_SINKS:  # one more logit per row, with no value (in the epilogue only)
        sink = tl.load(SINKS + h * stride_sinks).to(tl.float32)
        m_i, l_i, alpha = _add_sink(m_i, l_i, sink)
        acc = acc * alpha[:, None]
    # every visible row has l_i >= 1 (its maximum contributes exp2(0)); empty rows have 0
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    _store_tile(
        O + b * stride_ob + h * stride_oh + offs_m * stride_om, out, row_ok, stride_od, DV,
        BLOCK_DV,
    )  # fmt: skip
    lse = m_i + tl.math.log2(l_i) * LN2  # log2(0) = -inf for empty rows
    tl.store(LSE + (b * H + h) * Nq + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Decode: few queries over a long cache, keys split across programs (flash-decoding)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed0", "seed1", "thresh", "OFF", "win_left", "win_right"])
def attn_decode(
    Q, K, V, OPART, LPART, BIAS, SLOPES, MASK, QIDS, KVIDS, QRNG, KS, VS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_sb, stride_sh,
    stride_qidb, stride_qidm, stride_kvidb, stride_kvidn,
    stride_ksb, stride_ksh, stride_ksn, stride_ksd, stride_vsb, stride_vsh, stride_vsn, stride_vsd,
    B, H, G, Nq, Nk, D, DV, OFF,
    qk_scale, cap, win_left, win_right,
    seed0, seed1, thresh, drop_scale,
    split_len, n_splits, heads_per_prog, n_hchunks,
    DESC_K, DESC_V,
    TUNE_Q, TUNE_K,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, CLEAN: tl.constexpr,
    PREC: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
):  # fmt: skip
    """One program = one split of the keys x (several query heads x all Nq rows) of one key/value
    head; grid (splits, B * Hkv * head chunks). Row ``r`` of the tile is query ``r % Nq`` of head
    ``r // Nq`` of the chunk, so the key/value tile is read once for all of them. Writes the
    split's normalised output to ``OPART`` (R, S, Dv) and its row maximum and row sum to
    ``LPART`` (R, S, 2): kept apart, since ``m + log(l)`` rounds to ``m`` for scores near 1e38.
    """
    split = tl.program_id(0)
    pid = tl.program_id(1)
    hc = pid % n_hchunks
    bhk = pid // n_hchunks
    hkv = H // G
    b = (bhk // hkv).to(tl.int64)
    hk = (bhk % hkv).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    gi = r // Nq
    i = r % Nq
    gh = hc * heads_per_prog + gi
    row_ok = (gi < heads_per_prog) & (gh < G)
    # the query head of each row, kept inside the group for the rows past it (never stored)
    h = hk * G + tl.minimum(gh, G - 1).to(tl.int64)  # (BLOCK_M,)
    k_start = split * split_len  # this program's share of the keys
    acc, l_i, m_i = _attend(
        Q, K, V, BIAS, SLOPES, MASK, QIDS, KVIDS, QRNG, DESC_K, DESC_V, KS, VS,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_biasb, stride_biash, stride_biasm,
        stride_biasn, stride_maskb, stride_maskh, stride_maskm, stride_maskn, stride_sb,
        stride_sh, stride_qidb, stride_qidm, stride_kvidb, stride_kvidn,
        stride_ksb, stride_ksh, stride_ksn, stride_ksd, stride_vsb, stride_vsh, stride_vsn,
        stride_vsd,
        b, h, hk, i, row_ok, OFF, Nq - 1 + OFF, k_start, tl.minimum(k_start + split_len, Nk),
        B, H, Nq, Nk, D, DV, OFF, qk_scale, cap, win_left, win_right,
        seed0, seed1, thresh, drop_scale, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI,
        HAS_MASK, HAS_SEG, SOFTCAP, DROPOUT, CLEAN, PREC, EVEN_D, UPCAST, USE_TMA,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, K_BITS, V_BITS, K_GROUP, V_GROUP,
    )  # fmt: skip

    row_g = (b * H + h) * Nq + i  # (BLOCK_M,) global row id
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    _store_tile(OPART + (row_g * n_splits + split) * DV, out, row_ok, 1, DV, BLOCK_DV)
    stats = LPART + (row_g * n_splits + split) * 2
    tl.store(stats, m_i, mask=row_ok)
    tl.store(stats + 1, l_i, mask=row_ok)


@triton.jit
def decode_combine(
    OPART, LPART, O, LSE, SINKS, stride_sinks,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Nq, DV, n_splits,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one row by their maxima and sums; grid (B * Hq * Nq,). Empty rows
    give 0, -inf. With ``HAS_SINKS`` the head's sink joins as one more split with no value
    (the split kernel itself never sees it)."""
    row = tl.program_id(0).to(tl.int64)
    i = row % Nq
    bh = row // Nq
    h = bh % H
    b = bh // H
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < n_splits
    stats = LPART + (row * n_splits + offs_s) * 2
    m_s = tl.load(stats, mask=s_ok, other=M_FLOOR)
    l_s = tl.load(stats + 1, mask=s_ok, other=0.0)
    m = tl.max(m_s, 0)
    w = l_s * tl.math.exp2((m_s - m) * LOG2E)  # 0 for splits that saw nothing
    total = tl.sum(w, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h * stride_sinks).to(tl.float32)
        m, total, alpha = _add_sink(m, total, sink)
        w = w * alpha
    o = _load_tile(OPART + (row * n_splits + offs_s) * DV, s_ok, 1, DV, BLOCK_DV, True, False)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        O + b * stride_ob + h * stride_oh + i * stride_om + offs_dv * stride_od,
        out.to(O.dtype.element_ty),
        mask=offs_dv < DV,
    )
    tl.store(LSE + row, m + tl.math.log2(total) * LN2)  # log2(0) = -inf for empty rows


# --------------------------------------------------------------------------------------------
# Backward (FlashAttention-2, Algorithm 2): preprocess, dK/dV per key tile, dQ per query tile
# --------------------------------------------------------------------------------------------


@triton.jit
def bwd_preprocess(
    O, DO, LSE, DLSE, DELTA, LSE_P, SINKS, DSINK,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Nq, DV, stride_sinks,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """``delta = rowsum(dO * O) - dlse`` and ``lse_p``, the lse with +inf for rows that see
    nothing (so that ``exp(s - lse_p)`` is 0 there); grid (M tiles, B * Hq).

    With ``HAS_SINKS`` also each row's share of the sink's gradient, ``-p_sink * delta`` with
    ``p_sink = exp(sink - lse)`` (0 where the sink takes nothing), into ``DSINK`` (B * Hq * Nq):
    the host sums it over batch and rows (docs/api.md; ``selfattn.sinks``). The sink changes
    neither ``delta`` nor the dQ/dK/dV kernels: its logit carries no value."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Nq
    o = _load_tile(
        O + b * stride_ob + h * stride_oh + offs_m * stride_om, row_ok, stride_od, DV, BLOCK_DV,
        True, False,
    ).to(tl.float32)  # fmt: skip
    do = _load_tile(
        DO + b * stride_dob + h * stride_doh + offs_m * stride_dom, row_ok, stride_dod, DV,
        BLOCK_DV, True, False,
    ).to(tl.float32)  # fmt: skip
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * Nq + offs_m, mask=row_ok, other=0.0)
    lse = tl.load(LSE + bh * Nq + offs_m, mask=row_ok, other=0.0)
    lse_p = tl.where(lse == float("-inf"), float("inf"), lse)
    if HAS_SINKS:
        sink = tl.load(SINKS + h * stride_sinks).to(tl.float32)
        p_sink = tl.where(sink == float("-inf"), 0.0, tl.math.exp2((sink - lse) * LOG2E))
        term = tl.where(p_sink > 0.0, -p_sink * delta, 0.0)
        tl.store(DSINK + bh * Nq + offs_m, term, mask=row_ok)
    tl.store(DELTA + bh * Nq + offs_m, delta, mask=row_ok)
    tl.store(LSE_P + bh * Nq + offs_m, lse_p, mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, bad, hc, offs_n,
    q_base, do_base, stride_qm, stride_qd, stride_dom, stride_dod, stats_base,
    start, end, Nq, Nk, D, DV, OFF,
    bias_base, stride_bias_m, stride_bias_n, slope, mask_base, stride_mask_m, stride_mask_n,
    qid_base, stride_qid_m, kvid, row_base, seed0, thresh, drop_scale,
    qk_scale, cap, win_left, win_right, LSE_P, DELTA,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, CLEAN: tl.constexpr,
    PREC: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Query tiles ``[start, end)`` of one head against this program's key tile (keys x rows)."""
    col_ok = offs_n < Nk
    APPLY: tl.constexpr = MASKED or HAS_MASK
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Nq
        q = _load_tile(q_base + offs_m * stride_qm, row_ok, stride_qd, D, BLOCK_D, MASKED, EVEN_D)
        do = _load_tile(
            do_base + offs_m * stride_dom, row_ok, stride_dod, DV, BLOCK_DV, MASKED, EVEN_D
        )
        if MASKED:
            lse_p = tl.load(LSE_P + stats_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + stats_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse_p = tl.load(LSE_P + stats_base + offs_m)
            delta = tl.load(DELTA + stats_base + offs_m)
        if UPCAST:  # the interpreter cannot multiply bfloat16 (triton-lang/triton#11584)
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        pos = offs_m + OFF
        ld_ok = col_ok[:, None] & row_ok[None, :]
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC)  # (BLOCK_N, BLOCK_M)
        s_t, t_t = _scores(
            s_t, qk_scale, cap,
            bias_base + offs_n[:, None] * stride_bias_n + offs_m[None, :] * stride_bias_m, ld_ok,
            slope, pos[None, :] - offs_n[:, None],
            SOFTCAP, HAS_BIAS, HAS_ALIBI,
        )  # fmt: skip
        if CLEAN:
            s_t = tl.where(bad[:, None], float("nan"), s_t)
        if APPLY:
            qid = offs_m
            if HAS_SEG and MASKED:
                qid = tl.load(qid_base + offs_m * stride_qid_m, mask=row_ok, other=-1)
            vis = _visible(
                pos[None, :], offs_n[:, None], Nk, win_left, win_right, qid[None, :], kvid[:, None],
                mask_base + offs_n[:, None] * stride_mask_n + offs_m[None, :] * stride_mask_m,
                ld_ok, row_ok[None, :],
                MASKED, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_SEG, HAS_MASK,
            )  # fmt: skip
            s_t = tl.where(vis, s_t, float("-inf"))
        p_t = tl.math.exp2((s_t - lse_p[None, :]) * LOG2E)  # probabilities, keys x rows
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # dP^T = V dO^T
        if DROPOUT:
            keep = _keep(_row_hash(row_base + offs_m, seed0)[None, :], hc[:, None], thresh)
            p_op = tl.where(keep, p_t * drop_scale, 0.0).to(do_base.dtype.element_ty)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        else:
            p_op = p_t.to(do_base.dtype.element_ty)
        if UPCAST:
            p_op = p_op.to(tl.float32)
        dv = tl.dot(p_op, do, dv, input_precision=PREC)  # dV += P^T dO
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P (dP - delta)
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        ds_t = ds_t.to(q_base.dtype.element_ty)
        if UPCAST:
            ds_t = ds_t.to(tl.float32)
        dk = tl.dot(ds_t, q, dk, input_precision=PREC)  # dK += dS^T Q
    return dk, dv


@triton.jit(do_not_specialize=["seed0", "seed1", "thresh", "OFF", "win_left", "win_right"])
def bwd_dkdv(
    Q, K, V, DO, DK, DVAL, LSE_P, DELTA, BIAS, SLOPES, MASK, QIDS, KVIDS, KRNG,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_sb, stride_sh,
    stride_qidb, stride_qidm, stride_kvidb, stride_kvidn,
    B, H, G, Nq, Nk, D, DV, OFF,
    scale, qk_scale, cap, win_left, win_right,
    seed0, seed1, thresh, drop_scale,
    TUNE_Q, TUNE_K,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, CLEAN: tl.constexpr,
    PREC: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One program = ``BLOCK_N`` keys of one (batch, key/value head); grid (N tiles, B * Hkv).

    Loops over the ``G`` query heads of the group and over the query tiles that may see these
    keys, so dK and dV are complete in registers: no atomics, deterministic.
    """
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    hkv = H // G
    b = (bhk // hkv).to(tl.int64)
    hk = (bhk % hkv).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < Nk
    # non-finite keys are zeroed here and their visible scores poisoned (see module docstring)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    k, v, bad_k, bad_v = _load_kv(
        k_base, v_base, k_base, v_base, 0, 0, n0, offs_n,  # no TMA here
        stride_kn, stride_kd, stride_vn, stride_vd, Nk, D, DV,
        True, EVEN_D, CLEAN, UPCAST, False, BLOCK_N, BLOCK_D, BLOCK_DV,
        k_base, v_base, 0, 0, 0, 0, k_base, 0, 0, 1, 1,  # float keys and values
    )  # fmt: skip
    bad = bad_k | bad_v  # the rows that see a bad k or v row get NaN gradients

    # the query rows that may see these keys, and those that see all of them
    seg_lo, seg_hi, seg_flo, seg_fhi, kvid = _segments(
        KRNG, KVIDS, stride_kvidb, stride_kvidn, b, B, Nk, offs_n, col_ok, Nq, HAS_SEG
    )
    lo, hi, flo, fhi = _row_span(
        n0, tl.minimum(n0 + BLOCK_N, Nk) - 1, OFF, Nq, win_left, win_right,
        seg_lo, seg_hi, seg_flo, seg_fhi, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_SEG,
    )  # fmt: skip
    a, f0, f1 = _phases(lo, hi, flo, fhi, Nq, BLOCK_M)

    hc = offs_n.to(tl.uint32)
    s0 = seed0
    th = seed0
    if DROPOUT:
        hc = _col_hash(offs_n, seed1.to(tl.uint32))
        s0 = seed0.to(tl.uint32)
        th = thresh.to(tl.uint32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        stats_base = (b * H + h) * Nq
        bias_base = BIAS + b * stride_biasb + h * stride_biash
        mask_base = MASK + b * stride_maskb + h * stride_maskh
        qid_base = QIDS + b * stride_qidb
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + b * stride_sb + h * stride_sh).to(tl.float32)
        for phase in tl.static_range(3):  # masked, unmasked, masked stretches (see _stretch)
            start, end = _stretch(phase, a, f0, f1, hi)
            dk, dv = _dkdv_inner(
                dk, dv, k, v, bad, hc, offs_n, q_base, do_base, stride_qm, stride_qd, stride_dom,
                stride_dod, stats_base, start, end, Nq, Nk, D, DV, OFF, bias_base, stride_biasm,
                stride_biasn, slope, mask_base, stride_maskm, stride_maskn, qid_base,
                stride_qidm, kvid, stats_base, s0, th, drop_scale, qk_scale, cap, win_left,
                win_right, LSE_P, DELTA,
                phase != 1, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG,
                SOFTCAP, DROPOUT, CLEAN, PREC, EVEN_D, UPCAST, BLOCK_M, BLOCK_D, BLOCK_DV,
            )  # fmt: skip
    dk = dk * scale
    _store_tile(
        DK + b * stride_dkb + hk * stride_dkh + offs_n * stride_dkn, dk, col_ok, stride_dkd, D,
        BLOCK_D,
    )  # fmt: skip
    _store_tile(
        DVAL + b * stride_dvb + hk * stride_dvh + offs_n * stride_dvn, dv, col_ok, stride_dvd,
        DV, BLOCK_DV,
    )  # fmt: skip


@triton.jit
def _dq_inner(
    dq, db_acc, da_acc, q, do, lse_p, delta,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    start, end, Nk, D, DV,
    pos, offs_m, row_ok, bias_rows, stride_bias_n, slope, mask_rows, stride_mask_n,
    qid, kvid_base, stride_kvid_n, hr, seed1, thresh, drop_scale,
    qk_scale, cap, win_left, win_right, db_base, stride_db_m, stride_db_n,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, CLEAN: tl.constexpr,
    PREC: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    NEED_DB: tl.constexpr, DB_ROWS: tl.constexpr, DB_COLS: tl.constexpr, NEED_DA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Key tiles ``[start, end)`` for one query tile: dQ, and dS into the bias/slope gradients."""
    APPLY: tl.constexpr = MASKED or HAS_MASK
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, bad_k, bad_v = _load_kv(
            k_base, v_base, k_base, v_base, 0, 0, start_n, offs_n,  # no TMA here
            stride_kn, stride_kd, stride_vn, stride_vd, Nk, D, DV,
            MASKED, EVEN_D, CLEAN and APPLY, UPCAST, False, BLOCK_N, BLOCK_D, BLOCK_DV,
            k_base, v_base, 0, 0, 0, 0, k_base, 0, 0, 1, 1,  # float keys and values
        )  # fmt: skip
        s, t = _row_scores(  # a bad value row poisons the scores here: NaN gradients
            q, k, bad_k | bad_v, offs_n, pos, row_ok, Nk, bias_rows, stride_bias_n, slope, mask_rows,
            stride_mask_n, qid, kvid_base, stride_kvid_n, qk_scale, cap, win_left, win_right,
            MASKED, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG, SOFTCAP,
            CLEAN, PREC,
        )  # fmt: skip
        p = tl.math.exp2((s - lse_p[:, None]) * LOG2E)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # dP = dO V^T
        if DROPOUT:
            keep = _keep(hr[:, None], _col_hash(offs_n, seed1)[None, :], thresh)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])  # gradient of the score after steps 1-4 (natural log)
        if NEED_DB:
            if DB_COLS:
                if DB_ROWS:
                    tl.store(
                        db_base + offs_m[:, None] * stride_db_m + offs_n[None, :] * stride_db_n,
                        ds, mask=row_ok[:, None] & (offs_n < Nk)[None, :],
                    )  # fmt: skip
                else:  # bias shared by all rows: this tile's column sums (one slot per row tile)
                    tl.store(db_base + offs_n * stride_db_n, tl.sum(ds, 0), mask=offs_n < Nk)
            else:
                db_acc += tl.sum(ds, 1)
        if NEED_DA:
            dist = pos[:, None] - offs_n[None, :]
            da_acc += tl.sum(ds * tl.abs(dist).to(tl.float32), 1)
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        ds = ds.to(k_base.dtype.element_ty)
        if UPCAST:
            ds = ds.to(tl.float32)
        dq = tl.dot(ds, k, dq, input_precision=PREC)  # dQ += dS K
    return dq, db_acc, da_acc


@triton.jit(do_not_specialize=["seed0", "seed1", "thresh", "OFF", "win_left", "win_right"])
def bwd_dq(
    Q, K, V, DO, DQ, LSE_P, DELTA, BIAS, SLOPES, MASK, QIDS, KVIDS, QRNG, DB, DA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_sb, stride_sh,
    stride_qidb, stride_qidm, stride_kvidb, stride_kvidn,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn, stride_da,
    B, H, G, Nq, Nk, D, DV, OFF,
    scale, qk_scale, cap, win_left, win_right,
    seed0, seed1, thresh, drop_scale,
    TUNE_Q, TUNE_K,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, CLEAN: tl.constexpr,
    PREC: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    NEED_DB: tl.constexpr, DB_ROWS: tl.constexpr, DB_COLS: tl.constexpr, NEED_DA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One program = ``BLOCK_M`` query rows of one head; grid (M tiles, B * Hq).

    Besides dQ it writes dS where the bias gradient needs it: the tile itself into ``DB``
    (B, Hq, Nq, Nk) for a bias with both rows and keys, column sums into slot ``pid_m`` of
    (B, Hq, M tiles, Nk) for one shared by all rows, row sums for one shared by all keys; and
    ``-sum(dS * |i' - j|)`` into ``DA`` (B, Hq, >= M tiles) for the ALiBi slopes. The host sums
    the rest of the broadcast dimensions, so nothing is accumulated atomically.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Nq
    q, qid, a, f0, f1, hi, bias_rows, mask_rows, slope, hr, s1, th = _row_tile(
        Q, BIAS, SLOPES, MASK, QIDS, QRNG, stride_qb, stride_qh, stride_qm, stride_qd,
        stride_biasb, stride_biash, stride_biasm, stride_maskb, stride_maskh, stride_maskm,
        stride_sb, stride_sh, stride_qidb, stride_qidm, b, h, offs_m, row_ok, m0 + OFF,
        tl.minimum(m0 + BLOCK_M, Nq) - 1 + OFF, 0, Nk, B, H, Nq, Nk, D, win_left, win_right,
        seed0, seed1, thresh, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK,
        HAS_SEG, DROPOUT, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    do = _load_tile(
        DO + b * stride_dob + h * stride_doh + offs_m * stride_dom, row_ok, stride_dod, DV,
        BLOCK_DV, True, False,
    )  # fmt: skip
    if UPCAST:
        do = do.to(tl.float32)
    stats = (b * H + h) * Nq + offs_m
    lse_p = tl.load(LSE_P + stats, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
    pos = offs_m + OFF
    db_base = DB + b * stride_dbb + h * stride_dbh
    if not DB_ROWS:
        db_base += pid_m * stride_dbm

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kvid_base = KVIDS + b * stride_kvidb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    da_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for phase in tl.static_range(3):  # masked, unmasked, masked stretches (see _stretch)
        start, end = _stretch(phase, a, f0, f1, hi)
        dq, db_acc, da_acc = _dq_inner(
            dq, db_acc, da_acc, q, do, lse_p, delta, k_base, v_base, stride_kn, stride_kd,
            stride_vn, stride_vd, start, end, Nk, D, DV, pos, offs_m, row_ok, bias_rows,
            stride_biasn, slope, mask_rows, stride_maskn, qid, kvid_base, stride_kvidn, hr, s1,
            th, drop_scale, qk_scale, cap, win_left, win_right, db_base, stride_dbm, stride_dbn,
            phase != 1, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG,
            SOFTCAP, DROPOUT, CLEAN, PREC, EVEN_D, UPCAST, NEED_DB, DB_ROWS, DB_COLS, NEED_DA,
            BLOCK_N, BLOCK_D, BLOCK_DV,
        )  # fmt: skip
    dq = dq * scale
    _store_tile(
        DQ + b * stride_dqb + h * stride_dqh + offs_m * stride_dqm, dq, row_ok, stride_dqd, D,
        BLOCK_D,
    )  # fmt: skip
    if NEED_DB and not DB_COLS:
        if DB_ROWS:
            tl.store(db_base + offs_m * stride_dbm, db_acc, mask=row_ok)
        else:
            tl.store(db_base, tl.sum(db_acc, 0))
    if NEED_DA:
        tl.store(DA + (b * H + h) * stride_da + pid_m, -tl.sum(da_acc, 0))


# --------------------------------------------------------------------------------------------
# Probabilities for attention_weights
# --------------------------------------------------------------------------------------------


@triton.jit
def _probs_tile(
    q, k_base, stride_kn, stride_kd, offs_n, pos, row_ok, Nk, D,
    bias_rows, stride_bias_n, slope, mask_rows, stride_mask_n, qid, kvid_base, stride_kvid_n,
    qk_scale, cap, win_left, win_right,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, CLEAN: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Scores of the keys ``offs_n`` with every rule applied (every tile is masked here:
    not a hot path)."""
    k = _load_tile(k_base + offs_n * stride_kn, offs_n < Nk, stride_kd, D, BLOCK_D, True, False)
    bad = offs_n  # unused without CLEAN
    if CLEAN:
        k, bad = _zero_bad(k)
    if UPCAST:  # the interpreter cannot multiply bfloat16 (triton-lang/triton#11584)
        k = k.to(tl.float32)
    s, _t = _row_scores(
        q, k, bad, offs_n, pos, row_ok, Nk, bias_rows, stride_bias_n, slope, mask_rows,
        stride_mask_n, qid, kvid_base, stride_kvid_n, qk_scale, cap, win_left, win_right,
        True, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG, SOFTCAP,
        CLEAN, PREC,
    )  # fmt: skip
    return s


@triton.jit(do_not_specialize=["OFF", "win_left", "win_right"])
def attn_probs(
    Q, K, P, LSE, ROWS, HEADS, BIAS, SLOPES, MASK, QIDS, KVIDS, QRNG, CS, CM, ENT, SINKS,
    stride_sinks,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pb, stride_ph, stride_pm, stride_pn,
    stride_lb, stride_lh, stride_lm,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_sb, stride_sh,
    stride_qidb, stride_qidm, stride_kvidb, stride_kvidn,
    B, H, G, Nq, Nk, D, OFF, M, HS,
    qk_scale, cap, win_left, win_right,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTCAP: tl.constexpr, CLEAN: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, HAS_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_P: tl.constexpr, COL_SUM: tl.constexpr, COL_MAX: tl.constexpr, ENTROPY: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """Softmax probabilities ``exp(s - lse)`` of selected rows and heads, written tile by tile
    into ``P`` (B, HS, M, Nk) float32 (zero-initialised by the host; tiles the rules leave
    empty are not visited). ``ROWS`` (M,) and ``HEADS`` (HS,) map the selection to query rows
    and heads. Without ``HAS_LSE`` a first pass over the keys computes the lse.
    Grid (M tiles, B * HS).

    ``attention_stats`` runs the same kernel with ``WRITE_P`` off and reduces each tile of
    probabilities instead of storing it: ``COL_SUM`` / ``COL_MAX`` add the tile's column sums /
    maxima into ``CS`` / ``CM`` (B, HS, Nk) (zero-initialised; atomically, since every tile of
    rows adds to the same keys), ``ENTROPY`` keeps ``-sum p log p`` (``log p = s - lse``) per
    row and writes ``ENT`` (B, HS, M).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HS).to(tl.int64)
    hs = (bh % HS).to(tl.int64)
    h = tl.load(HEADS + hs).to(tl.int64)
    hk = h // G
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < M
    i = tl.load(ROWS + offs_r, mask=row_ok, other=0)
    pos = i + OFF
    p_lo = tl.min(tl.where(row_ok, pos, 2147483647), 0)
    p_hi = tl.max(tl.where(row_ok, pos, -2147483647), 0)
    # every tile is masked here: only the keys [a, hi) matter, not the stretches
    q, qid, a, _f0, _f1, hi, bias_rows, mask_rows, slope, _hr, _s1, _th = _row_tile(
        Q, BIAS, SLOPES, MASK, QIDS, QRNG, stride_qb, stride_qh, stride_qm, stride_qd,
        stride_biasb, stride_biash, stride_biasm, stride_maskb, stride_maskh, stride_maskm,
        stride_sb, stride_sh, stride_qidb, stride_qidm, b, h, i, row_ok, p_lo, p_hi, 0, Nk,
        B, H, Nq, Nk, D, win_left, win_right, 0, 0, 0,  # no dropout seeds
        CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG, False, UPCAST,
        BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    k_base = K + b * stride_kb + hk * stride_kh
    kvid_base = KVIDS + b * stride_kvidb
    offs_n0 = tl.arange(0, BLOCK_N)

    if HAS_LSE:
        lse = tl.load(LSE + b * stride_lb + h * stride_lh + i * stride_lm, mask=row_ok, other=0.0)
        lse_p = lse
    else:  # the lse of the selected rows: max and sum over the visible keys
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + M_FLOOR
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(a, hi, BLOCK_N):
            s = _probs_tile(
                q, k_base, stride_kn, stride_kd, start_n + offs_n0, pos, row_ok, Nk, D,
                bias_rows, stride_biasn, slope, mask_rows, stride_maskn, qid, kvid_base,
                stride_kvidn, qk_scale, cap, win_left, win_right, CAUSAL, HAS_LEFT, HAS_RIGHT,
                HAS_BIAS, HAS_ALIBI, HAS_MASK, HAS_SEG, SOFTCAP, CLEAN, PREC, UPCAST, BLOCK_D,
            )  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2((s - m_new[:, None]) * LOG2E)
            l_i = l_i * tl.math.exp2((m_i - m_new) * LOG2E) + tl.sum(p, 1)
            m_i = m_new
        if HAS_SINKS:  # the sink's logit joins the lse (it takes its share of each row)
            sink = tl.load(SINKS + h * stride_sinks).to(tl.float32)
            m_i, l_i, _alpha = _add_sink(m_i, l_i, sink)
        lse_p = m_i + tl.math.log2(l_i) * LN2
    lse_p = tl.where(lse_p == float("-inf"), float("inf"), lse_p)  # rows that see nothing: p = 0
    p_base = P + b * stride_pb + hs * stride_ph + offs_r[:, None] * stride_pm
    col_base = (b * HS + hs) * Nk
    ent = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(a, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        s = _probs_tile(
            q, k_base, stride_kn, stride_kd, offs_n, pos, row_ok, Nk, D, bias_rows, stride_biasn,
            slope, mask_rows, stride_maskn, qid, kvid_base, stride_kvidn, qk_scale, cap,
            win_left, win_right, CAUSAL, HAS_LEFT, HAS_RIGHT, HAS_BIAS, HAS_ALIBI, HAS_MASK,
            HAS_SEG, SOFTCAP, CLEAN, PREC, UPCAST, BLOCK_D,
        )  # fmt: skip
        p = tl.math.exp2((s - lse_p[:, None]) * LOG2E)
        if WRITE_P:
            tl.store(
                p_base + offs_n[None, :] * stride_pn, p,
                mask=row_ok[:, None] & (offs_n < Nk)[None, :],
            )  # fmt: skip
        if COL_SUM:
            tl.atomic_add(CS + col_base + offs_n, tl.sum(p, 0), mask=offs_n < Nk)
        if COL_MAX:  # p >= 0: a float maximum any order gives the same
            tl.atomic_max(CM + col_base + offs_n, tl.max(p, 0), mask=offs_n < Nk)
        if ENTROPY:  # hidden and underflowed keys (p = 0) add nothing
            ent += tl.sum(tl.where(p > 0.0, -p * (s - lse_p[:, None]), 0.0), 1)
    if ENTROPY:
        tl.store(ENT + (b * HS + hs) * M + offs_r, ent, mask=row_ok)
