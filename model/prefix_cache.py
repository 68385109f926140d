"""Prefill shared context once: inside a batch, and across requests.

Every prompt is a chain of segments: each document in context (retrieved neighbours,
user examples) with its `<break>`, then the task's own document. The keys and values of
a segment depend only on the tokens before it and on its own, since RoPE positions count
real tokens from 0 whatever the left padding (model/decoder.py). So a segment's KV can be
computed once and copied to any row whose prompt starts with the same chain:

- inside a batch, the rows that share a prompt (a job's candidates, every guidance row's
  unconditional prompt) prefill it once (`SharedPrefill`);
- across requests, `PrefixCache` keeps segments' KV in a byte-bounded LRU. As in vLLM's
  prefix caching, a segment's key hashes its tokens together with its parent's key, so a
  key names the whole token prefix: a request whose neighbours were seen recently, in
  the same order, skips their prefill. Keys are the tokens themselves (document ids and
  memory versions only say which tokens they were), so a memory reload can never serve
  a stale document: a changed document has other tokens and another key, and the entries
  it leaves behind age out.

Prefill runs segment by segment, one prompt at a time, so a segment's KV is computed the
same way whether its prefix came from the cache or not: a hit gives exactly the logits of
a miss.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.decoder import CM3Decoder
from model.tokens import BREAK_ID

log = logging.getLogger(__name__)

ROOT_KEY = b"racm3-prefix"


def split_segments(tokens: Sequence[int]) -> list[list[int]]:
    """[doc, <break>]* rest -> [[doc, <break>], ..., rest] (rest may be empty)."""
    segments: list[list[int]] = [[]]
    for t in tokens:
        segments[-1].append(int(t))
        if t == BREAK_ID:
            segments.append([])
    if not segments[-1]:
        segments.pop()
    return segments


def segment_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of `tokens` after the prefix whose key is `parent`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(frozen=True)
class SegmentKV:
    """One segment's keys and values, and the state after its last token."""

    k: tuple[Tensor, ...]  # per layer (nh, S, hs), at RoPE positions [end - S, end)
    v: tuple[Tensor, ...]
    logits: Tensor  # (V,) next-token logits after the segment
    end: int  # prompt length up to the end of this segment (the next RoPE position)
    code_run: int  # image codes in a row at the end (image-grid positions continue it)

    @property
    def length(self) -> int:
        return self.k[0].size(1)

    @property
    def nbytes(self) -> int:
        kv = sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
        return kv + self.logits.numel() * self.logits.element_size()


@dataclass
class PrefixCacheStats:
    hits: int = 0  # segments whose KV came from the cache
    misses: int = 0  # segments that had to be prefilled
    hit_tokens: int = 0
    miss_tokens: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    max_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class PrefixCache:
    """Segment KV by prefix key, least recently used first out, at most `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, SegmentKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the engine thread writes, a metrics scrape reads
        self._stats = PrefixCacheStats(max_bytes=max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            s = self._stats
            return PrefixCacheStats(s.hits, s.misses, s.hit_tokens, s.miss_tokens, s.evictions,
                                    self._bytes, len(self._entries), self.max_bytes)

    def longest_prefix(self, keys: Sequence[bytes]) -> list[SegmentKV]:
        """The cached segments for the longest run of `keys` from the start."""
        found: list[SegmentKV] = []
        with self._lock:
            for key in keys:
                node = self._entries.get(key)
                if node is None:
                    break
                self._entries.move_to_end(key)
                found.append(node)
        return found

    def record(self, hits: Sequence[SegmentKV], misses: Sequence[SegmentKV]) -> None:
        with self._lock:
            s = self._stats
            s.hits += len(hits)
            s.misses += len(misses)
            s.hit_tokens += sum(n.length for n in hits)
            s.miss_tokens += sum(n.length for n in misses)

    def put(self, key: bytes, node: SegmentKV) -> None:
        size = node.nbytes
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = node
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._stats.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


@torch.inference_mode()
def prefill_prompt(model: CM3Decoder, tokens: Sequence[int],
                   cache: PrefixCache | None = None) -> list[SegmentKV]:
    """The prompt's segments' KV: from `cache` for its longest cached prefix, the rest
    prefilled one segment at a time (and added to `cache`)."""
    if not tokens:
        raise ValueError("an empty prompt has nothing to prefill")
    segments = split_segments(tokens)
    keys, key = [], ROOT_KEY
    for seg in segments:
        key = segment_key(key, seg)
        keys.append(key)
    nodes = cache.longest_prefix(keys) if cache is not None else []
    hits = len(nodes)
    if hits < len(segments):
        kv = model.new_cache(1, len(tokens))
        if nodes:
            write_segments(kv.k, kv.v, 0, nodes, offset=0)
            start = nodes[-1].end
            kv.key_mask[:, :start] = True
            kv.length = start
            kv.next_pos.fill_(start)
            kv.code_run.fill_(nodes[-1].code_run)
        device = model.wte.weight.device
        for seg, key in zip(segments[hits:], keys[hits:], strict=True):
            a = kv.length
            logits, _ = model(torch.tensor([seg], device=device), kv_cache=kv, last_only=True)
            b = kv.length
            node = SegmentKV(
                tuple(k[0, :, a:b].clone() for k in kv.k),
                tuple(v[0, :, a:b].clone() for v in kv.v),
                logits[0, -1].clone(),
                b,
                int(kv.code_run[0]),
            )
            nodes.append(node)
            if cache is not None:
                cache.put(key, node)
    if cache is not None:
        cache.record(nodes[:hits], nodes[hits:])
    return nodes


def write_segments(k: Sequence[Tensor], v: Sequence[Tensor], rows: slice | int,
                   nodes: Sequence[SegmentKV], offset: int) -> None:
    """Copy a prompt's segments into `rows` of per-layer (B, nh, T, hs) k and v, the
    prompt's first token at slot `offset`."""
    start = 0
    for node in nodes:
        a, b = offset + start, offset + node.end
        for layer in range(len(k)):
            k[layer][rows, :, a:b] = node.k[layer]
            v[layer][rows, :, a:b] = node.v[layer]
        start = node.end
