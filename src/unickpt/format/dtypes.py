"""The dtypes unickpt stores, with their names in the manifest and in safetensors headers."""

from __future__ import annotations

import torch

from unickpt.errors import CorruptCheckpointError, InvalidStateError

# manifest name -> (torch dtype, safetensors header name)
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "F64"),
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3"),
    "float8_e5m2": (torch.float8_e5m2, "F8_E5M2"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint64": (torch.uint64, "U64"),
    "uint32": (torch.uint32, "U32"),
    "uint16": (torch.uint16, "U16"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
    "complex64": (torch.complex64, "C64"),
}
_BY_TORCH = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
# safetensors header name -> manifest name, for the dtypes unickpt stores
FROM_SAFETENSORS = {header: name for name, (_, header) in _DTYPES.items()}


def dtype_name(dtype: torch.dtype, *, key: str) -> str:
    """Manifest name of ``dtype``; ``key`` names the tensor in the error."""
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise InvalidStateError(f"tensor {key!r}: dtype {dtype} cannot be stored") from None


def torch_dtype(name: str) -> torch.dtype:
    """Torch dtype of a manifest dtype name."""
    try:
        return _DTYPES[name][0]
    except KeyError:
        raise CorruptCheckpointError(f"unknown dtype {name!r} in manifest") from None


def safetensors_dtype(name: str) -> str:
    """safetensors header dtype of a manifest dtype name."""
    return _DTYPES[name][1]


def itemsize(name: str) -> int:
    """Bytes per element of a manifest dtype name."""
    return torch_dtype(name).itemsize


def is_known(name: str) -> bool:
    return name in _DTYPES
