"""Shared by the benchmark scripts: which devices to run on, and how to name them."""

import torch


def parse_devices(spec: str):
    """``"auto"`` (CPU, plus CUDA when present) or a comma list such as ``"cpu,cuda"``."""
    if spec == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(d) for d in spec.split(",")]


def device_label(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
