"""Flags for what goes in and out of a run: data, tokenizer, checkpoints, evaluation, logging.

Split from `arguments.py` to keep each file short; `build_parser` there assembles all groups.
Names and defaults are Megatron-LM's (spec §10; data §2, checkpoints §4, log lines §3).
"""
from __future__ import annotations

from megatron_lite.config.accepted_as_is import ACCEPTED_AS_IS

TOKENIZER_TYPES = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "TikTokenizer",
    "MultimodalTokenizer",
    "SFTTokenizer",
    "NullTokenizer",
)

# Values of Megatron's StrictHandling enum for --dist-ckpt-strictness (spec §10).
DIST_CKPT_STRICTNESS = (
    "assume_ok_unexpected",
    "log_unexpected",
    "log_all",
    "raise_unexpected",
    "raise_all",
    "return_unexpected",
    "return_all",
    "ignore_all",
)


def _add_checkpointing_args(parser):
    group = parser.add_argument_group(title="checkpointing")
    group.add_argument("--save", type=str, default=None, help="Directory to save checkpoints to.")
    group.add_argument("--save-interval", "--persistent-save-interval", type=int, default=None,
                       help="Iterations between checkpoint saves (required with --save).")
    group.add_argument("--save-retain-interval", type=int, default=None,
                       help="Keep only checkpoints whose iteration is a multiple of this value.")
    # Megatron gives these store_true flags a None default; the dump prints None (spec §3.1).
    group.add_argument("--no-save-optim", action="store_true", default=None,
                       help="Do not save the optimizer state.")
    group.add_argument("--no-save-rng", action="store_true", default=None, help="Do not save RNG state.")
    group.add_argument("--load", type=str, default=None, help="Directory to load a checkpoint from.")
    group.add_argument("--no-load-optim", action="store_true", default=None,
                       help="Do not load the optimizer and scheduler state.")
    group.add_argument("--no-load-rng", action="store_true", default=None, help="Do not load RNG state.")
    group.add_argument("--finetune", action="store_true",
                       help="Load model weights only and start at iteration 0.")
    group.add_argument("--pretrained-checkpoint", type=str, default=None,
                       help="Checkpoint to finetune from when --load has none.")
    group.add_argument("--ckpt-step", type=int, default=None,
                       help="Load this iteration instead of the tracker's.")
    group.add_argument("--override-ckpt-iteration", type=int, default=None,
                       help="Resume at this iteration with consumed samples = iteration * B.")
    group.add_argument("--use-checkpoint-args", action="store_true",
                       help="Take model-shape arguments from the checkpoint.")
    group.add_argument("--no-use-tokenizer-model-from-checkpoint-args", action="store_false",
                       dest="use_tokenizer_model_from_checkpoint_args",
                       help="With --use-checkpoint-args, keep the command line's --tokenizer-type and "
                       "--tokenizer-model instead of the checkpoint's.")
    group.add_argument("--exit-on-missing-checkpoint", action="store_true",
                       help="Exit instead of initializing randomly when --load has no checkpoint.")
    group.add_argument("--ckpt-format", type=str, default="torch_dist",
                       choices=["torch", "torch_dist", "torch_dcp", "fsdp_dtensor"],
                       help="Checkpoint format: torch_dist (the others are refused).")
    group.add_argument("--auto-detect-ckpt-format", action="store_true",
                       help=ACCEPTED_AS_IS["auto_detect_ckpt_format"])
    group.add_argument("--ckpt-convert-format", type=str, default=None, choices=["torch", "torch_dist"],
                       help="Re-save the loaded checkpoint in this format (refused: not supported).")
    group.add_argument("--ckpt-convert-save", type=str, default=None,
                       help="Directory for the converted checkpoint (refused: not supported).")
    group.add_argument("--async-save", action="store_true", default=None,
                       help="Write checkpoints in a background thread; the step waits only for the copy to "
                       "host memory.")
    group.add_argument("--no-ckpt-fully-parallel-save", action="store_false", dest="ckpt_fully_parallel_save",
                       help="Do not spread checkpoint writing over the data-parallel group.")
    # Megatron-LM's dest and notice: deprecated, parallel saving is the default.
    group.add_argument("--ckpt-fully-parallel-save", action="store_true",
                       dest="ckpt_fully_parallel_save_deprecated",
                       help="Deprecated (as in Megatron-LM): parallel saving is the default; see "
                       "--no-ckpt-fully-parallel-save.")
    group.add_argument("--use-persistent-ckpt-worker", action="store_true",
                       help=ACCEPTED_AS_IS["use_persistent_ckpt_worker"])
    group.add_argument("--ckpt-fully-parallel-load", action="store_true",
                       help=ACCEPTED_AS_IS["ckpt_fully_parallel_load"])
    group.add_argument("--ckpt-assume-constant-structure", action="store_true",
                       help=ACCEPTED_AS_IS["ckpt_assume_constant_structure"])
    group.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                       help=ACCEPTED_AS_IS["dist_ckpt_optim_fully_reshardable"])
    group.add_argument("--dist-ckpt-strictness", type=str, default="assume_ok_unexpected",
                       choices=list(DIST_CKPT_STRICTNESS),
                       help="Handling of key mismatches when loading a distributed checkpoint: a model "
                       "tensor missing from the checkpoint stops the load (under log_unexpected, log_all and "
                       "ignore_all too: no partial loads), a checkpoint tensor the model lacks is skipped; "
                       "raise_all and return_* are refused.")
    group.add_argument("--non-persistent-save-interval", type=int, default=None,
                       help="Iterations between rolling non-persistent saves (refused: not supported).")
    group.add_argument("--non-persistent-ckpt-type", type=str, default=None, choices=["global", "local"],
                       help="Kind of non-persistent checkpoint (refused: not supported).")
    group.add_argument("--non-persistent-global-ckpt-dir", type=str, default=None,
                       help="Directory of global non-persistent checkpoints (refused: not supported).")
    return parser


