"""The native backend: our Llama-family implementation over a paged K/V cache, on CPU or CUDA.

prepare_inputs turns the engine's ragged batch (lists of ids, block tables) into device tensors once
per forward: flattened token ids and positions, each new token's cache slot, the decode group's
padded block tables and key mask, and the prefill chunks. The model then runs every chunk together.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F

from collab_decode.backends.base import ModelInput, ModelOutput
from collab_decode.models.attention import AttentionMetadata, KVCache, PrefillChunk
from collab_decode.models.loader import load_model, resolve_dtype
from collab_decode.models.rope import RotaryEmbedding


class NativeBackend:
    """Weights, K/V storage and the forward of one model."""

    def __init__(self, model: torch.nn.Module, compile: bool = False):
        self.model = model
        # torch.compile fuses the many small ops that dominate a small model's decode step on a CPU.
        # Only decode-only batches (the bulk of generation) take the compiled path, so its graph sees one
        # metadata layout; batches with prefill chunks run eagerly. The first calls compile (~1 minute).
        self._compiled = torch.compile(model.decode, dynamic=True) if compile else None
        # a model whose forward takes `keep` runs a chunk's last layer on the rows read only (an architecture
        # added with a forward of its own, without it, runs every row)
        self._keeps_rows = "keep" in inspect.signature(model.forward).parameters
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = self.config.vocab_size
        self.hidden_size = self.config.hidden_size
        self.max_model_len = self.config.max_position_embeddings
        self.eos_token_ids = self.config.eos_token_ids
        self.rope = RotaryEmbedding(self.config, self.device, self.dtype)
        self.cache: KVCache | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu",
                        compile: bool = False) -> "NativeBackend":
        return cls(load_model(path, resolve_dtype(dtype), device), compile)

    def kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.dtype.itemsize

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        self.cache = KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks, block_size,
                             self.device, self.dtype)

    def release(self, seq_id: int) -> None:
        pass  # blocks are owned by the engine's KVCacheManager

    def clear_blocks(self, block_ids: list[int]) -> None:
        """Zero these blocks' K/V (a failed request's, which may hold NaN) before another sequence gets them."""
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        for k, v in zip(self.cache.k, self.cache.v):
            k.index_fill_(0, index, 0)
            v.index_fill_(0, index, 0)

    @property
    def embedding(self) -> torch.Tensor:
        """(V, hidden) the input embedding table `embed` reads (a router on the host reads its rows directly)."""
        return self.model.model.embed_tokens.weight

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        # the functional call: the router's features look up a few rows per step (the weights need no grad)
        return F.embedding(token_ids.to(self.device), self.embedding)

    def forward(self, batch: ModelInput) -> ModelOutput:
        if torch.is_inference_mode_enabled():  # the engine's step already is: entering again costs ~5 us
            return self._forward(batch)
        with torch.inference_mode():
            return self._forward(batch)

    def _forward(self, batch: ModelInput) -> ModelOutput:
        if self.cache is None:
            raise RuntimeError("init_cache() must be called before forward()")
        input_ids, positions, meta, last_idx, seq_lens = self.prepare_inputs(batch)
        chunk_lens = [len(c.token_ids) for c in batch.chunks]
        cos, sin = self.rope.cos_sin(positions, seq_lens, chunk_lens)
        all_positions = any(c.all_positions for c in batch.chunks)  # some chunk is read at every position
        if self._compiled is not None and meta.only_decodes and not all_positions:
            # one token per sequence, so each token is its sequence's last
            last_hidden, logits = self._compiled(input_ids, cos, sin, self.cache, meta)
            return ModelOutput(logits=logits.float(), hidden=last_hidden)
        if meta.only_decodes or not self._keeps_rows or all_positions:
            hidden = self.model(input_ids, cos, sin, self.cache, meta)  # (T, hidden)
            last_hidden = hidden if meta.only_decodes else hidden[last_idx]  # (B, hidden): each sequence's last
        else:  # chunks read at their last token only: the last layer runs the rest of the rows no further
            last_hidden = self.model(input_ids, cos, sin, self.cache, meta, keep=last_idx)  # (B, hidden)
        out = ModelOutput(logits=self.model.logits(last_hidden).float(), hidden=last_hidden)
        start = 0
        for chunk, n in zip(batch.chunks, chunk_lens):
            if chunk.all_positions:
                out.all_hidden[chunk.seq_id] = hidden[start:start + n]
                out.all_logits[chunk.seq_id] = self.model.logits(hidden[start:start + n]).float()
            start += n
        return out

    def prepare_inputs(self, batch: ModelInput):
        """Device tensors for one forward: ids (T,), positions (T,), attention metadata, last index (B,).

        Decoding sequences (one new token) are handled with plain Python ints and one tensor build per
        step; prefill chunks compute their slots with tensor ops.
        """
        block_size = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_idx: list[int] = []
        seq_lens: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        prefill_slots: list[tuple[int, torch.Tensor]] = []  # (offset in the batch, slots)
        for chunk in batch.chunks:
            n, start = len(chunk.token_ids), len(ids)
            seq_len = chunk.num_cached + n
            num_blocks = -(-seq_len // block_size)
            if n == 0 or len(chunk.block_table) < num_blocks:
                raise ValueError(f"sequence {chunk.seq_id}: chunk of {n} tokens on {chunk.num_cached} cached needs "
                                 f"{num_blocks} blocks and at least one token; block table has "
                                 f"{len(chunk.block_table)}")
            ids.extend(chunk.token_ids)
            last_idx.append(start + n - 1)
            seq_lens.append(seq_len)
            if n == 1:
                p = chunk.num_cached
                positions.append(p)
                slots.append(chunk.block_table[p // block_size] * block_size + p % block_size)
                decode_rows.append(start)
                decode_tables.append(chunk.block_table[:num_blocks])
                decode_lens.append(seq_len)
                continue
            table = torch.tensor(chunk.block_table[:num_blocks], dtype=torch.int64)
            pos = torch.arange(chunk.num_cached, seq_len, dtype=torch.int64)
            positions.extend(range(chunk.num_cached, seq_len))
            slots.extend([0] * n)  # filled from prefill_slots below
            prefill_slots.append((start, table[pos // block_size] * block_size + pos % block_size))
            prefills.append(PrefillChunk(start, start + n, chunk.num_cached, table.to(self.device)))
        if not prefills:  # the usual step, every sequence decoding: one host-to-device build
            return self._prepare_decodes(ids, positions, slots, decode_tables, decode_lens)
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        for start, chunk_slots in prefill_slots:
            slot_mapping[start:start + len(chunk_slots)] = chunk_slots
        meta = AttentionMetadata(slot_mapping=slot_mapping.to(self.device), decode_token_idx=None,
                                 decode_block_tables=None, decode_mask=None, prefills=prefills)
        if decode_rows:
            self._prepare_decode(meta, decode_rows, decode_tables, decode_lens)
        device = self.device
        return (torch.tensor(ids, dtype=torch.int64, device=device), torch.tensor(positions, device=device), meta,
                torch.tensor(last_idx, dtype=torch.int64, device=device), seq_lens)

    def _prepare_decodes(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
                         seq_lens: list[int]):
        """prepare_inputs of a batch whose every sequence decodes one token: ids, positions, slots, rows and
        block tables are views of one int64 tensor (at batch 1 each tensor built costs more than its data)."""
        n = len(ids)
        max_blocks = max(len(t) for t in tables)
        padded = [b for t in tables for b in _pad_table(t, max_blocks)]
        flat = torch.tensor(ids + positions + slots + list(range(n)) + padded, dtype=torch.int64, device=self.device)
        rows = flat[3 * n:4 * n]  # token i is sequence i's, and its last
        meta = AttentionMetadata(slot_mapping=flat[2 * n:3 * n], decode_token_idx=rows,
                                 decode_block_tables=flat[4 * n:].view(n, max_blocks), decode_mask=None, prefills=[],
                                 only_decodes=True)
        self._decode_lengths(meta, max_blocks, seq_lens)
        return flat[:n], flat[n:2 * n], meta, rows, seq_lens

    def _prepare_decode(self, meta: AttentionMetadata, rows: list[int], tables: list[list[int]],
                        seq_lens: list[int]) -> None:
        max_blocks = max(len(t) for t in tables)
        padded = torch.tensor([_pad_table(t, max_blocks) for t in tables], dtype=torch.int64)
        meta.decode_token_idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
        meta.decode_block_tables = padded.to(self.device)
        self._decode_lengths(meta, max_blocks, seq_lens)

    def _decode_lengths(self, meta: AttentionMetadata, max_blocks: int, seq_lens: list[int]) -> None:
        """The decoding sequences' lengths: one common length, or a key mask where they differ."""
        if min(seq_lens) == max(seq_lens):
            meta.decode_len = seq_lens[0]
            return
        key_pos = torch.arange(max_blocks * self.cache.block_size)
        mask = key_pos[None, :] < torch.tensor(seq_lens)[:, None]  # (Bd, L)
        meta.decode_mask = mask[:, None, None, :].to(self.device)


def _pad_table(table: list[int], num_blocks: int) -> list[int]:
    """A block table padded to num_blocks with the sequence's own last block, never another's: masked keys
    still meet their values as 0 * value, and another sequence's NaN would come through as NaN."""
    return table + table[-1:] * (num_blocks - len(table))
