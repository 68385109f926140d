"""The CLIP wrapper on the real open_clip demo model (random init; nothing downloaded)."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors import safe_open

from model.clip import DEMO_MODEL, ClipEncoder, register_model_configs, sidecar_path

CAPTIONS = ["a big blue square on the left", "a small red circle", "the flag of Veloria"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These batches are tiny: on a shared 2-core machine a second OpenMP thread only adds
    barrier waits (seconds per call under load), never speed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    torch.manual_seed(0)
    return ClipEncoder.create(DEMO_MODEL)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)


def test_demo_config_is_registered_and_small(encoder):
    cfg = open_clip.get_model_config(DEMO_MODEL)
    assert DEMO_MODEL in open_clip.list_models()
    assert encoder.image_size == 32
    assert encoder.context_length == 32
    assert encoder.embed_dim == cfg["embed_dim"]
    assert sum(p.numel() for p in encoder.model.parameters()) < 10_000_000


def test_tokenizer_works_offline_and_truncates(encoder):
    tokens = encoder.tokenize(["hello world", "word " * 100])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.int64
    sot, eot = encoder.tokenizer.sot_token_id, encoder.tokenizer.eot_token_id
    assert tokens[0, 0] == sot and eot in tokens[0].tolist()
    assert tokens[1, -1] == eot  # a long caption is cut, still closed by end-of-text


def test_embeddings_are_l2_normalised_float32(encoder, images):
    text = encoder.encode_text(CAPTIONS)
    image = encoder.encode_image(images)
    for emb, n in ((text, len(CAPTIONS)), (image, len(images))):
        assert emb.dtype == np.float32 and emb.shape == (n, encoder.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(text[0], text[1])  # different inputs, different vectors
    assert encoder.encode_text([]).shape == (0, encoder.embed_dim)


def test_batching_gives_the_same_result_as_one_by_one(encoder, images):
    text_batched = encoder.encode_text(CAPTIONS, batch_size=2)
    text_single = np.concatenate([encoder.encode_text([c]) for c in CAPTIONS])
    np.testing.assert_allclose(text_batched, text_single, atol=1e-5)
    image_batched = encoder.encode_image(images, batch_size=2)
    image_single = np.concatenate([encoder.encode_image(images[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(image_batched, image_single, atol=1e-5)


def test_image_forms_agree(encoder, images):
    from_uint8 = encoder.encode_image(images)
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(encoder.encode_image(as_tensor), from_uint8, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_image(list(images)), from_uint8, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_image(list(as_tensor)), from_uint8, atol=1e-5)


def test_preprocessing_resizes_crops_and_normalises(encoder):
    mean = torch.tensor(encoder.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(encoder.preprocess_cfg["std"]).view(1, 3, 1, 1)
    # 48x80 image: red left/right margins, green centre square of 48x48.
    image = np.zeros((48, 80, 3), dtype=np.uint8)
    image[:, :, 0] = 255
    image[:, 16:64] = (0, 200, 0)
    out = encoder.preprocess_images([image, np.full((20, 20, 3), 200, dtype=np.uint8)])
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    green = (torch.tensor([0, 200, 0]).view(1, 3, 1, 1) / 255 - mean) / std
    centre = out[:1, :, 4:-4, 4:-4]
    torch.testing.assert_close(centre, green.expand(1, 3, 24, 24), atol=1e-3, rtol=0)
    grey = (torch.full((1, 3, 1, 1), 200 / 255) - mean) / std
    torch.testing.assert_close(out[1:], grey.expand(1, 3, 32, 32), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "bad",
    [
        torch.rand(2, 3, 32, 32) * 2 - 0.5,  # already normalised, not [0, 1]
        torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
        np.zeros((2, 3, 32, 32), dtype=np.uint8),  # channels-first numpy
        np.zeros((2, 32, 32, 3), dtype=np.float32),
    ],
    ids=["out-of-range", "uint8-tensor", "nchw-numpy", "float-numpy"],
)
def test_rejects_images_in_the_wrong_form(encoder, bad):
    with pytest.raises(ValueError):
        encoder.encode_image(bad)


def test_document_embedding_is_the_normalised_mean_with_fallback(encoder, images):
    captions = ["a red circle", None, "", "a blue square"]
    docs_images = [images[0], images[1], images[2], None]
    docs = encoder.embed_documents(captions, docs_images)
    text = encoder.encode_text(["a red circle", "a blue square"])
    image = encoder.encode_image(images[:3])

    both = text[0] + image[0]
    np.testing.assert_allclose(docs[0], both / np.linalg.norm(both), atol=1e-5)
    np.testing.assert_allclose(docs[1], image[1], atol=1e-5)  # image only
    np.testing.assert_allclose(docs[2], image[2], atol=1e-5)  # empty caption: image only
    np.testing.assert_allclose(docs[3], text[1], atol=1e-5)  # text only
    assert docs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)

    dense = encoder.embed_documents(["a red circle", "x", "y"], images[:3], batch_size=2)
    np.testing.assert_allclose(dense[0], docs[0], atol=1e-5)
    text_only = encoder.embed_documents(["a red circle"], None)
    np.testing.assert_allclose(text_only[0], text[0], atol=1e-5)
    with pytest.raises(ValueError, match="neither"):
        encoder.embed_documents(["ok", None], [None, None])


def test_save_and_load_round_trip_gives_identical_embeddings(encoder, images, tmp_path):
    path = encoder.save(tmp_path / "clip" / "demo.safetensors")
    assert path.is_file()
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["model_name"] == DEMO_MODEL and meta["embed_dim"] == encoder.embed_dim
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(encoder.model.state_dict())

    expected_text = encoder.encode_text(CAPTIONS)
    expected_image = encoder.encode_image(images)
    for loaded in (ClipEncoder.create(DEMO_MODEL, pretrained=path), ClipEncoder.load(path)):
        assert np.array_equal(loaded.encode_text(CAPTIONS), expected_text)
        assert np.array_equal(loaded.encode_image(images), expected_image)

    torch.manual_seed(1)
    fresh = ClipEncoder.create(DEMO_MODEL)  # a new random init really differs
    assert not np.allclose(fresh.encode_text(CAPTIONS), expected_text, atol=1e-3)


def test_foreign_checkpoints_without_sidecar_load(encoder, images, tmp_path):
    """What a user's own open_clip file looks like: a bare state dict, .safetensors or .pt."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(state, str(tmp_path / "bare.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ddp.pt")
    expected = encoder.encode_image(images)
    for name in ("bare.safetensors", "ddp.pt"):
        loaded = ClipEncoder.create(DEMO_MODEL, pretrained=tmp_path / name)
        assert np.array_equal(loaded.encode_image(images), expected)
    with pytest.raises(FileNotFoundError, match="demo.json"):
        ClipEncoder.load(tmp_path / "demo.safetensors")


