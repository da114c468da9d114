"""How much memory a checkpoint needs in each mode, checked before the load starts.

A 7B model on a machine without the memory must fail with one clear error before anything is loaded,
never with an out-of-memory kill halfway through (on a Jetson the CPU and GPU share one memory, so an
oversized load takes the whole robot computer down). The sizes come from the safetensors headers (a
few kilobytes per shard), which also catch a truncated shard or an index whose ``total_size`` does not
match its files, naming the file.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from openvla_ros.errors import CheckpointError

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# The LLM's Linear weights: what 8-bit and 4-bit quantise (the towers, projector and lm_head stay).
_QUANTIZED = re.compile(r"^language_model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+\.weight$")
_NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4 bits, and one float32 absmax per block of 64
_INT8_BYTES_PER_WEIGHT = 1.0
GIB = 1024**3


@dataclass(frozen=True)
class StoredTensor:
    name: str
    numel: int
    nbytes: int


def read_headers(files: list[Path]) -> dict[Path, list[StoredTensor]]:
    """Returns the tensors of each safetensors file from its header alone.

    Raises:
        CheckpointError: naming a file whose header is unreadable or that is shorter than its header says.
    """
    found = {}
    for path in files:
        try:
            with open(path, "rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(length))
        except (OSError, struct.error, ValueError) as exc:
            raise CheckpointError(f"weight file {path} is corrupt or truncated: no readable safetensors header "
                                  f"({exc}); download or save the checkpoint again") from exc
        tensors, end = [], 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for side in entry["shape"]:
                numel *= int(side)
            start, stop = entry["data_offsets"]
            end = max(end, int(stop))
            tensors.append(StoredTensor(name, numel, int(stop) - int(start)))
        if path.stat().st_size < 8 + length + end:
            raise CheckpointError(f"weight file {path} is corrupt or truncated: {path.stat().st_size} bytes, its header "
                                  f"describes {8 + length + end}; download or save the checkpoint again")
        found[path] = tensors
    return found


_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) of a safetensors file in file order, each read into memory of its own.

    Plain reads, not a memory map: a tensor the model keeps does not keep the whole file mapped (with
    a map, loading openvla-7b left 13 GB of its files counted in the process's resident memory after
    the load, beside a 5 GB 4-bit model).

    Raises:
        CheckpointError: naming the file when it is unreadable, truncated or holds an unknown dtype.
    """
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
            header.pop("__metadata__", None)
            start = 8 + length
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                dtype = _TORCH_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise CheckpointError(f"weight file {path}: tensor {name} has dtype {entry['dtype']}, which "
                                          "this loader does not read")
                begin, end = entry["data_offsets"]
                file.seek(start + int(begin))
                buffer = bytearray(int(end) - int(begin))
                if file.readinto(buffer) != len(buffer):
                    raise CheckpointError(f"weight file {path} is corrupt or truncated at tensor {name}; download "
                                          "or save the checkpoint again")
                tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
                yield name, tensor.reshape(entry["shape"])
    except CheckpointError:
        raise
    except (OSError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"weight file {path} is corrupt or truncated ({exc}); download or save the "
                              "checkpoint again") from exc


def check_index_total(index_path: Path, headers: dict[Path, list[StoredTensor]]) -> None:
    """Raises CheckpointError when the index's ``total_size`` differs from what its shards hold."""
    if not index_path.is_file():
        return
    total = json.loads(index_path.read_text()).get("metadata", {}).get("total_size")
    stored = sum(tensor.nbytes for tensors in headers.values() for tensor in tensors)
    if total is not None and int(total) != stored:
        raise CheckpointError(f"{index_path} says total_size {int(total)} bytes, its shards hold {stored}: "
                              "the files are from different downloads or incomplete; download them again")


def estimate_bytes(headers: dict[Path, list[StoredTensor]], quantization: str, compute_dtype: torch.dtype) -> int:
    """Returns the bytes the loaded model holds: quantised LLM weights, everything else in ``compute_dtype``."""
    element = torch.empty((), dtype=compute_dtype).element_size()
    total = 0.0
    for tensors in headers.values():
        for tensor in tensors:
            if quantization != "none" and _QUANTIZED.match(tensor.name):
                total += tensor.numel * (_NF4_BYTES_PER_WEIGHT if quantization == "4bit" else _INT8_BYTES_PER_WEIGHT)
            else:
                total += tensor.numel * element
    return int(total)


# The loader puts weights in by groups of about this size (openvla_ros.model.loading.load_model).
LOAD_GROUP_BYTES = 512 * 1024**2


def load_peak_bytes(headers: dict[Path, list[StoredTensor]], quantization: str, compute_dtype: torch.dtype) -> int:
    """Returns the most the load holds at once: the final model plus 5%, and while weights are quantised or
    converted one group of them in ``compute_dtype`` (the loader's groups, plus the largest tensor)."""
    final = estimate_bytes(headers, quantization, compute_dtype)
    element = torch.empty((), dtype=compute_dtype).element_size()
    largest = max((t.numel for tensors in headers.values() for t in tensors), default=0) * element
    converted = quantization != "none" or any(
        t.nbytes != t.numel * element for tensors in headers.values() for t in tensors)
    return int(final * 1.05) + ((LOAD_GROUP_BYTES + largest) if converted else 0)


def available_bytes(device: torch.device) -> int | None:
    """Returns the memory free for the model on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parameter_count(headers: dict[Path, list[StoredTensor]]) -> int:
    return sum(tensor.numel for tensors in headers.values() for tensor in tensors)


def check_fits(checkpoint_dir: Path, headers: dict[Path, list[StoredTensor]], quantization: str,
               compute_dtype: torch.dtype, device: torch.device, available: int | None = None,
               extra_bytes: int = 0) -> None:
    """Raises CheckpointError before the load when it would not fit, naming the modes that would.

    ``extra_bytes`` is what loads beside the safetensors in every mode (OpenVLA-OFT's head files);
    ``available`` overrides what :func:`available_bytes` reads (tests).
    """
    free = available if available is not None else available_bytes(device)
    if free is None:
        return
    need = load_peak_bytes(headers, quantization, compute_dtype) + extra_bytes
    if need <= free:
        return
    options = []
    for mode, dtype in (("none", torch.bfloat16), ("8bit", torch.bfloat16), ("4bit", torch.bfloat16)):
        if (mode, dtype) == (quantization, compute_dtype):
            continue
        mode_need = load_peak_bytes(headers, mode, dtype) + extra_bytes
        label = "bfloat16" if mode == "none" else f"quantization {mode} (bfloat16 compute)"
        options.append((mode_need, f"{label} needs about {mode_need / GIB:.1f} GiB"))
    fitting = [text for mode_need, text in options if mode_need <= free]
    mode_name = str(compute_dtype).replace("torch.", "") + ("" if quantization == "none" else f" + {quantization}")
    advice = ("; ".join(fitting) + ": use that") if fitting else (
        "no mode fits: " + "; ".join(text for _, text in options) + "; free memory or use a machine with more")
    raise CheckpointError(
        f"{checkpoint_dir} ({parameter_count(headers) / 1e9:.2f} B parameters) needs about {need / GIB:.1f} GiB to "
        f"load in {mode_name} on {device.type}, and {free / GIB:.1f} GiB are available; {advice}"
    )
