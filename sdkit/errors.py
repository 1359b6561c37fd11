"""The one exception type users see: a refused input or a failed check.

The CLI prints `sdkit: error: <message>` for it and exits 1; everything else is a bug
and shows a traceback only with --debug.
"""

import re


class SdkitError(Exception):
    """A problem with the user's input or environment, described in one line."""


# words that start with a vowel letter but are said with a "you"/"w" sound: a UNet, a one-off
_CONSONANT_SOUND = ("unet", "uni", "use", "usu", "uti", "eu", "one", "once")
# consonant letters whose spoken name starts with a vowel sound: an LDM, an SDXL, an fp16 file
_VOWEL_SOUND_LETTERS = "fhlmnrsx"


def with_article(word: object) -> str:
    """`word` after "a" or "an" as it is said: an embedding, an unknown, a UNet, a LoRA,
    an LDM (letters spelled out), an ia3. Messages name kinds, families and formats from
    variables, so the article cannot be written into the message."""
    text = str(word)
    lower = text.lower()
    if lower.startswith(_CONSONANT_SOUND):
        article = "a"
    elif lower[:1] in ("a", "e", "i", "o", "u"):
        article = "an"
    else:
        article = "an" if _spelled_out(lower) and lower[:1] in _VOWEL_SOUND_LETTERS else "a"
    return f"{article} {text}"


def _spelled_out(lower: str) -> bool:
    """A leading run of letters with no vowel (ldm, sdxl, fp16) is read letter by letter."""
    letters = re.match(r"[a-z]*", lower).group()  # type: ignore[union-attr]  (always matches)
    return bool(letters) and not re.search("[aeiouy]", letters)
