"""Save and load distributed checkpoints (`--ckpt-format torch_dist`, spec §4).

Tensors (model, fp32 main params, optimizer moments, per-rank RNG tensors) go through
`torch.distributed.checkpoint` as DTensors keyed by global names, so any layout loads any
other. Everything else (iteration, consumed samples, args, scheduler, loss scaler, Python /
NumPy RNG values, FLOPs so far) is JSON in `common.json`: loading it executes no code.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megatron_lite.checkpoint import checksums, rng
from megatron_lite.checkpoint.async_save import AsyncSaver, HostStaging
from megatron_lite.checkpoint.layout import (
    COMMON,
    METADATA,
    METADATA_CONTENT,
    TRACKER,
    CheckpointError,
    checkpoint_writer,
    describe_error,
    iteration_dir,
    prune_checkpoints,
    read_tracker,
    write_json,
    write_tracker,
)
from megatron_lite.checkpoint.megatron.reader import fill_state
from megatron_lite.checkpoint.megatron.record import read_any_record
from megatron_lite.checkpoint.optim_state import OptimizerCheckpoint
from megatron_lite.checkpoint.safe_load import (
    UNSAFE_MARK,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
)
from megatron_lite.checkpoint.sharded import local_params, model_state

CHECKPOINT_VERSION = 3.0
# spec §4.5: model-shape arguments a resumed run must agree on.
_MUST_MATCH = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "add_position_embedding",
    "ffn_hidden_size",
    "num_query_groups",
    "kv_channels",
    "swiglu",
    "normalization",
    "padded_vocab_size",
    "untie_embeddings_and_output_weights",
)


@dataclass
class CheckpointContext:
    """What saving/loading needs besides the training objects; built once per run."""

    mesh: object  # the TP DeviceMesh (checkpoint/sharded.py: build_tp_mesh)
    ps: object
    device: torch.device
    rng_tracker: object = None
    args: dict = field(default_factory=dict)  # the run's arguments: saved, and checked on load


@dataclass
class CheckpointTargets:
    """The training objects a checkpoint is saved from and loaded into."""

    models: list  # this rank's model chunks
    optimizer: object = None
    scheduler: object = None
    grad_scaler: object = None


@dataclass
class SaveOptions:
    save_optim: bool = True  # not --no-save-optim
    save_rng: bool = True  # not --no-save-rng
    fully_parallel: bool = True  # --ckpt-fully-parallel-save (see _save_planner)
    staging: HostStaging | None = None  # copy to (pinned) host memory first
    saver: AsyncSaver | None = None  # --async-save: publish in the background
    on_published: object = None  # () -> None, on every rank right after the publication
    retain_interval: int | None = None  # --save-retain-interval (spec §4.4)


@dataclass
class LoadOptions:
    ckpt_step: int | None = None  # --ckpt-step: this iteration instead of the tracker's
    finetune: bool = False  # weights only, iteration 0 (spec §4.5)
    load_optim: bool = True
    load_rng: bool = True
    override_scheduler: bool = False  # --override-opt_param-scheduler
    use_checkpoint_scheduler: bool = False  # --use-checkpoint-opt_param-scheduler


@dataclass
class LoadedState:
    iteration: int
    consumed_train_samples: int
    consumed_valid_samples: int
    skipped_train_samples: int
    floating_point_operations_so_far: float
    release: bool
    # Restores the saved RNG states. Call it right before the first training step: building
    # data loaders draws from the default generator, which must not shift the restored stream.
    restore_rng: object = None


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)  # torch.dtype and friends: informative only


def _rng_prefix(ps) -> str:
    return f"rng.pp{ps.pp_rank}.tp{ps.tp_rank}."


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier(ps) -> None:
    if ps.world_group is not None:
        dist.barrier(group=ps.world_group)


def _check_finite(models, ps, iteration: int) -> None:
    """Refuse to publish weights with NaN/Inf (a run with --no-check-for-nan-in-loss-and-grad
    can get there): the previous checkpoint stays the one --load finds. Collective."""
    params = local_params(models)  # FSDP2 shards included
    if not params:
        return
    bad = torch.stack([(~torch.isfinite(p)).any() for p in params]).any().float().reshape(1)
    for group in (ps.mp_group, ps.dp_cp_group):  # together they span the world
        if group is not None:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    if bool(bad.item()):
        raise CheckpointError(f"refusing to save iteration {iteration}: the model has non-finite weights "
                              "(NaN/Inf); the previous checkpoint is still the latest")


def _save_planner(fully_parallel: bool):
    """DCP writes each replicated tensor once. By default the writer of each is the rank with
    the least to write so far, which spreads the save over the DP replicas (Megatron's fully
    parallel save); `--no-ckpt-fully-parallel-save` makes the lowest rank write all of them."""
    return DefaultSavePlanner(dedup_save_to_lowest_rank=not fully_parallel)


def save_checkpoint(root: str, iteration: int, targets: CheckpointTargets, loop_state, ctx: CheckpointContext,
                    opts: SaveOptions | None = None) -> str:
    """Collective. Returns the directory the checkpoint will have once published.

    `opts.staging` copies the state to host memory first (reused pinned buffers on CUDA).
    With `opts.saver` (`--async-save`) this returns once the state is in host memory; the saver
    publishes it later (see checkpoint/async_save.py). With `opts.retain_interval`, once
    published, older checkpoints whose iteration is not a multiple of it are deleted."""
    opts = opts or SaveOptions()
    models, saver = targets.models, opts.saver
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    _check_finite(models, ctx.ps, iteration)
    if saver is not None:
        saver.wait()  # the previous save must be published before this one can follow it
    if _rank0():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted save
    _barrier(ctx.ps)
    state = model_state(models, ctx.mesh)
    if opts.save_optim:
        state.update(OptimizerCheckpoint(targets.optimizer, models, ctx.mesh).entries(for_load=False))
    rng_values = None
    if opts.save_rng:
        tensors, rng_values = rng.capture(ctx.rng_tracker, ctx.device)
        state.update({_rng_prefix(ctx.ps) + k: v for k, v in tensors.items()})
    gathered = [None] * ctx.ps.world_size
    key = f"pp{ctx.ps.pp_rank}.tp{ctx.ps.tp_rank}"
    if ctx.ps.world_group is not None:
        dist.all_gather_object(gathered, (key, rng_values), group=ctx.ps.world_group)
    else:
        gathered = [(key, rng_values)]
    common = None
    if _rank0():
        common = _common_record(iteration, loop_state, ctx.ps, opts.save_optim, targets,
                                dict(gathered) if opts.save_rng else None, ctx.args)

    def publish():
        if common is not None:
            _publish(root, iteration, partial, final, common)
            if opts.retain_interval:
                prune_checkpoints(root, iteration, opts.retain_interval)
        if opts.on_published is not None:
            opts.on_published()

    if saver is not None:
        saver.start(state, partial, iteration, publish, planner=_save_planner(opts.fully_parallel))
        return final
    if opts.staging is not None:  # one fast copy to host memory instead of DCP's per-tensor ones
        state = opts.staging.stage(state)
    _write_state(state, partial, iteration, opts.fully_parallel)
    publish()
    _barrier(ctx.ps)
    return final


def _common_record(iteration: int, loop_state, ps, save_optim: bool, targets: CheckpointTargets,
                   rng_values: dict | None, args_dict: dict) -> dict:
    """`common.json`: everything but tensors, as JSON (reading it runs no code)."""
    return {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_train_samples": loop_state.consumed_train_samples,
        "consumed_valid_samples": loop_state.consumed_valid_samples,
        "skipped_train_samples": loop_state.skipped_train_samples,
        "num_floating_point_operations_so_far": loop_state.floating_point_operations_so_far,
        "tensor_model_parallel_size": ps.tp_size,
        "pipeline_model_parallel_size": ps.pp_size,
        "has_optimizer": save_optim,
        "has_rng": rng_values is not None,
        "opt_param_scheduler": targets.scheduler.state_dict(),
        "grad_scaler": targets.grad_scaler.state_dict() if targets.grad_scaler is not None else None,
        "rng_values": rng_values or {},
        "args": _jsonable(args_dict),
    }


def _write_state(state: dict, partial: str, iteration: int, fully_parallel: bool) -> None:
    """Collective synchronous DCP write into `partial`; a failure removes the partial files
    and is a CheckpointError of one line (a full disk reads as `OSError: [Errno 28] ...`)."""
    try:
        dcp.save(state, storage_writer=checkpoint_writer(partial), planner=_save_planner(fully_parallel))
    except (Exception, CheckpointException) as e:
        if _rank0():  # every rank has stopped writing (the failure is collective): free the disk
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"{partial}: save of iteration {iteration} failed ({describe_error(e)}); "
                              "the previous checkpoint is still the latest") from e


def _publish(root: str, iteration: int, partial: str, final: str, common: dict) -> None:
    """Rank 0, after every rank's tensors are written: complete the directory, move it into
    place, then name it in the tracker. A crash before the tracker write leaves the previous
    checkpoint as the one `--load` finds."""
    write_json(os.path.join(partial, COMMON), common)
    write_json(os.path.join(partial, METADATA), METADATA_CONTENT)  # marker written last
    if os.path.exists(final):  # re-saving an iteration: keep the old copy until the new is in
        os.replace(final, final + ".old")
    os.replace(partial, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    write_tracker(root, iteration)


def _check_args(common: dict, args_dict: dict, directory: str) -> None:
    saved = common.get("args", {})
    for name in _MUST_MATCH:
        if name in saved and name in args_dict and _jsonable(args_dict[name]) != saved[name]:
            raise CheckpointError(
                f"{directory}: {name} is {saved[name]!r} in the checkpoint but "
                f"{args_dict[name]!r} on the command line"
            )


def _unsafe(error: BaseException) -> str | None:
    """The refusal of a malicious file (safe_load.py), wherever DCP wrapped it: per-rank
    failure lists, causes, or the text of an error DCP re-raised in its own words."""
    if isinstance(error, UnsafeCheckpointError):
        return str(error)
    for inner in getattr(error, "failures", {}).values():  # rank -> (exception, traceback)
        inner = inner[0] if isinstance(inner, tuple) else inner
        found = _unsafe(inner) if isinstance(inner, BaseException) else None
        if found is not None:
            return found
    for part in str(error).replace("; ", "\n").splitlines():
        if UNSAFE_MARK in part:
            return part[part.find("/"):] if "/" in part else part
    cause = error.__cause__ or error.__context__
    return _unsafe(cause) if cause is not None else None


def _read_state(directory: str, state: dict, ps) -> None:
    """Collective: verify the tensor files' checksums, then fill `state` through the safe
    reader (safe_load.py); every failure is a CheckpointError of one line."""
    corrupted = checksums.verify(directory, ps)  # before DCP reads anything into the model
    if corrupted:
        raise CheckpointError(corrupted)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(directory), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # DCP's lists every rank's failure
        unsafe = _unsafe(e)
        if unsafe is not None:
            raise CheckpointError(unsafe) from None
        raise CheckpointError(_load_failure(directory, e)) from e


def _read_megatron_state(directory: str, megatron, state: dict, rng_prefix: str) -> None:
    """Fill `state` from a Megatron-LM checkpoint (megatron/reader.py); failures in one line."""
    try:
        fill_state(directory, megatron, state, rng_prefix)
    except (CheckpointError, UnsafeCheckpointError) as e:
        raise CheckpointError(str(e)) from None
    except (Exception, CheckpointException) as e:
        unsafe = _unsafe(e)
        raise CheckpointError(unsafe or _load_failure(directory, e)) from e


def _load_failure(directory: str, error: Exception) -> str:
    """One line naming what is wrong: the tensor files shorter than `.metadata` says they are,
    else DCP's own first line."""
    short = []
    try:
        ends = {}
        for info in SafeFileSystemReader(directory).read_metadata().storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(ends.items()):
            path = os.path.join(directory, name)
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size is None or size < end:
                short.append(f"{path} has {'no file' if size is None else f'{size} bytes'}, expected {end}")
    except Exception:  # the metadata itself is unreadable: report DCP's error
        pass
    if short:
        return f"{directory}: truncated checkpoint: " + "; ".join(short)
    return f"{directory}: cannot load ({describe_error(error)})"


