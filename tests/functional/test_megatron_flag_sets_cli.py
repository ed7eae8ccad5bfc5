"""Megatron-LM's own launch flags run unchanged at tiny sizes (the drop-in issue's done criterion):
`examples/gpt3/train_gpt3_175b_distributed.sh` (core_v0.14-0.17) and two of Megatron's GPT
functional-test configs (`tests/functional_tests/test_cases/gpt/*/model_config.yaml`), with only
the sizes shrunk, the paths filled in and `--distributed-backend nccl` read as gloo (no GPU here).
"""
import importlib.util
import os
import re

import pytest

from tests.functional.test_pretrain_cli import ROOT, resumed_loss, torchrun
from tests.functional.test_pretrain_data import GPT2, corpus


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """GPT-2 tokens of a corpus large enough for --split 949,50,1 to give its test split documents."""
    d = tmp_path_factory.mktemp("megatron_data")
    spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--input", corpus(d / "corpus.jsonl", 3000, 7), "--output-prefix", str(d / "my-gpt3"),
                      "--vocab-file", str(GPT2 / "vocab.json"), "--merge-file", str(GPT2 / "merges.txt"),
                      "--tokenizer-type", "GPT2BPETokenizer", "--append-eod", "--workers", "1"]) == 0
    return d


def _paths(data, tmp_path):
    return {"DATA_PATH": str(data / "my-gpt3_text_document"), "VOCAB_FILE": str(GPT2 / "vocab.json"),
            "MERGE_FILE": str(GPT2 / "merges.txt"), "CHECKPOINT_PATH": str(tmp_path / "ckpt"),
            "TENSORBOARD_PATH": str(tmp_path / "tb"), "DATA_CACHE_PATH": str(tmp_path / "cache")}


def _rows(stdout: str) -> dict[int, tuple[str, str]]:
    """iteration -> (learning rate, lm loss) as printed (these configs add num zeros, params norm)."""
    return {int(m.group(1)): (m.group(2), m.group(3)) for m in re.finditer(
        r"^ \[[^]]+\] iteration +(\d+)/.* learning rate: (\S+) \|.* lm loss: (\S+) \|", stdout, re.M)}


def _expand(flags: str, paths: dict) -> list[str]:
    for name, value in paths.items():
        flags = flags.replace(f"${name}", value)
    return flags.split()


# train_gpt3_175b_distributed.sh, every flag kept, sizes shrunk (96 layers -> 4, TP8xPP16 -> PP2,
# 500000 iterations -> 4). Its `--rampup-batch-size 16 16 5859375` is left out: Megatron-LM itself
# refuses it with --train-iters ("expected no batch-size rampup for iteration-based training").
GPT3_175B = """
--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32
--attention-backend auto
--micro-batch-size 1 --global-batch-size 4 --train-iters 4 --weight-decay 0.1 --adam-beta1 0.9
--adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5 --lr-decay-style cosine
--min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000
--tensor-model-parallel-size 1 --pipeline-model-parallel-size 2
--data-path $DATA_PATH --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE --split 949,50,1
--log-interval 2 --save-interval 10000 --eval-interval 1000 --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH
--eval-iters 2 --tensorboard-dir $TENSORBOARD_PATH
--distributed-backend gloo
"""

# gpt3_mcore_te_tp1_pp1_resume_torch_dist_dist_optimizer/model_config.yaml (sizes shrunk: 12 layers
# -> 2, h 512 -> 64, S 1024 -> 32, 100 iterations -> 4, save every 2).
GPT3_RESUME_DIST_OPT = """
--num-layers 2 --hidden-size 64 --num-attention-heads 8 --log-params-norm --log-num-zeros-in-grad
--log-validation-ppl-to-tensorboard --log-timers-to-tensorboard --tensorboard-dir $TENSORBOARD_PATH
--micro-batch-size 2 --global-batch-size 8 --seq-length 32 --max-position-embeddings 32 --train-iters 4
--timing-log-level 0 --lr-decay-iters 320000 --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH
--data-path $DATA_PATH --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE --split 949,50,1
--distributed-backend gloo --lr 0.00015 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2
--clip-grad 1.0 --lr-warmup-fraction .01 --log-interval 1 --save-interval 2 --eval-interval 1000
--eval-iters 2 --transformer-impl transformer_engine --tensor-model-parallel-size 1
--pipeline-model-parallel-size 1 --use-distributed-optimizer --no-ckpt-fully-parallel-save --async-save
--deterministic-mode --no-gradient-accumulation-fusion --attention-softmax-in-fp32
--use-checkpoint-opt_param-scheduler --use-mcore-models --ckpt-format torch_dist
--dist-ckpt-strictness log_all --data-cache-path $DATA_CACHE_PATH --bf16 --log-memory-to-tensorboard
--use-persistent-ckpt-worker
--check-weight-hash-across-dp-replicas-interval 2 --rerun-mode disabled --logging-level 40
--ckpt-assume-constant-structure --ckpt-fully-parallel-load --auto-detect-ckpt-format
--no-use-tokenizer-model-from-checkpoint-args
"""

