"""Generator training: the paper's batch rules, resume, and DDP equivalence."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from model.decoder import DecoderConfig
from model.tokens import (
    BREAK_ID,
    EOS_ID,
    IMG_CLOSE_ID,
    IMG_OPEN_ID,
    MASK_IDS,
    SRC_ID,
    TokenSpace,
)
from training.train_generator import (
    GeneratorTrainConfig,
    TrainingCorpus,
    build_batch,
    lr_at,
    make_example,
    step_k,
    train_generator,
)

SPACE = TokenSpace(text_vocab_size=40, codebook_size=16, image_grid=(2, 2))


def _doc(rng: np.random.Generator) -> list[int]:
    text = SPACE.text_to_ids(rng.integers(0, 40, size=int(rng.integers(2, 6))).tolist())
    codes = SPACE.codes_to_ids(rng.integers(0, 16, size=4))
    return [IMG_OPEN_ID, *text, SRC_ID, *codes, IMG_CLOSE_ID]


def _corpus(n_main: int = 32, n_memory: int = 40, seed: int = 0) -> TrainingCorpus:
    rng = np.random.default_rng(seed)
    main = [_doc(rng) for _ in range(n_main)]
    memory = [_doc(rng) for _ in range(n_memory)]
    table = rng.integers(0, n_memory, size=(n_main, 2, 2))
    table[0, 1, 1] = -1  # a query that found only one neighbour
    return TrainingCorpus(main, memory, table, SPACE.image_grid)


def _tiny_model() -> DecoderConfig:
    return DecoderConfig(vocab_size=SPACE.padded_vocab_size, n_layer=2, n_head=2, n_embd=32,
                         block_size=128)


def test_examples_follow_the_paper_rules():
    corpus = _corpus()
    cfg = GeneratorTrainConfig(alpha=0.1, mask_prob=0.5)
    ks = set()
    for i in range(200):
        rng = np.random.default_rng([1, i])
        doc = i % len(corpus.main_docs)
        ex = make_example(corpus, doc, rng, cfg)
        ks.add(ex.k)
        assert ex.k in (0, 1, 2)
        assert ex.ids.count(BREAK_ID) == ex.k
        assert ex.ids[-1] == EOS_ID
        # neighbours come from the table, never the document itself
        assert set(ex.neighbour_ids) <= set(int(n) for n in corpus.neighbours[doc].ravel())
        w = np.asarray(ex.weights)
        ids = np.asarray(ex.ids)
        retrieved = np.arange(len(ids)) < ex.main_start
        assert np.allclose(w[retrieved], 0.1)
        sentinels = np.isin(ids, MASK_IDS)
        assert np.all(w[sentinels] == 0)
        assert np.all(w[~retrieved & ~sentinels] == 1.0)
    assert ks == {0, 1, 2}


def test_baseline_never_retrieves():
    corpus = _corpus()
    cfg = GeneratorTrainConfig(max_k=0)
    for i in range(50):
        ex = make_example(corpus, i % 32, np.random.default_rng(i), cfg)
        assert ex.k == 0 and BREAK_ID not in ex.ids


def test_batches_depend_only_on_seed_and_step():
    corpus = _corpus()
    cfg = GeneratorTrainConfig(batch_size=6, seed=3)
    a = build_batch(corpus, 5, cfg, 128)
    b = build_batch(corpus, 5, cfg, 128)
    c = build_batch(corpus, 6, cfg, 128)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) or a[0].shape != c[0].shape
    # two ranks' shards together hold exactly the single-process batch's rows
    r0 = build_batch(corpus, 5, cfg, 128, rank=0, world_size=2)[0]
    r1 = build_batch(corpus, 5, cfg, 128, rank=1, world_size=2)[0]
    rows = {tuple(r[r != 0].tolist()) for r in a[0]}
    assert rows == {tuple(r[r != 0].tolist()) for r in [*r0, *r1]}


def test_one_k_per_batch_keeps_the_k_distribution_and_pads_less():
    corpus = _corpus()
    shared = GeneratorTrainConfig(batch_size=8, mask_prob=0.0)
    own = GeneratorTrainConfig(batch_size=8, mask_prob=0.0, k_per_batch=False)
    ks = [step_k(s, shared) for s in range(600)]
    # uniform over {0, 1, 2}: each about a third of the steps
    assert set(ks) == {0, 1, 2}
    assert all(abs(ks.count(k) / len(ks) - 1 / 3) < 0.06 for k in (0, 1, 2))
    pads = {"shared": 0, "own": 0}
    for step in range(60):
        idx, _, _ = build_batch(corpus, step, shared, 128)
        breaks = (idx == BREAK_ID).sum(1)
        # every sequence of the batch holds the step's K neighbours (fewer only where
        # the table found fewer: document 0's image query has one)
        assert int(breaks.max()) == step_k(step, shared) or step_k(step, shared) == 2
        assert int(breaks.max() - breaks.min()) <= 1
        pads["shared"] += int((idx == 0).sum())
        pads["own"] += int((build_batch(corpus, step, own, 128)[0] == 0).sum())
    assert pads["shared"] < 0.6 * pads["own"]
    with pytest.raises(ValueError, match="max_k"):
        make_example(corpus, 0, np.random.default_rng(0), GeneratorTrainConfig(max_k=0), k=1)


def test_lr_schedule_warms_up_then_decays():
    cfg = GeneratorTrainConfig(steps=100, lr=1e-3, warmup_frac=0.1, min_lr_frac=0.1)
    assert lr_at(0, cfg) < lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=0.05)


def test_loss_goes_down_and_resume_matches_an_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    corpus = _corpus()
    cfg = GeneratorTrainConfig(steps=30, batch_size=8, lr=3e-3, ckpt_every=10, log_every=5)
    full = train_generator(corpus, _tiny_model(), cfg, tmp_path / "a", progress=False)
    losses = [h["loss"] for h in full.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])

    train_generator(corpus, _tiny_model(), cfg, tmp_path / "b", progress=False, stop_at=20)
    resumed = train_generator(corpus, _tiny_model(), cfg, tmp_path / "b", progress=False)
    assert resumed.history[0]["step"] == 21  # picked up after the last checkpoint
    assert (tmp_path / "b" / "generator.log.jsonl").is_file()
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = GeneratorTrainConfig(steps=1, batch_size=8, ckpt_every=1000)
    result = train_generator(_corpus(), _tiny_model(), cfg, out_dir, progress=False)
    queue.put((rank, result.history[0]["loss"]))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process_first_step_loss(tmp_path):
    torch.set_num_threads(1)
    cfg = GeneratorTrainConfig(steps=1, batch_size=8, ckpt_every=1000)
    single = train_generator(_corpus(), _tiny_model(), cfg, tmp_path / "one", progress=False)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path / "ddp"), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    losses = dict(queue.get() for _ in range(2))
    assert losses[0] == pytest.approx(single.history[0]["loss"], rel=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_sample_weights_set_the_share_of_each_kind_of_document():
    from dataclasses import replace

    from training.pipeline import entity_weights
    from training.train_generator import global_batch_indices

    kinds = ["object"] * 24 + ["entity"] * 8  # 25% entities in the data
    corpus = replace(_corpus(), sample_weights=entity_weights(kinds, 0.5))
    cfg = GeneratorTrainConfig(batch_size=64)
    drawn = np.concatenate([global_batch_indices(32, s, cfg, corpus.sample_weights)
                            for s in range(100)])
    assert abs((drawn >= 24).mean() - 0.5) < 0.03  # half the draws are entity documents
    # a function of (seed, step) alone, like the uniform draw
    assert (global_batch_indices(32, 7, cfg, corpus.sample_weights)
            == global_batch_indices(32, 7, cfg, corpus.sample_weights)).all()
    with pytest.raises(ValueError, match="sample_weights"):
        replace(corpus, sample_weights=np.zeros(32))
    with pytest.raises(ValueError, match="gen_entity_frac"):
        entity_weights(kinds, 1.0)
