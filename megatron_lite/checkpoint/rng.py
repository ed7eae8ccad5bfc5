"""This rank's random-generator states as tensors + JSON-able values, so a checkpoint can
restore them without unpickling arbitrary objects (spec §4.2 `rng_state`)."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture(tracker, device) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json values) describing python, numpy, torch, cuda and TP-tracker states."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.device(device).type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    for name, state in (tracker.state_dict() if tracker is not None else {}).items():
        tensors[f"tracker.{name}"] = state
    values = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, values


def restore(tensors: dict[str, torch.Tensor], values: dict, tracker, device) -> None:
    version, state, gauss = values["python"]
    random.setstate((version, tuple(state), gauss))
    kind, pos, has_gauss, np_gauss = values["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    if torch.device(device).type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    if tracker is not None:
        tracker.load_state_dict(
            {k[len("tracker.") :]: v for k, v in tensors.items() if k.startswith("tracker.")}
        )
