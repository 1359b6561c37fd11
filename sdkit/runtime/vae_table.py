"""Well-known VAE files by the sha256 of the whole file (A1111's "new" hash, Civitai SHA256).

Only hashes cited in public sources are listed; each entry names where it was found.
A file's hash changes with its container (`.ckpt` vs `.safetensors`, diffusers folder
weights), so one VAE can appear several times. Unknown hashes are the normal case: the
numeric check, not this table, decides whether a VAE fits a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class KnownVae:
    sha256: str
    name: str
    family: str  # a key of sdkit.arch.families.FAMILIES
    note: str
    source: str  # where the hash is cited

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_SD_VAE_LISTS = "download manifests of ComfyUI / A1111 installers pinning the Hugging Face file"
_SD1_MIR = "darkshapes MIR model index (sd1 VAE file hashes)"
_TRAINER_LIST = "kohya LoRA-trainer notebook validator (expected VAE sha256 list)"

KNOWN_VAES: dict[str, KnownVae] = {entry.sha256: entry for entry in (
    KnownVae("735e4c3a447a3255760d7f86845f09f937809baa529c17370d83e4c3758f3c75",
             "vae-ft-mse-840000-ema-pruned.safetensors", "sd1",
             "stabilityai/sd-vae-ft-mse-original: SD VAE with the decoder fine-tuned (MSE)", _SD_VAE_LISTS),
    KnownVae("c6a580b13a5bc05a5e16e4dbb80608ff2ec251a162311590c1f34c013d7f3dab",
             "vae-ft-mse-840000-ema-pruned.ckpt", "sd1",
             "stabilityai/sd-vae-ft-mse-original, pickle release", _TRAINER_LIST),
    KnownVae("a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815",
             "sd-vae-ft-mse (diffusers diffusion_pytorch_model.safetensors)", "sd1",
             "stabilityai/sd-vae-ft-mse, diffusers layout", _SD1_MIR),
    KnownVae("0b204ad0cae549e0a7e298d803d57e36363760dec71c63109c1da3e1147ec520",
             "vae-ft-ema-560000-ema-pruned.ckpt", "sd1",
             "stabilityai/sd-vae-ft-ema-original: SD VAE with the decoder fine-tuned (EMA)", _SD1_MIR),
    KnownVae("95f26a5ab04779d5467d1fcecaf93160ffa523afe399b835b3e1bb77ff2d937a",
             "vae-ft-ema-560000-ema-pruned.safetensors", "sd1",
             "stabilityai/sd-vae-ft-ema-original, safetensors release", _SD1_MIR),
    KnownVae("32db726da04f06c1b6b14c0043ce115cc87a501482945c5add89a40d838fcb46",
             "sd-vae-ft-ema (diffusers diffusion_pytorch_model.safetensors)", "sd1",
             "stabilityai/sd-vae-ft-ema, diffusers layout", _SD1_MIR),
    KnownVae("f921fb3f29891d2a77a6571e56b8b5052420d2884129517a333c60b1b4816cdf",
             "animevae.pt (NovelAI; also shipped as Anything-V3.0.vae.pt, anything-v4.0.vae.pt)", "sd1",
             "weights equal to the original SD 1.4 VAE", _TRAINER_LIST),
    KnownVae("2f11c4a99ddc28d0ad8bce0acc38bed310b45d38a3fe4bb367dc30f3ef1a4868",
             "kl-f8-anime.ckpt", "sd1", "hakurei/waifu-diffusion-v1-4 VAE", _TRAINER_LIST),
    KnownVae("df3c506e51b7ee1d7b5a6a2bb7142d47d488743c96aa778afb0f53a2cdc2d38d",
             "kl-f8-anime2.ckpt", "sd1",
             "hakurei/waifu-diffusion-v1-4 VAE (also shipped as MoistMix.vae.pt)", _TRAINER_LIST),
    KnownVae("2453b80bc1716bc3f94496d4e56be891e267051dc43c5144f384b66a73ac8295",
             "autoencoder_fix_kl-f8-trinart_characters.ckpt", "sd1", "naclbit/trinart_characters VAE",
             _TRAINER_LIST),
    KnownVae("53cfd845736459e78f208786f8d56109093f37dc427e366769416f6ca9ea6fc9",
             "mse840000_klf8anime", "sd1", "a merge of vae-ft-mse-840000 and kl-f8-anime", _TRAINER_LIST),
    KnownVae("a9a44822203eaa05104d37a242ec5af405d0fcfb98a81fb89f0c2e8bb71ae962",
             "mse840000_klf8anime_klf8anime2", "sd1", "a merge of vae-ft-mse-840000, kl-f8-anime and "
             "kl-f8-anime2", _TRAINER_LIST),
    KnownVae("600345c503784cd77536d714f0e4c43f9e1fa4379007e730d54c454c66ee36db",
             "ClearVAE", "sd1", "community SD1 VAE", _TRAINER_LIST),
    KnownVae("4809659b70d67d314c45062ece33a7f9f8abc9aaf13805173a129cad2664e091",
             "ClearVAE NansLessTest", "sd1", "community SD1 VAE", _TRAINER_LIST),
    KnownVae("9c2d6dc265bd4758042cc2385b090aede02d8160b556830e9385db8a74ddcaab",
             "ClearVAE Variant", "sd1", "community SD1 VAE", _TRAINER_LIST),
    KnownVae("63aeecb90ff7bc1c115395962d3e803571385b61938377bc7089b36e81e92e2e",
             "sdxl_vae.safetensors", "sdxl-base",
             "stabilityai/sdxl-vae; produces NaN in float16 (use sdxl-vae-fp16-fix)", _SD_VAE_LISTS),
    KnownVae("235745af8d86bf4a4c1b5b4f529868b37019a10f7c0b2e79ad0abca3a22bc6e1",
             "sdxl-vae-fp16-fix sdxl_vae.safetensors", "sdxl-base",
             "madebyollin/sdxl-vae-fp16-fix (also shipped as Pony Diffusion V6 XL's VAE); "
             "safe in float16", _SD_VAE_LISTS),
)}


def known_vae(sha256: str | None) -> KnownVae | None:
    """The table's entry for a file's sha256 (any case), or None."""
    return KNOWN_VAES.get(sha256.lower()) if sha256 else None
