"""A paged KV cache whose pages hold quantized K/V rows, and attention that reads it (pure torch).

This is the reference of the CPU (C++) and GPU (Triton) kernels, the CPU path where those cannot
be built, and the prefill attention of the C++ path; the quantizer itself is `kv.quant`, the same
one the search's simulation uses, so what was measured offline is what is served.

One layer's cache is a uint8 tensor [num_blocks, num_kv_heads, block_size, row_bytes] (vLLM's
`LBHNC` page layout). A token's row for one KV head is `[K row | V row]`, each row as
`kv.quant.quantize` packs it: codes, then one fp16 (scale, zero) pair per group (or, for the fp8
tier, one float8 e4m3 byte a value). Keys may be stored
in the Hadamard basis (`rotate_keys`); attention then rotates the query instead of every key,
since q . k = (q H) . (k H).

Blocks are not zeroed when vLLM hands them out, so anything past a request's length is garbage
(possibly NaN once decoded): attention masks by sequence length and zeroes those rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_adaspkv.kv import quant


@dataclass(frozen=True)
class KVFormat:
    """How one layer stores a token's K and V for one KV head."""

    bits: int
    head_dim: int
    group: int = 32
    rotate_keys: bool = False
    fp8: bool = False  # 8 bits as float8 e4m3 values (no scales) instead of codes with a scale pair per group

    def __post_init__(self):
        quant.check_layout(self.bits, self.head_dim, self.group, self.fp8)
        if self.rotate_keys:
            quant.hadamard(self.head_dim)  # raises unless head_dim is a power of two

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K row; V is the same."""
        return quant.bytes_per_token_head(self.bits, self.head_dim, self.group, self.fp8)

    @property
    def token_head_bytes(self) -> int:
        """Bytes of one token's K and V for one KV head: the page's last dimension."""
        return 2 * self.row_bytes


def kv_to_store(key: torch.Tensor, value: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """key, value [T, H, D] -> fp32 [T, H, 2, D], keys in the basis the cache stores them in."""
    if fmt.rotate_keys:
        key = key.float() @ quant.hadamard_on(fmt.head_dim, key.device)
    return torch.stack([key, value], -2).float()


def encode(key: torch.Tensor, value: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """key, value [T, H, D] -> uint8 rows [T, H, fmt.token_head_bytes]. K and V are quantized in
    one call (the quantizer works row by row, so the bytes are the same; half the tensor ops)."""
    kv = kv_to_store(key, value, fmt)  # [T, H, 2, D]
    return quant.quantize(kv, fmt.bits, fmt.group, fmt.fp8).flatten(-2)  # [T, H, 2 * row_bytes]


def decode(rows: torch.Tensor, fmt: KVFormat, dtype: torch.dtype,
           valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 rows [..., fmt.token_head_bytes] -> key, value [..., D] (keys in the stored basis);
    rows where `valid` [...] is False decode to 0. K and V rows are decoded in one pass (half the
    tensor ops: they dominate on CPU)."""
    kv = quant.dequantize(rows.unflatten(-1, (2, fmt.row_bytes)), fmt.bits, fmt.head_dim, fmt.group, dtype,
                          None if valid is None else valid[..., None], fmt.fp8)
    return kv[..., 0, :], kv[..., 1, :]  # [..., D] each


