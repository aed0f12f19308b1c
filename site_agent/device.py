"""Where a site trains: ``device: auto | cpu | cuda`` in ``site.yaml`` (issue 19.2).

* ``auto`` (the default): the first CUDA device when PyTorch sees one, else the CPU: a site
  without a GPU behaves exactly as before.
* ``cpu``: always the CPU.
* ``cuda``: the first CUDA device; a machine without one is a configuration error at load
  time (:func:`check_available`), never a silent fall-back to the CPU.

Only where the arithmetic runs changes. Clipping (:mod:`site_agent.clipping`), the noise and
the accounting are the same code on either device: the network and each Poisson batch move
to the device, the noise is drawn there by the site's private generator
(:func:`common.dp.noise.private_torch_generator` on that device, seeded from the OS entropy
pool), and the released delta comes back to the CPU. The Poisson sampling itself stays on
the CPU, beside the rows. With ``policy.secure_noise`` the noise comes from the ChaCha20
CSPRNG, which runs on the CPU, and is copied to the device.
"""

from __future__ import annotations

from typing import Final, Literal

import torch

DeviceSetting = Literal["auto", "cpu", "cuda"]
DEVICE_SETTINGS: Final = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """Whether PyTorch can use a CUDA device in this process (patched by tests)."""
    return bool(torch.cuda.is_available())


def check_available(setting: str) -> None:
    """Raise ``ValueError`` (a configuration error) for a setting this machine cannot honour."""
    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"device must be one of {', '.join(DEVICE_SETTINGS)}, got {setting!r}")
    if setting == "cuda" and not cuda_available():
        raise ValueError(
            "device: cuda, but PyTorch sees no CUDA device on this machine (no GPU, no driver, "
            "or a CPU-only torch build); set device: auto or cpu"
        )


def resolve(setting: str) -> torch.device:
    """The ``torch.device`` a setting names on this machine (see the module docstring)."""
    check_available(setting)
    if setting == "cuda" or (setting == "auto" and cuda_available()):
        return torch.device("cuda")
    return torch.device("cpu")
