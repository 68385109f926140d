"""VQ image tokenizer: shapes, straight-through gradients, training, dead codes, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import load_metadata
from model.vq import EMAQuantizer, VQConfig, VQModel
from training.train_vq import train_vq

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


PALETTE = np.array([
    [220, 40, 40], [40, 170, 60], [40, 80, 220], [240, 210, 40], [150, 60, 190],
    [250, 140, 30], [40, 200, 210], [245, 245, 245], [30, 30, 30], [130, 130, 130],
], dtype=np.float32) / 255.0


def render_shapes(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """1-2 squares/circles/triangles in palette colours on a plain background, (n, 3, H, W)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = np.empty((n, size, size, 3), np.float32)
    for img in out:
        bg = rng.integers(len(PALETTE))
        img[:] = PALETTE[bg]
        for _ in range(rng.integers(1, 3)):
            colour = PALETTE[(bg + rng.integers(1, len(PALETTE))) % len(PALETTE)]
            r = rng.uniform(size / 10, size / 4)
            cx, cy = rng.uniform(r, size - r, 2)
            kind = rng.integers(3)
            if kind == 0:
                mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
            elif kind == 1:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            else:
                mask = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - cy + r) / 2)
            img[mask] = colour
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# A narrow demo-shaped model (same 32x32 -> 8x8 layout) keeps training tests to seconds
# on a shared 2-core machine; the demo preset itself is exercised by the shape tests.
def small_config(**overrides) -> VQConfig:
    return VQConfig.preset("demo", channels=16, codebook_size=64, **overrides)


