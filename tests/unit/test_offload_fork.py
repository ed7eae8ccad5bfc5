"""Host optimizer state is kept out of forked DataLoader workers (cpu_offload.exclude_from_forks):
otherwise the first optimizer step after the workers fork copies every page of the fp32 mains
(copy-on-write), which killed the 1-GPU Llama-3-8B offload run on its 128 GB host."""
import sys

import pytest
import torch

from megatron_lite.optimizer.cpu_offload import exclude_from_forks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise flags are Linux's")


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_large_host_tensor_is_not_copied_into_children():
    t = torch.zeros(32 << 20, dtype=torch.float32)  # 128 MiB
    middle = t.data_ptr() + t.nbytes // 2
    assert "dc" not in _vm_flags(middle)
    exclude_from_forks(t)
    assert "dc" in _vm_flags(middle)  # "do not copy area on fork"
    t.add_(1.0)  # the tensor itself is unaffected
    assert float(t[-1]) == 1.0


def test_small_and_device_tensors_are_left_alone():
    small = torch.zeros(1 << 20, dtype=torch.uint8)  # 1 MiB: may share heap pages with others
    exclude_from_forks(small)
    assert "dc" not in _vm_flags(small.data_ptr() + small.nbytes // 2)
    exclude_from_forks(torch.zeros(4, device="meta"))  # not host memory: nothing to do
