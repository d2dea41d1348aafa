"""Where training runs: ``train.device`` and ``train.cpu_threads`` turned into what torch needs, checked before any
work."""

from __future__ import annotations

import os

from pipeline.errors import ConfigError


def cpu_threads(requested: int) -> int:
    """``train.cpu_threads`` -> a thread count: 0 means every core this process may use."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str) -> str:
    """Turn ``train.device`` into a concrete device string, failing before any work when it can't be had."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return "0" if n else "cpu"
    if device == "cpu":
        return "cpu"
    if n == 0:
        raise ConfigError(f"train.device is {device!r} but no CUDA GPU is available here "
                          "(torch.cuda.is_available() is False); expected one of: auto, cpu")
    if device == "cuda":
        return "0"
    ids = [int(x) for x in device.split(",")]
    bad = [i for i in ids if i >= n]
    if bad:
        raise ConfigError(f"train.device asks for GPU {bad} but only {n} GPU(s) exist (indices 0..{n - 1})")
    return ",".join(str(i) for i in ids)
