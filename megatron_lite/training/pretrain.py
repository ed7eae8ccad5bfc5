"""`pretrain()`: the edge where the argparse namespace becomes objects. Parses and validates
the command line, starts the distributed world, builds model, optimizer, scheduler and data,
and runs the loop."""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.layout import CheckpointError
from megatron_lite.config.arguments import parse_args
from megatron_lite.config.configs import model_config_from_args
from megatron_lite.config.data_config import data_config_from_args, tokenizer_config_from_args
from megatron_lite.config.ranges import check_ranges
from megatron_lite.config.startup_lines import (
    format_args_dump,
    pad_vocab_size,
    padded_vocab_line,
    world_size_line,
)
from megatron_lite.config.validation import ConfigError, validate_args
from megatron_lite.context_parallel.split import ContextParallelBatches
from megatron_lite.data.builders import build_data_iterators
from megatron_lite.data.tokenizers import TokenizerError, build_tokenizer
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel, default_bucket_size
from megatron_lite.data_parallel.fsdp import FSDPConfig, FullyShardedChunk
from megatron_lite.optimizer.cpu_offload import OffloadConfig
from megatron_lite.optimizer.distributed import DistributedOptimizer
from megatron_lite.optimizer.fsdp import FullyShardedOptimizer
from megatron_lite.optimizer.grad_scaler import ConstantLossScaler, DynamicLossScaler
from megatron_lite.optimizer.lr_scheduler import OptimizerParamScheduler
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer, OptimizerConfig
from megatron_lite.pipeline_parallel.chunks import build_model_chunks
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
from megatron_lite.training.checkpointing import RunCheckpointing, use_checkpoint_args
from megatron_lite.training.failures import report_failures
from megatron_lite.training.flops import num_floating_point_operations
from megatron_lite.training.housekeeping import Housekeeping, HousekeepingConfig
from megatron_lite.training.initialize import build_parallel_state, init_distributed, seed_rank
from megatron_lite.training.logging import RankLogger
from megatron_lite.training.memory import memory_report_line
from megatron_lite.training.memory_estimate import MemoryLayout, check_fits, describe, estimate, host_memory
from megatron_lite.training.microbatches import MicroBatchCalculator
from megatron_lite.training.nonfinite import NonFiniteCheck
from megatron_lite.training.signals import SignalHandler
from megatron_lite.training.tensorboard import TensorboardConfig, TensorboardLogger
from megatron_lite.training.theoretical_memory import LayoutInfo, theoretical_memory_lines
from megatron_lite.training.timers import Timers
from megatron_lite.training.train_loop import LoopConfig, LoopHooks, LoopState, Trainer
from megatron_lite.training.train_step import evaluation_step, train_step
from megatron_lite.training.weight_hash import check_weight_hashes


def _wrap_ddp(args, module, ps, chunk_index: int = 0):
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


def _build_optimizer(args, chunks, ps):
    """`chunks`: this rank's DDP-wrapped model chunks. fp32 main params and grads, loss
    scaling (spec §7)."""
    if args.num_distributed_optimizer_instances > 1:
        raise SystemExit("error: --num-distributed-optimizer-instances > 1 is not available yet")
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


def _check_memory(args, config, ps, env, logger) -> None:
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


def _context_parallel_batches(args, data, ps, device):
    """(train, valid, test) iterators; with CP each is read on CP rank 0 only and broadcast,
    then split into this rank's zig-zag share (spec §9.1)."""
    iterators = (data.train, data.valid, data.test)
    if ps.cp_size == 1:
        return iterators
    sizes = (args.micro_batch_size, args.eval_micro_batch_size, args.eval_micro_batch_size)
    return tuple(None if it is None else ContextParallelBatches(
        it if ps.cp_rank == 0 else None, ps.cp_group, ps.ranks["cp"], ps.cp_rank, b, args.seq_length, device)
        for it, b in zip(iterators, sizes))


def _pipeline_layout(args) -> PipelineLayout:
    return build_layout(
        args.num_layers, args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size,
        first_stage_layers=args.decoder_first_pipeline_num_layers,
        last_stage_layers=args.decoder_last_pipeline_num_layers,
        account_for_embedding=args.account_for_embedding_in_pipeline_split,
        account_for_loss=args.account_for_loss_in_pipeline_split)


