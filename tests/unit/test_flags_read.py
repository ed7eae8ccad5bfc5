"""Every flag of the training parser is read somewhere (DESIGN rule 12: nothing is parsed and
ignored).

The test walks the real parser (`config/arguments*.py`) and, for each action's `dest`, looks for
a read of it in megatron_lite/, pretrain_*.py and tools/ outside the parser definitions:
`args.<dest>` / `a.<dest>`, or the string `"<dest>"` (`getattr(args, "<dest>")`, a list of names
the code reads). Not counted as reads: the numeric range table (config/ranges.py: a range check
alone makes no flag do anything), the list `--use-checkpoint-args` copies
(checkpoint/checkpoint_args.py) and the argument dump. A field of `ModelConfig` (filled from
`args` by name in `model_config_from_args`) counts only if the model code reads it as
`<object>.<dest>` somewhere outside config/.

Two explicit exceptions, each with its reason: ACCEPTED_AS_IS (config/accepted_as_is.py) holds
flags whose Megatron meaning is megatron_lite's only behaviour (their help says so), and
_OTHER_ISSUES below holds flags another change is implementing at the time.
"""
from __future__ import annotations

import ast
from pathlib import Path

from megatron_lite.config.accepted_as_is import ACCEPTED_AS_IS
from megatron_lite.config.arguments import build_parser
from megatron_lite.config.configs import _MODEL_FIELDS

ROOT = Path(__file__).resolve().parents[2]
PARSER_FILES = {"megatron_lite/config/arguments.py", "megatron_lite/config/arguments_io.py",
                "megatron_lite/config/arguments_parallel.py"}
NOT_A_USE = {"megatron_lite/config/ranges.py", "megatron_lite/checkpoint/checkpoint_args.py",
             "megatron_lite/config/accepted_as_is.py"}
# Names the argparse namespace goes by where code reads it.
NAMESPACE_NAMES = {"args", "a"}

_OTHER_ISSUES: dict[str, str] = {}


def _sources() -> list[Path]:
    files = sorted((ROOT / "megatron_lite").rglob("*.py")) + sorted(ROOT.glob("pretrain_*.py"))
    files += sorted((ROOT / "tools").rglob("*.py"))
    return [f for f in files if f.relative_to(ROOT).as_posix() not in PARSER_FILES | NOT_A_USE]


def _reads(dests: set[str]) -> tuple[set[str], set[str]]:
    """(dests read from the namespace or named as strings, attribute names read on any object
    outside config/)."""
    from_args, anywhere = set(), set()
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in dests:
                if isinstance(node.value, ast.Name) and node.value.id in NAMESPACE_NAMES:
                    from_args.add(node.attr)
                if not rel.startswith("megatron_lite/config/"):
                    anywhere.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in dests:
                from_args.add(node.value)
    return from_args, anywhere


def _parser_dests() -> dict[str, object]:
    return {a.dest: a for a in build_parser()._actions if a.dest != "help"}


def test_every_flag_is_read_somewhere():
    actions = _parser_dests()
    from_args, anywhere = _reads(set(actions))
    unread = []
    for dest, action in sorted(actions.items()):
        if dest in ACCEPTED_AS_IS or dest in _OTHER_ISSUES:
            continue
        read = (dest in anywhere) if dest in _MODEL_FIELDS else (dest in from_args)
        if not read:
            unread.append("/".join(action.option_strings))
    assert not unread, f"flags parsed and read nowhere (make them work or refuse them by name): {unread}"


def test_exceptions_are_flags_and_say_why():
    actions = _parser_dests()
    for dest, reason in ACCEPTED_AS_IS.items():
        assert dest in actions, f"ACCEPTED_AS_IS names no flag: {dest}"
        assert reason and actions[dest].help == reason, f"the help of {dest} must give the reason"
    for dest in _OTHER_ISSUES:
        assert dest in actions, f"_OTHER_ISSUES names no flag: {dest}"


def test_the_scan_finds_reads():
    """The scanner itself: a known read through `args.`, one through a string, one ModelConfig
    field read by the model."""
    from_args, anywhere = _reads({"seq_length", "full_validation", "rotary_interleaved"})
    assert {"seq_length", "full_validation"} <= from_args
    assert "rotary_interleaved" in anywhere
