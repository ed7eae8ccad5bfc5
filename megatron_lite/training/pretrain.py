"""`pretrain()`: the edge where the argparse namespace becomes objects. It reads as the steps of
DESIGN's "How a step flows": parse and validate the command line, start the distributed world
and the parallel layout, build this rank's model chunks, wrap them for data parallelism, build
the optimizer, scheduler and data iterators, then run the loop and tear down. The builders
live in training/builders.py; after `_finish_arguments` nothing changes `args`."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.layout import CheckpointError
from megatron_lite.config.arguments import parse_args
from megatron_lite.config.configs import ModelConfig, model_config_from_args
from megatron_lite.config.data_config import data_config_from_args, tokenizer_config_from_args
from megatron_lite.config.ranges import check_ranges
from megatron_lite.config.startup_lines import format_args_dump, world_size_line
from megatron_lite.config.validation import ConfigError, validate_args
from megatron_lite.data.builders import build_data_iterators
from megatron_lite.data.tokenizers import TokenizerError, build_tokenizer
from megatron_lite.models.cuda_graphs import enable_cuda_graphs, release_cuda_graphs
from megatron_lite.optimizer.cpu_offload import exclude_host_state_from_forks
from megatron_lite.pipeline_parallel.chunks import build_model_chunks
from megatron_lite.pipeline_parallel.schedules import in_flight_per_chunk
from megatron_lite.training import builders
from megatron_lite.training.checkpointing import RunCheckpointing, use_checkpoint_args
from megatron_lite.training.failures import report_failures
from megatron_lite.training.initialize import build_parallel_state, init_distributed, seed_rank
from megatron_lite.training.logging import RankLogger
from megatron_lite.training.memory import memory_report_line
from megatron_lite.training.microbatches import MicroBatchCalculator
from megatron_lite.training.nonfinite import NonFiniteCheck
from megatron_lite.training.signals import SignalHandler
from megatron_lite.training.timers import Timers
from megatron_lite.training.train_loop import LoopHooks, LoopState, Trainer
from megatron_lite.training.train_step import evaluation_step, train_step
from megatron_lite.training.weight_hash import check_weight_hashes


@dataclass
class TrainingRun:
    """This rank's training objects, each built once from the arguments."""

    args: object
    env: object  # initialize.DistributedEnv
    logger: RankLogger
    ps: object  # ParallelState
    timers: Timers
    config: ModelConfig
    chunks: list  # data-parallel-wrapped model chunks, one per virtual pipeline stage
    executor: object  # PipelineExecutor: runs the schedule over the chunks
    trace: object  # PipelineTrace or None
    optimizer: object
    scheduler: object
    ckpt: RunCheckpointing | None
    nan_check: NonFiniteCheck


def pretrain(argv=None, defaults: dict | None = None) -> int:
    """Train as the command line says; failures of the run become one `error:` line
    (training/failures.py)."""
    return report_failures(_pretrain, argv, defaults)


def _pretrain(argv=None, defaults: dict | None = None) -> int:
    start = time.time()
    args, env, logger = _initialize(argv, defaults)
    tokenizer, data_config, batches = _finish_arguments(args, env, logger)
    run = _build(args, env, logger, start)
    state = run.ckpt.load() if run.ckpt is not None else LoopState()
    valid_iter, test_iter, trainer, chores = _prepare_loop(run, state, tokenizer, data_config, batches, start)
    try:
        exit_reason = _train(run, trainer, chores, state)
        if run.ckpt is not None:
            run.ckpt.close()  # the background save in flight, if any, is published before we go on
        _final_evaluation(run, trainer, state, exit_reason, valid_iter, test_iter)
    finally:
        trainer.tb.close()  # what was logged reaches the disk, failure or not
    if run.trace is not None:
        builders.finish_trace(args, run.trace, logger)
    logger.datetime_line("after training is done")
    _teardown(run)
    return 0


def _one_line(error: Exception, rank: int) -> SystemExit:
    """A configuration error before the world can agree on anything: rank 0 prints it."""
    return SystemExit(f"error: {error}" if rank == 0 else 2)


