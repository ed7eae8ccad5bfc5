"""Parallel-layout flags (TP/PP/VPP/CP/DP, data-parallel buckets, MoE): Megatron names and defaults.

Split from `arguments.py` to keep each file short; `build_parser` there assembles all groups.
The layout rules these flags must obey are checked in `validation.py` (spec §5, §6.2, §8, §9).
"""
from __future__ import annotations


def _add_distributed_args(parser):
    group = parser.add_argument_group(title="distributed")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1,
                       help="Tensor-parallel size TP.")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                       help="Pipeline-parallel size PP.")
    group.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                       help="Transformer layers on the first pipeline stage (default: even split).")
    group.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                       help="Transformer layers on the last pipeline stage (default: even split).")
    group.add_argument("--pipeline-model-parallel-layout", type=str, default=None,
                       help="Megatron-LM's layer-to-stage layout, stages in pipeline order separated by |: "
                       "E embedding, t transformer layer, L loss, x*n and (...)*n repeat, e.g. "
                       "\"Et*4|t*3|t*3|t*3|t*3|t*3|t*3|t*2L\" (PP 2 x VPP 4). Sets the VPP size itself.")
    group.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                       help="Count the input embedding as one layer when splitting layers over stages.")
    group.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                       help="Count the output layer and loss as one layer when splitting over stages.")
    # spec §5.4: the virtual-pipeline degree comes from one of these two flags.
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                       help="Layers per virtual pipeline stage (model chunk).")
    group.add_argument("--num-virtual-stages-per-pipeline-rank", "--virtual-pipeline-model-parallel-size",
                       type=int, default=None, dest="num_virtual_stages_per_pipeline_rank",
                       help="Model chunks per pipeline rank (VPP).")
    group.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", type=int, default=None,
                       dest="microbatch_group_size_per_vp_stage",
                       help="Consecutive micro-batches run per model chunk in the interleaved schedule "
                       "(N, default PP).")
    group.add_argument("--no-overlap-p2p-communication", action="store_false", dest="overlap_p2p_comm",
                       help="Do not overlap pipeline send/recv with compute (interleaved schedule).")
    group.add_argument("--overlap-p2p-communication-warmup-flush", action="store_true",
                       dest="overlap_p2p_comm_warmup_flush",
                       help="Also overlap send/recv with compute in the warm-up and flush phases of the "
                       "interleaved schedule: megatron_lite's p2p overlap always does (each compute's "
                       "receive is posted before the previous compute, in every phase); needs the "
                       "overlap, as in Megatron-LM.")
    group.add_argument("--distributed-backend", type=str, default=None, choices=["nccl", "gloo"],
                       help="torch.distributed backend; default nccl with CUDA, else gloo.")
    group.add_argument("--distributed-timeout-minutes", type=int, default=10,
                       help="Timeout of torch.distributed collectives, in minutes.")
    group.add_argument("--nccl-communicator-config-path", type=str, default=None,
                       help="YAML file of NCCL options per process group, keyed by Megatron's group names "
                       "(dp, dp_cp, cp, hcp, mp, tp, pp, embd, tp_dp_cp, tp_dp, tp_cp): cga_cluster_size, "
                       "max_ctas, min_ctas, is_high_priority_stream.")
    group.add_argument("--local-rank", type=int, default=None,
                       help="Local rank passed by older launchers (torchrun sets LOCAL_RANK instead).")
    _add_ddp_args(group)
    group.add_argument("--context-parallel-size", type=int, default=1, help="Context-parallel size CP.")
    group.add_argument("--cp-comm-type", nargs="+", type=str, default=["p2p"],
                       help="Context-parallel attention communication: p2p, all_gather (allgather), a2a or "
                       "a2a+p2p; one value, or one per layer.")
    group.add_argument("--hierarchical-context-parallel-sizes", nargs="+", type=int, default=None,
                       help="Inner and outer CP group sizes for a2a+p2p.")
    group.add_argument("--sequence-parallel", action="store_true",
                       help="Shard norm/dropout activations along the sequence over the TP group.")
    group.add_argument("--tp-comm-overlap", action="store_true",
                       help="Overlap TP communication with GEMMs (needs --sequence-parallel).")
    group.add_argument("--use-tp-pp-dp-mapping", action="store_true",
                       help="Order ranks tp-cp-pp-dp instead of tp-cp-dp-pp.")
    group.add_argument("--use-megatron-fsdp", action="store_true", help="Megatron FSDP (not supported).")
    group.add_argument("--use-torch-fsdp2", action="store_true",
                       help="Shard parameters, gradients and optimizer state over the data-parallel ranks "
                       "with PyTorch's FSDP2 (ZeRO-3; data_parallel/fsdp.py).")
    group.add_argument("--torch-fsdp2-no-reshard-after-forward", action="store_false",
                       dest="torch_fsdp2_reshard_after_forward",
                       help="FSDP2: keep the layers gathered from a step's first forward to its last "
                       "backward (one all-gather per layer and step instead of two per micro-batch; "
                       "ZeRO-2-like memory).")
    _add_dpp_args(group)
    return parser


