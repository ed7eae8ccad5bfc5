"""From the argparse namespace to this rank's training objects: model chunks wrapped for data
parallelism, the pipeline executor, optimizer, LR scheduler, data iterators and the memory
check. `pretrain()` (training/pretrain.py) calls these in the order of DESIGN's "How a step
flows"; like it, they are the edge where `args` is read (DESIGN rule 2)."""
from __future__ import annotations

import os

import torch

from megatron_lite.config.startup_lines import pad_vocab_size, padded_vocab_line
from megatron_lite.context_parallel.split import ContextParallelBatches
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel, default_bucket_size
from megatron_lite.data_parallel.fsdp import FSDPConfig, FullyShardedChunk
from megatron_lite.optimizer.cpu_offload import OffloadConfig
from megatron_lite.optimizer.distributed import DistributedOptimizer
from megatron_lite.optimizer.fsdp import FullyShardedOptimizer
from megatron_lite.optimizer.grad_scaler import ConstantLossScaler, DynamicLossScaler
from megatron_lite.optimizer.lr_scheduler import OptimizerParamScheduler
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer, OptimizerConfig
from megatron_lite.pipeline_parallel.dynamic import BREADTH_FIRST
from megatron_lite.pipeline_parallel.executor import PipelineConfig, PipelineExecutor
from megatron_lite.pipeline_parallel.layout import PipelineLayout, build_layout
from megatron_lite.pipeline_parallel.p2p import PipelineChannels
from megatron_lite.pipeline_parallel.trace import (
    PipelineTrace,
    bubble_stats,
    gather_events,
    write_chrome_trace,
)
from megatron_lite.training.flops import num_floating_point_operations
from megatron_lite.training.housekeeping import Housekeeping, HousekeepingConfig
from megatron_lite.training.memory_estimate import MemoryLayout, check_fits, describe, estimate, host_memory
from megatron_lite.training.tensorboard import TensorboardConfig, TensorboardLogger
from megatron_lite.training.theoretical_memory import LayoutInfo, theoretical_memory_lines
from megatron_lite.training.train_loop import LoopConfig


def wrap_chunk(args, module, ps, chunk_index: int = 0):
    """Contiguous buffers, bucketed DP reduction and (optionally) sharded params (spec §8); or
    with --use-torch-fsdp2, FSDP2's ZeRO-3 sharding (data_parallel/fsdp.py)."""
    if args.use_torch_fsdp2:
        return FullyShardedChunk(module, ps, FSDPConfig(
            compute_dtype=module.config.params_dtype, grad_reduce_in_fp32=not args.grad_reduce_in_bf16,
            calculate_per_token_loss=args.calculate_per_token_loss,
            check_for_nan_in_grad=args.check_for_nan_in_loss_and_grad,
            reshard_after_forward=args.torch_fsdp2_reshard_after_forward))
    num_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    cfg = DDPConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=default_bucket_size(args.ddp_bucket_size, args.ddp_num_buckets, num_params,
                                        ps.dp_size * ps.cp_size, args.overlap_grad_reduce, ps.pp_rank,
                                        chunk_index),
        average_in_collective=args.ddp_average_in_collective,
        calculate_per_token_loss=args.calculate_per_token_loss,
        check_for_nan_in_grad=args.check_for_nan_in_loss_and_grad,
        pad_buckets_for_high_nccl_busbw=args.ddp_pad_buckets_for_high_nccl_busbw)
    return DistributedDataParallel(module, ps, cfg)


def build_optimizer(args, chunks, ps):
    """`chunks`: this rank's DDP-wrapped model chunks. fp32 main params and grads, loss
    scaling (spec §7)."""
    cfg = OptimizerConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                          adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                          sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad,
                          log_num_zeros_in_grad=args.log_num_zeros_in_grad, decoupled_lr=args.decoupled_lr,
                          decoupled_min_lr=args.decoupled_min_lr)
    scaler = None
    if args.fp16:
        scaler = (ConstantLossScaler(args.loss_scale) if args.loss_scale else DynamicLossScaler(
            args.initial_loss_scale, args.min_loss_scale, args.loss_scale_window, args.hysteresis))
    elif args.loss_scale:
        scaler = ConstantLossScaler(args.loss_scale)
    if args.use_torch_fsdp2:
        return FullyShardedOptimizer(chunks, cfg, ps, scaler)
    offload = OffloadConfig(args.optimizer_offload_fraction, args.overlap_cpu_optimizer_d2h_h2d) \
        if args.optimizer_cpu_offload else None
    if args.use_distributed_optimizer:
        return DistributedOptimizer(chunks, cfg, ps, scaler, offload=offload)
    named = [(name, p) for chunk in chunks for name, p in chunk.module.named_parameters()]
    return MixedPrecisionOptimizer(named, cfg, ps, scaler, offload=offload)