def _add_validation_args(parser):
    group = parser.add_argument_group(title="validation")
    group.add_argument("--eval-iters", type=int, default=100,
                       help="Iterations per evaluation (0 disables validation and test).")
    group.add_argument("--eval-interval", type=int, default=1000, help="Iterations between evaluations.")
    group.add_argument("--eval-global-batch-size", type=int, default=None,
                       help="Global batch size for evaluation (default --global-batch-size).")
    group.add_argument("--eval-micro-batch-size", type=int, default=None,
                       help="Micro-batch size for evaluation (default --micro-batch-size).")
    group.add_argument("--skip-train", action="store_true",
                       help="Skip training; only evaluate (if enabled) and exit.")
    group.add_argument("--full-validation", action="store_true",
                       help="Evaluate on the whole validation set each time.")
    group.add_argument("--multiple-validation-sets", action="store_true",
                       help="Report one validation loss per validation dataset.")
    return parser


def _add_data_args(parser):
    group = parser.add_argument_group(title="data and dataloader")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="[weight1] prefix1 [weight2 prefix2 ...], split by --split.")
    group.add_argument("--split", type=str, default=None,
                       help="Train,valid,test proportions, e.g. 949,50,1.")
    group.add_argument("--train-data-path", nargs="*", default=None, help="Blend used only for training.")
    group.add_argument("--valid-data-path", nargs="*", default=None, help="Blend used only for validation.")
    group.add_argument("--test-data-path", nargs="*", default=None, help="Blend used only for test.")
    group.add_argument("--data-args-path", type=str, default=None,
                       help="File holding the --data-path list.")
    group.add_argument("--per-split-data-args-path", type=str, default=None,
                       help="JSON file with train/valid/test blends.")
    group.add_argument("--data-cache-path", type=str, default=None,
                       help="Directory for dataset index caches.")
    group.add_argument("--mock-data", action="store_true", help="Train on synthetic data.")
    group.add_argument("--no-mmap-bin-files", action="store_false", dest="mmap_bin_files",
                       help="Read .bin files without mmap.")
    group.add_argument("--seq-length", type=int, default=None, help="Sequence length S.")
    group.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes.")
    group.add_argument("--reset-position-ids", action="store_true",
                       help="Restart position ids after every end-of-document token.")
    group.add_argument("--reset-attention-mask", action="store_true",
                       help="Block attention across end-of-document tokens.")
    group.add_argument("--eod-mask-loss", action="store_true",
                       help="Mask the loss where the input token is end-of-document.")
    group.add_argument("--no-create-attention-mask-in-dataloader", action="store_false",
                       dest="create_attention_mask_in_dataloader",
                       help="Do not build the attention mask in the dataloader.")
    group.add_argument("--num-dataset-builder-threads", type=int, default=1,
                       help="Threads per rank building blended datasets.")
    group.add_argument("--mid-level-dataset-surplus", type=float, default=0.005,
                       help="Extra fraction of samples built for each dataset of a blend.")
    group.add_argument("--allow-ambiguous-pad-tokens", action="store_true",
                       help="Keep a pad id that collides with another special token.")
    return parser


