"""Zero-copy tensor handles as plain data, so no pickle crosses a process boundary.

torch.multiprocessing shares tensors by pickling a rebuild function plus its
arguments. We use the same storage primitives but ship only ints and bytes inside
a dict, which msgpack carries and which cannot execute anything when decoded.

CPU: the storage moves into anonymous shared memory held by a file descriptor
(torch's "file_descriptor" strategy). The importer opens `/proc/<pid>/fd/<fd>` of
the exporting process, which the kernel allows only to the same user. There is no
name under /dev/shm, so nothing leaks when vLLM's workers are killed: the memory
goes away with the last process that maps it.
CUDA: the storage is exported as a CUDA IPC handle in place (same GPU only).
"""

from __future__ import annotations

import os
from typing import Any

import torch

TensorHandle = dict[str, Any]
KINDS = ("cpu_fd", "cuda_ipc")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in tensor handle")
    return dtype


def export_tensor(tensor: torch.Tensor) -> TensorHandle:
    """Describe `tensor` so another process can map the same memory.

    On CPU the storage is moved into shared memory first (a one-time copy; the
    tensor object and every alias of its storage keep working and the private copy
    is freed). On CUDA the storage is exported as an IPC handle in place.
    """
    storage = tensor.untyped_storage()
    layout = {
        "dtype": _dtype_name(tensor.dtype),
        "shape": list(tensor.shape),
        "stride": list(tensor.stride()),
        "offset": tensor.storage_offset(),
    }
    if tensor.device.type == "cpu":
        fd, nbytes = storage._share_fd_cpu_()
        return {"kind": "cpu_fd", "pid": os.getpid(), "fd": fd, "nbytes": nbytes, **layout}
    if tensor.device.type == "cuda":
        (device, handle, nbytes, offset_bytes, ref_handle, ref_offset, event, event_sync) = (
            storage._share_cuda_()
        )
        return {
            "kind": "cuda_ipc",
            "device": device,
            "handle": handle,
            "nbytes": nbytes,
            "offset_bytes": offset_bytes,
            "ref_handle": ref_handle,
            "ref_offset": ref_offset,
            "event": event,
            "event_sync": event_sync,
            **layout,
        }
    raise ValueError(f"cannot share a tensor on device {tensor.device}")


def storage_key(handle: TensorHandle) -> tuple[str, int | bytes, int]:
    """Identity of the underlying allocation: equal keys mean aliased memory."""
    if handle["kind"] == "cpu_fd":
        return ("cpu_fd", handle["pid"], handle["fd"])
    return ("cuda_ipc", handle["handle"], handle["offset_bytes"])


class TensorImporter:
    """Maps handles back to tensors, opening each shared allocation once.

    Opening an allocation once per storage keeps aliases (tied embeddings, fused
    q/k/v slices) aliased in this process too, which the trainer relies on.
    """

    def __init__(self) -> None:
        self._storages: dict[tuple[str, int | bytes, int], torch.UntypedStorage] = {}

    def __call__(self, handle: TensorHandle) -> torch.Tensor:
        if handle.get("kind") not in KINDS:
            raise ValueError(f"unknown tensor handle kind {handle.get('kind')!r}")
        key = storage_key(handle)
        storage = self._storages.get(key)
        if storage is None:
            storage = self._open(handle)
            self._storages[key] = storage
        tensor = torch.empty(0, dtype=_dtype(handle["dtype"]), device=storage.device)
        return tensor.set_(storage, handle["offset"], handle["shape"], handle["stride"])

    @staticmethod
    def _open(handle: TensorHandle) -> torch.UntypedStorage:
        if handle["kind"] == "cpu_fd":
            fd = os.open(f"/proc/{handle['pid']}/fd/{handle['fd']}", os.O_RDWR)
            try:
                return torch.UntypedStorage._new_shared_fd_cpu(fd, handle["nbytes"])
            finally:
                os.close(fd)  # the storage keeps its own duplicate
        if handle["kind"] == "cuda_ipc":
            torch.cuda._lazy_init()
            return torch.UntypedStorage._new_shared_cuda(
                handle["device"],
                handle["handle"],
                handle["nbytes"],
                handle["offset_bytes"],
                handle["ref_handle"],
                handle["ref_offset"],
                handle["event"],
                handle["event_sync"],
            )
        raise ValueError(f"unknown tensor handle kind {handle['kind']!r}")
