"""tools/bench/collapsed_stacks.py: shares of a thread's samples from py-spy's raw output."""
import pytest

from tools.bench.collapsed_stacks import parse, summarize

RAW = """\
process 11:"python train.py";thread (0x1): MainThread;main (t.py:1);step (t.py:5);gemm (m.py:9) 6
process 11:"python train.py";thread (0x1): MainThread;main (t.py:1);step (t.py:6);all_gather (c.py:3) 3
process 11:"python train.py";thread (0x1): MainThread;main (t.py:1);load (t.py:2) 1
process 11:"python train.py";thread (0x2): watchdog;poll (w.py:4) 5
"""


def test_roots_and_shares():
    by_root = parse(RAW.splitlines())
    main = 'process 11:"python train.py";thread (0x1): MainThread'
    assert sorted(by_root) == sorted([main, 'process 11:"python train.py";thread (0x2): watchdog'])
    total, inclusive, leaf = summarize(by_root[main])
    assert total == 10 and inclusive["main (t.py:1)"] == 10 and leaf["gemm (m.py:9)"] == 6
    total, inclusive, leaf = summarize(by_root[main], within="step")
    assert total == 9 and "load (t.py:2)" not in leaf


def test_functions_add_their_lines():
    by_root = parse(RAW.splitlines(), functions=True)
    main = 'process 11:"python train.py";thread (0x1): MainThread'
    _, inclusive, _ = summarize(by_root[main])
    assert inclusive["step (t.py)"] == 9


def test_a_line_without_count_is_refused():
    with pytest.raises(SystemExit, match="error: not a collapsed-stack line"):
        parse(["main (t.py:1);step (t.py:5)"])


def test_a_missing_file_is_one_error_line(monkeypatch, tmp_path):
    from tools.bench import collapsed_stacks

    monkeypatch.setattr("sys.argv", ["collapsed_stacks.py", str(tmp_path / "none.txt")])
    with pytest.raises(SystemExit, match=r"^error: cannot read .*none\.txt: No such file"):
        collapsed_stacks.main()
