"""Convert between Hugging Face checkpoints (a local directory with `config.json` and
`*.safetensors`) and megatron_lite `torch_dist` checkpoints, for Llama and GPT-2.

    python tools/checkpoint/convert.py hf-to-megatron --hf-dir llama-1b/ --save ckpt/
    python tools/checkpoint/convert.py megatron-to-hf --load ckpt/ --hf-dir out/

A torch_dist checkpoint stores every tensor under its layout-independent name with its global
shape, so there is no target TP/PP to choose: the converted checkpoint loads at any
`--tensor-model-parallel-size` / `--pipeline-model-parallel-size` (as a `release`
checkpoint: weights only, like Megatron's `--finetune`).

Megatron-LM's own interface moves whole training states (weights, optimizer, scheduler,
iteration) between the two projects' formats:

    python tools/checkpoint/convert.py --model-type GPT --loader core --saver lite \
        --load-dir megatron_ckpt/ --save-dir lite_ckpt/
    python tools/checkpoint/convert.py --model-type GPT --loader lite --saver core \
        --load-dir lite_ckpt/ --save-dir megatron_ckpt/

Loaders: `core`/`mcore` (Megatron-LM torch_dist), `lite` (megatron_lite), `hf`/`llama_mistral`
(a Hugging Face directory, weights only). Savers: `core`/`mcore`, `lite`, `hf`. Both torch_dist
layouts store global tensors, so any `--target-tensor-parallel-size` /
`--target-pipeline-parallel-size` loads them; the values are recorded as the saved layout.
(`megatron --load` of a Megatron-LM checkpoint needs no conversion: megatron_lite reads it.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_lite.checkpoint.global_io import (  # noqa: E402
    read_global_checkpoint,
    read_global_training_state,
    write_global_checkpoint,
    write_global_training_state,
)
from megatron_lite.checkpoint.layout import CheckpointError  # noqa: E402
from megatron_lite.checkpoint.megatron.global_state import read_megatron_training_state  # noqa: E402
from megatron_lite.checkpoint.megatron.writer import megatron_state, write_megatron_checkpoint  # noqa: E402
from megatron_lite.config.configs import ModelConfig, model_config_from_args  # noqa: E402
from megatron_lite.models import hf  # noqa: E402


def _read_hf_dir(path: str):
    from safetensors.torch import load_file

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise SystemExit(f"error: --hf-dir {path} has no config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as e:
        config = e
    if not isinstance(config, dict):
        raise SystemExit(f"error: {config_path}: not a JSON object ({config})")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"error: --hf-dir {path} has no *.safetensors files")
    state = {}
    for name in files:
        try:
            state.update(load_file(os.path.join(path, name)))
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            raise SystemExit(f"error: {os.path.join(path, name)}: cannot read ({e})") from None
    return config, state


def _args_of(cfg: ModelConfig, family: str, orig_vocab: int) -> dict:
    args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "params_dtype"}
    args.update(
        padded_vocab_size=cfg.vocab_size,
        orig_vocab_size=orig_vocab,
        model_family=family,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        add_position_embedding=cfg.position_embedding_type == "learned_absolute",
    )
    return args


def hf_to_megatron(a) -> None:
    config, state = _read_hf_dir(a.hf_dir)
    try:
        family = hf._family(a.family, config)
        cfg = hf.model_config_from_hf(
            config,
            family,
            make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
            tp=a.tensor_model_parallel_size,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {os.path.join(a.hf_dir, 'config.json')}: {_one_line(e)}") from None
    try:
        global_state = hf.hf_to_global(state, cfg, family)
    except (ValueError, KeyError, RuntimeError) as e:  # missing or mis-shaped tensors
        raise SystemExit(f"error: --hf-dir {a.hf_dir} (*.safetensors): {_one_line(e)}") from None
    directory = write_global_checkpoint(
        a.save, global_state, cfg, _args_of(cfg, family, config["vocab_size"])
    )
    print(f"wrote {len(global_state)} tensors to {directory} ({family}, padded vocab {cfg.vocab_size})")


def megatron_to_hf(a) -> None:
    global_state, common = read_global_checkpoint(a.load, a.ckpt_step)
    _write_hf(global_state, dict(common["args"]), a.hf_dir, a.family, a.vocab_size, a.load)


def _write_hf(global_state: dict, args: dict, hf_dir: str, family, vocab_size, source: str) -> None:
    from safetensors.torch import save_file

    family = family or args.get("model_family") or ("llama" if args.get("swiglu") else "gpt2")
    orig_vocab = vocab_size or args.get("orig_vocab_size") or args.get("vocab_size")
    if not orig_vocab:
        raise SystemExit(
            "error: the checkpoint does not record the tokenizer's vocabulary size: pass --vocab-size"
        )
    ns = SimpleNamespace(**args)
    if not hasattr(ns, "add_bias_linear"):
        ns.add_bias_linear = True
    try:
        cfg = model_config_from_args(ns)
        hf_state = hf.global_to_hf(global_state, cfg, family, orig_vocab, tied_head=False)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # args or tensors not of this model
        raise SystemExit(f"error: --load {source}: {_one_line(e)}") from None
    os.makedirs(hf_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, os.path.join(hf_dir, "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf.hf_config_from_model_config(cfg, family, orig_vocab), f, indent=2)
    print(f"wrote {len(hf_state)} tensors to {hf_dir} ({family})")


def _load_training_state(a):
    """(model, optimizer, record) from --load-dir through the chosen --loader."""
    if a.loader in ("core", "mcore"):
        return read_megatron_training_state(a.load_dir, a.ckpt_step)
    if a.loader == "lite":
        return read_global_training_state(a.load_dir, a.ckpt_step)
    config, state = _read_hf_dir(a.load_dir)
    try:
        family = hf._family("llama" if a.loader == "llama_mistral" else None, config)
        cfg = hf.model_config_from_hf(config, family, tp=a.target_tensor_parallel_size)
        model = hf.hf_to_global(state, cfg, family)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: --load-dir {a.load_dir}: {_one_line(e)}") from None
    common = {"checkpoint_version": 3.0, "iteration": 0, "consumed_train_samples": 0,
              "consumed_valid_samples": 0, "skipped_train_samples": 0,
              "num_floating_point_operations_so_far": 0.0, "opt_param_scheduler": None, "grad_scaler": None,
              "args": _args_of(cfg, family, config["vocab_size"])}
    return model, {"step": None}, common


def convert_training_state(a) -> None:
    """Megatron-LM's convert.py interface (see the module docstring)."""
    if a.model_type != "GPT":
        raise SystemExit(f"error: --model-type {a.model_type}: only GPT models are supported")
    if a.megatron_path:
        print("note: --megatron-path is not needed: megatron_lite reads and writes Megatron-LM's "
              "layout itself")
    model, optimizer, common = _load_training_state(a)
    tp, pp = a.target_tensor_parallel_size, a.target_pipeline_parallel_size
    common = dict(common, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if a.saver == "hf":
        _write_hf(model, dict(common["args"]), a.save_dir, None, a.true_vocab_size, a.load_dir)
        return
    if a.saver == "lite":
        directory = write_global_training_state(a.save_dir, model, optimizer, common)
    else:
        directory = write_megatron_checkpoint(a.save_dir, megatron_state(model, optimizer, common, tp, pp),
                                              int(common["iteration"]))
    what = "weights and optimizer" if optimizer.get("step") is not None else "weights"
    print(f"wrote {len(model)} tensors ({what}) of iteration {common['iteration']} to {directory}")


def _megatron_style_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Megatron-LM-style conversion of whole training states")
    p.add_argument("--model-type", required=True, choices=["GPT", "BERT"])
    p.add_argument("--loader", required=True, choices=["core", "mcore", "lite", "hf", "llama_mistral"])
    p.add_argument("--saver", required=True, choices=["core", "mcore", "lite", "hf"])
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--ckpt-step", type=int, default=None, help="iteration to read (default: the tracker's)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="recorded as the saved layout (torch_dist loads at any TP)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                   help="recorded as the saved layout (torch_dist loads at any PP)")
    p.add_argument("--true-vocab-size", type=int, default=None, help="--saver hf: vocabulary without padding")
    p.add_argument("--megatron-path", default=None, help="accepted for Megatron's scripts; not needed here")
    return p


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("--") and argv[0] not in ("-h", "--help"):
        a = _megatron_style_parser().parse_args(argv)
        try:
            convert_training_state(a)
        except (OSError, ValueError, KeyError, CheckpointError) as e:
            raise SystemExit(f"error: {_one_line(e)}") from None
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("hf-to-megatron", help="Hugging Face directory -> torch_dist checkpoint")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--save", required=True)
    imp.add_argument("--family", choices=hf.FAMILIES, default=None, help="default: config.json model_type")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    imp.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="only for vocabulary padding (Megatron pads to a multiple of divisor x TP)",
    )
    exp = sub.add_parser("megatron-to-hf", help="torch_dist checkpoint -> Hugging Face directory")
    exp.add_argument("--load", required=True)
    exp.add_argument("--hf-dir", required=True)
    exp.add_argument("--ckpt-step", type=int, default=None)
    exp.add_argument("--family", choices=hf.FAMILIES, default=None)
    exp.add_argument(
        "--vocab-size", type=int, default=None, help="tokenizer vocabulary (padding is stripped)"
    )
    a = p.parse_args(argv)
    try:
        (hf_to_megatron if a.direction == "hf-to-megatron" else megatron_to_hf)(a)
    except (OSError, ValueError, KeyError, CheckpointError) as e:  # unreadable, malformed or refused input
        raise SystemExit(f"error: {_one_line(e)}") from None


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, cut to `limit` characters (lists of missing
    tensors can run to thousands)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit] + " ..."


if __name__ == "__main__":
    main()
