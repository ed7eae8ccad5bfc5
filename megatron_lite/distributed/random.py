"""Seeding and the tensor-parallel RNG tracker (spec §2.12).

Dropout inside tensor-parallel regions (attention probabilities of this rank's heads) must
differ between TP ranks, while dropout on replicated activations must agree. The tracker
holds named RNG states and swaps one in around such regions. It is an object owned by
the model, not a global, so several models/layouts can coexist in one process.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Offset of the model-parallel stream from the base seed (Megatron's constant, spec §2.12).
_MODEL_PARALLEL_SEED_OFFSET = 2718


def rank_seed(seed: int, pp_rank: int, dp_rank: int = 0, data_parallel_random_init: bool = False) -> int:
    """Base seed of a rank: distinct per pipeline stage (and per DP rank when asked)."""
    out = seed + 100 * pp_rank
    if data_parallel_random_init:
        out += 10 * dp_rank
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class RNGTracker:
    """Named RNG states for one device type; `fork(name)` runs a block under that state.

    `graph_safe` (CUDA only, for CUDA graphs: models/cuda_graphs.py): each named state is a
    generator state object that `fork` installs into the device's default generator with
    `graphsafe_set_state` instead of copying state tensors in and out, which a graph capture
    cannot record. The draws are the same: a state is a (seed, offset) pair either way, and the
    installed object advances in place. `generators()` lists the objects a capture registers."""

    def __init__(self, device: torch.device | str = "cpu", graph_safe: bool = False):
        self.device = torch.device(device)
        self.graph_safe = graph_safe and self.device.type == "cuda"
        self._states: dict[str, torch.Tensor] = {}  # state tensors (not graph-safe)
        self._generators: dict[str, torch.Generator] = {}  # state objects (graph-safe)

    def add(self, name: str, seed: int) -> None:
        if name in self._states or name in self._generators:
            raise ValueError(f"RNG state {name!r} already exists")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        if self.graph_safe:
            self._generators[name] = generator.clone_state()
        else:
            self._states[name] = generator.get_state()

    def generators(self) -> list[torch.Generator]:
        """The graph-safe state objects (empty unless graph_safe)."""
        return list(self._generators.values())

    def _default_generator(self) -> torch.Generator:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]

    def _get_device_state(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set_device_state(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self._states and name not in self._generators:
            raise KeyError(f"RNG state {name!r} was never added to the tracker")
        if self.graph_safe:
            default = self._default_generator()
            saved = default.graphsafe_get_state()
            default.graphsafe_set_state(self._generators[name])
            try:
                yield
            finally:
                default.graphsafe_set_state(saved)
            return
        saved = self._get_device_state()
        self._set_device_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get_device_state()
            self._set_device_state(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.graph_safe:
            return {k: g.get_state() for k, g in self._generators.items()}
        return {k: v.clone() for k, v in self._states.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        if self.graph_safe:
            # In place: a captured graph holds these very objects.
            unknown = set(states) - set(self._generators)
            if unknown:
                raise KeyError(f"RNG states {sorted(unknown)} were never added to the tracker")
            for k, v in states.items():
                self._generators[k].set_state(v)
            return
        self._states = {k: v.clone() for k, v in states.items()}


def build_rng_tracker(seed: int, tp_rank: int, pp_rank: int, device, dp_rank: int = 0,
                      data_parallel_random_init: bool = False, graph_safe: bool = False) -> RNGTracker:
    """Seed the default generators for this rank and return a tracker with the TP stream
    (`graph_safe`: see RNGTracker)."""
    base = rank_seed(seed, pp_rank, dp_rank, data_parallel_random_init)
    seed_everything(base)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed(base)
    tracker = RNGTracker(device, graph_safe)
    tracker.add(MODEL_PARALLEL_RNG, base + _MODEL_PARALLEL_SEED_OFFSET + tp_rank)
    return tracker
