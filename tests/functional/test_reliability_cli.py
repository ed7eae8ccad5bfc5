"""Failure handling through torchrun on CPU: a planted pickle in a checkpoint's `.metadata`
is refused in one line and runs nothing; a stopped rank ends the job within
--distributed-timeout-minutes; killing torchrun itself leaves no worker behind."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.functional.test_checkpoint_cli import TINY_GPT
from tests.functional.test_pretrain_cli import ROOT, torchrun
from tests.functional.test_training_loop_cli import _children

pytestmark = pytest.mark.slow


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _with(flags, name, value):
    out = list(flags)
    out[out.index(name) + 1] = value
    return out


def test_planted_metadata_pickle_is_refused_on_load(tmp_path):
    import pickle

    ckpt = str(tmp_path / "ckpt")
    flags = _with(TINY_GPT, "--train-iters", "4")
    torchrun(1, "pretrain_gpt.py", *flags, "--save", ckpt, "--save-interval", "4")
    marker = tmp_path / "pwned"
    with open(os.path.join(ckpt, "iter_0000004", ".metadata"), "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    proc = torchrun(1, "pretrain_gpt.py", *flags, "--load", ckpt, check=False)
    assert proc.returncode != 0
    assert "[rank0]: Traceback" not in proc.stderr, proc.stderr[-2000:]  # torchrun's own is fine
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and ".metadata: refusing to load posix.system" in errors[0], errors
    assert not marker.exists()


def test_a_corrupted_tensor_file_is_refused_on_load(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    flags = _with(TINY_GPT, "--train-iters", "4")
    torchrun(2, "pretrain_gpt.py", *flags, "--save", ckpt, "--save-interval", "4")
    directory = os.path.join(ckpt, "iter_0000004")
    victim = sorted(f for f in os.listdir(directory) if f.endswith(".distcp"))[-1]
    with open(os.path.join(directory, victim), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    proc = torchrun(2, "pretrain_gpt.py", *flags, "--load", ckpt, "--no-load-optim", check=False)
    assert proc.returncode != 0
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    errors = {ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: ")}
    assert any(f"{victim}: checksum mismatch" in e for e in errors), errors
    assert " iteration        5/" not in proc.stdout  # no training step ran


def _start(tmp_path, *extra):
    """A 2-process run long enough to be interrupted; returns (torchrun Popen, log path)."""
    log = tmp_path / "run.log"
    flags = _with(TINY_GPT, "--train-iters", "100000")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "pretrain_gpt.py"), *flags, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while " iteration        2/" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    return proc, log


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path):
    proc, log = _start(tmp_path, "--distributed-timeout-minutes", "1")
    workers = _children(proc.pid)
    assert len(workers) == 2
    stopped = time.time()
    os.kill(workers[1], signal.SIGSTOP)
    try:
        proc.wait(timeout=60 + 75)  # the timeout, then torchrun's SIGTERM grace before SIGKILL
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert time.time() - stopped < 60 + 75
    text = log.read_text()
    assert "a collective failed, another rank is stuck or dead (--distributed-timeout-minutes)" in text, \
        text[-3000:]


def test_killing_torchrun_ends_its_workers(tmp_path):
    proc, _ = _start(tmp_path)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, "workers outlived torchrun"
