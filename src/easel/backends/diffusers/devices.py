"""Which torch devices this machine has, and a device option checked against them.

A device that does not exist must be refused when the server starts, with the devices that
do exist, not discovered by the first job ("Torch not compiled with CUDA enabled"). The fleet
file's per-backend ``device`` options go through the same :func:`check_device`.
"""

from __future__ import annotations

from easel.errors import InvalidRequest

AUTO = "auto"


def available_devices() -> list[str]:
    """``cpu``, then each CUDA device (``cuda``, ``cuda:1``...), then ``mps`` where present."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        devices += ["cuda"] + [f"cuda:{i}" for i in range(count)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(option: str) -> str:
    """``option`` if this machine has it (``auto``: the best one present), else a 4xx that
    lists the devices that exist."""
    name = option.strip().lower()
    if name == AUTO:
        return best_device()
    if name == "cpu":
        return name
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    present = available_devices()
    if device is not None and (str(device) in present or device.type in present):
        index = device.index
        if device.type != "cuda" or index is None or index < torch.cuda.device_count():
            return name
    raise InvalidRequest(
        f"device {option!r} does not exist on this machine; it has: {', '.join(present)} "
        f"(or {AUTO}: the best of them)"
    )


def best_device() -> str:
    """The best accelerator present: cuda, then mps, then cpu."""
    present = available_devices()
    for name in ("cuda", "mps"):
        if name in present:
            return name
    return "cpu"
