"""Reading the pickled objects of a Megatron-LM checkpoint without running code from them
(DESIGN rule 13, spec §4.3).

Megatron stores its non-tensor state (`common_state`: args, iteration, scheduler, optimizer
param groups; `rng_state`; `rerun_state_machine_state`; `common.pt` before core_v0.19) as
`torch.save`d Python objects. They name Megatron's own classes (enums such as
`megatron.core.transformer.enums.AttnBackend`) besides `argparse.Namespace`, `signal.Signals`
and NumPy arrays. We load them with `torch.load(weights_only=True)`, whose unpickler rebuilds
only allowlisted globals; each `megatron.*` name the pickle asks for is rebuilt as an inert
stand-in of ours (`MegatronObject`) that only records what it was given. No Megatron import
happens and nothing from the file runs; any other global is refused in one line.
"""
from __future__ import annotations

import _codecs
import argparse
import io
import pickle
import pickletools
import re
import signal
import zipfile

import numpy as np
import torch

from megatron_lite.checkpoint.safe_load import UNSAFE_MARK, UnsafeCheckpointError


class MegatronObject:
    """Stand-in for an object of a Megatron class (mostly enums: pickled as `Class(value)`).

    `megatron_name` is the class's qualified name; `args` what its constructor was given;
    `state` what pickle's BUILD step would have set."""

    megatron_name = "megatron"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state) -> None:
        self.state = state

    @property
    def value(self):
        """The enum value (`Class(value)`), else None."""
        return self.args[0] if len(self.args) == 1 else None

    def __repr__(self) -> str:
        return f"{self.megatron_name}{self.args!r}"


def _standin(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (MegatronObject,), {"megatron_name": name})


def _numpy_globals() -> list:
    """What a pickled NumPy array (Megatron's `np_rng_state`) needs: the array rebuilder, the
    array and dtype types. NumPy 1 and 2 name the rebuilder's module differently."""
    core = getattr(np, "_core", None) or np.core
    out = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.int64)),
           type(np.dtype(np.float64)), _codecs.encode]
    out.append((core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"))
    out.append((core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"))
    return out


def _globals_named(pickled: bytes) -> set[str]:
    """`module.name` of every global a pickle stream refers to (read, not executed)."""
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(pickled):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.add(f"{strings[-2]}.{strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)
    return names


def _megatron_names(raw: bytes) -> set[str]:
    """The `megatron.*` globals named by a `torch.save` archive's `data.pkl`."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            pickled = archive.read(pkl)
    except (zipfile.BadZipFile, StopIteration):
        pickled = raw  # legacy (non-zip) torch.save: scan the stream itself
    try:
        return {n for n in _globals_named(pickled) if n.startswith("megatron.")}
    except Exception:  # a malformed stream: torch.load below reports it
        return set()


def load_object(raw: bytes, what: str):
    """Unpickle one Megatron checkpoint object (`what` names it in errors)."""
    allowed = [argparse.Namespace, signal.Signals, *_numpy_globals()]
    allowed += [(_standin(n), n) for n in sorted(_megatron_names(raw))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        culprit = found.group(1) if found else "an unexpected global"
        raise UnsafeCheckpointError(f"{what}: {UNSAFE_MARK} it: it asks for {culprit}, which is not a type a "
                                    "Megatron checkpoint holds (this file may be malicious)") from None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise UnsafeCheckpointError(f"{what}: cannot read the pickled object "
                                    f"({type(e).__name__}: {first})") from None


def plain(value):
    """JSON-able copy of an unpickled value: stand-ins become their enum value (or name),
    dtypes and signals their names, tuples lists, tensors Python numbers/lists."""
    if isinstance(value, MegatronObject):
        return plain(value.value) if value.value is not None else value.megatron_name
    if isinstance(value, argparse.Namespace):
        return {k: plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, signal.Signals):
        return value.name
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # torch.dtype and friends
