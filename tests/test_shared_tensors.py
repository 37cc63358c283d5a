"""Zero-copy tensor handles across a real process boundary, with no pickle."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import pytest
import torch

from livetrain.shared_tensors import TensorImporter, export_tensor, storage_key

CHILD = """
import sys, msgspec, torch
from livetrain.shared_tensors import TensorImporter
handles = msgspec.msgpack.decode(sys.stdin.buffer.read())
load = TensorImporter()
weight, rows = load(handles["weight"]), load(handles["rows"])
assert rows.data_ptr() == weight[2:4].data_ptr(), "aliases must stay aliased"
rows.mul_(-1.0)           # write through the view
weight[0, 0] = 123.0
print(float(weight.sum()))
"""


def test_another_process_writes_the_same_memory():
    weight = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    expected = weight.clone()
    expected[2:4] *= -1
    expected[0, 0] = 123.0
    handles = {"weight": export_tensor(weight), "rows": export_tensor(weight[2:4])}
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=msgspec.msgpack.encode(handles),
        capture_output=True,
        check=True,
    )
    assert torch.equal(weight, expected)
    assert float(child.stdout) == pytest.approx(float(expected.sum()))


def test_export_keeps_the_tensor_and_leaves_no_named_segment():
    weight = torch.randn(3, 5)
    before, ptr_values = set(os.listdir("/dev/shm")), weight.clone()
    handle = export_tensor(weight)
    assert torch.equal(weight, ptr_values)
    assert weight.untyped_storage().is_shared()
    assert set(os.listdir("/dev/shm")) == before
    assert export_tensor(weight) == handle  # idempotent: a restarted trainer gets the same


def test_importer_opens_each_allocation_once():
    weight = torch.randn(4, 4)
    first, second = export_tensor(weight[:2]), export_tensor(weight[2:])
    assert storage_key(first) == storage_key(second)
    load = TensorImporter()
    a, b = load(first), load(second)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_unknown_handle_kind_is_rejected():
    handle = {**export_tensor(torch.zeros(2)), "kind": "pickle"}
    with pytest.raises(ValueError, match="unknown tensor handle kind"):
        TensorImporter()(handle)


CUDA_CHILD = """
import sys, msgspec, torch
from livetrain.shared_tensors import TensorImporter
TensorImporter()(msgspec.msgpack.decode(sys.stdin.buffer.read())).add_(1.0)
torch.cuda.synchronize()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ipc_round_trip():
    weight = torch.arange(8, dtype=torch.float32, device="cuda")
    handle = export_tensor(weight[2:6])
    assert handle["kind"] == "cuda_ipc"
    subprocess.run(
        [sys.executable, "-c", CUDA_CHILD], input=msgspec.msgpack.encode(handle), check=True
    )
    expected = torch.arange(8, dtype=torch.float32)
    expected[2:6] += 1
    assert torch.equal(weight.cpu(), expected)
