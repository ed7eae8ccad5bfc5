"""Runs a schedule (schedules.py) over this rank's model chunks: forward and backward of
(micro-batch, chunk), the p2p transfers between stages (p2p.py), loss normalisation
(spec §6.4), the per-chunk gradient-reduction hooks, and optional timing (trace.py).

One executor serves every layout: PP = 1 runs the no-pipelining schedule (gradient
accumulation) without any communication; `forward_only=True` is evaluation. With `--use-dpp`
(`PipelineConfig.dynamic`) a training step has no fixed action list: dynamic_executor.py picks
each compute as its input arrives, calls back into `_compute` and sends `_outgoing` itself.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.autograd import Variable

from megatron_lite.context_parallel.split import TOKENS_KEY
from megatron_lite.pipeline_parallel import schedules
from megatron_lite.pipeline_parallel.dynamic import BREADTH_FIRST
from megatron_lite.pipeline_parallel.dynamic_executor import run_dynamic_step
from megatron_lite.pipeline_parallel.layout import last_virtual_stage, virtual_stage
from megatron_lite.pipeline_parallel.schedules import ACT, Action, Op


@dataclass(frozen=True)
class PipelineConfig:
    microbatch_group_size: int | None = None  # N of spec §6.2 (None: PP)
    overlap_p2p_comm: bool = False
    # Megatron's deallocate_pipeline_outputs: once a stage output is sent, only its autograd
    # graph is needed, so its data is freed and held activations stay at the schedule's bound.
    deallocate_outputs: bool = True
    calculate_per_token_loss: bool = False  # back-propagate raw loss sums (spec §6.4)
    # --use-dpp: training steps in MegatronDPP's readiness-driven order (dynamic_executor.py),
    # with priorities `dynamic_order` (dynamic.py); evaluation keeps the static order.
    dynamic: bool = False
    dynamic_order: str = BREADTH_FIRST
    # --dpp-gpu-queue-depth: a dynamic pick waits until at most this many of the rank's earlier
    # computes are unfinished on its GPU (0: no limit; dynamic_executor.py says why).
    dynamic_queue_depth: int = 0


@dataclass
class GradSyncHooks:
    """How the executor drives data-parallel gradient reduction, per chunk index: sync is
    switched off at the start of a step, on right before the chunk's last backward, and the
    reduction is launched right after it (spec §6.2, Megatron's no_sync / grad_sync_func)."""

    disable: Callable[[int], None] | None = None
    before_last_backward: Callable[[int], None] | None = None
    on_chunk_backward_done: Callable[[int], None] | None = None

    @classmethod
    def for_ddp(cls, chunks) -> GradSyncHooks:
        """Hooks for `data_parallel.ddp.DistributedDataParallel`-style chunks."""
        return cls(disable=lambda c: chunks[c].enable_grad_sync(False),
                   before_last_backward=lambda c: chunks[c].enable_grad_sync(True),
                   on_chunk_backward_done=lambda c: chunks[c].start_grad_sync())


@dataclass
class ForwardBackwardResult:
    # Last pipeline stage only (empty elsewhere): per micro-batch [2] fp32 (masked loss sum,
    # unmasked tokens), detached.
    losses: list[torch.Tensor]
    totals: torch.Tensor  # [2]: their sum (zeros off the last stage)
    # Memory accounting, taken before each compute: most (micro-batch, chunk) outputs held for
    # a later backward (the schedule's in-flight bound), and the bytes their data occupied
    # (about nothing for sent outputs when deallocated: only their autograd graphs remain).
    peak_in_flight: int = 0
    peak_output_bytes: int = 0


@dataclass(frozen=True)
class _StagePosition:
    """Where a chunk sits in the pipeline: the first virtual stage embeds (its input comes from
    the data, not a receive), the last one computes the loss (spec §5.4)."""
    first: bool
    last: bool


@dataclass
class _StepState:
    data_iter: Iterator
    num_microbatches: int
    loss_scale: float
    forward_only: bool
    batches: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)  # (mb, chunk) -> received activation (or None)
    outputs: dict = field(default_factory=dict)  # (mb, chunk) -> stage output / scaled loss
    input_grads: dict = field(default_factory=dict)  # (mb, chunk) -> grad to send upstream
    recvs: dict = field(default_factory=dict)  # (kind, mb, chunk) -> (buffer, work or None)
    sends: list = field(default_factory=list)  # (work, tensor kept alive until done)
    losses: dict = field(default_factory=dict)  # mb -> [2]
    peak_in_flight: int = 0
    peak_output_bytes: int = 0


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _custom_backward(output: torch.Tensor, grad: torch.Tensor | None) -> None:
    """`torch.autograd.backward` without its shape check: the output's data may have been
    freed after it was sent (Megatron's custom_backward)."""
    if grad is None:
        grad = torch.ones_like(output, memory_format=torch.preserve_format)
    Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(grad,), keep_graph=False, create_graph=False,
        inputs=tuple(), allow_unreachable=True, accumulate_grad=True)


