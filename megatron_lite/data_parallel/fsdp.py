"""ZeRO-3 through PyTorch's FSDP2 (`--use-torch-fsdp2`, `torch.distributed.fsdp.fully_shard`):
parameters, gradients and optimizer state of one model chunk sharded over the DP×CP group.

Units: every transformer layer is one FSDP unit; the root unit (the GPTModel itself) holds the
embedding, the final norm and the output layer, because those are used outside any one
submodule's forward (the tied output layer reads the embedding table directly, the chunked
loss calls the output weight as a tensor). Each unit's parameters are all-gathered right before
its forward and again before its backward (ZeRO-3), except the last layer's and the root's,
whose backward follows their forward at once. Each layer's forward also starts the next
layer's all-gather, and each backward the previous layer's, so gathers overlap compute.

Mixed precision: the sharded parameters are fp32 and are the master weights (the optimizer,
optimizer/fsdp.py, steps them in place); they are all-gathered in the compute dtype (bf16),
and gradients are reduce-scattered in fp32 (bf16 with `--grad-reduce-in-bf16`) into fp32
shards. Gradient accumulation: every micro-batch's gradient is reduce-scattered right after
its backward and summed into the shard; keeping unsharded gradients until the last micro-batch
(FSDP2's `set_requires_gradient_sync(False)`) would hold a full fp32 gradient copy per GPU,
the very memory ZeRO-3 exists to remove.

Tensor parallelism composes as a 2-D (TP × DP) layout: our TP layers hold their local shard
as a plain tensor, so FSDP2 shards each TP rank's local parameters over that rank's DP×CP
group. The tags TP relies on (`tensor_model_parallel`, `partition_dim`, ...) are copied onto
the sharded parameters; checkpoint/fsdp_state.py turns them into DTensor placements.

The wrapper speaks the DistributedDataParallel chunk protocol the executor, `train_step` and
`finalize_grads` use (`zero_grad_buffer`, `enable_grad_sync`, `finish_grad_sync`, ...).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

# Parameter tags of tensor_parallel/sharding.py and models/gpt.py, kept on the sharded params.
_TAGS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel",
         "shared_embedding")


@dataclass(frozen=True)
class FSDPConfig:
    compute_dtype: torch.dtype = torch.float32  # --bf16: bf16; the shards stay fp32
    grad_reduce_in_fp32: bool = True  # False with --grad-reduce-in-bf16
    calculate_per_token_loss: bool = False
    check_for_nan_in_grad: bool = False  # --check-for-nan-in-loss-and-grad
    # False (--torch-fsdp2-no-reshard-after-forward): layers stay gathered from the first
    # forward to the last backward of a step, one all-gather per layer and step instead of
    # two per micro-batch (see enable_grad_sync).
    reshard_after_forward: bool = True
    # Read by shared code written for DDP chunks: FSDP2 always overlaps both.
    overlap_grad_reduce: bool = True
    use_distributed_optimizer: bool = False


def fsdp_shard_dim(param: torch.Tensor) -> int:
    """The dimension FSDP2 shards `param` on: 0, except for a 2-D weight made of TP-strided parts
    (SwiGLU fc1, `[gate; up]` along dim 0), sharded on its input dim so that every rank's shard
    stays one box of the global `[2, ffn, h]` checkpoint tensor (checkpoint/fsdp_state.py)."""
    strided = getattr(param, "tensor_model_parallel", False) and getattr(param, "partition_stride", 1) > 1
    if strided and param.partition_dim == 0:
        if param.dim() < 2:
            raise ValueError("--use-torch-fsdp2 cannot shard a 1-D TP-strided parameter (SwiGLU fc1 bias): "
                             "add --disable-bias-linear")
        return 1
    return 0


def _placement(param: torch.nn.Parameter) -> Shard:
    return Shard(fsdp_shard_dim(param))


@torch.no_grad()
def _to_fp32(module: torch.nn.Module) -> None:
    """The shards FSDP2 cuts become the fp32 master weights (already sharded DTensors of
    inner units are fp32 and left alone)."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def _forget_cached_shardings() -> None:
    """DTensor caches sharding decisions by mesh *value* (ranks and device type), and the specs
    it returns hold the mesh object they were first computed with. A process that destroyed an
    earlier layout's groups (tests build several layouts in one process, DESIGN rule 1) would get
    specs over dead groups back for an equal mesh over new ones; start from an empty cache."""
    propagator = DTensor._op_dispatcher.sharding_propagator
    # Private caches whose names vary across torch releases: clear the ones this one has.
    for name in ("propagate_op_sharding", "_propagate_tensor_meta_cached"):
        clear = getattr(getattr(propagator, name, None), "cache_clear", None)
        if clear is not None:
            clear()
    native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)  # the C++ fast path's
    if native is not None:
        native()


