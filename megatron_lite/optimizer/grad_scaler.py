"""Loss scalers for fp16 (spec §7.2): constant, and dynamic with hysteresis."""
from __future__ import annotations

import torch


class ConstantLossScaler:
    def __init__(self, scale: float):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass  # spec §7.1: a constant scale; overflowing steps are still skipped

    def inv_scale(self, device) -> torch.Tensor:
        return torch.tensor(1.0 / self.scale, dtype=torch.float32, device=device)

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    """Overflow: reset growth, spend one hysteresis credit, halve once credits are gone.
    `window` clean steps in a row: double and refill the credits. A clean step does not
    refill credits (the Megatron behaviour users' loss-scale curves reflect)."""

    def __init__(self, initial_scale: float = 2.0**32, min_scale: float = 1.0, window: int = 1000,
                 hysteresis: int = 2, growth_factor: float = 2.0, backoff_factor: float = 0.5):
        self.scale = float(initial_scale)
        self.min_scale, self.window, self.hysteresis = float(min_scale), window, hysteresis
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.window:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def inv_scale(self, device) -> torch.Tensor:
        # float32(1 / float64(scale)), as the fused unscale kernel uses.
        return torch.tensor(1.0 / self.scale, dtype=torch.float32, device=device)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = state["growth_tracker"]
        self.hysteresis_tracker = state["hysteresis_tracker"]