def load_checkpoint(root: str, targets: CheckpointTargets, ctx: CheckpointContext, logger,
                    opts: LoadOptions | None = None) -> LoadedState | None:
    """Collective. None when `root` has no checkpoint (the run starts from scratch)."""
    opts = opts or LoadOptions()
    found = read_tracker(root) if opts.ckpt_step is None else (opts.ckpt_step, False)
    if found is None:
        if not os.path.exists(root):  # Megatron starts from scratch here too: say it loudly
            logger.rank0(f"WARNING: --load {root} does not exist; training starts from random weights "
                         "(--exit-on-missing-checkpoint makes this an error)")
        logger.rank0(f"WARNING: could not find the metadata file {os.path.join(root, TRACKER)}")
        logger.rank0("    will not load any checkpoints and will start from random")
        return None
    iteration, release = found
    directory = iteration_dir(root, iteration, release)
    common, megatron = read_any_record(directory)
    logger.rank0(f" loading distributed checkpoint from {root} at iteration {iteration}")
    logger.rank0(f" checkpoint version {common['checkpoint_version']}")
    _check_args(common, ctx.args, directory)
    weights_only = opts.finetune or release
    load_optim = (opts.load_optim and not weights_only and common["has_optimizer"]
                  and targets.optimizer is not None)
    same_layout = (common["tensor_model_parallel_size"] == ctx.ps.tp_size
                   and common["pipeline_model_parallel_size"] == ctx.ps.pp_size)
    load_rng = opts.load_rng and not weights_only and common["has_rng"] and same_layout
    state = model_state(targets.models, ctx.mesh, for_load=True)
    opt_ckpt = OptimizerCheckpoint(targets.optimizer, targets.models, ctx.mesh) \
        if targets.optimizer is not None else None
    if load_optim:
        state.update(opt_ckpt.entries(for_load=True))
    rng_keys = _rng_templates(ctx) if load_rng else {}
    state.update(rng_keys)
    if megatron is not None:
        _read_megatron_state(directory, megatron, state, _rng_prefix(ctx.ps))
    else:
        _read_state(directory, state, ctx.ps)
    if load_optim:
        opt_ckpt.finish_load()
        _load_schedule(common, targets, opts, directory)
    elif opt_ckpt is not None:
        opt_ckpt.refresh_main_from_model()
    logger.rank0(
        f"  successfully loaded checkpoint from {root} [ t {ctx.ps.tp_rank + 1}/{ctx.ps.tp_size}, "
        f"p {ctx.ps.pp_rank + 1}/{ctx.ps.pp_size} ] at iteration {iteration}"
    )
    if weights_only:
        return LoadedState(0, 0, 0, 0, 0.0, release)
    return LoadedState(iteration, common["consumed_train_samples"], common["consumed_valid_samples"],
                       common["skipped_train_samples"], common["num_floating_point_operations_so_far"],
                       release, _rng_restorer(ctx, state, rng_keys, common) if load_rng else None)


