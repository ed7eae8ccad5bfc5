"""One contiguous main-grad buffer for a model chunk's parameters.

Each parameter gets `param.main_grad`, a view into the buffer (fp32 by default, spec §7.1);
a post-accumulate hook adds every micro-batch's `param.grad` into it and frees `param.grad`.
Gradients therefore accumulate in fp32 across micro-batches even for bf16 params, and the
data-parallel reduction is a single collective over one tensor.
"""
from __future__ import annotations

import torch


class GradBuffer:
    def __init__(self, params: list[torch.nn.Parameter], dtype: torch.dtype = torch.float32):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradBuffer needs at least one trainable parameter")
        device = self.params[0].device
        total = sum(p.numel() for p in self.params)
        self.data = torch.zeros(total, dtype=dtype, device=device)  # [numel]
        self._hooks = []
        offset = 0
        # Reverse registration order approximates backward order (spec §8.1), which keeps a
        # future bucketed reduction's buckets filling front to back.
        for p in reversed(self.params):
            n = p.numel()
            p.main_grad = self.data[offset:offset + n].view_as(p)
            offset += n
            self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulate))

    @staticmethod
    def _accumulate(param: torch.nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None

    def zero(self) -> None:
        self.data.zero_()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
