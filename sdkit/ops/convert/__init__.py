"""Converting a file: precision, pruning, CLIP repair, single file <-> diffusers, LoRA and embedding layouts.

Nothing is imported here: each module is imported where it is used (some need torch,
some must not).
"""
