"""All-in-one checkpoints and the parts ComfyUI keeps in separate folders.

`split` writes a checkpoint's diffusion model, text encoders and VAE each on its own, into
ComfyUI's folders (`diffusion_models/`, `text_encoders/`, `vae/`); `join` assembles one
all-in-one file from such parts, in the layout ComfyUI's checkpoint loader reads for the
family. Tensors are copied as they are stored (names change, bytes never).
"""

from sdkit.ops.parts.join import JoinResult, join_parts
from sdkit.ops.parts.split import SplitResult, split_checkpoint

__all__ = ["JoinResult", "SplitResult", "join_parts", "split_checkpoint"]