def test_demo_preset_shapes_and_code_range():
    torch.manual_seed(0)
    model = VQModel(VQConfig.preset("demo")).eval()
    assert model.grid == (8, 8) and model.config.codebook_size == 512
    images = torch.rand(5, 3, 32, 32)

    codes = model.encode(images)
    assert codes.shape == (5, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 512

    decoded = model.decode(codes)
    assert decoded.shape == (5, 3, 32, 32) and decoded.dtype == torch.float32
    assert 0.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0

    out = model(images)
    assert out.recon.shape == images.shape and out.codes.shape == (5, 8, 8)
    assert torch.equal(out.codes, codes)  # forward and encode agree
    assert out.loss.ndim == 0 and torch.isclose(out.loss, out.recon_loss + out.commit_loss)
    assert 1.0 <= float(out.perplexity) <= 512 and 0.0 < float(out.usage) <= 1.0


def test_large_preset_shapes():
    cfg = VQConfig.preset("large")
    assert cfg.image_size == 256 and cfg.grid == (32, 32) and cfg.codebook_size == 8192
    assert VQModel(cfg).num_params() > 10_000_000  # built at full width (no forward: too slow)

    # The same layout at a sixteenth of the width really runs: 1024 codes out of 8192.
    # (Not on the meta device: its first forward spends ~15 s loading meta kernels.)
    narrow = VQModel(VQConfig.preset("large", channels=8)).eval()
    codes = narrow.encode(torch.rand(1, 3, 256, 256))
    assert codes.shape == (1, 32, 32) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 8192
    assert narrow.decode(codes).shape == (1, 3, 256, 256)


def test_gradients_reach_encoder_through_straight_through():
    torch.manual_seed(0)
    model = VQModel(small_config()).train()
    out = model(render_shapes(8))
    out.recon_loss.backward()  # the reconstruction depends on the encoder only via z_q
    first_conv = model.encoder.net[0].weight
    assert first_conv.grad is not None and float(first_conv.grad.abs().sum()) > 0
    assert not model.quantizer.embed.requires_grad  # the codebook learns by EMA only


def test_short_training_lowers_reconstruction_loss():
    torch.manual_seed(0)
    pool = render_shapes(512, seed=1)
    held_out = render_shapes(64, seed=2)
    model = VQModel(small_config())
    before = float(((model.decode(model.encode(held_out)) - held_out) ** 2).mean())

    gen = torch.Generator().manual_seed(0)
    history = train_vq(model, lambda: pool[torch.randint(len(pool), (32,), generator=gen)],
                       steps=60, lr=3e-3, log_every=10, progress=False)

    after = float(((model.decode(model.encode(held_out)) - held_out) ** 2).mean())
    assert history["step"] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    # measured: 0.135 over the first 10 steps -> 0.066 over the last 10
    assert history["recon_loss"][-1] < 0.6 * history["recon_loss"][0]
    assert after < 0.6 * before
    assert history["usage"][-1] > 0.5  # most of the codebook is in use


def test_training_stops_when_a_one_shot_iterator_runs_out():
    torch.manual_seed(0)
    model = VQModel(small_config())
    pool = render_shapes(16, seed=5)
    history = train_vq(model, (pool[i : i + 8] for i in (0, 8)), steps=5, log_every=4,
                       progress=False)
    assert history["step"] == [2.0]  # the partial window is still logged
    with pytest.raises(TypeError, match="single tensor"):
        train_vq(model, pool, steps=1, progress=False)


def test_dead_codes_are_restarted_from_batch_outputs():
    torch.manual_seed(0)
    q = EMAQuantizer(16, 4, cosine=True, restart_after=3).train()
    # data near +e0; codes 0-3 also near +e0, codes 4-15 at -e0 so no input picks them
    data = torch.nn.functional.normalize(torch.randn(2, 4, 4, 4) * 0.1 + torch.tensor(
        [1.0, 0, 0, 0]).view(1, 4, 1, 1), dim=1)
    embed = torch.zeros(16, 4)
    embed[:4] = torch.nn.functional.normalize(torch.eye(4)[0] + 0.1 * torch.randn(4, 4), dim=1)
    embed[4:, 0] = -1.0
    q.embed.copy_(embed)
    q.embed_sum.copy_(embed)
    q.initialised.fill_(True)
    before = q.embed.clone()

    for _ in range(2):
        assert int(q(data).codes.max()) < 4
    assert torch.allclose(q.embed[4:], before[4:])  # unused, but not yet for long enough
    q(data)  # third step without use: restart

    batch_vectors = data.permute(0, 2, 3, 1).reshape(-1, 4)
    restarted = q.embed[4:]
    assert not torch.allclose(restarted, before[4:])
    # every restarted code is one of this batch's encoder outputs
    gaps = (restarted[:, None] - batch_vectors[None]).abs().amax(dim=-1).min(dim=1).values
    assert float(gaps.max()) < 1e-6
    assert int(q.steps_unused[4:].max()) == 0
    assert q.num_restarts == 12


def test_encode_is_batch_invariant_and_leaves_codebook_alone():
    torch.manual_seed(0)
    model = VQModel(small_config()).train()
    images = render_shapes(10, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    codes = model.encode(images)
    assert torch.equal(codes, model.encode(images, batch_size=3))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.encode(images[:0]).shape == (0, 8, 8)


def test_invalid_inputs_raise():
    model = VQModel(small_config()).eval()
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="float"):
        model.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out of range"):
        model.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="expected codes"):
        model.decode(torch.zeros(1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown VQ preset"):
        VQConfig.preset("huge")


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    pool = render_shapes(64, seed=4)
    model = VQModel(small_config())
    train_vq(model, [pool[:32], pool[32:]], steps=4, log_every=2, progress=False)
    model.eval()

    weights = model.save(tmp_path)
    assert weights == tmp_path / "vq.safetensors"
    meta = load_metadata(tmp_path, "vq")  # the common checkpoint format
    assert meta["class"] == "model.vq.VQModel"
    assert VQConfig.from_dict(meta["config"]) == model.config
    loaded = VQModel.load(tmp_path)
    assert not loaded.training
    assert torch.equal(loaded.encode(pool), model.encode(pool))
    codes = model.encode(pool)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    for key, value in model.state_dict().items():  # EMA state survives for resumed training
        assert torch.equal(loaded.state_dict()[key], value), key

    # fp16 checkpoint: the loaded model is exactly the fp16-rounded model
    model.save(tmp_path, name="vq16", dtype=torch.float16)
    assert (tmp_path / "vq16.safetensors").stat().st_size < weights.stat().st_size
    with safe_open(str(tmp_path / "vq16.safetensors"), "pt") as f:
        assert f.get_tensor("encoder.net.0.weight").dtype == torch.float16
        assert f.get_tensor("quantizer.embed_sum").dtype == torch.float32
    rounded = VQModel(model.config)
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
        rounded.quantizer.embed.copy_(rounded.quantizer.embed.half().float())
    half = VQModel.load(tmp_path, name="vq16")
    assert torch.equal(half.encode(pool), rounded.eval().encode(pool))

    with pytest.raises(FileNotFoundError):
        VQModel.load(tmp_path, name="missing")


def test_a_checkpoint_with_the_bare_config_still_loads_and_unknown_keys_are_refused(tmp_path):
    """Bundles trained before the VQ used the common format keep loading."""
    torch.manual_seed(0)
    model = VQModel(small_config()).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text(json.dumps(model.config.to_dict()))
    loaded = VQModel.load(tmp_path, name="old")
    pool = render_shapes(8, seed=1)
    assert torch.equal(loaded.encode(pool), model.encode(pool))

    model.save(tmp_path, name="new")
    meta = json.loads((tmp_path / "new.json").read_text())
    meta["config"]["attention"] = True
    (tmp_path / "new.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown VQConfig fields \\['attention'\\]"):
        VQModel.load(tmp_path, name="new")


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(rank)  # different data and different restart draws per rank
    q = EMAQuantizer(32, 8, restart_after=2).train()
    for _ in range(6):
        q(torch.randn(4, 8, 4, 4) + rank)
    torch.save(q.embed, f"{out_dir}/embed{rank}.pt")
    dist.destroy_process_group()


def test_codebook_stays_identical_across_ddp_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    e0, e1 = (torch.load(tmp_path / f"embed{r}.pt") for r in (0, 1))
    assert torch.equal(e0, e1)
