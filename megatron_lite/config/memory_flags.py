"""Cross-flag rules of the memory-scaling flags (issue 17): `--use-torch-fsdp2` (ZeRO-3 through
PyTorch's FSDP2, data_parallel/fsdp.py) and the hybrid CPU optimizer (`--optimizer-cpu-offload`
and its companions, optimizer/cpu_offload.py). Megatron's own FSDP2 restrictions are kept
(pipeline parallelism, its distributed optimizer, gradient-accumulation fusion and fp16 are
refused), plus what our layout cannot express; each refusal is one line naming the flag."""
from __future__ import annotations

from megatron_lite.config.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_memory_flags(args) -> None:
    """Runs after the parallel sizes and precision are derived (validation.py)."""
    if args.use_torch_fsdp2:
        _check_fsdp2(args)
    _require(args.use_torch_fsdp2 or args.torch_fsdp2_reshard_after_forward,
             "--torch-fsdp2-no-reshard-after-forward needs --use-torch-fsdp2")
    if args.optimizer_cpu_offload:
        _require(not args.use_torch_fsdp2, "--optimizer-cpu-offload works with the plain and the distributed "
                 "optimizer, not with --use-torch-fsdp2")
        return
    for flag, on in (("--overlap-cpu-optimizer-d2h-h2d", args.overlap_cpu_optimizer_d2h_h2d),
                     ("--use-torch-optimizer-for-cpu-offload", args.use_torch_optimizer_for_cpu_offload),
                     ("--optimizer-offload-fraction", args.optimizer_offload_fraction != 1.0)):
        _require(not on, f"{flag} needs --optimizer-cpu-offload")


def _check_fsdp2(args) -> None:
    name = "--use-torch-fsdp2"
    # Megatron's restrictions (arguments.py): FSDP2 shards whole layers of one model replica.
    _require(args.pipeline_model_parallel_size == 1,
             f"{name} is not supported with pipeline parallelism (--pipeline-model-parallel-size "
             f"{args.pipeline_model_parallel_size})")
    _require(not args.use_distributed_optimizer, f"{name} already shards the optimizer state: drop "
             "--use-distributed-optimizer")
    _require(not args.gradient_accumulation_fusion, f"{name} is not supported with gradient-accumulation "
             "fusion: pass --no-gradient-accumulation-fusion (FSDP2 accumulates sharded gradients itself)")
    _require(not args.fp16, f"{name} is not supported with --fp16 (use --bf16)")
    shards = args.data_parallel_size * args.context_parallel_size
    _require(shards > 1, f"{name} shards over the data-parallel x context-parallel ranks, and there is "
             f"{shards}: use more GPUs or drop the flag")
    # SwiGLU's fc1 bias is [gate; up] per TP rank, 1-D: a dim-0 FSDP shard of it is no box
    # of the global [2, ffn] checkpoint tensor (the weights shard on their input dim instead).
    _require(not (args.swiglu and args.add_bias_linear), f"{name} does not support --swiglu with linear "
             "biases: add --disable-bias-linear")
    _require(not getattr(args, "check_weight_hash_across_dp_replicas_interval", None),
             f"--check-weight-hash-across-dp-replicas-interval does not apply to {name}: the data-parallel "
             "ranks hold different shards, not replicas")
    for flag, on in (("--ddp-bucket-size", args.ddp_bucket_size is not None),
                     ("--ddp-num-buckets", args.ddp_num_buckets is not None),
                     ("--ddp-pad-buckets-for-high-nccl-busbw", args.ddp_pad_buckets_for_high_nccl_busbw)):
        # FSDP2 reduces each layer's gradients as one group: there are no DDP buckets to size.
        _require(not on, f"{flag} does not apply to {name} (it reduces layer by layer)")
