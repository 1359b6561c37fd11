"""Textual inversion: new token vectors, and nothing else, learn the concept.

Each text encoder gets placeholder tokens of its own (`<sdkit-train-0>`, ... one per
vector) whose rows in the token table start as the initialiser word's vectors (a word of
several tokens is cycled over the vectors, as kohya does). Captions and preview prompts
are rewritten so that the trigger word becomes the placeholders; a caption that does not
mention it gets it in front. The token table is the trainable parameter (the optimizer
needs a whole tensor), and after every optimizer step each row but the placeholders' is
put back exactly, as diffusers' trainer does — so only the new vectors change.

Saved by the output suffix: `.safetensors` as kohya / A1111 `emb_params` (SDXL:
`clip_l` + `clip_g`) with ModelSpec and `ss_*` metadata, `.pt` as the dict A1111 pickles
(`string_to_param`, `string_to_token`, `name`, `step`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdkit.adapters.embedding import Embedding
from sdkit.errors import SdkitError
from sdkit.io import write_safetensors
from sdkit.ops.convert.embedding import embedding_tensors, write_a1111_pt
from sdkit.ops.recipe_meta import EMBEDDING_IMPLEMENTATION, SpecFacts, build_metadata
from sdkit.runtime.sample.prompt import mentions, replace_name
from sdkit.runtime.train.methods.base import SaveContext, TrainingMethod

_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class _TableState:
    """One text encoder's token table: the placeholder ids and the rows to keep."""

    def __init__(self, table: torch.nn.Embedding, ids: list[int]) -> None:
        self.table = table
        self.ids = ids
        self.keep = torch.ones(table.weight.shape[0], dtype=torch.bool, device=table.weight.device)
        self.keep[ids] = False
        self.original = table.weight.detach().clone()

    def restore(self) -> None:
        weight = self.table.weight
        if self.original.device != weight.device:  # the model moved to its device after setup
            self.original, self.keep = self.original.to(weight.device), self.keep.to(weight.device)
        with torch.no_grad():
            weight[self.keep] = self.original[self.keep].to(weight.dtype)

    def vectors(self) -> torch.Tensor:
        return self.table.weight.detach()[self.ids].float().cpu()


class EmbeddingMethod(TrainingMethod):
    name = "ti"
    text_grad = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        count = self.config.embedding.vectors
        self.placeholders = [f"<sdkit-train-{index}>" for index in range(count)]
        self.tables: dict[str, _TableState] = {}
        if self.token != self.config.stem.name:
            self.notes.append(f"A1111, ComfyUI and kohya call an embedding by its file name: prompts use "
                              f"{self.config.stem.name!r}, not --token {self.token!r}")
        if self.config.output.suffix.lower() == ".pt" and len(self.model.text_components) > 1:
            raise SdkitError(f"{self.config.output}: SDXL embeddings have no A1111 .pt layout; "
                             "write a .safetensors file")

    @property
    def token(self) -> str:
        return self.config.token

    def setup(self, generator: torch.Generator) -> None:
        for component in self.model.text_components:
            tokenizer = getattr(self.pipe, _TOKENIZERS[component])
            encoder = getattr(self.pipe, component)
            init_ids = tokenizer(self.config.embedding.init_word, add_special_tokens=False).input_ids
            if not init_ids:
                raise SdkitError(f"--init-word {self.config.embedding.init_word!r} gives no tokens")
            tokenizer.add_tokens(self.placeholders)
            ids = tokenizer.convert_tokens_to_ids(self.placeholders)
            table = encoder.get_input_embeddings()
            if max(ids) >= table.weight.shape[0]:  # grow, never shrink (toy tables are larger)
                encoder.resize_token_embeddings(max(ids) + 1)
                table = encoder.get_input_embeddings()
            with torch.no_grad():
                for index, row in enumerate(ids):
                    table.weight[row] = table.weight[init_ids[index % len(init_ids)]]
            table.weight.requires_grad_(True)
            self.tables[component] = _TableState(table, ids)

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [state.table.weight for state in self.tables.values()], "lr": self.config.optim.lr}]

    def prompt(self, text: str) -> str:
        return replace_name(text, self.token, " ".join(self.placeholders))

    def caption(self, text: str) -> str:
        if not mentions(text, self.token):
            text = f"{self.token}, {text}" if text else self.token
        return self.prompt(text)

    def after_optimizer_step(self) -> None:
        for state in self.tables.values():
            state.restore()

    def embedding(self, path: Path, steps: int) -> Embedding:
        vectors = {component: state.vectors() for component, state in self.tables.items()}
        return Embedding(path=path, layout="kohya", token=self.token, vectors=vectors, dtype="F32",
                         step=steps, checkpoint_name=self.model.name)

    def save(self, context: SaveContext) -> list[Path]:
        embedding = self.embedding(context.path, context.steps)
        dtype = _DTYPE_CODES[context.dtype]
        facts = SpecFacts(family=self.model.family, prediction=context.prediction, adapter="textual-inversion",
                          implementation=EMBEDDING_IMPLEMENTATION)
        extra = {**context.training_metadata, "modelspec.trigger_phrase": self.token}
        metadata = build_metadata("train", context.inputs, context.recipe_params, facts, extra,
                                  title=context.path.stem, hashes=context.input_hashes)
        if context.path.suffix.lower() == ".pt":
            write_a1111_pt(context.path, embedding, dtype, {"sd_checkpoint": context.base_short_hash, **metadata},
                           overwrite=context.overwrite)
        else:
            write_safetensors(context.path, embedding_tensors(embedding, "kohya", dtype), metadata,
                              overwrite=context.overwrite)
        return [context.path]
