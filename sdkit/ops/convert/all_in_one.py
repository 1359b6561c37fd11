"""An all-in-one checkpoint of a transformer family ⇄ a whole diffusers pipeline folder.

The checkpoint is the layout Stability released SD3 in and ComfyUI keeps its all-in-one
FLUX.1 files in: the diffusion model under `model.diffusion_model.` in its single-file
names, each text encoder under `text_encoders.<ComfyUI's name>.transformer.` in Hugging
Face names, the VAE in LDM names under the family's `checkpoint_vae_root`. Which prefix is
which component is what `sdkit sample` reads such a file by (`runtime.flow_load`); the way
back writes the names `sdkit join` writes (`ops.parts.join`).

- `--to diffusers` (a folder): each component through the per-component folder writer,
  lazily; configs, tokenizers and the scheduler come from `--config DIR` (a local
  diffusers folder of the model); without one, the transformer's config follows from its
  release, a CLIP tokenizer whose vocabulary is OpenAI CLIP's is the one sdkit ships, the
  scheduler is the family's released one, and what cannot be had offline is named in one
  line. An encoder the family's pipeline projects but the model takes unprojected (SD3's
  CLIP-L) gets an identity `text_projection`, as diffusers' own single-file loader gives it.
- `--to single-file` (a `.safetensors` file) from such a folder: the same names back.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdkit.arch.families import FAMILIES
from sdkit.arch.families.spec import Family, TextEncoderSpec
from sdkit.arch.keymaps.transformer import transformer_plan
from sdkit.data.clip_tokenizer import END_OF_TEXT, OPENCLIP_PAD, write_clip_tokenizer
from sdkit.data.pipeline_defaults import tokenizer_fits
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor
from sdkit.io.output_path import build_in_partial
from sdkit.ops.convert.model import write_file
from sdkit.ops.convert.transformer import TransformerConversion, _layout_match
from sdkit.ops.folders import _diffusers_version, _write_json, write_component_folder
from sdkit.ops.layout import extract_component, plan_tensors
from sdkit.ops.parts.join import ENCODER_ROOT, checkpoint_encoder_keys
from sdkit.ops.parts.split import DENOISER_ROOT, VAE_ROOTS

_FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# the pad token of the shipped CLIP tokenizer each released CLIP's diffusers folder uses
_CLIP_PADS = {"CLIP-L": END_OF_TEXT, "CLIP-G": OPENCLIP_PAD}
_SHOWN = 3


def _family(identity: Any, where: Path) -> Family:
    family = FAMILIES.get(identity.family)
    if family is None or family.sampling is None:
        raise SdkitError(f"{where}: is {with_article(identity.part)}; sdkit knows no diffusers pipeline of it "
                         "to convert it to or from")
    return family


def _encoder_specs(family: Family) -> dict[str, TextEncoderSpec]:
    """The family's text encoders by the pipeline component that holds each."""
    return {spec.component: spec for spec in family.text_encoders if spec.component in family.sampling.text_encoders}


def _tokenizer_name(component: str) -> str:
    return component.replace("text_encoder", "tokenizer")


