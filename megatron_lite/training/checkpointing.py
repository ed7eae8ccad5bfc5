"""`--save` / `--load` / `--use-checkpoint-args` for one run: the edge between the argparse
namespace and checkpoint/io.py, with Megatron-LM's checkpoint log lines (spec §3.7)."""
from __future__ import annotations

from dataclasses import replace

from megatron_lite.checkpoint.async_save import AsyncSaver, HostStaging
from megatron_lite.checkpoint.checkpoint_args import checkpoint_arg_updates, saved_args
from megatron_lite.checkpoint.io import (
    CheckpointContext,
    CheckpointTargets,
    LoadOptions,
    SaveOptions,
    load_checkpoint,
    save_checkpoint,
)
from megatron_lite.checkpoint.layout import CheckpointError
from megatron_lite.checkpoint.sharded import build_tp_mesh
from megatron_lite.config.errors import ConfigError
from megatron_lite.training.logging import saved_checkpoint_line, saving_checkpoint_line
from megatron_lite.training.train_loop import LoopState

# --dist-ckpt-strictness values under which Megatron-LM loads the rest of a checkpoint that lacks
# some of the model's tensors (they keep their initial values); megatron_lite never does.
_PARTIAL_LOAD_STRICTNESS = ("log_unexpected", "log_all", "ignore_all")
# DCP's message for a model tensor absent from the checkpoint.
_MISSING_TENSOR = "Missing key in checkpoint state_dict"


def strictness_note(strictness: str, error: str) -> str:
    """What to add to a failed load's error line under --dist-ckpt-strictness. Its values agree
    with megatron_lite's loader (a model tensor missing from the checkpoint stops the load, a
    checkpoint tensor the model lacks is skipped) for a checkpoint that matches the model; they
    differ only here, where Megatron-LM would load the checkpoint partially: say so by name."""
    if strictness in _PARTIAL_LOAD_STRICTNESS and _MISSING_TENSOR in error:
        return (f" (--dist-ckpt-strictness {strictness} would load the rest; megatron_lite never loads "
                "a checkpoint partially)")
    return ""


