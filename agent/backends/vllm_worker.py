"""The receiving end of `VLLMBackend.update_weights`, run inside vLLM's GPU worker processes.

vLLM mixes `WeightReceiver` into its GPU worker class (`worker_extension_cls`), and the
backend calls its methods by name through `AsyncLLM.collective_rpc`. Weights travel in
buckets: the trainer packs a few hundred MB of tensors into one flat byte buffer on each
engine GPU and sends only its CUDA IPC handle (plain bytes and ints, no pickle); each
worker maps the buffer of its own GPU, hands views of it to the model's `load_weights`
(the loader vLLM itself uses for checkpoints: it fuses q/k/v and gate/up and shards for
tensor parallelism) and lets go of the buffer before the next bucket comes.

`pack` and `unpack` are plain tensor code, tested on the CPU; the rest needs vLLM and a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

ALIGN = 256  # bytes; every tensor starts at a multiple of this, so its view keeps its dtype's alignment

# One packed tensor: [name, dtype name, shape, byte offset in the bucket].
Entry = list[Any]


def pack(tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device | str) -> tuple[torch.Tensor, list[Entry]]:
    """The tensors' bytes in one flat uint8 buffer on `device`, and where each one lies in it."""
    tensors = [(name, tensor.detach()) for name, tensor in tensors]
    entries: list[Entry] = []
    size = 0
    for name, tensor in tensors:
        entries.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), size])
        size += _aligned(tensor.numel() * tensor.element_size())
    buffer = torch.empty(size, dtype=torch.uint8, device=device)
    for (_, tensor), (_, _, _, offset) in zip(tensors, entries, strict=True):
        nbytes = tensor.numel() * tensor.element_size()
        buffer[offset : offset + nbytes].copy_(tensor.contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
    return buffer, entries


def unpack(buffer: torch.Tensor, entries: list[Entry]) -> list[tuple[str, torch.Tensor]]:
    """Views into `buffer` (no copy) of the tensors `pack` put there."""
    out = []
    for name, dtype_name, shape, offset in entries:
        dtype = getattr(torch, dtype_name)
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out.append((name, buffer[offset : offset + nbytes].view(dtype).view(shape)))
    return out


def bucket_bytes(tensor: torch.Tensor) -> int:
    """The room `pack` gives this tensor."""
    return _aligned(tensor.numel() * tensor.element_size())


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def ipc_handle(buffer: torch.Tensor) -> list[Any]:
    """What another process needs to map `buffer` (a whole CUDA allocation block): bytes and ints only."""
    device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = (
        buffer.untyped_storage()._share_cuda_()
    )
    return [handle, size, offset, ref_handle, ref_offset, event_handle, event_sync, buffer.numel()]


def open_ipc_handle(fields: list[Any], device_index: int) -> torch.Tensor:
    """The uint8 buffer behind an `ipc_handle`, mapped into this process on the same physical GPU."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    handle, size, offset, ref_handle, ref_offset, event_handle, event_sync, numel = fields
    return rebuild_cuda_tensor(torch.Tensor, torch.Size([numel]), (1,), 0, torch.storage.TypedStorage, torch.uint8,
                               device_index, handle, size, offset, False, ref_handle, ref_offset, event_handle,
                               event_sync)


def gpu_uuid(device: torch.device | int) -> str:
    """A GPU's identity that every process agrees on, whatever CUDA_VISIBLE_DEVICES it was given."""
    return str(torch.cuda.get_device_properties(device).uuid)


class WeightReceiver:
    """Methods vLLM adds to its GPU worker (`self` is the worker: `self.device`, `self.model_runner`).

    Their names must not clash with the worker's own attributes (vLLM checks), hence the prefix.
    """

    def fd_begin_update(self) -> None:
        self._fd_loaded: set[str] = set()

    def fd_load_bucket(self, handles: dict[str, list[Any]], entries: list[Entry]) -> int:
        """Load one bucket (`handles`: one IPC handle per engine GPU, by UUID); returns the tensor count."""
        device: torch.device = self.device  # type: ignore[attr-defined]
        buffer = open_ipc_handle(handles[gpu_uuid(device)], device.index)
        model = self.model_runner.get_model()  # type: ignore[attr-defined]  # unwrapped from CUDA-graph wrappers
        loaded = model.load_weights(weights=unpack(buffer, entries))
        self._fd_loaded.update(loaded)
        torch.cuda.synchronize(device)  # the copies out of the buffer are done before the sender reuses it
        del buffer
        return len(entries)

    def fd_finish_update(self) -> list[str]:
        """The model's parameters that no bucket of this update reached (they keep stale values)."""
        names = [name for name, _ in self.model_runner.get_model().named_parameters()]  # type: ignore[attr-defined]
        missing = sorted(set(names) - self._fd_loaded)
        del self._fd_loaded
        return missing
