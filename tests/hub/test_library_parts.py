"""Libraries of split parts (diffusion models, text encoders, VAEs of the transformer
families), filed in each WebUI's folders, listed with their part; Civitai base-model names.

The files are full-size and header-only (fixtures/families/released.py): the released key
names and shapes with a hole for data. Hashing tens of gigabytes of hole is no test of
placement (hashing has its own tests), so the library hashes them here by their header.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from cli_run import run_sdkit
from conftest import kohya_lora

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "families"
sys.path.insert(0, str(FIXTURES))

from released import (CLIP_L, RELEASES, T5_XXL, UMT5_XXL, WAN22_VAE, clip_shapes,  # noqa: E402
                      ldm_vae_shapes, single_file_shapes, t5_shapes, typed, umt5_shapes,
                      wan_vae_shapes, write_header_only)

from sdkit.arch.families import (CIVITAI_BASE_MODELS, FAMILIES, civitai_base_models_for,  # noqa: E402
                                 family_for_civitai_base_model)
from sdkit.hub.library import Library, detect_layout, open_for_scan, scan_library  # noqa: E402
from sdkit.io import Hashes  # noqa: E402

FLUX_PART = "FLUX.1-dev diffusion model"
SHARED_VAE = "16-channel VAE (SD3 VAE / FLUX VAE design: the weights alone do not tell which)"
# file name -> (kind, family, part) as identify() gives them
PARTS = {
    "flux1-dev.safetensors": ("unet", "flux", FLUX_PART),
    "wan2.1_t2v_1.3B.safetensors": ("unet", "wan", "Wan2.1-T2V-1.3B diffusion model"),
    "qwen_image.safetensors": ("unet", "qwen-image", "Qwen-Image diffusion model"),
    "t5xxl_fp16.safetensors": ("text-encoder", "unknown", "T5-XXL encoder"),
    "clip_l.safetensors": ("text-encoder", "sd1", "CLIP-L text encoder"),
    "umt5_xxl.safetensors": ("text-encoder", "wan", "UMT5-XXL encoder"),
    "ae.safetensors": ("vae", "unknown", SHARED_VAE),
    "wan2.2_vae.safetensors": ("vae", "wan", "Wan 2.2 VAE"),
}


def header_hashes(path: Path, **_: object) -> Hashes:
    with open(path, "rb") as file:
        digest = hashlib.sha256(file.read(1 << 20) + str(path.stat().st_size).encode()).hexdigest()
    return Hashes(digest, digest[:10], digest[:8], digest[:12], digest)


@pytest.fixture(autouse=True)
def hash_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sdkit.hub.library.library.hash_file", header_hashes)


@pytest.fixture(scope="session")
def part_tensors() -> dict[str, dict]:
    """Name -> released keys, shapes and dtypes of each part (built once: the encoders
    come from transformers' classes on the meta device)."""
    return {
        "flux1-dev.safetensors": typed(single_file_shapes(RELEASES["FLUX.1-dev"]), "BF16"),
        "wan2.1_t2v_1.3B.safetensors": typed(single_file_shapes(RELEASES["Wan2.1-T2V-1.3B"]), "BF16"),
        "qwen_image.safetensors": typed(single_file_shapes(RELEASES["Qwen-Image"]), "BF16"),
        "t5xxl_fp16.safetensors": typed(t5_shapes(T5_XXL), "F16"),
        "clip_l.safetensors": typed(clip_shapes(CLIP_L), "F16"),
        "umt5_xxl.safetensors": typed(umt5_shapes(UMT5_XXL), "BF16"),
        "ae.safetensors": typed(ldm_vae_shapes(16, quant_convs=False), "F32"),
        "wan2.2_vae.safetensors": typed(wan_vae_shapes(WAN22_VAE), "BF16"),
    }


@pytest.fixture
def inbox(tmp_path: Path, part_tensors: dict[str, dict]) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    for name, tensors in part_tensors.items():
        write_header_only(folder / name, tensors)
    return folder


def add_all(library: Library, inbox: Path) -> dict[str, str]:
    """File name -> where the library put it (moved: sparse files stay sparse)."""
    placements = library.add([inbox / name for name in PARTS], method="move")
    return {name: p.entry.path for name, p in zip(PARTS, placements)}


# --- where split parts go ----------------------------------------------------------------------

FOLDERS = {
    "comfyui": {"unet": "models/diffusion_models", "text-encoder": "models/text_encoders", "vae": "models/vae"},
    # Forge loads split diffusion models from the checkpoint folder, encoders from text_encoder
    "a1111": {"unet": "models/Stable-diffusion", "text-encoder": "models/text_encoder", "vae": "models/VAE"},
}


@pytest.mark.parametrize("layout", list(FOLDERS))
def test_split_parts_land_in_each_webui_folder(layout: str, inbox: Path, tmp_path: Path) -> None:
    with Library.init(tmp_path / "lib", layout) as library:
        placed = add_all(library, inbox)
        entries = {e.path: e for e in library.index.entries()}
    for name, (kind, family, part) in PARTS.items():
        assert placed[name] == f"{FOLDERS[layout][kind]}/{name}"
        entry = entries[placed[name]]
        assert (entry.kind, entry.family, entry.part) == (kind, family, part)
    assert entries[placed["flux1-dev.safetensors"]].release == "FLUX.1-dev"
    assert not (tmp_path / "lib" / "models" / "other").exists() or \
        not any((tmp_path / "lib" / "models" / "other").iterdir())


def test_family_subfolders_name_the_family_of_each_part(inbox: Path, tmp_path: Path) -> None:
    with Library.init(tmp_path / "lib", "comfyui", family_subfolders=True) as library:
        placed = add_all(library, inbox)
    assert placed == {
        "flux1-dev.safetensors": "models/diffusion_models/flux/flux1-dev.safetensors",
        "wan2.1_t2v_1.3B.safetensors": "models/diffusion_models/wan/wan2.1_t2v_1.3B.safetensors",
        "qwen_image.safetensors": "models/diffusion_models/qwen-image/qwen_image.safetensors",
        # parts several families share stay out of any one family's folder
        "t5xxl_fp16.safetensors": "models/text_encoders/t5xxl_fp16.safetensors",
        "clip_l.safetensors": "models/text_encoders/clip_l.safetensors",
        "umt5_xxl.safetensors": "models/text_encoders/wan/umt5_xxl.safetensors",
        "ae.safetensors": "models/vae/ae.safetensors",
        "wan2.2_vae.safetensors": "models/vae/wan/wan2.2_vae.safetensors",
    }


def test_invokeai_like_files_split_parts_by_family(inbox: Path, tmp_path: Path) -> None:
    with Library.init(tmp_path / "lib", "invokeai-like") as library:
        placed = add_all(library, inbox)
    assert placed["flux1-dev.safetensors"] == "flux/unet/flux1-dev.safetensors"
    assert placed["umt5_xxl.safetensors"] == "wan/text_encoder/umt5_xxl.safetensors"
    assert placed["t5xxl_fp16.safetensors"] == "any/text_encoder/t5xxl_fp16.safetensors"


# --- existing WebUI roots, new and legacy folder names -------------------------------------------

def test_scan_reads_comfyui_legacy_and_new_folders(inbox: Path, tmp_path: Path) -> None:
    root = tmp_path / "ComfyUI"
    where = {"flux1-dev.safetensors": "models/unet", "t5xxl_fp16.safetensors": "models/clip",
             "wan2.1_t2v_1.3B.safetensors": "models/diffusion_models",
             "umt5_xxl.safetensors": "models/text_encoders", "ae.safetensors": "models/vae",
             "clip_l.safetensors": "models/checkpoints"}  # a text encoder where checkpoints go
    for folder in ("models/checkpoints", "models/loras", *where.values()):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, folder in where.items():
        shutil.move(inbox / name, root / folder / name)
    assert detect_layout(root) is not None and detect_layout(root).name == "comfyui"
    library, _ = open_for_scan(root)
    with library:
        report = scan_library(library)
        entries = {e.path: e for e in library.index.entries()}
    assert report.files == len(where) and report.added == len(where)
    for name, folder in where.items():
        kind, family, part = PARTS[name]
        assert (entries[f"{folder}/{name}"].kind, entries[f"{folder}/{name}"].part) == (kind, part)
    assert report.misplaced == [{"path": "models/checkpoints/clip_l.safetensors", "kind": "text-encoder",
                                 "folder": "models/text_encoders"}]


def test_a_forge_root_is_recognised_and_scanned(inbox: Path, tmp_path: Path) -> None:
    root = tmp_path / "forge"
    for folder in ("models/Stable-diffusion", "models/text_encoder", "models/VAE"):
        (root / folder).mkdir(parents=True)
    shutil.move(inbox / "flux1-dev.safetensors", root / "models/Stable-diffusion/flux1-dev.safetensors")
    shutil.move(inbox / "t5xxl_fp16.safetensors", root / "models/text_encoder/t5xxl_fp16.safetensors")
    assert detect_layout(root) is not None and detect_layout(root).name == "a1111"
    library, _ = open_for_scan(root)
    with library:
        report = scan_library(library)
        parts = {e.path: e.part for e in library.index.entries()}
    assert report.misplaced == []
    assert parts == {"models/Stable-diffusion/flux1-dev.safetensors": FLUX_PART,
                     "models/text_encoder/t5xxl_fp16.safetensors": "T5-XXL encoder"}


# --- ls, and rows from before the index kept parts -----------------------------------------------

def test_ls_shows_family_and_part(inbox: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per row
    root = tmp_path / "lib"
    with Library.init(root, "comfyui") as library:
        add_all(library, inbox)
    code, out, err = run_sdkit(capsys, "library", "ls", "--library", str(root), "--json")
    assert code == 0, err
    rows = {row["path"]: row for row in json.loads(out)}
    flux = rows["models/diffusion_models/flux1-dev.safetensors"]
    assert (flux["kind"], flux["family"], flux["release"], flux["part"]) == ("unet", "flux", "FLUX.1-dev", FLUX_PART)
    assert flux["family_source"] == "weights" and flux["notes"] == []
    assert rows["models/vae/ae.safetensors"]["family_source"] is None
    code, out, _ = run_sdkit(capsys, "library", "ls", "--library", str(root), "--kind", "unet")
    assert code == 0
    for words in ("flux1-dev", "FLUX.1-dev diffusion", "wan (Wan2.1-T2V-1.3B)", "qwen-image"):
        assert words in out, words


OLD_SCHEMA = """
CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT, autov2 TEXT, autov3 TEXT, legacy TEXT, kind TEXT NOT NULL, family TEXT NOT NULL,
    adapter_type TEXT, source TEXT, trigger_words TEXT NOT NULL DEFAULT '[]', hub TEXT,
    added_at TEXT NOT NULL, indexed_at TEXT NOT NULL);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def test_an_index_from_before_parts_gains_them_on_the_next_scan(inbox: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ComfyUI"
    (root / ".sdkit").mkdir(parents=True)
    (root / "models" / "vae").mkdir(parents=True)
    vae = shutil.move(inbox / "ae.safetensors", root / "models/vae/ae.safetensors")
    stat = Path(vae).stat()
    with sqlite3.connect(root / ".sdkit" / "index.sqlite") as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO settings VALUES ('layout', 'comfyui')")
        db.execute("INSERT INTO files VALUES ('models/vae/ae.safetensors', ?, ?, 'abc', 'abc', NULL, NULL, "
                   "'vae', 'unknown', NULL, NULL, '[]', NULL, 'then', 'then')", (stat.st_size, stat.st_mtime_ns))
    db.close()
    code, out, err = run_sdkit(capsys, "library", "ls", "--library", str(root), "--json")
    assert code == 0, err
    [row] = json.loads(out)
    assert (row["kind"], row["part"], row["notes"]) == ("vae", None, [])  # still readable
    code, out, err = run_sdkit(capsys, "library", "scan", str(root), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["unchanged"], report["rehashed"], report["reidentified"]) == (1, 0, 1)
    code, out, _ = run_sdkit(capsys, "library", "ls", "--library", str(root), "--json")
    [row] = json.loads(out)
    assert row["part"] == SHARED_VAE and row["sha256"] == "abc"  # described, not hashed again


# --- Civitai base-model names, both ways ----------------------------------------------------------

def test_civitai_base_model_names_map_to_families_and_releases() -> None:
    assert family_for_civitai_base_model("Flux.1 D") == ("flux", "FLUX.1-dev")
    assert family_for_civitai_base_model("flux.1 s ") == ("flux", "FLUX.1-schnell")
    assert family_for_civitai_base_model("Wan Video 2.2 TI2V-5B") == ("wan", "Wan2.2-TI2V-5B")
    assert family_for_civitai_base_model("SD 3.5") == ("sd3", None)  # three releases share it
    assert family_for_civitai_base_model("Pony") == ("sdxl-base", None)
    assert family_for_civitai_base_model("Qwen") == ("qwen-image", None)
    assert family_for_civitai_base_model("Other") is None
    assert civitai_base_models_for("flux", "FLUX.1-dev") == ("Flux.1 D",)
    assert civitai_base_models_for("flux") == ("Flux.1 D", "Flux.1 S", "Flux.1 Krea", "Flux.1 Kontext")
    assert "Wan Video 2.2 I2V-A14B" in civitai_base_models_for("wan")
    assert civitai_base_models_for("flux", "FLUX.1-Fill-dev") == civitai_base_models_for("flux")
    assert civitai_base_models_for("no-such-family") == ()


def test_every_civitai_name_of_a_family_leads_back_to_it() -> None:
    for family in FAMILIES.values():
        for name in civitai_base_models_for(family.name):
            assert family_for_civitai_base_model(name)[0] == family.name, name
        for release in family.releases:
            for name in release.civitai_base_models:
                back = family_for_civitai_base_model(name)
                assert back in ((family.name, release.name), (family.name, None)), name
    assert len(CIVITAI_BASE_MODELS) >= 25


# --- a Civitai lookup by hash settles the family the weights leave open ---------------------------

def tiny_shared_vae(path: Path) -> Path:
    """A 16-channel VAE of the SD3 / FLUX design, small: it fits several families."""
    return write_header_only(path, typed(ldm_vae_shapes(16, quant_convs=False, widths=(32, 64), layers=1), "F16"))


@pytest.fixture
def civitai_parts(fake_civitai, tmp_path: Path):
    from hub_fakes import CivitaiFile, CivitaiVersion

    (tmp_path / "made").mkdir()
    vae = tiny_shared_vae(tmp_path / "made" / "ae.safetensors")
    lora = kohya_lora(tmp_path / "made" / "style.safetensors", seed=7)
    fake_civitai.add_model(201, "Flux VAE", "VAE", [CivitaiVersion(
        2001, 201, "v1", base_model="Flux.1 D", files=[CivitaiFile(51, "ae.safetensors", vae.read_bytes(), primary=True)])])
    fake_civitai.add_model(202, "Style", "LORA", [CivitaiVersion(
        2002, 202, "v1", base_model="SDXL 1.0", files=[CivitaiFile(52, "style.safetensors", lora.read_bytes(), primary=True)])])
    return {"vae": vae, "lora": lora}


@pytest.fixture
def real_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """These files are small and Civitai knows them by their real sha256."""
    from sdkit.io import hash_file

    monkeypatch.setattr("sdkit.hub.library.library.hash_file", hash_file)


def test_lookup_fills_the_family_the_weights_leave_open(civitai_parts, real_hashes, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ComfyUI"
    with Library.init(root, "comfyui") as library:
        [vae] = library.add([civitai_parts["vae"]])
        assert (vae.entry.family, vae.entry.family_source) == ("unknown", None)
    code, out, err = run_sdkit(capsys, "library", "lookup", str(vae.path), "--library", str(root))
    assert code == 0, err
    assert "family: flux" in out
    with Library.open_existing(root) as library:
        entry = library.index.get(vae.entry.path)
    assert (entry.family, entry.release, entry.family_source) == ("flux", "FLUX.1-dev", "civitai")
    assert entry.hub["base_model"] == "Flux.1 D" and entry.notes == []
    assert entry.part == SHARED_VAE
    code, out, _ = run_sdkit(capsys, "library", "ls", "--library", str(root))
    assert code == 0 and "from Civitai" in out


def test_lookup_never_overrides_the_weights_and_notes_a_disagreement(civitai_parts, real_hashes,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "webui"
    with Library.init(root, "a1111") as library:
        [lora] = library.add([civitai_parts["lora"]])
    code, out, err = run_sdkit(capsys, "library", "lookup", str(lora.path), "--library", str(root), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["family"] == "sd1" and result["base_model"] == "SDXL 1.0"
    assert result["notes"] == ["Civitai lists this file as SDXL 1.0 (sdxl-base); its weights are sd1"]
    with Library.open_existing(root) as library:
        entry = library.index.get(lora.entry.path)
    assert (entry.family, entry.family_source) == ("sd1", "weights") and entry.notes == result["notes"]


def test_a_civitai_name_outside_what_the_weights_fit_is_only_noted(fake_civitai, real_hashes,
                                                                   tmp_path: Path) -> None:
    from hub_fakes import CivitaiFile, CivitaiVersion
    from sdkit.hub.civitai import CivitaiClient
    from sdkit.hub.library import lookup_file

    vae = tiny_shared_vae(tmp_path / "ae.safetensors")
    fake_civitai.add_model(203, "Odd VAE", "VAE", [CivitaiVersion(
        2003, 203, "v1", base_model="SD 1.5", files=[CivitaiFile(53, "ae.safetensors", vae.read_bytes())])])
    with Library.init(tmp_path / "lib", "comfyui") as library:
        [placed] = library.add([vae])
        result = lookup_file(placed.path, library, CivitaiClient())
    assert result.family == "unknown"
    assert result.notes == ["Civitai lists this file as SD 1.5 (sd1); its weights fit sd3, flux, chroma, z-image, "
                            "lumina2, hidream"]


def test_a_download_is_filed_under_the_family_civitai_names(civitai_parts, real_hashes, tmp_path: Path,
                                                            options) -> None:
    from sdkit.hub import download

    Library.init(tmp_path / "lib-root", "comfyui").close()
    [outcome] = download("civitai:201", library=tmp_path / "lib-root", options=options,
                         family_subfolders=True)
    assert outcome.path == tmp_path / "lib-root" / "models" / "vae" / "flux" / "ae.safetensors"
    assert outcome.family == "flux"
    with Library.open_existing(tmp_path / "lib-root") as library:
        [entry] = library.index.entries()
    assert (entry.family, entry.release, entry.family_source) == ("flux", "FLUX.1-dev", "civitai")



def test_anima_parts_are_filed_under_its_family(tmp_path: Path) -> None:
    """Anima's diffusion model and its Qwen3-0.6B go in its folder; the Qwen-Image VAE,
    which Qwen-Image runs with too, stays out of any one family's."""
    from released import LANGUAGE_MODELS, WAN21_VAE, comfyui_layout, language_model_shapes

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files = {
        "anima-preview.safetensors": typed(single_file_shapes(RELEASES["Anima-2B"]), "BF16"),
        "qwen_3_06b_base.safetensors": typed(comfyui_layout(language_model_shapes(LANGUAGE_MODELS["Qwen3-0.6B"])),
                                             "BF16"),
        "qwen_image_vae.safetensors": typed(wan_vae_shapes(WAN21_VAE), "BF16"),
    }
    for name, tensors in files.items():
        write_header_only(inbox / name, tensors)
    with Library.init(tmp_path / "lib", "comfyui", family_subfolders=True) as library:
        placements = library.add([inbox / name for name in files], method="move")
        placed = {name: p.entry.path for name, p in zip(files, placements)}
        families = {name: p.entry.family for name, p in zip(files, placements)}
    assert placed == {
        "anima-preview.safetensors": "models/diffusion_models/anima/anima-preview.safetensors",
        "qwen_3_06b_base.safetensors": "models/text_encoders/anima/qwen_3_06b_base.safetensors",
        "qwen_image_vae.safetensors": "models/vae/qwen_image_vae.safetensors",
    }
    assert families["anima-preview.safetensors"] == "anima"


def test_anima_civitai_name() -> None:
    assert family_for_civitai_base_model("Anima") == ("anima", "Anima-2B")
    assert civitai_base_models_for("anima") == ("Anima",)