class PipelineExecutor:
    """`chunks`: this rank's model chunks in chunk order (GPTModel, possibly wrapped in DDP).
    `channels`: a p2p.PipelineChannels (required when PP > 1). `trace`: a trace.PipelineTrace."""

    def __init__(self, chunks, ps, config: PipelineConfig | None = None, channels=None, trace=None):
        self.chunks = list(chunks)
        self.ps, self.config = ps, config or PipelineConfig()
        self.channels, self.trace = channels, trace
        if ps.pp_size > 1 and channels is None:
            raise ValueError("pipeline parallelism needs p2p channels (PipelineChannels.create)")
        if self.config.dynamic and ps.pp_size > 1 and ps.tp_size * ps.cp_size > 1:
            # The ranks of a stage that share its forward/backward collectives pick their
            # tasks together, over a host-side group (collective: every rank builds its executor).
            ps.create_cpu_groups("tp-cp")
        model_cfg = _unwrap(self.chunks[0]).config
        self._sequence_parallel = model_cfg.sequence_parallel
        self._hidden = model_cfg.hidden_size
        # Stage outputs are the residual stream: fp32 with --fp32-residual-connection.
        self._dtype = torch.float32 if model_cfg.fp32_residual_connection else model_cfg.params_dtype
        self._device = next(self.chunks[0].parameters()).device
        # (num_microbatches, forward_only) -> the step's actions. Built once: a schedule only
        # depends on these and the layout, and building one costs 0.3-2 ms of host time per
        # step at PP 2-8 (measured), time the host would not spend queueing GPU work.
        self._schedules: dict[tuple[int, bool], tuple[Action, ...]] = {}

    @property
    def vpp_size(self) -> int:
        return len(self.chunks)

    def train(self) -> None:
        for c in self.chunks:
            c.train()

    def eval(self) -> None:
        for c in self.chunks:
            c.eval()

    def schedule(self, num_microbatches: int, forward_only: bool = False) -> tuple[Action, ...]:
        key = (num_microbatches, forward_only)
        if key not in self._schedules:
            self._schedules[key] = tuple(schedules.build(
                self.ps.pp_size, self.vpp_size, num_microbatches, self.ps.pp_rank,
                group_size=self.config.microbatch_group_size, forward_only=forward_only,
                overlap_p2p_comm=self.config.overlap_p2p_comm))
        return self._schedules[key]

    # ---- one step -------------------------------------------------------------------------
    def forward_backward(self, data_iter, num_microbatches: int, *, loss_scale: float = 1.0,
                         forward_only: bool = False, grad_sync: GradSyncHooks | None = None
                         ) -> ForwardBackwardResult:
        """Run every micro-batch through this rank's part of the model. Every stage reads the
        same micro-batches from `data_iter` (dicts of `[b, s]` tensors), so the iterators of a
        pipeline stay in step."""
        st = _StepState(data_iter, num_microbatches, loss_scale, forward_only)
        hooks = grad_sync or GradSyncHooks()
        if hooks.disable and not forward_only:
            for c in range(self.vpp_size):
                hooks.disable(c)
        tracing = self.trace is not None and not forward_only  # evaluation is not traced
        # All M micro-batches up front: every stage reads them (the iterators of a pipeline stay
        # in step), and host-to-device copies never stall the host in the middle of the schedule.
        self._batch(st, num_microbatches - 1)
        if tracing:
            self.trace.start_step()
        with torch.no_grad() if forward_only else torch.enable_grad():
            if self.config.dynamic and not forward_only and self.ps.pp_size > 1:
                run_dynamic_step(self, st, hooks)
            else:
                for action in self.schedule(num_microbatches, forward_only):
                    self._run(action, st, hooks)
        if tracing:
            self.trace.finish_step()
        losses = [st.losses[mb] for mb in sorted(st.losses)]
        totals = torch.stack(losses).sum(0) if losses else torch.zeros(2, device=self._device)
        return ForwardBackwardResult(losses, totals, st.peak_in_flight, st.peak_output_bytes)

    def _run(self, a: Action, st: _StepState, hooks: GradSyncHooks) -> None:
        if a.op is Op.RECV:
            self._post_recv(a, st)
        elif a.op is Op.SEND:
            self._post_send(a, st)
        elif a.op is Op.SYNC:
            for key, (buf, work) in st.recvs.items():
                if work is not None:
                    work.wait()
                    st.recvs[key] = (buf, None)
            for work, _ in st.sends:
                work.wait()
            st.sends.clear()
        else:
            self._compute(a, st, hooks, self._input(a, st))

    def _compute(self, a: Action, st: _StepState, hooks: GradSyncHooks, received) -> None:
        """Forward or backward `a` on its input `received` (already waited for, so idle time
        shows as a gap before the timed span), with the memory accounting and, around the
        last backward of a chunk, the gradient-sync hooks."""
        self._release_finished_sends(st)
        st.peak_in_flight = max(st.peak_in_flight, len(st.outputs))
        held = sum(o.untyped_storage().nbytes() for o in st.outputs.values())
        st.peak_output_bytes = max(st.peak_output_bytes, held)
        if a.op is Op.FORWARD:
            with self._timed(a, st):
                self._forward(a.microbatch, a.chunk, st, received)
            return
        if a.last and hooks.before_last_backward:
            hooks.before_last_backward(a.chunk)
        with self._timed(a, st):
            self._backward(a.microbatch, a.chunk, st, received)
        if a.last and hooks.on_chunk_backward_done:
            hooks.on_chunk_backward_done(a.chunk)

    def _timed(self, a: Action, st: _StepState):
        if self.trace is None or st.forward_only:
            return contextlib.nullcontext()
        return self.trace.span(a.op.value, a.microbatch, a.chunk)

    # ---- compute ------------------------------------------------------------------------
    def _stage(self, chunk: int) -> _StagePosition:
        pp = self.ps.pp_size
        v, last = virtual_stage(pp, self.ps.pp_rank, chunk), last_virtual_stage(pp, self.vpp_size)
        return _StagePosition(first=v == 0, last=v == last)

    def _batch(self, st: _StepState, mb: int) -> dict:
        pin = self._device.type == "cuda"  # a pageable source would make the copy synchronous
        while len(st.batches) <= mb:
            batch = next(st.data_iter)
            # contiguous(): a broadcast (expanded) CPU tensor cannot be pinned in place.
            st.batches.append({k: (v.contiguous().pin_memory() if pin and not v.is_cuda else v)
                               .to(self._device, non_blocking=True) for k, v in batch.items()})
        return st.batches[mb]

    def _input(self, a: Action, st: _StepState) -> torch.Tensor | None:
        """The received activation (forward) or output gradient (backward) `a` consumes, if any:
        `[s/cp(/tp), b, h]`."""
        stage = self._stage(a.chunk)
        if (a.op is Op.FORWARD and stage.first) or (a.op is Op.BACKWARD and stage.last):
            return None
        buf, work = st.recvs.pop((ACT if a.op is Op.FORWARD else schedules.GRAD, a.microbatch, a.chunk))
        if work is not None:
            work.wait()
        return buf

    def _forward(self, mb: int, chunk: int, st: _StepState, x: torch.Tensor | None) -> None:
        last = self._stage(chunk).last
        batch = self._batch(st, mb)
        if x is not None:
            x.requires_grad_(not st.forward_only)  # [s/cp(/tp), b, h]
        out = self.chunks[chunk](batch["tokens"], batch["position_ids"],
                                 labels=batch["labels"] if last else None, hidden_states=x)
        st.inputs[(mb, chunk)] = x
        if not last:
            st.outputs[(mb, chunk)] = out  # [s/cp(/tp), b, h]
            return
        mask = batch["loss_mask"].float()  # [b, s]
        loss_sum, count = (out.float() * mask).sum(), mask.sum()
        st.losses[mb] = torch.stack([loss_sum.detach(), count])
        if not st.forward_only:
            # spec §6.4: each micro-batch back-propagates loss_sum / tokens / M (or the raw sum
            # with per-token loss), times the loss scale.
            # With CP the rank holds part of the sequence: divide by the whole sequence's count
            # and undo the 1/(DP x CP) averaging of DDP, which is meant for replicas (spec §9.1).
            whole = batch.get(TOKENS_KEY, count)
            scaled = loss_sum if self.config.calculate_per_token_loss else (
                loss_sum * self.ps.cp_size / whole.clamp(min=1) / st.num_microbatches)
            st.outputs[(mb, chunk)] = scaled * st.loss_scale

    def _backward(self, mb: int, chunk: int, st: _StepState, grad: torch.Tensor | None) -> None:
        out, x = st.outputs.pop((mb, chunk)), st.inputs.pop((mb, chunk))
        _custom_backward(out, grad)
        if not self._stage(chunk).first:
            st.input_grads[(mb, chunk)] = x.grad  # [s/cp(/tp), b, h]

    # ---- communication --------------------------------------------------------------------
    def _activation_shape(self, st: _StepState, mb: int) -> tuple[int, int, int]:
        b, s = self._batch(st, mb)["tokens"].shape  # already this CP rank's share of the sequence
        if self._sequence_parallel:
            s //= self.ps.tp_size
        return s, b, self._hidden

    def _post_recv(self, a: Action, st: _StepState) -> None:
        shape = self._activation_shape(st, a.microbatch)
        buf = torch.empty(shape, dtype=self._dtype, device=self._device)
        st.recvs[(a.kind, a.microbatch, a.chunk)] = (buf, self.channels.irecv(buf, a.kind, a.peer))

    def _post_send(self, a: Action, st: _StepState) -> None:
        tensor = self._outgoing(a, st)
        st.sends.append((self.channels.isend(tensor, a.kind, a.peer), tensor))

    def _outgoing(self, a: Action, st: _StepState) -> torch.Tensor:
        """The tensor `a` sends: the stage output (ACT) or the input's gradient (GRAD),
        `[s/cp(/tp), b, h]`. The caller keeps it alive until its send has used it."""
        key = (a.microbatch, a.chunk)
        if a.kind != ACT:
            return st.input_grads.pop(key)
        out = st.outputs[key]
        # A separate tensor object sharing the storage: the returned tensor keeps the data
        # alive while `out` itself drops it (below) and keeps only its autograd graph.
        tensor = out.detach()
        if self.config.deallocate_outputs and out._base is None:
            out.data = torch.empty((1,), device=out.device, dtype=out.dtype)
        return tensor

    @staticmethod
    def _release_finished_sends(st: _StepState) -> None:
        # Sends are only waited at a SYNC; dropping finished ones frees their buffers earlier.
        if st.sends:
            st.sends[:] = [(w, t) for w, t in st.sends if not w.is_completed()]