class FullyShardedChunk(torch.nn.Module):
    """One model chunk (GPTModel) sharded with FSDP2; `forward` is the chunk's."""

    fully_sharded = True  # what checkpoint code asks instead of importing this module

    def __init__(self, module: torch.nn.Module, ps, config: FSDPConfig):
        super().__init__()
        if ps.pp_size > 1:
            raise ValueError("--use-torch-fsdp2 is not supported with pipeline parallelism")
        if ps.dp_cp_group is None:
            raise ValueError("--use-torch-fsdp2 needs more than one data-parallel x context-parallel rank")
        self.module, self.ps, self.config = module, ps, config
        self.group = ps.dp_cp_group
        self.device = next(module.parameters()).device
        self.mesh = DeviceMesh.from_group(self.group, self.device.type)  # the DP×CP group of this TP slice
        _forget_cached_shardings()
        tags = {name: ({t: getattr(p, t) for t in _TAGS if hasattr(p, t)}, self._shard_dim(name, p))
                for name, p in module.named_parameters()}
        self._shard(module, config)
        for name, p in module.named_parameters():
            values, dim = tags[name]
            for tag, value in values.items():
                setattr(p, tag, value)
            p.fsdp_shard_dim = dim

    def _shard_dim(self, name: str, p) -> int:
        dim = fsdp_shard_dim(p)
        n = self.ps.dp_size * self.ps.cp_size
        if dim > 0 and p.shape[dim] % n:  # FSDP2 shards dims other than 0 evenly only
            raise ValueError(f"--use-torch-fsdp2: {name} {tuple(p.shape)} cannot be sharded on dim {dim} "
                             f"over {n} data-parallel x context-parallel ranks (make --hidden-size "
                             "divisible by it)")
        return dim

    def _shard(self, module, config: FSDPConfig) -> None:
        """`fully_shard` every layer, then the root; prefetch chains and divide factors."""
        compute = config.compute_dtype
        policy = MixedPrecisionPolicy(
            param_dtype=None if compute == torch.float32 else compute,
            reduce_dtype=torch.float32 if config.grad_reduce_in_fp32 else compute,
            # The model casts its own activations (e.g. an fp32 residual stream stays fp32).
            cast_forward_inputs=False)
        layers = list(module.decoder.layers)
        self._units = [*layers, module]
        for i, layer in enumerate(layers):
            _to_fp32(layer)  # unit by unit: one layer's full fp32 copy exists at a time
            fully_shard(layer, mesh=self.mesh, mp_policy=policy, shard_placement_fn=_placement,
                        reshard_after_forward=config.reshard_after_forward and i < len(layers) - 1)
        _to_fp32(module)
        fully_shard(module, mesh=self.mesh, mp_policy=policy, shard_placement_fn=_placement)
        for prev, layer in zip(layers, layers[1:]):
            prev.set_modules_to_forward_prefetch([layer])
            layer.set_modules_to_backward_prefetch([prev])
        if config.calculate_per_token_loss:
            for unit in [*layers, module]:  # a SUM reduce-scatter; finalize divides by the tokens
                unit.set_gradient_divide_factor(1.0)
                # A plain SUM, not PREMUL_SUM(1.0), which gloo lacks (FSDP2's choice for fp32);
                # a torch without the switch runs on NCCL, which has PREMUL_SUM.
                if hasattr(unit, "set_force_sum_reduction_for_comms"):
                    unit.set_force_sum_reduction_for_comms(True)

    def train(self, mode: bool = True):
        """Also frees every gathered unit: a forward-only pass (evaluation) leaves the units that
        keep their parameters between forward and backward (the last layer, the root) gathered,
        and the next training forward would then skip their all-gather and, with it, the hooks
        that reduce-scatter their gradients correctly (measured: a wrong gradient norm on the
        step after an evaluation). Called at the start of every step; a no-op when sharded."""
        super().train(mode)
        for unit in getattr(self, "_units", ()):
            unit.reshard()
        return self

    def forward(self, *args, **kwargs):
        with warnings.catch_warnings():
            # FSDP2 warns that the root returns a view (the [b, s] loss is a transpose); the
            # executor never modifies it in place, which is what the warning is about.
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            return self.module(*args, **kwargs)

    def sharded_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(local name, DTensor parameter sharded over the DP×CP mesh) of every trainable param."""
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def local_grads(self, params=None) -> list[torch.Tensor]:
        """This rank's fp32 gradient shards (after the step's backward), in `params` order."""
        params = params if params is not None else [p for _, p in self.sharded_params()]
        return [p.grad.to_local() for p in params if p.grad is not None]

    # ---- the DDP-chunk protocol ---------------------------------------------------------
    def zero_grad_buffer(self) -> None:
        self.module.zero_grad(set_to_none=True)

    def enable_grad_sync(self, enabled: bool) -> None:
        """Every micro-batch reduce-scatters (see the module docstring). What changes is the
        end of a backward that another micro-batch follows (`enabled` False): the root and the
        first layer, whose backward ends right before the next forward starts with them, stay
        gathered instead of being freed and gathered again at once. Without resharding after
        forward every layer stays gathered until the step's last backward: the end of each
        forward already holds them all, so the peak is unchanged, and a step gathers each
        layer once instead of once per micro-batch."""
        if not self._units:
            return
        if not self.config.reshard_after_forward:
            self.module.set_reshard_after_backward(enabled)  # the root and every layer
            return
        self.module.set_reshard_after_backward(enabled, recurse=False)  # the root
        if len(self._units) > 1:
            self._units[0].set_reshard_after_backward(enabled)

    @contextlib.contextmanager
    def no_sync(self):
        yield

    def start_grad_sync(self) -> None:
        """FSDP2 launches each unit's reduce-scatter from its own post-backward hook."""

    def finish_grad_sync(self) -> None:
        """The reduce-scatters have landed (FSDP2's end-of-backward callback waited for them).
        Sum the sequence-parallel norm/bias gradient shards over TP (spec §7.4: each TP rank
        saw only its sequence chunk); every TP rank holds the same element range of them."""
        params = [p for _, p in self.sharded_params() if p.grad is not None]
        if self.ps.tp_size > 1:
            sp = [p.grad.to_local() for p in params if getattr(p, "sequence_parallel", False)]
            if sp:
                flat = torch.cat([g.reshape(-1) for g in sp])  # [sum of shard numels]
                dist.all_reduce(flat, group=self.ps.tp_group)
                parts = flat.split([g.numel() for g in sp])
                torch._foreach_copy_(sp, [c.view_as(g) for c, g in zip(parts, sp)])

    def nonfinite_grad_flags(self) -> torch.Tensor | None:
        """`[1]` bool on the device: a NaN/Inf in any rank's reduce-scattered gradient shards
        (each rank sees only its shard, so the flag is MAX-reduced over every rank: all of
        them report it); None without `check_for_nan_in_grad`. No host sync: training/
        nonfinite.py reads it when it chooses."""
        if not self.config.check_for_nan_in_grad:
            return None
        bad = torch.zeros(1, dtype=torch.float32, device=self.device)
        for g in self.local_grads():
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.ps.groups["tp-dp-cp"])
        return bad > 0  # [1]

    def nonfinite_grad_message(self, index: int) -> str:
        return (f"Rank {self.ps.rank}: found NaN or Inf in the reduce-scattered gradients "
                "(--use-torch-fsdp2)")

    def scale_gradients(self, factor) -> None:
        grads = self.local_grads()
        if grads:
            torch._foreach_mul_(grads, factor)

    def start_param_sync(self, force_sync: bool = False) -> None:
        """FSDP2 all-gathers each unit before its forward: nothing to start."""

    def finish_param_sync(self) -> None:
        """Nothing in flight between steps: the sharded parameters are always current."""
