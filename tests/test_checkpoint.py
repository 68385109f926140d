"""Checkpoints: safetensors + JSON round trips, tied weights, fp16 storage, no pickle."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from torch import nn

from model.checkpoint import load_metadata, load_module, load_state, save_checkpoint

torch.set_num_threads(2)


@dataclass
class TinyConfig:
    vocab_size: int = 50
    n_embd: int = 16
    grid: tuple[int, int] = (2, 3)  # JSON turns tuples into lists; loading must undo that


class Tiny(nn.Module):
    """Token embedding tied to the LM head, as in the decoder."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.register_buffer("step", torch.tensor(12345, dtype=torch.long))
        self.register_buffer("empty_a", torch.zeros(0))
        self.register_buffer("empty_b", torch.zeros(0))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.wte(idx)))


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny(TinyConfig())
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)  # not the init value, so loading must matter
    return model


IDX = torch.arange(10).view(2, 5)


def test_round_trip_fp32(tmp_path) -> None:
    model = _tiny()
    meta_path = save_checkpoint(model, model.config, tmp_path, "tiny", metadata={"step": 7})
    assert meta_path == tmp_path / "tiny.json"
    assert (tmp_path / "tiny.safetensors").is_file()
    assert not list(tmp_path.glob("*.tmp"))

    loaded = load_module(Tiny, TinyConfig, tmp_path, "tiny")
    assert loaded.config == model.config and isinstance(loaded.config.grid, tuple)
    assert not loaded.training
    assert loaded.head.weight is loaded.wte.weight  # still tied after loading
    assert loaded.step.item() == 12345
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(IDX), model.eval()(IDX))


def test_tied_weight_is_stored_once(tmp_path) -> None:
    model = _tiny()
    save_checkpoint(model, model.config, tmp_path, "tiny")
    with safe_open(str(tmp_path / "tiny.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert len(stored) == len(model.state_dict()) - 1
    meta = load_metadata(tmp_path, "tiny")
    assert meta["tied"] == {"head.weight": "wte.weight"}
    assert meta["class"].endswith("Tiny") and meta["config"]["grid"] == [2, 3]

    state, config = load_state(tmp_path, "tiny")
    assert state["head.weight"] is state["wte.weight"]
    assert set(state) == set(model.state_dict())
    assert config == {"vocab_size": 50, "n_embd": 16, "grid": [2, 3]}


def test_fp16_storage_loads_back_to_fp32(tmp_path) -> None:
    model = _tiny()
    save_checkpoint(model, model.config, tmp_path, "full")
    save_checkpoint(model, model.config, tmp_path, "half", dtype=torch.float16)
    full = (tmp_path / "full.safetensors").stat().st_size
    half = (tmp_path / "half.safetensors").stat().st_size
    assert half < 0.6 * full

    state, _ = load_state(tmp_path, "half")
    assert state["wte.weight"].dtype == torch.float16
    assert state["step"].dtype == torch.long  # only floating tensors change type
    assert load_metadata(tmp_path, "half")["storage_dtype"] == "float16"

    loaded = load_module(Tiny, TinyConfig, tmp_path, "half")
    assert loaded.wte.weight.dtype == torch.float32
    assert loaded.step.item() == 12345
    expected = model.wte.weight.detach().half().float()
    assert torch.equal(loaded.wte.weight.detach(), expected)
    assert not torch.equal(loaded.wte.weight.detach(), model.wte.weight.detach())


def test_dict_config_and_shared_views(tmp_path) -> None:
    # a buffer that views part of a parameter shares its storage without being a tie
    model = _tiny()
    model.register_buffer("first_rows", model.wte.weight.detach()[1:3])
    save_checkpoint(model, {"note": "dict configs work too"}, tmp_path, "views")
    state, config = load_state(tmp_path, "views")
    assert config == {"note": "dict configs work too"}
    assert torch.equal(state["first_rows"], model.wte.weight.detach()[1:3])
    assert state["first_rows"] is not state["wte.weight"]


def _forbid_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    model = _tiny()
    save_checkpoint(model, model.config, tmp_path, "tiny", dtype=torch.float16)
    _forbid_unpickling(monkeypatch)
    loaded = load_module(Tiny, TinyConfig, tmp_path, "tiny")
    assert loaded.step.item() == 12345


_UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    _UNPICKLED.append("ran")
    return "payload"


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickle_files_are_refused(tmp_path) -> None:
    model = _tiny()
    save_checkpoint(model, model.config, tmp_path, "tiny")
    # a .bin beside the JSON is never a fallback
    (tmp_path / "tiny.safetensors").rename(tmp_path / "tiny.bin")
    torch.save(model.state_dict(), tmp_path / "tiny.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_state(tmp_path, "tiny")
    # a pickle under the .safetensors name is refused without running its code
    (tmp_path / "tiny.safetensors").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ValueError):
        load_state(tmp_path, "tiny", verify=False)
    with pytest.raises(ValueError, match="checksum"):
        load_state(tmp_path, "tiny")
    assert _UNPICKLED == []


def test_corruption_and_missing_files_are_clear(tmp_path) -> None:
    model = _tiny()
    save_checkpoint(model, model.config, tmp_path, "tiny")
    weights = tmp_path / "tiny.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip bits inside the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_state(tmp_path, "tiny")

    with pytest.raises(FileNotFoundError):
        load_state(tmp_path, "absent")
    (tmp_path / "other.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match="racm3-checkpoint"):
        load_state(tmp_path, "other")


def test_strict_loading_catches_architecture_mismatch(tmp_path) -> None:
    model = _tiny()
    save_checkpoint(model, {"vocab_size": 50, "n_embd": 8, "grid": [2, 3]}, tmp_path, "wrong")
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_module(Tiny, TinyConfig, tmp_path, "wrong")


def test_unknown_config_keys_are_refused_with_their_names(tmp_path) -> None:
    model = _tiny()
    save_checkpoint(model, {"vocab_size": 50, "n_embd": 16, "grid": [2, 3], "n_expert": 4},
                    tmp_path, "newer")
    with pytest.raises(ValueError, match=r"unknown TinyConfig fields \['n_expert'\]"):
        load_module(Tiny, TinyConfig, tmp_path, "newer")


def test_decoder_and_vq_configs_refuse_unknown_keys_alike() -> None:
    from model.decoder import DecoderConfig
    from model.vq import VQConfig

    decoder = DecoderConfig.preset("demo")
    assert DecoderConfig.from_dict(decoder.to_dict()) == decoder
    for cls, saved in ((DecoderConfig, decoder.to_dict()), (VQConfig, VQConfig().to_dict())):
        with pytest.raises(ValueError, match=rf"unknown {cls.__name__} fields \['typo'\]"):
            cls.from_dict({**saved, "typo": 1})