class RunCheckpointing:
    """`--save` / `--load` for this run: the edge between args and checkpoint/io.py."""

    def __init__(self, args, ps, env, chunks, optimizer, scheduler, rng_tracker, timers, logger):
        self.args, self.ps, self.chunks = args, ps, chunks
        self.optimizer, self.scheduler = optimizer, scheduler
        self.timers, self.logger = timers, logger
        self.ctx = CheckpointContext(build_tp_mesh(ps, env.device.type), ps, env.device, rng_tracker,
                                     args=vars(args))
        self.targets = CheckpointTargets(chunks, optimizer, scheduler, optimizer.scaler)
        self.saver = AsyncSaver(env.device, ps.timeout) if (args.async_save and args.save) else None
        # Synchronous saves from a GPU also go through pinned host buffers (see HostStaging).
        self.staging = HostStaging(env.device) if (env.device.type == "cuda" and self.saver is None) else None
        self.last_saved, self.restore_rng = None, None

    def load(self) -> LoopState:
        a = self.args
        opts = LoadOptions(ckpt_step=a.ckpt_step, finetune=a.finetune, load_optim=not a.no_load_optim,
                           load_rng=not a.no_load_rng, override_scheduler=a.override_opt_param_scheduler,
                           use_checkpoint_scheduler=a.use_checkpoint_opt_param_scheduler)
        self.timers("load-checkpoint", 0).start(barrier=True)
        try:
            loaded = None
            if a.load:
                loaded = load_checkpoint(a.load, self.targets, self.ctx, self.logger, opts)
            if loaded is None and a.pretrained_checkpoint:  # spec §4.5: finetune semantics
                opts = replace(opts, ckpt_step=None, finetune=True)
                loaded = load_checkpoint(a.pretrained_checkpoint, self.targets, self.ctx, self.logger, opts)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}{strictness_note(a.dist_ckpt_strictness, str(e))}") from None
        self.timers("load-checkpoint", 0).stop(barrier=True)
        if loaded is not None:
            block = self.timers.log_string(["load-checkpoint"])
            if block:
                self.logger.rank0(block)
        if loaded is None:
            if a.load and a.exit_on_missing_checkpoint:
                raise SystemExit(f"error: --exit-on-missing-checkpoint: no checkpoint in --load {a.load}")
            return LoopState()
        self.restore_rng = loaded.restore_rng
        state = LoopState(loaded.iteration, loaded.consumed_train_samples, loaded.consumed_valid_samples,
                          loaded.skipped_train_samples, loaded.floating_point_operations_so_far)
        if a.override_ckpt_iteration is not None:  # spec §4.5
            n = a.override_ckpt_iteration
            self.logger.rank0(f" overriding the checkpoint iteration {state.iteration} with {n} "
                              f"(consumed samples {n * a.global_batch_size})")
            state.iteration, state.consumed_train_samples = n, n * a.global_batch_size
        return state

    def save(self, state: LoopState) -> None:
        a, ps, timers = self.args, self.ps, self.timers
        for chunk in self.chunks:  # overlapped param all-gathers must have landed
            chunk.finish_param_sync()
        timers("save-checkpoint", 0).start(barrier=True)
        self.logger.rank0(saving_checkpoint_line(state.iteration, a.save, a.ckpt_format))
        iteration = state.iteration
        if self.saver is not None:  # the previous background save must be published first
            self._report(self.saver.wait)

        def published():
            self.logger.rank0(saved_checkpoint_line(iteration, a.save, (ps.tp_rank, ps.tp_size),
                                                    (ps.pp_rank, ps.pp_size)))

        try:
            save_checkpoint(a.save, iteration, self.targets, state, self.ctx, SaveOptions(
                save_optim=not a.no_save_optim, save_rng=not a.no_save_rng,
                fully_parallel=a.ckpt_fully_parallel_save, staging=self.staging, saver=self.saver,
                on_published=published, retain_interval=a.save_retain_interval))
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        # With --async-save this is the time the step was blocked: the copy to host memory.
        timers("save-checkpoint", 0).stop(barrier=True)
        if self.saver is not None:
            size, seconds = self.saver.last_staging
            self.logger.rank0(f"  scheduled an async checkpoint save at iteration {iteration:7d} to {a.save}")
            self.logger.rank0(f"  copied {size / 2**30:.2f} GiB to host memory in {seconds:.2f} s")
        block = timers.log_string(["save-checkpoint"])
        if block:
            self.logger.rank0(block)
        self.last_saved = iteration

    def poll(self) -> None:
        """Publish a finished background save (`--async-save`); called after every step."""
        if self.saver is not None:
            self._report(self.saver.poll)

    def close(self) -> None:
        """Wait for the save in flight, then release the staging buffers and the save group."""
        if self.saver is not None:
            self._report(self.saver.close)

    def _report(self, finish) -> None:
        try:
            result = finish()
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        if result is not None:
            self.logger.rank0(f"  async checkpoint save of iteration {result.iteration:7d} took "
                              f"{result.seconds:.2f} s in the background")


# What --no-use-tokenizer-model-from-checkpoint-args keeps from the command line.
_CHECKPOINT_TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model")


def use_checkpoint_args(args, logger) -> None:
    """`--use-checkpoint-args` (spec §4.5): the model shape of the checkpoint `--load` names."""
    if not args.load:
        raise ConfigError("--use-checkpoint-args needs --load")
    saved = saved_args(args.load, args.ckpt_step)
    if saved is None:
        if args.exit_on_missing_checkpoint:
            raise ConfigError(f"--use-checkpoint-args: no checkpoint in --load {args.load}")
        logger.rank0("Checkpoint not found to provide arguments, using provided arguments.")
        return
    tokenizer_flags = {name: getattr(args, name) for name in _CHECKPOINT_TOKENIZER_ARGS}
    updates = checkpoint_arg_updates(vars(args), saved)
    for name, value in updates.items():
        setattr(args, name, value)
    changed = list(updates)
    for name in _CHECKPOINT_TOKENIZER_ARGS:
        # Megatron-LM (checkpointing.py load_args_from_checkpoint) forces the checkpoint's
        # tokenizer unless --no-use-tokenizer-model-from-checkpoint-args keeps the command line's.
        value = saved.get(name) if args.use_tokenizer_model_from_checkpoint_args else tokenizer_flags[name]
        if value is not None and value != getattr(args, name):
            setattr(args, name, value)
            changed.append(name)
        elif value is None and name in changed:  # the command line left it unset: keep it unset
            setattr(args, name, None)
            changed.remove(name)
    logger.rank0(f" using the checkpoint's arguments: {', '.join(changed) or 'none differ'}")
