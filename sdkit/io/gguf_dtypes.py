"""Dtype codes for the tensor types of GGUF files (llama.cpp's GGML types).

GGML types that are plain element arrays keep the safetensors code of the same layout
("F32", "F16", "BF16", "I8", …), so their bytes can be mapped as they are. Block-quantized
types get one code each, "GGUF_" + the GGML name ("GGUF_Q8_0", "GGUF_Q4_K", …): their
elements are stored `block_size` at a time in `type_size` bytes, the sizes the `gguf`
package publishes in `GGML_QUANT_SIZES` (Q8_0: 32 elements in 34 bytes; Q4_K: 256 in 144).
Loading such a tensor dequantizes it to float32.
"""

from __future__ import annotations

from functools import lru_cache

import gguf

from sdkit.io.model_file import GGUF_QUANT_PREFIX

_PLAIN_CODES = {
    gguf.GGMLQuantizationType.F32: "F32", gguf.GGMLQuantizationType.F16: "F16",
    gguf.GGMLQuantizationType.BF16: "BF16", gguf.GGMLQuantizationType.F64: "F64",
    gguf.GGMLQuantizationType.I8: "I8", gguf.GGMLQuantizationType.I16: "I16",
    gguf.GGMLQuantizationType.I32: "I32", gguf.GGMLQuantizationType.I64: "I64",
}


def code_of(ggml_type: gguf.GGMLQuantizationType) -> str:
    """The sdkit dtype code of a GGML tensor type."""
    return _PLAIN_CODES.get(ggml_type) or GGUF_QUANT_PREFIX + ggml_type.name


def is_quantized_code(code: str) -> bool:
    return code.startswith(GGUF_QUANT_PREFIX)


@lru_cache(maxsize=None)
def ggml_type_of(code: str) -> gguf.GGMLQuantizationType:
    """The GGML type behind a "GGUF_…" code; KeyError for any other code."""
    if not is_quantized_code(code):
        raise KeyError(code)
    return gguf.GGMLQuantizationType[code[len(GGUF_QUANT_PREFIX):]]


def block_layout(code: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a "GGUF_…" code."""
    return gguf.GGML_QUANT_SIZES[ggml_type_of(code)]