def write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
          fmt: KVFormat) -> None:
    """Quantize key, value [T, H, D] into their slots of cache [B, H, N, C]; slot s is block
    s // N, position s % N. Negative slots (vLLM's padding) are skipped."""
    n = slot_mapping.shape[0]  # key/value may carry padding rows past the scheduled tokens
    slots, key, value = slot_mapping.long(), key[:n], value[:n]
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    block_size = cache.shape[2]
    rows = encode(key, value, fmt)  # [T, H, C]
    cache[slots // block_size, :, slots % block_size] = rows


def attend(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
           query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int, scale: float,
           fmt: KVFormat) -> torch.Tensor:
    """Causal attention of the new tokens of R requests over their cached context.

    query [T, Hq, D] holds request r's q_len_r newest tokens at rows query_start_loc[r]:...[r+1];
    seq_lens [R] counts each request's tokens including those; block_table [R, >= blocks]; cache
    [B, Hkv, N, C]. Returns [T, Hq, D] in query's dtype. Every step is batched over requests and
    tokens: the context is gathered page by page, decoded once, and attended with SDPA under a
    mask built from the lengths (prefill, decode, chunked prefill and prefix hits are one case).
    In a batch that mixes decode requests (one new token) with longer ones, the decodes are
    attended apart: padded to the batch's longest query, each would cost as much as a prefill.
    """
    return attend_with_decode(_attend_decode, query, cache, block_table, seq_lens, query_start_loc,
                              max_query_len, max_seq_len, scale, fmt)


def attend_with_decode(attend_decode: Callable[..., torch.Tensor], query: torch.Tensor, cache: torch.Tensor,
                       block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                       max_query_len: int, max_seq_len: int, scale: float, fmt: KVFormat) -> torch.Tensor:
    """`attend` with the decode requests' attention done by `attend_decode` (the arguments of
    `_attend_decode`): the C++ CPU kernels plug in there and keep this batching."""
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0:
        return query.new_empty(query.shape)
    if max_query_len == 1 and query.shape[0] == num_reqs:  # decode only
        return attend_decode(query, cache, block_table, seq_lens, max_seq_len, scale, fmt)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [R]
    decoding = q_lens == 1
    if not bool(decoding.any()):
        return _attend_varlen(query, cache, block_table, seq_lens, query_start_loc, max_query_len,
                              max_seq_len, scale, fmt)
    out = query.new_empty(query.shape)
    dec = decoding.nonzero().squeeze(1)  # [Rd] requests with one new token
    rows = query_start_loc[dec].long()  # [Rd] their query rows
    out[rows] = attend_decode(query[rows], cache, block_table[dec], seq_lens[dec],
                              int(seq_lens[dec].max()), scale, fmt)
    rest = (~decoding).nonzero().squeeze(1)  # [Rp] requests with several new tokens
    rows = (~decoding)[torch.repeat_interleave(q_lens)].nonzero().squeeze(1)  # [Tp] their query rows
    lens = q_lens[rest].long()
    starts = torch.cat([lens.new_zeros(1), lens.cumsum(0)])  # [Rp + 1] in the compacted query
    out[rows] = _attend_varlen(query[rows], cache, block_table[rest], seq_lens[rest], starts,
                               int(lens.max()), int(seq_lens[rest].max()), scale, fmt)
    return out


def _attend_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, max_seq_len: int, scale: float, fmt: KVFormat) -> torch.Tensor:
    """One new token per request, query [R, Hq, D]: each sees its whole context."""
    key, value, in_context = _context(cache, block_table, seq_lens.long(), max_seq_len, fmt)
    q = query.float()[:, :, None]  # [R, Hq, 1, D]
    return _sdpa(q, key, value, in_context[:, None, None], scale, fmt)[:, :, 0].to(query.dtype)


def _attend_varlen(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int, scale: float,
                   fmt: KVFormat) -> torch.Tensor:
    """Any number of new tokens per request, padded to max_query_len under a causal mask."""
    num_tokens, num_heads, head_dim = query.shape
    num_reqs = seq_lens.shape[0]
    device = query.device
    seq_lens = seq_lens.long()
    key, value, in_context = _context(cache, block_table, seq_lens, max_seq_len, fmt)

    # Scatter the packed query rows into a [R, Lq, Hq, D] batch.
    token = torch.arange(num_tokens, device=device)
    req = torch.searchsorted(query_start_loc[1:].long(), token, right=True)  # [T]
    step = token - query_start_loc[:-1].long()[req]  # [T] index within the request's new tokens
    q = query.new_zeros(num_reqs, max_query_len, num_heads, head_dim, dtype=torch.float32)
    q[req, step] = query.float()

    # Token i of request r sits at absolute position seq_len - q_len + i and sees keys <= it.
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()  # [R]
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_query_len, device=device)[None, :]  # [R, Lq]
    key_pos = torch.arange(key.shape[2], device=device)  # [S]
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # [R, Lq, S]
    mask &= in_context[:, None, :]
    mask[:, :, 0] = True  # padding query rows (i >= q_len) need one visible key; they are dropped
    out = _sdpa(q.transpose(1, 2), key, value, mask[:, None], scale, fmt)  # [R, Hq, Lq, D]
    return out.transpose(1, 2)[req, step].to(query.dtype)  # [T, Hq, D]


def _context(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
             fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each request's cached K, V [R, Hkv, S, D] fp32 (S = its pages' slots) and in_context [R, S]."""
    num_reqs, block_size = seq_lens.shape[0], cache.shape[2]
    table = block_table[:num_reqs, :-(-max_seq_len // block_size)].long()  # [R, nb]
    pages = cache.index_select(0, table.flatten()).unflatten(0, table.shape)  # [R, nb, Hkv, N, C]
    pages = pages.permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :max_seq_len]  # [R, Hkv, S, C], S = max_seq_len
    in_context = torch.arange(pages.shape[2], device=cache.device)[None, :] < seq_lens[:, None]  # [R, S]
    # Rows past a request's length are unwritten blocks: they decode to 0, so no NaN reaches the output
    key, value = decode(pages, fmt, torch.float32, in_context[:, None, :])
    return key, value, in_context


def _sdpa(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float,
          fmt: KVFormat) -> torch.Tensor:
    """q [R, Hq, Lq, D] over key, value [R, Hkv, S, D] under a boolean mask broadcast to [R, Hq, Lq, S]."""
    if fmt.rotate_keys:  # keys are stored in the Hadamard basis: rotate the query instead
        q = q @ quant.hadamard_on(q.shape[-1], q.device)
    return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != key.shape[1])