def _build_executor(args, chunks, ps, env):
    """The schedule runner over this rank's chunks, its p2p links and the optional trace."""
    channels = None
    if ps.pp_size > 1:
        ring = (args.virtual_pipeline_model_parallel_size or 1) > 1  # chunk c -> c+1 wraps around
        channels = PipelineChannels.create(ps, ring=ring, backend=env.backend)
    trace = None
    if args.pipeline_trace or args.pipeline_trace_file:
        trace = PipelineTrace(env.rank, ps.pp_rank, env.device)
    cfg = PipelineConfig(microbatch_group_size=args.microbatch_group_size_per_vp_stage,
                         overlap_p2p_comm=args.overlap_p2p_comm,
                         calculate_per_token_loss=args.calculate_per_token_loss,
                         dynamic=args.use_dpp, dynamic_order=args.dpp_order or BREADTH_FIRST)
    return PipelineExecutor(chunks, ps, cfg, channels, trace), trace


def _finish_trace(args, trace, logger) -> None:
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


def _build_scheduler(args, optimizer):
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


def _resolve_padded_vocab_size(args, orig_vocab: int, logger, rank: int) -> None:
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


def pretrain(argv=None, defaults: dict | None = None) -> int:
    """Train as the command line says; failures of the run become one `error:` line
    (training/failures.py)."""
    return report_failures(_pretrain, argv, defaults)


