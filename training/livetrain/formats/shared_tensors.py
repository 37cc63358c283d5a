"""Zero-copy tensor handles as plain data, so no pickle crosses a process boundary.

torch.multiprocessing shares tensors by pickling a rebuild function plus its
arguments. We use the same storage primitives but ship only ints and bytes, as the
typed handles of formats/messages.py, which cannot execute anything when decoded.

CPU: the storage moves into anonymous shared memory held by a file descriptor
(torch's "file_descriptor" strategy). The importer opens `/proc/<pid>/fd/<fd>` of
the exporting process, which the kernel allows only to the same user. There is no
name under /dev/shm, so nothing leaks when vLLM's workers are killed: the memory
goes away with the last process that maps it.
CUDA: the storage is exported as a CUDA IPC handle in place (same GPU only).
"""

from __future__ import annotations

import os

import msgspec
import torch

from livetrain.formats.messages import CpuFdHandle, CudaIpcHandle, TensorHandle


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
    dtype, shape, stride = _dtype_name(tensor.dtype), list(tensor.shape), list(tensor.stride())
    offset = int(tensor.storage_offset())
    if tensor.device.type == "cpu":
        fd, nbytes = storage._share_fd_cpu_()
        return CpuFdHandle(os.getpid(), fd, nbytes, dtype, shape, stride, offset)
    if tensor.device.type == "cuda":  # CudaIpcHandle's first fields are _share_cuda_'s
        ipc = storage._share_cuda_()
        return CudaIpcHandle(*ipc, dtype, shape, stride, offset)  # type: ignore[call-arg]
    raise ValueError(f"cannot share a tensor on device {tensor.device}")


def storage_key(handle: TensorHandle) -> tuple[str, int | bytes, int]:
    """Identity of the underlying allocation: equal keys mean aliased memory."""
    if isinstance(handle, CpuFdHandle):
        return ("cpu_fd", handle.pid, handle.fd)
    return ("cuda_ipc", handle.handle, handle.offset_bytes)


class TensorImporter:
    """Maps handles back to tensors, opening each shared allocation once.

    Opening an allocation once per storage keeps aliases (tied embeddings, fused
    q/k/v slices) aliased in this process too, which the trainer relies on.
    """

    def __init__(self) -> None:
        self._storages: dict[tuple[str, int | bytes, int], torch.UntypedStorage] = {}

    def __call__(self, handle: TensorHandle) -> torch.Tensor:
        key = storage_key(handle)
        storage = self._storages.get(key)
        if storage is None:
            storage = self._open(handle)
            self._storages[key] = storage
        tensor = torch.empty(0, dtype=_dtype(handle.dtype), device=storage.device)
        return tensor.set_(storage, handle.offset, handle.shape, handle.stride)

    @staticmethod
    def _open(handle: TensorHandle) -> torch.UntypedStorage:
        if isinstance(handle, CpuFdHandle):
            fd = os.open(f"/proc/{handle.pid}/fd/{handle.fd}", os.O_RDWR)
            try:
                return torch.UntypedStorage._new_shared_fd_cpu(fd, handle.nbytes)  # type: ignore[attr-defined]
            finally:
                os.close(fd)  # the storage keeps its own duplicate
        torch.cuda._lazy_init()
        ipc_fields = msgspec.structs.astuple(handle)[:8]  # what _share_cuda_ returned
        return torch.UntypedStorage._new_shared_cuda(*ipc_fields)
