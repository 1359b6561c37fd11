"""`inspect` as a library call: one report dict per file, the `--json` schema.

The schema is documented in the README ("inspect --json"); keep the two in step.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sdkit.arch import identify
from sdkit.io.model_file import ModelFile
from sdkit.io.opener import open_model


def hashes_report(path: str | Path) -> dict[str, Any]:
    """The four hashes users meet (null where a hash does not apply to the file)."""
    from sdkit.io.hashing import hash_file  # with its cache (sqlite): only when hashing

    hashes = hash_file(path)
    return {
        "sha256": hashes.sha256,
        "autov2": hashes.autov2,
        "legacy": hashes.legacy,
        "autov3": hashes.autov3,
    }


def _dtype_counts(model: ModelFile) -> dict[str, int]:
    return dict(sorted(Counter(info.dtype for info in model.infos.values()).items()))


def inspect_png(path: str | Path) -> dict[str, Any]:
    """The generation parameters an image carries (A1111 `parameters` text chunk): the
    fields as written, and typed (`generation`; README, "inspect of a PNG")."""
    from sdkit.runtime.sample.png import generation_summary, read_png_parameters

    fields = read_png_parameters(path)
    return {"path": str(path), "format": "png", "kind": "image", "parameters": fields,
            "generation": generation_summary(fields)}


def inspect_path(path: str | Path, *, with_hashes: bool = False, deep: bool = False) -> dict[str, Any]:
    """Describe a model file or diffusers folder: what it is, for which family, what it holds.

    A PNG gets its generation parameters instead (see `inspect_png`).
    """
    if str(path).lower().endswith(".png"):
        return inspect_png(path)
    with open_model(path) as model:
        identity = identify(model, deep=deep)
        ident = identity.to_json()
        report: dict[str, Any] = {
            "path": str(path),
            "format": model.format,
            "kind": ident["kind"],
            "family": ident["family"],
            "release": ident["facts"].get("release"),
            "part": ident["part"],
            "needs": ident["needs"],
            "summary": ident["summary"],
            "adapter_type": ident.get("adapter_type"),
            "components": ident.get("components", []),
            "key_convention": ident.get("key_convention"),
            "variant": ident.get("variant"),
            "prediction": ident.get("prediction"),
            "precision": ident.get("precision"),
            "nonstandard": ident.get("nonstandard", False),
            "tensors": len(model),
            "parameters": model.parameters,
            "dtypes": _dtype_counts(model),
            "size_bytes": model.size_bytes,
            "metadata": dict(model.metadata),
            "notes": list(ident.get("notes", [])),
            "facts": ident.get("facts", {}),
        }
    if with_hashes:
        report["hashes"] = hashes_report(path)
    return report