def _add_ddp_args(group) -> None:
    """Data-parallel gradient reduction and the distributed optimizer (data_parallel/ddp.py)."""
    group.add_argument("--use-distributed-optimizer", action="store_true",
                       help="Shard optimizer state over data-parallel ranks (ZeRO-1).")
    group.add_argument("--num-distributed-optimizer-instances", type=int, default=1,
                       help="Number of distributed-optimizer replicas across the data-parallel group.")
    group.add_argument("--overlap-grad-reduce", action="store_true",
                       help="Reduce gradient buckets asynchronously during backward.")
    group.add_argument("--overlap-param-gather", action="store_true",
                       help="All-gather updated parameters asynchronously during the next forward.")
    group.add_argument("--no-align-grad-reduce", action="store_false", dest="align_grad_reduce",
                       help="Let each pipeline stage launch its gradient reduction independently "
                       "(refused: not supported).")
    group.add_argument("--no-align-param-gather", action="store_false", dest="align_param_gather",
                       help="Let each pipeline stage launch its parameter all-gathers independently "
                       "(refused with virtual pipeline stages; without them alignment is off anyway).")
    group.add_argument("--ddp-bucket-size", type=int, default=None,
                       help="Gradient bucket size in elements.")
    group.add_argument("--ddp-num-buckets", type=int, default=None,
                       help="Split the gradients into this many buckets.")
    group.add_argument("--ddp-pad-buckets-for-high-nccl-busbw", action="store_true",
                       help="Pad buckets to a multiple of 2^16 for NCCL bus bandwidth.")
    group.add_argument("--ddp-average-in-collective", action="store_true",
                       help="Average inside the collective instead of pre-scaling by 1/DP.")


def _add_dpp_args(group) -> None:
    """MegatronDPP's dynamic pipeline (issue 18, pipeline_parallel/dynamic*.py), in the group
    where MegatronDPP declares its flags; config/dpp_flags.py checks them."""
    group.add_argument("--use-dpp", action="store_true",
                       help="MegatronDPP's dynamic pipeline: each training step runs whichever forward or "
                       "backward has its input ready (same losses and gradients as the static schedule).")
    group.add_argument("--dpp-order", type=str, default=None, choices=["breadth-first", "depth-first"],
                       help="Priorities of --use-dpp (default breadth-first, MegatronDPP's): breadth-first "
                       "runs many micro-batches through one chunk and holds the activations of the static "
                       "schedule with one group of all micro-batches; depth-first follows "
                       "--microbatch-group-size-per-virtual-pipeline-stage and holds fewer.")
    group.add_argument("--dpp-gpu-queue-depth", type=int, default=None,
                       help="With --use-dpp on GPUs: launch the next task only once at most this many of the "
                       "rank's earlier tasks are unfinished on its GPU, so the pick sees the inputs that "
                       "arrived meanwhile instead of queueing behind work launched ahead (default 0: no "
                       "limit).")
    transport = "MegatronDPP's shared-memory/RDMA transport (no meaning here: accepted with a warning)"
    group.add_argument("--workload", type=int, default=None,
                       help=f"Bytes each copy thread moves in {transport}; MegatronDPP's default 1048576.")
    group.add_argument("--num-gpus", type=int, default=None, help=f"GPUs per node for {transport}.")
    group.add_argument("--node-ips", type=str, default=None,
                       help=f"Comma-separated InfiniBand IPs of the nodes for {transport}.")
    group.add_argument("--multi-node", action="store_true", help=f"Multi-node RDMA mode of {transport}.")


def _add_moe_args(parser):
    group = parser.add_argument_group(title="moe")
    group.add_argument("--expert-model-parallel-size", type=int, default=1,
                       help="Expert-parallel size (MoE; not supported beyond 1).")
    group.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                       help="Tensor-parallel size inside experts (default TP).")
    group.add_argument("--num-experts", type=int, default=None, help="Experts per MoE layer (None: dense).")
    group.add_argument("--moe-router-topk", type=int, default=2, help="Experts each token is routed to.")
    return parser
