"""The CLIP tokenizer sdkit builds from the BPE merges it ships, against documented CLIP ids.

Expected ids, each from a published source (all OpenAI CLIP's vocabulary, which
clip-vit-base-patch32, clip-vit-large-patch14 and the OpenCLIP text encoders share):
- transformers `tests/models/clip/test_tokenization_clip.py` (v5): the ids of its common
  test string (`integration_expected_token_ids`, tokenized by openai/clip-vit-base-patch32,
  without the start/end tokens);
- Bumblebee `test/bumblebee/text/clip_tokenizer_test.exs`: "a photo of a cat" / "a photo of
  a dog" as openai/clip-vit-base-patch32 encodes them;
- nishio/external_brain_in_markdown `pages/CLIP.md`: openai/CLIP `clip.tokenize` output for
  "a painting of a cat" and "bozuman", padded with 0 to 77 (the reference tokenizer pads
  with id 0, the `!` token the SD 2.x / SDXL `tokenizer_2` folders name as pad);
- ComfyUI `comfy/sd1_tokenizer/tokenizer_config.json`: SD 1.x pads with `<|endoftext|>`;
  ComfyUI `comfy/sdxl_clip.py`: SDXL's CLIP-G pads with 0.
"""

from __future__ import annotations

import json

import pytest

from sdkit.data.clip_tokenizer import (
    END_OF_TEXT,
    MERGES_FILE,
    OPENCLIP_PAD,
    clip_merges,
    clip_tokenizer,
    write_clip_tokenizer,
)

COMMON_TEST_STRING = ("This is a test \U0001F60A\nI was born in 92000, and this is fals\u00e9.\n"
                      "\u751f\u6d3b\u7684\u771f\u8c1b\u662f\nHi  Hello\nHi   Hello\n\n \n  \n Hello\n<s>\n"
                      "hi<s>there\nThe following string should be properly encoded: Hello.\n"
                      "But ird and \u0e1b\u0e35   ird   \u0e14\nHey how are you doing")
TRANSFORMERS_IDS = [589, 533, 320, 1628, 3020, 328, 739, 2683, 530, 280, 273, 271, 271, 271, 267, 537, 589, 533,
                    2778, 82, 4166, 269, 33375, 162, 112, 119, 163, 248, 226, 41570, 164, 108, 249, 42891, 363, 1883,
                    3306, 1883, 3306, 3306, 283, 338, 285, 1883, 283, 338, 285, 997, 518, 3473, 9696, 1535, 655,
                    12560, 524, 33703, 281, 3306, 269, 767, 2770, 537, 1777, 505, 20278, 2770, 38825, 2189, 829, 631,
                    592, 1960]
DOCUMENTED = [  # prompt, ids with the start and end tokens
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),  # Bumblebee
    ("a photo of a dog", [49406, 320, 1125, 539, 320, 1929, 49407]),  # Bumblebee
    ("a painting of a cat", [49406, 320, 3086, 539, 320, 2368, 49407]),  # clip.tokenize, CLIP.md
    ("bozuman", [49406, 647, 4091, 786, 49407]),  # clip.tokenize, CLIP.md
]


@pytest.fixture(scope="module")
def clip_l():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def open_clip():
    return clip_tokenizer(OPENCLIP_PAD)


def test_vocabulary_size_and_special_tokens(clip_l, open_clip):
    for tokenizer in (clip_l, open_clip):
        assert len(tokenizer) == tokenizer.vocab_size == 49408
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
        assert tokenizer.convert_ids_to_tokens([49406, 49407]) == ["<|startoftext|>", "<|endoftext|>"]
        assert tokenizer.model_max_length == 77
    assert clip_l.pad_token_id == 49407 and clip_l.pad_token == END_OF_TEXT
    assert open_clip.pad_token_id == 0 and open_clip.pad_token == "!"


@pytest.mark.parametrize("prompt, ids", DOCUMENTED)
def test_documented_prompts_give_clips_ids(clip_l, open_clip, prompt, ids):
    assert clip_l(prompt).input_ids == ids
    assert open_clip(prompt).input_ids == ids


def test_transformers_common_test_string(clip_l):
    assert clip_l.encode(COMMON_TEST_STRING, add_special_tokens=False) == TRANSFORMERS_IDS
    assert clip_l(COMMON_TEST_STRING).input_ids == [49406, *TRANSFORMERS_IDS, 49407]


def test_padding_to_77_as_each_family_pads(clip_l, open_clip):
    ids = [49406, 320, 3086, 539, 320, 2368, 49407]
    padded = open_clip("a painting of a cat", padding="max_length", max_length=77).input_ids
    assert padded == ids + [0] * 70  # clip.tokenize's own padding (CLIP.md)
    assert clip_l("a painting of a cat", padding="max_length", max_length=77).input_ids == ids + [49407] * 70


def test_written_folder_is_a_hugging_face_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp_path, OPENCLIP_PAD)
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and len([line for line in merges[1:] if line]) == 49408 - 512 - 2
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == "!"
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (loaded.pad_token_id, loaded.model_max_length) == (0, 77)
    assert loaded("a photo of a dog").input_ids == DOCUMENTED[1][1]


def test_merges_come_from_the_shipped_file_and_its_licence_ships_beside_it():
    import hashlib

    # the open_clip_torch 3.3.0 copy (sdkit/data/CLIP-LICENSE.txt names it)
    assert hashlib.sha256(MERGES_FILE.read_bytes()).hexdigest() == \
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert clip_merges()[0] == ("i", "n")
    licence = MERGES_FILE.with_name("CLIP-LICENSE.txt").read_text(encoding="utf-8")
    assert "Copyright (c) 2021 OpenAI" in licence and "MIT License" in licence