def single_connection_notice(args, device, environ) -> str | None:
    """Megatron's launch scripts export CUDA_DEVICE_MAX_CONNECTIONS=1 so that its async TP
    collectives start before the GEMMs queued after them. Our overlaps do not rely on it, and
    with tensor parallelism it costs time (issue 13): say so, once, rather than override it."""
    if (device.type == "cuda" and args.tensor_model_parallel_size > 1
            and environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1"):
        return ("WARNING: CUDA_DEVICE_MAX_CONNECTIONS=1 is not needed here and slows tensor "
                "parallelism (2xH200, GPT 1.3B TP2+SP: 1072 vs 882 ms/it); unset it")
    return None


def _initialize(argv, defaults):
    """Parse and validate the command line and start the distributed world."""
    args = parse_args(argv, defaults=defaults)
    if args.deterministic_mode:
        # cuBLAS reads its workspace setting when its first handle is made: set it before
        # any GPU work. Ops without a deterministic kernel then raise instead of varying.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:  # before init_distributed, which already uses --distributed-timeout-minutes
        check_ranges(args)
    except ConfigError as e:  # no process group yet: torchrun's RANK picks the rank that prints
        raise _one_line(e, int(os.environ.get("RANK", "0"))) from None
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
        raise _one_line(e, env.rank) from None
    logger.rank0(world_size_line(args))
    if (notice := single_connection_notice(args, env.device, os.environ)) is not None:
        logger.rank0(notice)
    return args, env, logger


def _finish_arguments(args, env, logger):
    """The derived sizes validation cannot know before the tokenizer and the batch ramp exist:
    the padded vocabulary and, with --train-samples, the iteration count. `args` is final after
    this (and printed)."""
    batches = MicroBatchCalculator(args.global_batch_size, args.micro_batch_size, args.data_parallel_size,
                                   tuple(args.rampup_batch_size) if args.rampup_batch_size else None)
    if args.train_samples:
        args.train_iters = batches.iterations_for_samples(args.train_samples)
    logger.rank0(f"> building {args.tokenizer_type} tokenizer ...")
    try:
        tokenizer = build_tokenizer(tokenizer_config_from_args(args))
        data_config = data_config_from_args(args)
    except (ConfigError, TokenizerError) as e:
        raise _one_line(e, env.rank) from None
    builders.resolve_padded_vocab_size(args, tokenizer.vocab_size, logger, env.rank)
    logger.rank0(format_args_dump(args))
    return tokenizer, data_config, batches


def _build(args, env, logger, start: float) -> TrainingRun:
    """Parallel layout and seeds, then model chunks, DDP/FSDP wrapping, executor, optimizer,
    scheduler and checkpointing (spec §5, §8, §7)."""
    ps = build_parallel_state(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.context_parallel_size, not args.untie_embeddings_and_output_weights,
                              "tp-cp-pp-dp" if args.use_tp_pp_dp_mapping else "tp-cp-dp-pp",
                              hierarchical_cp=args.hierarchical_context_parallel_sizes,
                              timeout_minutes=args.distributed_timeout_minutes,
                              nccl_comm_cfgs=args.nccl_comm_cfgs)
    tracker = seed_rank(args.seed, ps, env.device, args.data_parallel_random_init,
                        graph_safe=args.te_rng_tracker or args.cuda_graph_impl == "local")
    logger.datetime_line("after megatron is initialized")
    logger.rank0(f"time to initialize megatron (seconds): {time.time() - start:.3f}")
    timers = Timers(args.timing_log_level, args.timing_log_option, sync_cuda=env.device.type == "cuda",
                    barrier_with_l1=args.barrier_with_L1_time, group=ps.world_group)
    config = model_config_from_args(args)
    builders.check_memory(args, config, ps, env, logger)
    # One model chunk per virtual pipeline stage of this rank (spec §5.4).
    chunks = build_model_chunks(config, ps, builders.pipeline_layout(args), args.seed, tracker, env.device,
                                cpu_init=bool(args.use_cpu_initialization))
    if ps.dp_rank == 0 and ps.cp_rank == 0:
        n = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        logger.all(f" > number of parameters on (tensor, pipeline) model parallel rank "
                   f"({ps.tp_rank}, {ps.pp_rank}): {n}")
    chunks = [builders.wrap_chunk(args, chunk, ps, c) for c, chunk in enumerate(chunks)]
    executor, trace = builders.build_executor(args, chunks, ps, env)
    optimizer = builders.build_optimizer(args, chunks, ps)
    scheduler = builders.build_scheduler(args, optimizer)
    ckpt = RunCheckpointing(args, ps, env, chunks, optimizer, scheduler, tracker, timers, logger) \
        if (args.save or args.load or args.pretrained_checkpoint) else None
    return TrainingRun(args, env, logger, ps, timers, config, chunks, executor, trace, optimizer, scheduler,
                       ckpt, NonFiniteCheck())


def _data_iterators(run: TrainingRun, state: LoopState, tokenizer, data_config):
    """(train, valid, test) iterators from where the loaded checkpoint left off (spec §2.11)."""
    args, ps, env = run.args, run.ps, run.env
    world = ps.world_group
    try:
        data = build_data_iterators(data_config, tokenizer, ps.dp_rank, ps.dp_size,
                                    consumed_train_samples=state.consumed_train_samples,
                                    consumed_valid_samples=state.consumed_valid_samples,
                                    is_first_rank=env.rank == 0,
                                    barrier=lambda: world is None or dist.barrier(group=world),
                                    log=run.logger.rank0)
    except (OSError, ValueError, IndexError) as e:  # missing or corrupt data, empty split, oversampled blend
        raise SystemExit(f"error: {e}") from None
    return builders.context_parallel_batches(args, data, ps, env.device)


def _prepare_loop(run: TrainingRun, state, tokenizer, data_config, batches, start: float):
    """Data iterators, the setup report lines, and the Trainer with its hooks."""
    args, ps, env, logger = run.args, run.ps, run.env, run.logger
    logger.datetime_line("after model, optimizer, and learning rate scheduler are built")
    # Before any data worker forks (at the first batch): see exclude_host_state_from_forks.
    exclude_host_state_from_forks(run.optimizer)
    data_iter, valid_iter, test_iter = _data_iterators(run, state, tokenizer, data_config)
    logger.datetime_line("after dataloaders are built")
    logger.rank0("done with setup ...")
    for line in builders.theoretical_memory(args, run.config, ps):
        logger.rank0(line)
    tensorboard = builders.tensorboard_logger(args, logger)
    tensorboard.text("arguments", "<pre>" + format_args_dump(args) + "</pre>")
    chores = builders.housekeeping(args, env)
    hooks = _loop_hooks(run, chores, data_iter, valid_iter)
    trainer = Trainer(builders.loop_config(args, run.config, ps, env), hooks, optimizer=run.optimizer,
                      scheduler=run.scheduler, batches=batches, timers=run.timers, logger=logger,
                      tensorboard=tensorboard, device=env.device, start_time=start)
    return valid_iter, test_iter, trainer, chores


def _loop_hooks(run: TrainingRun, chores, data_iter, valid_iter) -> LoopHooks:
    """What the loop calls back into: the step itself, evaluation, saving, the per-iteration
    chores and checks (train_loop.LoopHooks)."""
    args, ps, env, logger = run.args, run.ps, run.env, run.logger
    hash_interval = args.check_weight_hash_across_dp_replicas_interval

    graphs_after = args.cuda_graph_warmup_steps if args.cuda_graph_impl == "local" else None
    steps_run = [0]  # in this process (a resumed run warms up again)

    def step(num_microbatches):
        if steps_run[0] == graphs_after:
            logger.rank0(f"CUDA graphs: capturing every transformer layer after {graphs_after} warm-up "
                         "iterations (--cuda-graph-impl local)")
            # Micro-batches of each chunk in flight at once under this step's schedule: that
            # many copies of its graphs (1 each without pipeline parallelism).
            slots = in_flight_per_chunk(run.executor.schedule(num_microbatches), len(run.chunks))
            for chunk, n in zip(run.chunks, slots):
                enable_cuda_graphs(chunk, n)
        steps_run[0] += 1
        result = train_step(run.executor, run.optimizer, data_iter, num_microbatches, ps, env.device,
                            run.timers, empty_unused_memory_level=args.empty_unused_memory_level,
                            nan_check=run.nan_check)
        if args.pipeline_trace and run.trace.steps:
            logger.all(run.trace.step_line())
        return result

    def memory_report(iteration):
        line = memory_report_line(env.rank, iteration, env.device)
        if line is not None and ps.dp_rank == 0:  # spec §3.4: one line per model-parallel rank
            logger.all(line)

    def after_step(iteration):
        chores.after_step(iteration)
        if run.ckpt is not None:
            run.ckpt.poll()
        if hash_interval and iteration % hash_interval == 0:
            check_weight_hashes(run.chunks, ps, env.device, iteration, logger)

    return LoopHooks(
        step, lambda it, m: evaluation_step(run.executor, it, m, ps, env.device), valid_iter,
        save=run.ckpt.save if (run.ckpt is not None and args.save) else None,
        signal_handler=SignalHandler(group=ps.world_group) if args.exit_signal_handler else None,
        memory_report=memory_report, before_step=chores.before_step, after_step=after_step,
        before_eval=chores.before_eval, after_eval=chores.after_eval,
        check_nonfinite=run.nan_check.raise_if_found)


def _train(run: TrainingRun, trainer: Trainer, chores, state: LoopState):
    """The training iterations (unless --skip-train) and the final save; returns the loop's
    exit reason (None when it ran to --train-iters)."""
    args, logger, hooks = run.args, run.logger, trainer.hooks
    if run.ckpt is not None and run.ckpt.restore_rng is not None:
        run.ckpt.restore_rng()  # after the data loaders drew their seeds (see checkpoint/io.py)
    if args.skip_train:
        return None
    logger.rank0("training ...")
    logger.datetime_line("before the start of training step")
    if args.check_weight_hash_across_dp_replicas_interval:  # Megatron-LM checks before step 1 too
        check_weight_hashes(run.chunks, run.ps, run.env.device, state.iteration, logger)
    with hooks.signal_handler or contextlib.nullcontext():
        chores.start(state.iteration + 1)
        try:
            exit_reason = trainer.train(state)
        finally:
            chores.close()
    # spec §4.4: the end of training is saved too when it is not on a save interval.
    if hooks.save is not None and exit_reason is None and state.iteration > 0 \
            and state.iteration % (args.save_interval or 1) and run.ckpt.last_saved != state.iteration:
        hooks.save(state)
    return exit_reason


def _final_evaluation(run: TrainingRun, trainer: Trainer, state, exit_reason, valid_iter, test_iter) -> None:
    args = run.args
    if exit_reason is not None or args.eval_iters <= 0:
        return
    prefix = f"iteration {state.iteration}"
    # An empty split (e.g. --split 99,1,0) has no iterator: skipped, as Megatron does.
    if (not args.skip_train or args.eval_interval) and valid_iter is not None:
        trainer.run_evaluation(state, valid_iter, f"{prefix} on validation set", count_samples=False)
    if test_iter is not None:
        trainer.run_evaluation(state, test_iter, f"{prefix} on test set", count_samples=False)


def _teardown(run: TrainingRun) -> None:
    """Collective: free the CUDA graphs (they hold the NCCL communicators their collectives
    were captured on), the p2p links, the layout's groups and the world, in that order."""
    if run.env.device.type == "cuda":
        torch.cuda.synchronize()
        for chunk in run.chunks:
            release_cuda_graphs(chunk)
    if run.executor.channels is not None:
        run.executor.channels.destroy()
    run.ps.destroy()
    dist.destroy_process_group()