# gpt3_mcore_tp1_pp2/model_config.yaml (Megatron's local layers; sizes shrunk as above).
GPT3_LOCAL_PP2 = """
--num-layers 4 --hidden-size 64 --num-attention-heads 8 --log-params-norm --log-num-zeros-in-grad
--log-validation-ppl-to-tensorboard --log-timers-to-tensorboard --tensorboard-dir $TENSORBOARD_PATH
--micro-batch-size 2 --global-batch-size 8 --seq-length 32 --max-position-embeddings 32 --train-iters 3
--timing-log-level 0 --lr-decay-iters 320000 --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH
--data-path $DATA_PATH --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE --split 949,50,1
--distributed-backend gloo --lr 0.00015 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2
--clip-grad 1.0 --lr-warmup-fraction .01 --log-interval 1 --save-interval 10000 --eval-interval 1000
--eval-iters 2 --transformer-impl local --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2
--deterministic-mode --no-gradient-accumulation-fusion --use-mcore-models --ckpt-format torch_dist
--dist-ckpt-optim-fully-reshardable --dist-ckpt-strictness log_all --data-cache-path $DATA_CACHE_PATH
--bf16 --apply-query-key-layer-scaling --log-memory-to-tensorboard --async-save --use-persistent-ckpt-worker
"""


def test_gpt3_175b_example_flags(data, tmp_path):
    out = torchrun(2, "pretrain_gpt.py", *_expand(GPT3_175B, _paths(data, tmp_path))).stdout
    # --fp16 starts at loss scale 2^32: the first steps overflow and are skipped (no loss printed).
    printed = re.findall(r"^ \[[^]]+\] iteration +(\d+)/ +4 \|.* loss scale: ", out, re.M)
    assert printed == ["1", "2", "4"]
    assert "validation loss at iteration 4 on validation set" in out
    assert open(os.path.join(tmp_path, "ckpt", "latest_checkpointed_iteration.txt")).read() == "4"


def test_gpt3_175b_example_rampup_is_refused_as_megatron_refuses_it(data, tmp_path):
    # The script's ramp (16 16 5859375) scaled to the tiny global batch of 4.
    flags = _expand(GPT3_175B, _paths(data, tmp_path)) + ["--rampup-batch-size", "2", "1", "8"]
    proc = torchrun(2, "pretrain_gpt.py", *flags, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --rampup-batch-size needs --train-samples, not --train-iters"], proc.stderr


def test_functional_test_config_resumes(data, tmp_path):
    flags = _expand(GPT3_RESUME_DIST_OPT, _paths(data, tmp_path))
    first = torchrun(2, "pretrain_gpt.py", *flags).stdout
    rows = _rows(first)
    assert sorted(rows) == [1, 2, 3, 4]
    for it in (0, 2, 4):  # --check-weight-hash-across-dp-replicas-interval 2, and before training
        assert f">>> Weight hashes match after {it} iterations..." in first
    resumed = torchrun(2, "pretrain_gpt.py", *flags, "--ckpt-step", "2").stdout
    again = _rows(resumed)
    assert sorted(again) == [3, 4]
    losses = {it: loss for it, (_, loss) in rows.items()}
    for it in (3, 4):
        assert again[it][0] == rows[it][0]  # learning rate
        assert float(again[it][1]) == pytest.approx(resumed_loss(losses, 3, it), rel=2e-6)


def test_functional_test_config_local_layers_pp2(data, tmp_path):
    out = torchrun(2, "pretrain_gpt.py", *_expand(GPT3_LOCAL_PP2, _paths(data, tmp_path))).stdout
    assert sorted(_rows(out)) == [1, 2, 3]
