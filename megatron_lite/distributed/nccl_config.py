"""Megatron-LM's `--nccl-communicator-config-path`: a YAML file of per-communicator NCCL
settings, keyed by Megatron's process-group names, e.g.

    dp:            # the data-parallel reduce-scatters / all-gathers
      max_ctas: 8  # at most 8 thread blocks: more SMs left to the GEMMs they overlap with
    tp:
      cga_cluster_size: 2

Each group named gets `ProcessGroupNCCL.Options` with those fields of `config` set (the rest
stay NCCL's defaults), and `is_high_priority_stream` for its stream. Megatron's `net_name` is
refused by name: torch's NCCL options have no such field. Only NCCL groups take
them; on gloo the file is still read and checked, and the run says once that it has no effect.

The file is data: `yaml.safe_load` builds plain mappings and scalars, never objects.
"""
from __future__ import annotations

from megatron_lite.config.errors import ConfigError

FLAG = "--nccl-communicator-config-path"

# Megatron's group name -> the ParallelState group(s) it configures. The expert groups of
# Megatron's MoE (mp_exp, tp_exp, exp, dp_modulo_exp, dp_modulo_exp_cp) are accepted for its
# files' sake; megatron_lite builds no such group.
GROUPS: dict[str, tuple[str, ...]] = {
    "dp": ("dp",), "dp_cp": ("dp-cp",), "cp": ("cp",), "hcp": ("cp-inner", "cp-outer"),
    "mp": ("tp-pp",), "tp": ("tp",), "pp": ("pp",), "embd": ("embedding", "position-embedding"),
    "tp_dp_cp": ("tp-dp-cp",), "tp_dp": ("tp-dp",), "tp_cp": ("tp-cp",),
    "mp_exp": (), "tp_exp": (), "exp": (), "dp_modulo_exp": (), "dp_modulo_exp_cp": (),
}
_INT_KEYS = ("cga_cluster_size", "max_ctas", "min_ctas")


def load_nccl_comm_config(path: str) -> dict[str, dict]:
    """The checked file: {ParallelState group token: {option: value}}. One-line ConfigError
    naming the file (and the group and key) for anything wrong."""
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{FLAG} needs PyYAML (pip install pyyaml)") from None
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{FLAG} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{FLAG} {path}: not YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{FLAG} {path}: expected a mapping of group names, got {type(raw).__name__}")
    by_token = {}
    for name, options in raw.items():
        if name not in GROUPS:
            raise ConfigError(f"{FLAG} {path}: unknown group {name!r} (one of {', '.join(GROUPS)})")
        checked = _check_options(path, name, options)
        for token in GROUPS[name]:
            by_token[token] = checked
    return by_token


def _check_options(path: str, name: str, options) -> dict:
    where = f"{FLAG} {path}: group {name}"
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {options!r}")
    for key, value in options.items():
        if key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {key} must be a whole number >= 1 (got {value!r})")
        elif key == "net_name":  # Megatron sets config.net_name, which torch's NCCLConfig lacks
            raise ConfigError(f"{where}: net_name is not supported by megatron_lite (torch's NCCL "
                              "options have no network name; NCCL_NET=IB|Socket selects it)")
        elif key == "is_high_priority_stream":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: is_high_priority_stream must be true or false "
                                  f"(got {value!r})")
        else:
            raise ConfigError(f"{where}: unknown option {key!r} (one of {', '.join(_INT_KEYS)}, "
                              "is_high_priority_stream)")
    low, high = options.get("min_ctas"), options.get("max_ctas")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{where}: min_ctas ({low}) exceeds max_ctas ({high})")
    return dict(options)


def nccl_options(options: dict):
    """`ProcessGroupNCCL.Options` carrying `options` (a checked entry of the file); NCCL builds only."""
    import torch.distributed as dist

    high = options.get("is_high_priority_stream", False)
    opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=high)
    for key in _INT_KEYS:
        if key in options:
            setattr(opts.config, key, options[key])
    return opts
