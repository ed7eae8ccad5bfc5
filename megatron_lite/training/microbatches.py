"""Global batch size and number of micro-batches per iteration, with Megatron's linear
batch-size ramp-up (`--rampup-batch-size start increment samples`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatchCalculator:
    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    rampup: tuple[int, int, int] | None = None  # (start, increment, ramp samples)

    def __post_init__(self):
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(f"--global-batch-size ({self.global_batch_size}) is not divisible by "
                             f"--micro-batch-size ({self.micro_batch_size}) x data-parallel size "
                             f"({self.data_parallel_size})")
        if self.rampup is not None:
            start, incr, samples = self.rampup
            if start <= 0 or incr <= 0 or samples < 0:
                raise ValueError("--rampup-batch-size needs positive start and increment, samples >= 0")
            if (self.global_batch_size - start) % incr:
                raise ValueError(f"--rampup-batch-size: global batch size ({self.global_batch_size}) minus "
                                 f"start ({start}) must be a multiple of the increment ({incr})")
            for size in range(start, self.global_batch_size + 1, incr):
                if size % per_step:
                    raise ValueError(f"--rampup-batch-size: batch size {size} on the ramp is not "
                                     f"divisible by micro batch x data-parallel size ({per_step})")

    def global_batch(self, consumed_samples: int) -> int:
        """Batch size of the iteration that starts after `consumed_samples` samples."""
        if self.rampup is None:
            return self.global_batch_size
        start, incr, ramp_samples = self.rampup
        if consumed_samples > ramp_samples:
            return self.global_batch_size
        steps = (self.global_batch_size - start) // incr
        if steps == 0:
            return self.global_batch_size
        samples_per_step = ramp_samples / steps
        return min(start + int(consumed_samples / samples_per_step) * incr, self.global_batch_size)

    def num_microbatches(self, consumed_samples: int) -> int:
        return self.global_batch(consumed_samples) // (self.micro_batch_size * self.data_parallel_size)

    def iterations_for_samples(self, train_samples: int) -> int:
        """Iterations `--train-samples` amounts to (the ramp makes early iterations smaller)."""
        iterations, consumed = 0, 0
        while consumed < train_samples and self.rampup is not None and consumed <= self.rampup[2]:
            consumed += self.global_batch(consumed)
            iterations += 1
        return iterations + max(train_samples - consumed, 0) // self.global_batch_size