def _rng_templates(ctx: CheckpointContext) -> dict:
    """This rank's RNG tensors, as load templates of the right shapes."""
    tensors, _ = rng.capture(ctx.rng_tracker, ctx.device)
    return {_rng_prefix(ctx.ps) + k: v.clone() for k, v in tensors.items()}


def _rng_restorer(ctx: CheckpointContext, state: dict, rng_keys: dict, common: dict):
    """A callable restoring the loaded RNG states (see LoadedState.restore_rng)."""
    prefix = _rng_prefix(ctx.ps)
    saved = {k[len(prefix):]: state[k] for k in rng_keys}
    values = common["rng_values"][f"pp{ctx.ps.pp_rank}.tp{ctx.ps.tp_rank}"]
    return lambda: rng.restore(saved, values, ctx.rng_tracker, ctx.device)


def _load_schedule(common: dict, targets: CheckpointTargets, opts: LoadOptions, directory: str) -> None:
    """The LR schedule's position (its rules: OptimizerParamScheduler.load_state_dict) and the
    loss scaler's state."""
    try:
        targets.scheduler.load_state_dict(common["opt_param_scheduler"], override=opts.override_scheduler,
                                          use_checkpoint=opts.use_checkpoint_scheduler)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    if targets.grad_scaler is not None and common.get("grad_scaler"):
        targets.grad_scaler.load_state_dict(common["grad_scaler"])