def _add_tokenizer_args(parser):
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, default=None, choices=list(TOKENIZER_TYPES),
                       help="Tokenizer family.")
    group.add_argument("--vocab-file", type=str, default=None,
                       help="Vocabulary file (GPT-2 vocab.json, BERT vocab).")
    group.add_argument("--merge-file", type=str, default=None, help="GPT-2 BPE merges file.")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="SentencePiece model, HuggingFace id/path or tiktoken json.")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="Vocabulary size for NullTokenizer / TikTokenizer.")
    group.add_argument("--padded-vocab-size", type=int, default=None,
                       help="Padded vocabulary size (default: computed from the tokenizer).")
    group.add_argument("--null-tokenizer-eod-id", type=int, default=None,
                       help="End-of-document id of NullTokenizer (default vocab-size - 1).")
    group.add_argument("--tiktoken-pattern", type=str, default=None, help="tiktoken pattern: v1 or v2.")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="Number of special tokens of TikTokenizer.")
    group.add_argument("--tokenizer-special-tokens", type=str, nargs="+", default=None,
                       help="Extra special tokens.")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="Let HuggingFace tokenizers run code from the model repository.")
    return parser


def _add_logging_args(parser):
    group = parser.add_argument_group(title="logging")
    group.add_argument("--log-interval", type=int, default=100, help="Iterations between log lines.")
    group.add_argument("--logging-level", type=int, default=None,
                       help="Level of the root Python logger (e.g. 10 debug, 20 info, 40 error).")
    group.add_argument("--log-params-norm", action="store_true", help="Log the parameter norm.")
    group.add_argument("--log-num-zeros-in-grad", action="store_true",
                       help="Log the number of zero gradient entries.")
    group.add_argument("--log-throughput", action="store_true", help="Log TFLOP/s per GPU.")
    group.add_argument("--log-energy", action="store_true", help="Log energy and power per GPU.")
    group.add_argument("--log-progress", action="store_true",
                       help="Append progress lines to <save>/progress.txt.")
    group.add_argument("--log-memory-interval", type=int, default=None,
                       help="Iterations between memory reports.")
    group.add_argument("--timing-log-level", type=int, default=0, choices=[0, 1, 2],
                       help="Timer detail: 0 iteration only, 1 once-per-step ops, 2 everything.")
    group.add_argument("--timing-log-option", type=str, default="minmax", choices=["max", "minmax", "all"],
                       help="Report max, min and max, or all ranks' timings.")
    group.add_argument("--no-barrier-with-level-1-timing", action="store_false", dest="barrier_with_L1_time",
                       help="Do not barrier before level-1 timers.")
    group.add_argument("--wandb-project", type=str, default="", help="W&B project (empty: no W&B).")
    group.add_argument("--wandb-entity", type=str, default="", help="W&B entity.")
    group.add_argument("--wandb-exp-name", type=str, default="", help="W&B run name.")
    group.add_argument("--wandb-save-dir", type=str, default="", help="Local directory for W&B files.")
    # megatron_lite extension: print each rank's pipeline schedule (spec §6).
    group.add_argument("--pipeline-trace", action="store_true",
                       help="Log the forward/backward order of each pipeline rank (megatron_lite only).")
    group.add_argument("--pipeline-trace-file", type=str, default=None,
                       help="Write every rank's forward/backward timeline as Chrome-trace JSON to this file "
                       "at the end of training, and print the measured pipeline bubble (megatron_lite only).")
    return parser


def _add_tensorboard_args(parser):
    group = parser.add_argument_group(title="tensorboard")
    group.add_argument("--tensorboard-dir", type=str, default=None,
                       help="Write TensorBoard events here (last rank only).")
    group.add_argument("--tensorboard-log-interval", type=int, default=1,
                       help="Iterations between TensorBoard scalars.")
    group.add_argument("--tensorboard-queue-size", type=int, default=1000,
                       help="Pending TensorBoard events before a flush.")
    group.add_argument("--log-timers-to-tensorboard", action="store_true",
                       help="Write timers to TensorBoard.")
    group.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                       help="Write validation perplexity to TensorBoard.")
    group.add_argument("--log-memory-to-tensorboard", action="store_true",
                       help="Write memory use to TensorBoard.")
    group.add_argument("--log-world-size-to-tensorboard", action="store_true",
                       help="Write the world size to TensorBoard.")
    group.add_argument("--no-log-loss-scale-to-tensorboard", action="store_false",
                       dest="log_loss_scale_to_tensorboard",
                       help="Do not write the loss scale to TensorBoard.")
    return parser