def _pretrain(argv=None, defaults: dict | None = None) -> int:
    start = time.time()
    args = parse_args(argv, defaults=defaults)
    if args.deterministic_mode:
        # cuBLAS reads its workspace setting when its first handle is made: set it before
        # any GPU work. Ops without a deterministic kernel then raise instead of varying.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:  # before init_distributed, which already uses --distributed-timeout-minutes
        check_ranges(args)
    except ConfigError as e:  # no process group yet: torchrun's RANK picks the rank that prints
        raise SystemExit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 2) from None
    if args.logging_level is not None:
        # As Megatron-LM's initialize.py: the root logger, so every module's messages follow it.
        logging.getLogger().setLevel(args.logging_level)
    env = init_distributed(args.distributed_backend, args.distributed_timeout_minutes, args.local_rank)
    logger = RankLogger(env.rank, env.world_size)
    try:
        if args.use_checkpoint_args:
            use_checkpoint_args(args, logger)
        # Notices about flags are the same on every rank: rank 0 prints them, once.
        validate_args(args, env.world_size, warn=None if env.rank == 0 else (lambda _notice: None))
    except (ConfigError, CheckpointError) as e:
        if env.rank == 0:
            raise SystemExit(f"error: {e}") from None
        raise SystemExit(2) from None
    logger.rank0(world_size_line(args))
    batches = MicroBatchCalculator(args.global_batch_size, args.micro_batch_size, args.data_parallel_size,
                                   tuple(args.rampup_batch_size) if args.rampup_batch_size else None)
    if args.train_samples:
        args.train_iters = batches.iterations_for_samples(args.train_samples)
    logger.rank0(f"> building {args.tokenizer_type} tokenizer ...")
    try:
        tokenizer = build_tokenizer(tokenizer_config_from_args(args))
        data_config = data_config_from_args(args)
    except (ConfigError, TokenizerError) as e:
        if env.rank == 0:
            raise SystemExit(f"error: {e}") from None
        raise SystemExit(2) from None
    orig_vocab = tokenizer.vocab_size
    _resolve_padded_vocab_size(args, orig_vocab, logger, env.rank)
    logger.rank0(format_args_dump(args))

    ps = build_parallel_state(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.context_parallel_size, not args.untie_embeddings_and_output_weights,
                              "tp-cp-pp-dp" if args.use_tp_pp_dp_mapping else "tp-cp-dp-pp",
                              hierarchical_cp=args.hierarchical_context_parallel_sizes,
                              timeout_minutes=args.distributed_timeout_minutes)
    tracker = seed_rank(args.seed, ps, env.device, args.data_parallel_random_init)
    logger.datetime_line("after megatron is initialized")
    logger.rank0(f"time to initialize megatron (seconds): {time.time() - start:.3f}")

    timers = Timers(args.timing_log_level, args.timing_log_option, sync_cuda=env.device.type == "cuda",
                    barrier_with_l1=args.barrier_with_L1_time)
    config = model_config_from_args(args)
    _check_memory(args, config, ps, env, logger)
    # One model chunk per virtual pipeline stage of this rank (spec §5.4).
    chunks = build_model_chunks(config, ps, _pipeline_layout(args), args.seed, tracker, env.device,
                                cpu_init=bool(args.use_cpu_initialization))
    if ps.dp_rank == 0 and ps.cp_rank == 0:
        n = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        logger.all(f" > number of parameters on (tensor, pipeline) model parallel rank "
                   f"({ps.tp_rank}, {ps.pp_rank}): {n}")
    chunks = [_wrap_ddp(args, chunk, ps, c) for c, chunk in enumerate(chunks)]
    model, trace = _build_executor(args, chunks, ps, env)
    optimizer = _build_optimizer(args, chunks, ps)
    scheduler = _build_scheduler(args, optimizer)
    ckpt = RunCheckpointing(args, ps, env, chunks, optimizer, scheduler, tracker, timers, logger) \
        if (args.save or args.load or args.pretrained_checkpoint) else None
    state = ckpt.load() if ckpt is not None else LoopState()
    args.consumed_train_samples, args.consumed_valid_samples = (state.consumed_train_samples,
                                                                state.consumed_valid_samples)
    logger.datetime_line("after model, optimizer, and learning rate scheduler are built")

    try:
        data = build_data_iterators(data_config, tokenizer, ps.dp_rank, ps.dp_size,
                                    consumed_train_samples=args.consumed_train_samples,
                                    consumed_valid_samples=args.consumed_valid_samples,
                                    is_first_rank=env.rank == 0, barrier=dist.barrier, log=logger.rank0)
    except (OSError, ValueError, IndexError) as e:  # missing or corrupt data, empty split, oversampled blend
        raise SystemExit(f"error: {e}") from None
    data_iter, valid_iter, test_iter = _context_parallel_batches(args, data, ps, env.device)
    logger.datetime_line("after dataloaders are built")
    logger.rank0("done with setup ...")
    for line in theoretical_memory_lines(config, LayoutInfo(
            tp=ps.tp_size, pp=ps.pp_size, dp=ps.dp_size, vpp=args.virtual_pipeline_model_parallel_size,
            num_microbatches=args.num_micro_batches, micro_batch_size=args.micro_batch_size,
            seq_length=args.seq_length, use_distributed_optimizer=args.use_distributed_optimizer)):
        logger.rank0(line)

    tensorboard = TensorboardLogger(TensorboardConfig(
        args.tensorboard_dir, args.tensorboard_log_interval, args.tensorboard_queue_size,
        log_loss_scale=args.log_loss_scale_to_tensorboard, log_timers=args.log_timers_to_tensorboard,
        log_validation_ppl=args.log_validation_ppl_to_tensorboard,
        log_memory=args.log_memory_to_tensorboard, log_world_size=args.log_world_size_to_tensorboard),
        is_last_rank=logger.is_last)
    tensorboard.text("arguments", "<pre>" + format_args_dump(args) + "</pre>")

    # --check-for-nan-in-loss-and-grad read by the loop where it syncs anyway, not in the step.
    nan_check = NonFiniteCheck()

    def step(num_microbatches):
        result = train_step(model, optimizer, data_iter, num_microbatches, ps, env.device, timers,
                            empty_unused_memory_level=args.empty_unused_memory_level, nan_check=nan_check)
        if args.pipeline_trace and trace.steps:
            logger.all(trace.step_line())
        return result

    def eval_step(it, num_microbatches):
        return evaluation_step(model, it, num_microbatches, ps, env.device)

    def memory_report(iteration):
        line = memory_report_line(env.rank, iteration, env.device)
        if line is not None and ps.dp_rank == 0:  # spec §3.4: one line per model-parallel rank
            logger.all(line)

    loop = LoopConfig(
        train_iters=args.train_iters, log_interval=args.log_interval, seq_length=args.seq_length,
        world_size=env.world_size, flops_per_sample=num_floating_point_operations(config, 1, args.seq_length),
        eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        eval_num_microbatches=args.eval_global_batch_size // (args.eval_micro_batch_size * ps.dp_size),
        eval_global_batch_size=args.eval_global_batch_size, exit_interval=args.exit_interval,
        exit_duration_in_mins=args.exit_duration_in_mins, save_interval=args.save_interval,
        timing_log_level=args.timing_log_level, log_throughput=args.log_throughput,
        log_params_norm=args.log_params_norm, log_memory_interval=args.log_memory_interval,
        tensorboard_log_interval=args.tensorboard_log_interval)
    save = ckpt.save if (ckpt is not None and args.save) else None
    chores = Housekeeping(HousekeepingConfig(
        manual_gc=args.manual_gc, manual_gc_interval=args.manual_gc_interval,
        manual_gc_eval=args.manual_gc_eval,
        empty_unused_memory_level=args.empty_unused_memory_level, profile=args.profile,
        use_pytorch_profiler=args.use_pytorch_profiler, profile_step_start=args.profile_step_start,
        profile_step_end=args.profile_step_end, profile_ranks=tuple(args.profile_ranks),
        trace_dir=args.tensorboard_dir), env.rank, env.device)

    hash_interval = args.check_weight_hash_across_dp_replicas_interval

    def after_step(iteration):
        chores.after_step(iteration)
        if ckpt is not None:
            ckpt.poll()
        if hash_interval and iteration % hash_interval == 0:
            check_weight_hashes(chunks, ps, env.device, iteration, logger)

    hooks = LoopHooks(step, eval_step, valid_iter, save=save, memory_report=memory_report,
                      before_step=chores.before_step, after_step=after_step, before_eval=chores.before_eval,
                      after_eval=chores.after_eval, check_nonfinite=nan_check.raise_if_found)
    trainer = Trainer(loop, hooks,
                      optimizer=optimizer, scheduler=scheduler,
                      batches=batches, timers=timers, logger=logger, tensorboard=tensorboard,
                      device=env.device, start_time=start)
    exit_reason = None
    if ckpt is not None and ckpt.restore_rng is not None:
        ckpt.restore_rng()  # after the data loaders drew their seeds (see checkpoint/io.py)
    if not args.skip_train:
        logger.rank0("training ...")
        logger.datetime_line("before the start of training step")
        if hash_interval:  # Megatron-LM checks once before the first step too
            check_weight_hashes(chunks, ps, env.device, state.iteration, logger)
        with SignalHandler() if args.exit_signal_handler else contextlib.nullcontext() as handler:
            trainer.hooks.signal_handler = handler
            chores.start(state.iteration + 1)
            try:
                exit_reason = trainer.train(state)
            finally:
                chores.close()
        # spec §4.4: the end of training is saved too when it is not on a save interval.
        if save is not None and exit_reason is None and state.iteration > 0 \
                and state.iteration % (args.save_interval or 1) and ckpt.last_saved != state.iteration:
            save(state)
    if ckpt is not None:
        ckpt.close()  # the background save in flight, if any, is published before we go on
    if exit_reason is None and args.eval_iters > 0:
        prefix = f"iteration {state.iteration}"
        # An empty split (e.g. --split 99,1,0) has no iterator: skipped, as Megatron does.
        if (not args.skip_train or args.eval_interval) and valid_iter is not None:
            trainer.run_evaluation(state, valid_iter, f"{prefix} on validation set", count_samples=False)
        if test_iter is not None:
            trainer.run_evaluation(state, test_iter, f"{prefix} on test set", count_samples=False)
    tensorboard.close()
    if trace is not None:
        _finish_trace(args, trace, logger)
    logger.datetime_line("after training is done")
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    if model.channels is not None:
        model.channels.destroy()
    ps.destroy()
    dist.destroy_process_group()
    return 0
