"""Rules of MegatronDPP's flags (issue 18): `--use-dpp` and `--dpp-order` choose the dynamic
pipeline schedule (pipeline_parallel/dynamic*.py); `--workload`, `--num-gpus`, `--node-ips` and
`--multi-node` configure MegatronDPP's own shared-memory/RDMA tensor transport. Pipeline
messages here go through torch.distributed point-to-point channels (NCCL or gloo), where those
have no meaning, so they are accepted with one warning line: MegatronDPP's launch scripts run
unchanged. `--dpp-gpu-queue-depth` is ours (dynamic_executor.py). Runs on the raw flags, before
validation derives the schedule's group size."""
from __future__ import annotations

from collections.abc import Callable

from megatron_lite.config.errors import ConfigError
from megatron_lite.pipeline_parallel.dynamic import BREADTH_FIRST


def check_dpp_flags(args, warn: Callable[[str], None]) -> None:
    transport = (("--workload", args.workload is not None), ("--num-gpus", args.num_gpus is not None),
                 ("--node-ips", args.node_ips is not None), ("--multi-node", args.multi_node))
    given = [flag for flag, on in transport if on]
    if given:
        warn(f"{', '.join(given)}: settings of MegatronDPP's shared-memory/RDMA transport, which has no "
             "meaning here (pipeline tensors go through torch.distributed p2p over NCCL or gloo); ignored")
    if not args.use_dpp:
        ours = (("--dpp-order", args.dpp_order), ("--dpp-gpu-queue-depth", args.dpp_gpu_queue_depth))
        for flag, value in ours:
            if value is not None:
                raise ConfigError(f"{flag} needs --use-dpp")
        return
    if args.pipeline_model_parallel_size < 2:
        raise ConfigError("--use-dpp needs --pipeline-model-parallel-size > 1 (it reorders the pipeline "
                          "schedule)")
    if args.dpp_order is None:
        args.dpp_order = BREADTH_FIRST
    if args.dpp_gpu_queue_depth is None:
        args.dpp_gpu_queue_depth = 0
    if args.dpp_order == BREADTH_FIRST and args.microbatch_group_size_per_vp_stage is not None:
        raise ConfigError("--microbatch-group-size-per-virtual-pipeline-stage sets the order of --dpp-order "
                          "depth-first; breadth-first takes all micro-batches as one group")