class AllInOneConversion(TransformerConversion):
    """An all-in-one checkpoint to a pipeline folder, or such a folder to one checkpoint."""

    def _run(self):
        self.family = _family(self.identity, self.model.path)
        if self.options.only:
            raise SdkitError(f"{self.model.path}: --only is for the SD families; `sdkit split` writes the parts of "
                             "a transformer family's checkpoint")
        self._refuse_packed()
        self.result.family = self.family.name
        if self.model.components:
            return self._to_checkpoint()
        return self._to_pipeline()

    # -- the checkpoint to a pipeline folder -----------------------------------------------

    def _to_pipeline(self):
        if self.options.to != "diffusers":
            raise SdkitError(f"{self.model.path}: is already in single-file names (--to diffusers makes a "
                             "diffusers pipeline folder of it)")
        from sdkit.runtime.flow_load import all_in_one_tensors

        self.convention = "diffusers"
        self.match = _layout_match(self.model, DENOISER_ROOT)
        self._refuse_foreign_encoders()
        self._require_components()
        self._require_configs(self.configs)
        configs = {**self.configs, "transformer": self._config()}
        self.pipeline_configs = configs
        tensors = self._plain_values(all_in_one_tensors(self.family, self.model, configs))
        self._check_vae(tensors, configs["vae"])
        tensors.update(self._identity_projections(tensors, configs))
        self.tokenizers = self._tokenizer_sources(configs)
        self._note_left_out_keys()
        self.result.convention = "diffusers"
        self._write(None, None, tensors, {name: [name] for name in tensors})
        return self.result

    def _refuse_foreign_encoders(self) -> None:
        names = {spec.comfyui_name for spec in _encoder_specs(self.family).values()}
        for encoder in self.identity.facts.get("text_encoders") or []:
            words = encoder["prefix"].split(".")
            if words[0] + "." == ENCODER_ROOT and len(words) > 2 and words[1] not in names:
                raise SdkitError(f"{self.model.path}: holds a text encoder under {encoder['prefix']}, which "
                                 f"{self.family.title} does not use (it takes {self._needed()})")

    def _needed(self) -> str:
        from sdkit.runtime.flow_load import needed_parts

        return needed_parts(self.family)

    def _require_configs(self, configs: Mapping[str, dict]) -> None:
        missing = [c for c in ("vae", *self.family.sampling.text_encoders) if c not in configs]
        if missing:
            given = f"{self.options.config_dir} has no" if self.options.config_dir else "pass --config DIR (a local " \
                "diffusers folder of this model) for"
            raise SdkitError(f"{self.model.path}: a diffusers pipeline of {with_article(self.family.title)} model "
                             f"needs configs a checkpoint does not hold; {given} {', '.join(missing)}")

    def _require_components(self) -> None:
        from sdkit.runtime.flow_load import encoder_component

        held = {c for c in self.identity.components if not c.startswith("text_encoder")}
        held.update(encoder_component(self.family, e) for e in self.identity.facts.get("text_encoders") or [])
        for component in ("transformer", *self.family.sampling.text_encoders, "vae"):
            if component not in held:
                raise SdkitError(f"{self.model.path}: has no {component}; {with_article(self.family.title)} "
                                 f"pipeline needs {self._needed()} (`sdkit join` makes one checkpoint of the parts)")

    def _check_vae(self, tensors: Mapping[str, LazyTensor], config: Mapping[str, Any]) -> None:
        """A VAE of another latent space is refused before anything is written."""
        latent = tensors.get("vae/encoder.conv_out.weight")
        wanted = config.get("latent_channels")
        if latent is not None and isinstance(wanted, int) and latent.shape[0] != 2 * wanted:
            raise SdkitError(f"{self.model.path}: its VAE has {latent.shape[0] // 2} latent channels; "
                             f"{self.family.title}'s {self.family.vae_part} has {wanted}")

    def _identity_projections(self, tensors: Mapping[str, LazyTensor],
                              configs: Mapping[str, dict]) -> dict[str, LazyTensor]:
        made = {}
        for component in self.family.sampling.unprojected_pools:
            config = configs[component]
            if "WithProjection" not in str((config.get("architectures") or [""])[0]):
                continue
            width = int(config["hidden_size"])
            table = tensors[f"{component}/text_model.embeddings.token_embedding.weight"]
            made[f"{component}/text_projection.weight"] = _identity(width, table.dtype)
            self.result.notes.append(f"{component}/text_projection written as the identity: "
                                     f"{self.family.title} takes its pooled output unprojected")
        return made

    def _tokenizer_sources(self, configs: Mapping[str, dict]) -> dict[str, Path | str]:
        """Each tokenizer folder -> the folder it is copied from, or the pad token of the
        shipped CLIP tokenizer; one line naming the first that cannot be had offline."""
        found: dict[str, Path | str] = {}
        config_dir = Path(self.options.config_dir) if self.options.config_dir else None
        for component, spec in _encoder_specs(self.family).items():
            name = _tokenizer_name(component)
            if config_dir is not None and (config_dir / name).is_dir():
                found[name] = config_dir / name
            elif spec.part in _CLIP_PADS and tokenizer_fits(configs[component]):
                found[name] = _CLIP_PADS[spec.part]
            else:
                where = f"{config_dir} has no {name}/" if config_dir else "pass --config DIR (a local diffusers " \
                    "folder of this model)"
                raise SdkitError(f"{self.model.path}: {spec.part}'s tokenizer ({name}) cannot be made offline; {where}")
        return found

    def _note_left_out_keys(self) -> None:
        prefixes = (DENOISER_ROOT, *VAE_ROOTS, *(e["prefix"] for e in self.identity.facts.get("text_encoders") or []))
        left = [name for name in self.model.infos if not name.startswith(prefixes)]
        if left:
            shown = ", ".join(left[:_SHOWN]) + (", …" if len(left) > _SHOWN else "")
            self.result.notes.append(f"{len(left)} tensors have no place in the pipeline and were left out ({shown})")

    def _write_output(self, view, converted, tensors: dict[str, LazyTensor]) -> None:
        if self.model.components:
            self._write_checkpoint(tensors)
            return
        if self._writes_as_file():
            raise SdkitError(f"{self.output}: a diffusers pipeline is a folder; give a folder path")
        self.result.written = "folder"
        by_component: dict[str, dict[str, LazyTensor]] = {}
        for name, lazy in tensors.items():
            component, key = name.split("/", 1)
            by_component.setdefault(component, {})[key] = lazy
        build_in_partial(self.output, self.options.force, lambda folder: self._fill(folder, by_component))

    def _fill(self, folder: Path, by_component: Mapping[str, Mapping[str, LazyTensor]]) -> None:
        configs = self.pipeline_configs
        for component, tensors in by_component.items():
            (folder / component).mkdir()
            write_component_folder(folder / component, component, tensors, configs[component],
                                   self._metadata(component), self.progress, self.input_hash.patch)
        for name, source in self.tokenizers.items():
            if isinstance(source, Path):
                shutil.copytree(source, folder / name)
            else:
                write_clip_tokenizer(folder / name, source)
        self._write_scheduler(folder, configs["transformer"])
        _write_json(folder / "model_index.json", self._model_index(folder, list(by_component)))

    def _write_scheduler(self, folder: Path, transformer_config: Mapping[str, Any]) -> None:
        from sdkit.runtime.flow_load import default_schedule

        given = Path(self.options.config_dir) / "scheduler" if self.options.config_dir else None
        if given is not None and (given / "scheduler_config.json").is_file():
            shutil.copytree(given, folder / "scheduler")
            return
        (folder / "scheduler").mkdir()
        schedule = {"_class_name": _FLOW_SCHEDULER, "_diffusers_version": _diffusers_version(),
                    **default_schedule(self.family, transformer_config)}
        _write_json(folder / "scheduler" / "scheduler_config.json", schedule)

    def _model_index(self, folder: Path, components: list[str]) -> dict[str, Any]:
        given = Path(self.options.config_dir) / "model_index.json" if self.options.config_dir else None
        index = json.loads(given.read_text(encoding="utf-8")) if given is not None and given.is_file() else {}
        index = index if isinstance(index, dict) else {}
        sampling = self.family.sampling
        index.update({"_class_name": sampling.class_name, "_diffusers_version": _diffusers_version()})
        classes = {"transformer": ("diffusers", self.family.diffusers_model.class_name),
                   "vae": ("diffusers", sampling.vae_class),
                   "scheduler": ("diffusers", _scheduler_class(folder))}
        classes.update({c: ("transformers", sampling.text_encoders[c]) for c in components if c in sampling.text_encoders})
        classes.update({name: ("transformers", _tokenizer_class(folder / name)) for name in self.tokenizers})
        index.update({name: list(value) for name, value in classes.items()})
        return index

    # -- a pipeline folder to one checkpoint ------------------------------------------------

    def _to_checkpoint(self):
        if self.options.to != "single-file":
            raise SdkitError(f"{self.model.path}: is already a diffusers folder (--to single-file makes one "
                             "all-in-one checkpoint of it)")
        self.convention = "ldm"
        self.result.convention = "ldm"
        missing = [c for c in ("transformer", *self.family.sampling.text_encoders, "vae")
                   if c not in self.model.components]
        if missing:
            raise SdkitError(f"{self.model.path}: has no {missing[0]}/; an all-in-one {self.family.title} checkpoint "
                             f"holds {self._needed()}")
        tensors = self._checkpoint_denoiser()
        for component, spec in _encoder_specs(self.family).items():
            tensors.update(self._checkpoint_encoder(component, spec))
        configs = self.model.extra.get("configs") or {}
        vae = extract_component(self.model.components["vae"], "vae", "ldm", configs={"vae": configs.get("vae")})
        tensors.update({self.family.checkpoint_vae_root + name: lazy for name, lazy in vae.items()})
        self._write(None, None, tensors, {name: [name] for name in tensors})
        return self.result

    def _checkpoint_denoiser(self) -> dict[str, LazyTensor]:
        from sdkit.io import lazy_tensors

        head = "transformer/"
        tensors = {name: lazy for name, lazy in self._plain_values(lazy_tensors(self.model)).items()
                   if name.startswith(head)}
        self.match = _layout_match(self.model, head)
        if self.family.key_map is None or self.family.key_map.same_names:
            return {DENOISER_ROOT + name[len(head):]: lazy for name, lazy in tensors.items()}
        try:
            plan = transformer_plan(self.family, self.match.dims, "diffusers_to_ldm", list(tensors), head)
        except SdkitError as exc:
            raise SdkitError(f"{self.model.path}: {exc}") from None
        return {DENOISER_ROOT + name: lazy for name, lazy in plan_tensors(plan, tensors).items()}

    def _checkpoint_encoder(self, component: str, spec: TextEncoderSpec) -> dict[str, LazyTensor]:
        facts = next((f for f in self.identity.facts.get("text_encoders") or [] if f["component"] == component), None)
        part = self.model.components[component]
        if facts is None:
            raise SdkitError(f"{part.path}: is not a text encoder sdkit knows ({self.family.title}'s {component} "
                             f"is {spec.part})")
        return checkpoint_encoder_keys(part.path, part, facts, spec)

    def _write_checkpoint(self, tensors: dict[str, LazyTensor]) -> None:
        if not self._writes_as_file():
            raise SdkitError(f"{self.output}: an all-in-one checkpoint is a .safetensors file")
        write_file(self.output, tensors, self._metadata(None), self.input_hash, self.options.force, self.progress)


def _identity(width: int, dtype: str) -> LazyTensor:
    def make():
        import torch

        from sdkit.io.dtypes import CODE_TO_TORCH

        return torch.eye(width, dtype=CODE_TO_TORCH[dtype])
    return LazyTensor(dtype, (width, width), make)


def _scheduler_class(folder: Path) -> str:
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return str(config.get("_class_name") or _FLOW_SCHEDULER)


def _tokenizer_class(folder: Path) -> str:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return str(config.get("tokenizer_class") or "CLIPTokenizer")

