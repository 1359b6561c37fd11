"""Mapping between safetensors dtype codes and torch dtypes."""

import torch

CODE_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
TORCH_TO_CODE: dict[torch.dtype, str] = {v: k for k, v in CODE_TO_TORCH.items()}

# user-facing names (CLI --dtype) -> codes
NAME_TO_CODE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "fp64": "F64",
                "fp8": "F8_E4M3", "fp8_e4m3": "F8_E4M3", "fp8_e5m2": "F8_E5M2"}
