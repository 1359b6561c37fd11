"""Model families, identification and key conventions.

`identify(model)` says what a ModelFile is; `FAMILIES` holds the released families'
reference dimensions; `sdkit.arch.keymaps` converts between key conventions.
"""

from sdkit.arch.families import FAMILIES, Family
from sdkit.arch.identify import identify
from sdkit.arch.identity import Identity, Precision

__all__ = ["FAMILIES", "Family", "Identity", "Precision", "identify"]
