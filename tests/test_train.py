"""Training the demo model: deterministic resume after an interruption, fine-tuning history, the loss weighting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cq.errors import ConfigError
from cq.models.train import TrainConfig, train, x0_loss_weights


pytest.importorskip("sklearn")

TINY = {"steps": 4, "batch_size": 2, "save_every": 2, "warmup": 1}


def _weights(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The state file carries the data and the dropout RNG states; kill after the step-2 save and
    re-run: bit-identical to an uninterrupted run (the demo preset has dropout 0.1)."""
    config = TrainConfig(**TINY)
    whole, _ = _weights(train(config, tmp_path / "whole.safetensors", progress=False))

    import cq.models.train as module

    real = module.atomic_torch_save
    calls = []

    def save_then_die(obj, path):
        real(obj, path)
        calls.append(obj["step"])
        if obj["step"] == 2:
            raise KeyboardInterrupt  # the process dies right after the checkpoint

    monkeypatch.setattr(module, "atomic_torch_save", save_then_die)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(config, out, progress=False)
    assert calls == [2] and not out.exists()
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    monkeypatch.setattr(module, "atomic_torch_save", real)
    resumed, _ = _weights(train(config, out, progress=False))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_fine_tuning_starts_from_init_and_keeps_the_history(tmp_path):
    first = train(TrainConfig(**TINY), tmp_path / "a.safetensors", progress=False)
    second = train(
        TrainConfig(**TINY, init=str(first), x0_weight_cap=100.0, lr=1e-4), tmp_path / "b.safetensors", progress=False
    )
    _, meta = _weights(second)
    history = json.loads(meta["cq_train_history"])
    assert len(history) == 1 and history[0]["steps"] == 4 and "init" in json.loads(meta["cq_train_config"])
    with pytest.raises(ConfigError, match="init"):
        TrainConfig(init=str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    from cq.errors import CheckpointKeyMismatchError

    save_file({"not.a.key": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointKeyMismatchError, match="not.a.key"):
        train(TrainConfig(**TINY, init=str(tmp_path / "other.safetensors")), tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
    with pytest.raises(ConfigError, match="x0_weight_cap"):
        TrainConfig(x0_weight_cap=0.5)


def test_the_x0_weighting_emphasises_the_noisiest_steps():
    """The per-timestep weight is clamp((1 - abar) / abar, 1, cap) with mean 1: flat for cap 1 (the plain eps
    loss), increasing in t otherwise, and at t = T - 1 ``cap`` times the weight at t = 0."""
    from cq.models.presets import get_preset

    abar = get_preset("demo").noise.alphas_cumprod().float()
    assert torch.equal(x0_loss_weights(abar, 1.0), torch.ones_like(abar))
    for cap in (10.0, 100.0):
        w = x0_loss_weights(abar, cap)
        assert abs(float(w.mean()) - 1) < 1e-5 and bool((w[1:] >= w[:-1]).all())
        assert float(w[-1] / w[0]) == pytest.approx(cap)
        snr = abar / (1 - abar)
        assert bool((w[snr > 1] == w[0]).all())  # steps with SNR > 1 keep the plain loss
