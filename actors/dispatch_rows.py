"""The bytes of a layer's dispatch (actors/dispatch.py): the row layout a front-end sends its shards, and
the packing of one layer's rows into it."""

from __future__ import annotations

import torch

from .model import cpu_kernels


def row_bytes(hidden: int, top_k: int, dtype: torch.dtype) -> int:
    """Bytes of one dispatched row: the hidden state, then the K local slots (int32), padded to 8 bytes."""
    return -(-(hidden * dtype.itemsize + 4 * top_k) // 8) * 8


def pack_rows(x_TH, shard_TK, slot_TK, shards: int, row_size: int):
    """A layer's dispatch blocks, one per shard, each 1 + T rows of ``row_size`` bytes: the count, then every token
    with a slot on that shard, in token order (its hidden state, then its K slots there as int32, -1 for
    another shard's). Returns (send [N * (1 + T), row_size] uint8, row_of_slot [T * K]: where each (token,
    slot)'s output lands in the answers (shards in order, rows in order, slots in order), rows per shard,
    slots per shard). One native pass on CPU (kernels/moe_dispatch.c); tensor ops elsewhere."""
    T, K = shard_TK.shape
    x_TH = x_TH if x_TH.stride(-1) == 1 else x_TH.contiguous()
    if x_TH.device.type != "cpu" or not cpu_kernels.available():
        return torch_pack_rows(x_TH, shard_TK, slot_TK, shards, row_size)
    shard_TK, slot_TK = shard_TK.contiguous(), slot_TK.contiguous()
    send = torch.empty(shards * (1 + T), row_size, dtype=torch.uint8)
    row_of_slot = torch.empty(T * K, dtype=torch.int64)
    counts = torch.empty(2, shards, dtype=torch.int64)
    size = x_TH.element_size()
    cpu_kernels.lib().moe_dispatch_pack(x_TH.data_ptr(), x_TH.stride(0) * size, x_TH.shape[1] * size,
                                        shard_TK.data_ptr(), slot_TK.data_ptr(), T, K, shards, send.data_ptr(),
                                        row_size, row_of_slot.data_ptr(), counts[0].data_ptr(), counts[1].data_ptr())
    per_shard, slots_per_shard = counts.tolist()
    return send, row_of_slot, per_shard, slots_per_shard


def torch_pack_rows(x_TH, shard_TK, slot_TK, shards: int, row_size: int):
    """``pack_rows`` in tensor ops (any device)."""
    T, K = shard_TK.shape
    N, H, device = shards, x_TH.shape[1], x_TH.device
    hits_TN = torch.zeros(T, N, dtype=torch.bool, device=device)
    hits_TN.scatter_(1, shard_TK, True)
    dest, tokens = hits_TN.T.nonzero().unbind(1)  # (shard, token) pairs, grouped by shard
    per_shard = hits_TN.sum(0)
    own_RK = shard_TK[tokens] == dest[:, None]  # the slots each row's shard computes
    block = 1 + T  # rows per shard: the count, then room for every token
    row = dest * block + 1 + torch.arange(len(tokens), device=device) - (per_shard.cumsum(0) - per_shard)[dest]
    send = torch.empty(N * block, row_size, dtype=torch.uint8, device=device)
    send.view(torch.int64)[torch.arange(N, device=device) * block, 0] = per_shard
    send.view(x_TH.dtype)[row, :H] = x_TH[tokens]
    first_slot = H * x_TH.element_size() // 4
    send.view(torch.int32)[row, first_slot : first_slot + K] = torch.where(own_RK, slot_TK[tokens], -1).int()
    row_of_slot = torch.empty(T * K, dtype=torch.int64, device=device)
    flat_slot = (tokens[:, None] * K + torch.arange(K, device=device))[own_RK]
    row_of_slot[flat_slot] = torch.arange(flat_slot.numel(), device=device)
    slots_per_shard = torch.zeros(N, dtype=torch.int64, device=device).index_add_(0, dest, own_RK.sum(1))
    return send, row_of_slot, per_shard.tolist(), slots_per_shard.tolist()