def test_checkpoint_errors_are_clear(encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ClipEncoder.create(DEMO_MODEL, pretrained=tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        ClipEncoder.create(DEMO_MODEL, pretrained="openai")  # a tag, never downloaded
    with pytest.raises(ValueError, match="unknown CLIP model config"):
        ClipEncoder.create("no-such-model")
    with pytest.raises(ValueError, match="safetensors"):
        encoder.save(tmp_path / "weights.pt")

    # A checkpoint saved for another architecture is refused by its sidecar.
    other = json.loads(json.dumps(open_clip.get_model_config(DEMO_MODEL)))
    other["vision_cfg"]["layers"] = 1
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "racm3-test-other.json").write_text(json.dumps(other))
    register_model_configs(tmp_path / "cfgs")
    path = encoder.save(tmp_path / "demo.safetensors")
    with pytest.raises(ValueError, match="architecture differs"):
        ClipEncoder.create("racm3-test-other", pretrained=path)

    # A sidecar with a key this code does not know is refused, naming the key.
    meta = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**meta, "projection": "mlp"}))
    with pytest.raises(ValueError, match="unknown ClipSidecar fields \\['projection'\\]"):
        ClipEncoder.load(path)


def test_model_and_tokenize_support_a_clip_loss_train_step(images):
    torch.manual_seed(0)
    enc = ClipEncoder.create(DEMO_MODEL)
    enc.model.train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.SGD(enc.model.parameters(), lr=0.1)
    before = enc.encode_text(CAPTIONS)
    assert enc.model.training  # encoding does not leave train mode switched off

    image_features, text_features, logit_scale = enc.model(
        enc.preprocess_images(images[:3]), enc.tokenize(CAPTIONS)
    )
    loss = loss_fn(image_features, text_features, logit_scale)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not np.allclose(enc.encode_text(CAPTIONS), before, atol=1e-4)
