"""Flag rules of --use-torch-fsdp2 and the CPU optimizer offload (config/memory_flags.py): the
supported combinations validate, the others are refused in one line naming the flags."""
import pytest

from megatron_lite.config.validation import ConfigError
from tests.unit.test_arguments import make

FSDP2 = "--use-torch-fsdp2 --no-gradient-accumulation-fusion"


@pytest.mark.parametrize("extra,world", [
    (FSDP2, 2),
    (f"{FSDP2} --bf16 --grad-reduce-in-bf16 --tensor-model-parallel-size 2 --sequence-parallel", 4),
    (f"{FSDP2} --context-parallel-size 2", 2),
    (f"{FSDP2} --overlap-grad-reduce --calculate-per-token-loss", 2),
    ("--optimizer-cpu-offload", 1),
    ("--optimizer-cpu-offload --optimizer-offload-fraction 0.5 --use-distributed-optimizer "
     "--overlap-cpu-optimizer-d2h-h2d --use-torch-optimizer-for-cpu-offload", 2),
    ("--optimizer-cpu-offload --optimizer-offload-fraction 0", 1),
])
def test_supported_layouts_validate(extra, world):
    make(extra, world)


@pytest.mark.parametrize("extra,world,words", [
    (FSDP2, 1, ["--use-torch-fsdp2", "data-parallel x context-parallel"]),
    ("--use-torch-fsdp2", 2, ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion"]),
    (f"{FSDP2} --pipeline-model-parallel-size 2", 4, ["--use-torch-fsdp2", "pipeline parallelism"]),
    (f"{FSDP2} --use-distributed-optimizer", 2, ["--use-torch-fsdp2", "--use-distributed-optimizer"]),
    (f"{FSDP2} --fp16", 2, ["--use-torch-fsdp2", "--fp16"]),
    (f"{FSDP2} --swiglu", 2, ["--use-torch-fsdp2", "--swiglu", "--disable-bias-linear"]),
    (f"{FSDP2} --ddp-bucket-size 1000", 2, ["--ddp-bucket-size", "--use-torch-fsdp2"]),
    (f"{FSDP2} --check-weight-hash-across-dp-replicas-interval 10", 2,
     ["--check-weight-hash-across-dp-replicas-interval", "--use-torch-fsdp2"]),
    (f"{FSDP2} --optimizer-cpu-offload", 2, ["--optimizer-cpu-offload", "--use-torch-fsdp2"]),
    ("--use-megatron-fsdp", 1, ["--use-megatron-fsdp", "--use-torch-fsdp2"]),
    ("--optimizer-offload-fraction 0.5", 1,
     ["--optimizer-offload-fraction", "needs --optimizer-cpu-offload"]),
    ("--overlap-cpu-optimizer-d2h-h2d", 1, ["--overlap-cpu-optimizer-d2h-h2d", "--optimizer-cpu-offload"]),
    ("--use-torch-optimizer-for-cpu-offload", 1, ["--use-torch-optimizer-for-cpu-offload"]),
    ("--optimizer-cpu-offload --optimizer-offload-fraction 1.5", 1,
     ["--optimizer-offload-fraction", "[0, 1]"]),
])
def test_impossible_layouts_are_refused_in_one_line(extra, world, words):
    with pytest.raises(ConfigError) as e:
        make(extra, world)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
