"""The memory library: build, store, load and search a memory of image-text documents.

- build: `sources` (folders, JSONL/CSV/Parquet, webdataset shards) -> `build` (CLIP
  embeddings, BPE + VQ tokens) -> `store` (Arrow), `faiss_index`, `lexical_index` (BM25),
  `manifest`, and `publish` (versions switched atomically);
- load: `memory` (verified, memory-mapped, swapped atomically on reload);
- search: `search` (the paper's rules: relevance, modality, diversity; dense or hybrid).

It imports `model` only for CLIP, the tokenizer and the VQ model (`from_bundle`).
"""