def check_memory(args, config, ps, env, logger) -> None:
    """Print what this layout needs per GPU and refuse, before allocating anything, one that
    cannot fit the GPU (training/memory_estimate.py)."""
    layout = MemoryLayout(
        tp=ps.tp_size, pp=ps.pp_size, dp=ps.dp_size, cp=ps.cp_size,
        vpp=args.virtual_pipeline_model_parallel_size, micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length, num_microbatches=args.num_micro_batches,
        grad_fp32=args.accumulate_allreduce_grads_in_fp32, optimizer=args.optimizer,
        distributed_optimizer=args.use_distributed_optimizer, fsdp2=args.use_torch_fsdp2,
        fsdp2_reshard_after_forward=args.torch_fsdp2_reshard_after_forward,
        offload_fraction=args.optimizer_offload_fraction if args.optimizer_cpu_offload else 0.0)
    cuda = env.device.type == "cuda"
    visible = torch.cuda.get_device_properties(env.device).total_memory if cuda else None
    logger.rank0(describe(estimate(config, layout), visible))
    # torchrun's LOCAL_WORLD_SIZE: the GPUs of this host share its memory.
    host = host_memory(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    refusal = check_fits(config, layout, visible, host)
    if refusal is not None:
        raise SystemExit(f"error: {refusal}" if env.rank == 0 else 2)


def context_parallel_batches(args, data, ps, device):
    """(train, valid, test) iterators; with CP each is read on CP rank 0 only and broadcast,
    then split into this rank's zig-zag share (spec §9.1)."""
    iterators = (data.train, data.valid, data.test)
    if ps.cp_size == 1:
        return iterators
    sizes = (args.micro_batch_size, args.eval_micro_batch_size, args.eval_micro_batch_size)
    return tuple(None if it is None else ContextParallelBatches(
        it if ps.cp_rank == 0 else None, ps.cp_group, ps.ranks["cp"], ps.cp_rank, b, args.seq_length, device)
        for it, b in zip(iterators, sizes))


def pipeline_layout(args) -> PipelineLayout:
    return build_layout(
        args.num_layers, args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size,
        first_stage_layers=args.decoder_first_pipeline_num_layers,
        last_stage_layers=args.decoder_last_pipeline_num_layers,
        account_for_embedding=args.account_for_embedding_in_pipeline_split,
        account_for_loss=args.account_for_loss_in_pipeline_split,
        layout=args.pipeline_model_parallel_layout)


def build_executor(args, chunks, ps, env):
    """The schedule runner over this rank's chunks, its p2p links and the optional trace."""
    channels = None
    if ps.pp_size > 1:
        ring = (args.virtual_pipeline_model_parallel_size or 1) > 1  # chunk c -> c+1 wraps around
        channels = PipelineChannels.create(ps, ring=ring, backend=env.backend, dynamic=args.use_dpp)
    trace = None
    if args.pipeline_trace or args.pipeline_trace_file:
        trace = PipelineTrace(env.rank, ps.pp_rank, env.device)
    cfg = PipelineConfig(microbatch_group_size=args.microbatch_group_size_per_vp_stage,
                         overlap_p2p_comm=args.overlap_p2p_comm,
                         calculate_per_token_loss=args.calculate_per_token_loss,
                         dynamic=args.use_dpp, dynamic_order=args.dpp_order or BREADTH_FIRST,
                         dynamic_queue_depth=args.dpp_gpu_queue_depth or 0)
    return PipelineExecutor(chunks, ps, cfg, channels, trace), trace


def finish_trace(args, trace, logger) -> None:
    """Gather every rank's timeline, write the Chrome trace and report the bubble (rank 0)."""
    events = gather_events(trace)
    if not (args.pipeline_trace_file and logger.is_first):
        return
    write_chrome_trace(events, args.pipeline_trace_file)
    pp, vpp, m = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size or 1, \
        args.num_micro_batches
    line = f"pipeline trace written to {args.pipeline_trace_file}"
    try:
        stats = bubble_stats(events)
        line += (f"; measured bubble (idle / compute) {stats.bubble_fraction:.4f} over {stats.steps} steps "
                 f"(compute {stats.mean_busy_ms:.2f} ms, span {stats.mean_span_ms:.2f} ms per step), "
                 f"theoretical (PP-1)/(VPP*M) = {(pp - 1) / (vpp * m):.4f}")
    except ValueError:
        pass
    logger.rank0(line)


def build_scheduler(args, optimizer):
    """Schedule lengths in samples (spec §10): from iterations x global batch, or from the
    `*-samples` flags when training is given in samples."""
    B = args.global_batch_size
    if args.train_samples:
        total, decay = args.train_samples, args.lr_decay_samples or args.train_samples
        warmup_explicit = args.lr_warmup_samples
        wsd = args.lr_wsd_decay_samples or 0
    else:
        total, decay = args.train_iters * B, (args.lr_decay_iters or args.train_iters) * B
        warmup_explicit = args.lr_warmup_iters * B or args.lr_warmup_samples
        wsd = (args.lr_wsd_decay_iters or 0) * B
    warmup = int(args.lr_warmup_fraction * decay) if args.lr_warmup_fraction is not None else warmup_explicit
    return OptimizerParamScheduler(
        optimizer, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=args.lr_decay_style, start_wd=args.start_weight_decay, end_wd=args.end_weight_decay,
        wd_incr_steps=total, wd_incr_style=args.weight_decay_incr_style, init_lr=args.lr_warmup_init,
        wsd_decay_steps=wsd, lr_wsd_decay_style=args.lr_wsd_decay_style)


def resolve_padded_vocab_size(args, orig_vocab: int, logger, rank: int) -> None:
    """--padded-vocab-size as given (Megatron-LM then prints no padding line), else the padded size
    of spec §3.7. A given size must hold every token id and split evenly over the TP ranks."""
    given, tp = args.padded_vocab_size, args.tensor_model_parallel_size
    if given is None:
        args.padded_vocab_size = pad_vocab_size(orig_vocab, args.make_vocab_size_divisible_by, tp)
        logger.rank0(padded_vocab_line(orig_vocab, args.padded_vocab_size))
    elif given < orig_vocab or given % tp:
        raise SystemExit(f"error: --padded-vocab-size ({given}) must be >= the tokenizer's vocabulary size "
                         f"({orig_vocab}) and divisible by --tensor-model-parallel-size ({tp})"
                         if rank == 0 else 2)


def loop_config(args, config, ps, env) -> LoopConfig:
    """What the training loop needs of the arguments (train_loop.py)."""
    return LoopConfig(
        train_iters=args.train_iters, log_interval=args.log_interval, seq_length=args.seq_length,
        world_size=env.world_size, flops_per_sample=num_floating_point_operations(config, 1, args.seq_length),
        eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        eval_num_microbatches=args.eval_global_batch_size // (args.eval_micro_batch_size * ps.dp_size),
        eval_global_batch_size=args.eval_global_batch_size, exit_interval=args.exit_interval,
        exit_duration_in_mins=args.exit_duration_in_mins, save_interval=args.save_interval,
        timing_log_level=args.timing_log_level, log_throughput=args.log_throughput,
        log_params_norm=args.log_params_norm, log_memory_interval=args.log_memory_interval,
        tensorboard_log_interval=args.tensorboard_log_interval)


def tensorboard_logger(args, logger) -> TensorboardLogger:
    return TensorboardLogger(TensorboardConfig(
        args.tensorboard_dir, args.tensorboard_log_interval, args.tensorboard_queue_size,
        log_loss_scale=args.log_loss_scale_to_tensorboard, log_timers=args.log_timers_to_tensorboard,
        log_validation_ppl=args.log_validation_ppl_to_tensorboard,
        log_memory=args.log_memory_to_tensorboard, log_world_size=args.log_world_size_to_tensorboard),
        is_last_rank=logger.is_last)


def housekeeping(args, env) -> Housekeeping:
    """Garbage collection, cache emptying and profiling around the steps (housekeeping.py)."""
    return Housekeeping(HousekeepingConfig(
        manual_gc=args.manual_gc, manual_gc_interval=args.manual_gc_interval,
        manual_gc_eval=args.manual_gc_eval,
        empty_unused_memory_level=args.empty_unused_memory_level, profile=args.profile,
        use_pytorch_profiler=args.use_pytorch_profiler, profile_step_start=args.profile_step_start,
        profile_step_end=args.profile_step_end, profile_ranks=tuple(args.profile_ranks),
        trace_dir=args.tensorboard_dir), env.rank, env.device)


def theoretical_memory(args, config, ps) -> list[str]:
    """The theoretical memory lines (spec §3.5) of this layout."""
    return theoretical_memory_lines(config, LayoutInfo(
        tp=ps.tp_size, pp=ps.pp_size, dp=ps.dp_size, vpp=args.virtual_pipeline_model_parallel_size,
        num_microbatches=args.num_micro_batches, micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length, use_distributed_optimizer=args.use_distributed_optimizer))
