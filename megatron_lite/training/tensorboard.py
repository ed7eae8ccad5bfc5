"""TensorBoard scalars with Megatron's tag names (spec §3.8), written by the last rank only."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorboardConfig:
    log_dir: str | None
    log_interval: int = 1
    queue_size: int = 1000
    log_loss_scale: bool = True
    log_timers: bool = False
    log_validation_ppl: bool = False
    log_memory: bool = False
    log_world_size: bool = False


class TensorboardLogger:
    """Thin wrapper: a no-op unless `--tensorboard-dir` is set and this is the last rank."""

    def __init__(self, cfg: TensorboardConfig, is_last_rank: bool):
        self.cfg = cfg
        self.writer = None
        if cfg.log_dir and is_last_rank:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.log_dir, max_queue=cfg.queue_size)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalar(self, tag: str, value: float, iteration: int, samples: int | None = None) -> None:
        """Log `tag` against the iteration and, as `<tag> vs samples`, against consumed samples."""
        if self.writer is None:
            return
        self.writer.add_scalar(tag, value, iteration)
        if samples is not None:
            self.writer.add_scalar(f"{tag} vs samples", value, samples)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
