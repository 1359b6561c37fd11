"""Named block-weight presets (`--blocks GRAD_V`): one value per block id, in list order.

UNet models (SD1/SD2: 26 ids, SDXL: 20): supermerger's MBW presets, as its
`scripts/mbwpresets_master.txt` lists them for SD1 (BASE, IN00–IN11, M00, OUT00–OUT11);
for SDXL the SD1 list without IN09–IN11 and OUT09–OUT11, as supermerger's `weighttoxl`
converts them (its 21st SDXL entry, the VAE, has no block in sdkit: the VAE follows its
component setting). Only presets whose values follow a stated shape are carried here.

Transformer models: presets defined by a block's position p in the list (0 for `IN`,
1 for `OUT`, evenly spaced between), so that one preset fits every family and size:

- `ALL_A` 0 everywhere, `ALL_B` 1, `FLAT_25` / `FLAT_75` 0.25 / 0.75;
- `GRAD_IN` 1 − p (B strongest at the input side), `GRAD_OUT` p;
- `GRAD_V` |2p − 1| (B at both ends, A in the middle), `GRAD_A` 1 − |2p − 1|;
- `SMOOTHSTEP` 3p² − 2p³ and `REVERSE-SMOOTHSTEP`; `COSINE` (1 + cos πp) / 2 and
  `REVERSE_COSINE`.

These are the same shapes as supermerger's presets of those names over its 25 UNet
positions (IN00 … OUT11; BASE, the text encoders, stays 0 there); `GRAD_IN` and
`GRAD_OUT` are sdkit's.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from sdkit.errors import SdkitError

# supermerger scripts/mbwpresets_master.txt (SD1 order: BASE, IN00–IN11, M00, OUT00–OUT11)
_SD1_PRESETS = {
    "GRAD_V": "0,1,0.9166666667,0.8333333333,0.75,0.6666666667,0.5833333333,0.5,0.4166666667,0.3333333333,"
              "0.25,0.1666666667,0.0833333333,0,0.0833333333,0.1666666667,0.25,0.3333333333,0.4166666667,0.5,"
              "0.5833333333,0.6666666667,0.75,0.8333333333,0.9166666667,1.0",
    "GRAD_A": "0,0,0.0833333333,0.1666666667,0.25,0.3333333333,0.4166666667,0.5,0.5833333333,0.6666666667,"
              "0.75,0.8333333333,0.9166666667,1.0,0.9166666667,0.8333333333,0.75,0.6666666667,0.5833333333,0.5,"
              "0.4166666667,0.3333333333,0.25,0.1666666667,0.0833333333,0",
    "FLAT_25": "0" + ",0.25" * 25,
    "FLAT_75": "0" + ",0.75" * 25,
    "WRAP08": "0,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1",
    "WRAP12": "0,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1",
    "WRAP14": "0,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1",
    "WRAP16": "0,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1",
    "MID12_50": "0,0,0,0,0,0,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0,0,0,0,0,0",
    "OUT07": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1",
    "OUT12": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1",
    "OUT12_5": "0,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1",
    "RING08_SOFT": "0,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0",
    "RING08_5": "0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0,1,1,1,1,0,0,0,0,0,0",
    "RING10_5": "0,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0",
    "RING10_3": "0,0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0",
    "SMOOTHSTEP": (
        "0,0,0.00506365740740741,0.0196759259259259,0.04296875,0.0740740740740741,"
        "0.112123842592593,0.15625,0.205584490740741,0.259259259259259,0.31640625,0.376157407407407,"
        "0.437644675925926,0.5,0.562355324074074,0.623842592592592,0.68359375,0.740740740740741,"
        "0.794415509259259,0.84375,0.887876157407408,0.925925925925926,0.95703125,0.980324074074074,"
        "0.994936342592593,1"),
    "REVERSE-SMOOTHSTEP": (
        "0,1,0.994936342592593,0.980324074074074,0.95703125,0.925925925925926,"
        "0.887876157407407,0.84375,0.794415509259259,0.740740740740741,0.68359375,0.623842592592593,"
        "0.562355324074074,0.5,0.437644675925926,0.376157407407408,0.31640625,0.259259259259259,"
        "0.205584490740741,0.15625,0.112123842592592,0.0740740740740742,0.0429687499999996,0.0196759259259258,"
        "0.00506365740740744,0"),
    "COSINE": (
        "0,1,0.995722430686905,0.982962913144534,0.961939766255643,0.933012701892219,"
        "0.896676670145617,0.853553390593274,0.80438071450436,0.75,0.691341716182545,0.62940952255126,"
        "0.565263096110026,0.5,0.434736903889974,0.37059047744874,0.308658283817455,0.25,"
        "0.195619285495639,0.146446609406726,0.103323329854382,0.0669872981077805,0.0380602337443566,0.0170370868554658,"
        "0.00427756931309475,0"),
    "REVERSE_COSINE": (
        "0,0,0.00427756931309475,0.0170370868554659,0.0380602337443566,0.0669872981077808,"
        "0.103323329854383,0.146446609406726,0.19561928549564,0.25,0.308658283817455,0.37059047744874,"
        "0.434736903889974,0.5,0.565263096110026,0.62940952255126,0.691341716182545,0.75,"
        "0.804380714504361,0.853553390593274,0.896676670145618,0.933012701892219,0.961939766255643,0.982962913144534,"
        "0.995722430686905,1"),
    "ALL_A": "0" + ",0" * 25,
    "ALL_B": "1" + ",1" * 25,
}
_SD1_BLOCKS = 26
_SDXL_BLOCKS = 20


def _sdxl(values: list[float]) -> list[float]:
    """SD1 order -> SDXL order: BASE, IN00–IN08, then M00 and OUT00–OUT08."""
    return values[:10] + values[13:23]


_CURVES: dict[str, Callable[[float], float]] = {
    "ALL_A": lambda p: 0.0,
    "ALL_B": lambda p: 1.0,
    "FLAT_25": lambda p: 0.25,
    "FLAT_75": lambda p: 0.75,
    "GRAD_IN": lambda p: 1.0 - p,
    "GRAD_OUT": lambda p: p,
    "GRAD_V": lambda p: abs(2 * p - 1),
    "GRAD_A": lambda p: 1 - abs(2 * p - 1),
    "SMOOTHSTEP": lambda p: 3 * p ** 2 - 2 * p ** 3,
    "REVERSE-SMOOTHSTEP": lambda p: 1 - (3 * p ** 2 - 2 * p ** 3),
    "COSINE": lambda p: (1 + math.cos(math.pi * p)) / 2,
    "REVERSE_COSINE": lambda p: (1 - math.cos(math.pi * p)) / 2,
}


def unet_preset_names() -> list[str]:
    return list(_SD1_PRESETS)


def transformer_preset_names() -> list[str]:
    return list(_CURVES)


def curve(name: str, positions: int) -> list[float]:
    """A position-defined preset over `positions` evenly spaced blocks."""
    last = max(positions - 1, 1)
    return [_CURVES[name](i / last) for i in range(positions)]


def unet_preset(name: str, block_count: int) -> list[float]:
    """A supermerger preset for a UNet of 26 (SD1/SD2) or 20 (SDXL) block ids."""
    values = [float(v) for v in _SD1_PRESETS[name].split(",")]
    if block_count == _SD1_BLOCKS:
        return values
    if block_count == _SDXL_BLOCKS:
        return _sdxl(values)
    raise SdkitError(f"block preset {name} is for UNets of {_SD1_BLOCKS} (SD1/SD2) or {_SDXL_BLOCKS} (SDXL) "
                     f"blocks; this model has {block_count}")


def is_preset_name(text: str) -> bool:
    return text.strip().upper() in {*_SD1_PRESETS, *_CURVES}


def preset_values(name: str, ids: Sequence[str], transformer: bool) -> list[float]:
    """The preset's value of every id of a model, in order."""
    key = name.strip().upper()
    names = transformer_preset_names() if transformer else unet_preset_names()
    if key not in names:
        raise SdkitError(f"block preset {name!r} is not one for this model (its presets: {', '.join(names)})")
    return curve(key, len(ids)) if transformer else unet_preset(key, len(ids))
