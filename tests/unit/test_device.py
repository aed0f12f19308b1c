"""``device: auto | cpu | cuda`` (issue 19.2): configuration, and where training puts the
network, the batches and the noise generators. No GPU here: the CUDA side is checked by
patching ``site_agent.device.cuda_available`` and by the "meta" device, which has tensors
but no values, so a batch's device can be observed without computing on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from common.dp import noise
from common.errors import InvalidSpecError
from common.specs import MLPSpec, OptimizerSpec
from common.training.models import build_model
from site_agent import device as device_mod
from site_agent import trainer
from site_agent.config import load_site_config

BASE: dict[str, Any] = {
    "site_id": "bank-a",
    "orchestrator": "127.0.0.1:50051",
    "state_dir": "state",
    "insecure": True,
    "datasets": [{"name": "credit", "path": "credit.csv", "label": "default"}],
    "policy": {"max_epsilon": 10.0, "delta": 1e-5, "min_noise_multiplier": 0.5},
}


def _load(tmp_path: Path, **extra: Any) -> Any:
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({**BASE, **extra}))
    return load_site_config(tmp_path / "site.yaml")


def test_default_is_auto_and_cpu_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_mod, "cuda_available", lambda: False)
    cfg = _load(tmp_path)
    assert cfg.device == "auto"
    assert device_mod.resolve(cfg.device) == torch.device("cpu")
    assert device_mod.resolve("cpu") == torch.device("cpu")


def test_auto_picks_cuda_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "cuda_available", lambda: True)
    assert device_mod.resolve("auto") == torch.device("cuda")
    assert device_mod.resolve("cuda") == torch.device("cuda")
    assert device_mod.resolve("cpu") == torch.device("cpu")


def test_cuda_without_cuda_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_mod, "cuda_available", lambda: False)
    with pytest.raises(InvalidSpecError, match=r"device: cuda, but PyTorch sees no CUDA device"):
        _load(tmp_path, device="cuda")
    with pytest.raises(InvalidSpecError, match="device"):
        _load(tmp_path, device="tpu")


def test_private_generator_on_the_requested_device() -> None:
    g = noise.private_torch_generator(torch.device("cpu"))
    assert g.device.type == "cpu"
    drawn = noise.gaussian_torch(1.0, (4,), generator=g, device="cpu")
    assert drawn.device.type == "cpu" and drawn.dtype == torch.float32
    # Noise is never drawn on one device by a generator of another.
    with pytest.raises(ValueError, match="private generator is on cpu"):
        noise.gaussian_torch(1.0, (4,), generator=g, device="meta")
    # Zero noise and the CSPRNG land on the requested device too.
    assert noise.gaussian_torch(0.0, (2,), generator=g, device="meta").device.type == "meta"
    with noise.secure_noise(True):
        assert noise.gaussian_torch(1.0, (2,), generator=None, device="meta").device.type == "meta"


def test_batches_move_to_the_training_device() -> None:
    x, y = torch.zeros(10, 3), torch.zeros(10, dtype=torch.int64)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    batches = list(trainer.poisson_batches(loader, 3, torch.device("meta")))
    assert len(batches) == 3
    assert all(xb.device.type == "meta" and yb.device.type == "meta" for xb, yb in batches)
    cpu = list(trainer.poisson_batches(loader, 1, torch.device("cpu")))
    assert cpu[0][0].device.type == "cpu"


def test_training_draws_its_noise_on_the_training_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every noise generator is created on the device the network trains on; the sampling
    generator stays on the CPU with the rows; the delta comes back on the CPU."""
    asked: list[torch.device | str] = []

    def spy(device: torch.device | str = "cpu") -> torch.Generator:
        asked.append(device)
        return noise.private_torch_generator(device)

    monkeypatch.setattr(trainer, "_private_generator", spy)
    spec = MLPSpec(kind="mlp", input_dim=4, num_classes=2, hidden=(8,))
    rng = np.random.default_rng(0)
    result = trainer.train_local(
        model_spec=spec,
        global_state=build_model(spec, seed=0).state_dict(),
        features=rng.normal(size=(50, 4)).astype(np.float32),
        labels=rng.integers(0, 2, 50),
        params=trainer.TrainParams(
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            batch_size=10,
            local_epochs=None,
            local_steps=2,
            optimizer=OptimizerSpec(lr=0.1),
            device="cpu",
        ),
    )
    assert asked[0] == "cpu"  # the Poisson sampler, beside the rows
    assert asked[1:] == [torch.device("cpu")]  # the noise, on the training device
    assert all(v.device.type == "cpu" for v in result.delta.values())
