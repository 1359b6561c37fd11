"""Training data: captions from every source, filters with reasons, kohya buckets, crops,
epoch order, and the latent cache (the VAE runs once; the disk cache is reused)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from sdkit.errors import SdkitError
from sdkit.runtime.train.buckets import (BatchPlan, bucket_resolutions, bucket_step, epoch_batches, load_pixels,
                                         nearest_bucket, plan_crop)
from sdkit.runtime.train.data import ImageFilter, scan_dataset, tag_frequency, with_trigger
from sdkit.runtime.train.latents import LatentSource, TrainSample
from test_train_support import concept_pictures


def _picture(path, size=(32, 32), colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ---- captions and filters ----------------------------------------------------------------

def test_sidecar_captions_txt_before_caption_and_missing_ones_counted(tmp_path):
    _picture(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red square\n")
    (tmp_path / "a.caption").write_text("ignored")
    _picture(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.caption").write_text("kohya style")
    _picture(tmp_path / "c.png")
    scan = scan_dataset(tmp_path)
    captions = {r.path.name: r.caption for r in scan.records}
    assert captions == {"a.png": "red square", "b.jpg": "kohya style", "c.png": ""}
    assert scan.caption_source == "sidecar" and scan.uncaptioned == 1


@pytest.mark.parametrize("layout", ["csv", "jsonl"])
def test_metadata_files_give_captions_and_win_over_sidecars(tmp_path, layout):
    for name in ("a.png", "b.png"):
        _picture(tmp_path / "train" / name)
    (tmp_path / "train" / "a.txt").write_text("sidecar")
    rows = [("train/a.png", "first, red"), ("train/b.png", "second")]
    if layout == "csv":
        (tmp_path / "metadata.csv").write_text("file_name,text\n" + "".join(f'{f},"{t}"\n' for f, t in rows))
    else:
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n"
                                                         for f, t in rows))
    scan = scan_dataset(tmp_path)
    assert [r.caption for r in scan.records] == ["first, red", "second"]
    assert scan.caption_source == f"metadata.{layout}"
    assert tag_frequency(scan) == {tmp_path.name: {"first": 1, "red": 1, "second": 1}}


def test_broken_metadata_is_refused_naming_the_line(tmp_path):
    _picture(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(SdkitError, match="metadata.jsonl: line 1 has no text"):
        scan_dataset(tmp_path)


def test_filters_drop_small_and_out_of_range_pictures_with_reasons(tmp_path):
    _picture(tmp_path / "ok.png", (64, 64))
    _picture(tmp_path / "small.png", (16, 64))
    _picture(tmp_path / "wide.png", (256, 64))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    _picture(tmp_path / ".hidden" / "skip.png")
    scan = scan_dataset(tmp_path, ImageFilter(min_width=32, min_height=32, min_aspect=0.5, max_aspect=2.0))
    assert [r.path.name for r in scan.records] == ["ok.png"]
    assert set(scan.dropped) == {"small.png", "wide.png", "broken.png"}
    assert scan.dropped["small.png"] == "16x64 is narrower than the minimum width 32"
    assert "aspect ratio 4.00 is outside 0.5-2" in scan.dropped["wide.png"]
    assert "not a readable image" in scan.dropped["broken.png"]
    with pytest.raises(SdkitError, match="all 4 images were filtered out"):
        scan_dataset(tmp_path, ImageFilter(min_width=1000))


def test_a_minimum_on_one_side_names_only_that_side():
    only_width = ImageFilter(min_width=32)
    assert only_width.reason_to_drop(16, 64) == "16x64 is narrower than the minimum width 32"
    assert only_width.reason_to_drop(64, 16) is None
    assert ImageFilter(min_height=32).reason_to_drop(64, 16) == "64x16 is lower than the minimum height 32"


def test_an_empty_folder_and_an_excluded_subfolder(tmp_path):
    with pytest.raises(SdkitError, match="no images"):
        scan_dataset(tmp_path)
    _picture(tmp_path / "a.png")
    _picture(tmp_path / "class" / "c.png")
    assert [r.path.name for r in scan_dataset(tmp_path, exclude=(tmp_path / "class",)).records] == ["a.png"]


def test_trigger_word_goes_first():
    assert with_trigger("a photo", "ohwx") == "ohwx, a photo"
    assert with_trigger("", "ohwx") == "ohwx"
    assert with_trigger("a photo", None) == "a photo"


# ---- buckets and crops -----------------------------------------------------------------

def test_buckets_are_kohyas_for_sd_at_512():
    # sd-scripts' bucket list for 512 px, step 64, sides 256-1024 (its training log prints these)
    half = [(256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704), (384, 640), (448, 576)]
    expected = sorted(half + [(512, 512)] + [(h, w) for w, h in half])
    assert bucket_resolutions(512, 64) == expected
    assert bucket_step(8, 4) == 64


def test_pictures_go_to_the_bucket_nearest_their_aspect_ratio():
    buckets = bucket_resolutions(512, 64)
    assert nearest_bucket(1000, 500, buckets) == (704, 320)
    assert nearest_bucket(3000, 1000, buckets) == (832, 256)
    assert nearest_bucket(500, 1000, buckets) == (320, 704)
    assert nearest_bucket(777, 777, buckets) == (512, 512)


def test_center_crop_covers_the_bucket_and_random_crops_stay_inside():
    crop = plan_crop(100, 100, (64, 32), "center")
    assert crop.scaled == (64, 64) and (crop.left, crop.top) == (0, 16)
    rng = random.Random(3)
    crops = {plan_crop(300, 100, (32, 32), "random", rng) for _ in range(20)}
    assert len({c.left for c in crops}) > 1
    assert all(c.scaled == (96, 32) and 0 <= c.left <= 64 and c.top == 0 for c in crops)


def test_epoch_batches_hold_one_bucket_each_and_cover_every_sample_once():
    buckets = [(32, 32)] * 5 + [(64, 32)] * 3
    batches = epoch_batches(buckets, 2, seed=1, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(8))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert epoch_batches(buckets, 2, 1, 0) == batches and epoch_batches(buckets, 2, 1, 1) != batches
    plan = BatchPlan(buckets, 2, seed=1)
    assert plan.per_epoch == len(batches) and plan.batch_at(len(batches) + 1) == epoch_batches(buckets, 2, 1, 1)[1]


# ---- latent cache ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _samples(folder):
    return [TrainSample(record, (32, 32), record.caption) for record in scan_dataset(folder).records]


def test_memory_cache_runs_the_vae_once_per_picture(vae, tmp_path):
    samples = _samples(concept_pictures(tmp_path / "data", count=3))
    source = LatentSource(vae, samples, "memory", "center")
    source.prepare()
    assert source.encoded == 3
    first = source.batch([0, 1], torch.Generator().manual_seed(0), random.Random(0))
    source.batch([2, 0], torch.Generator().manual_seed(0), random.Random(0))
    assert source.encoded == 3 and first.latents.shape == (2, 4, 16, 16)
    # a draw from the VAE's own latent distribution, scaled by its scaling factor
    pixels = torch.stack([load_pixels(samples[i].record.path, (32, 32), first.crops[i]) for i in (0, 1)])
    with torch.no_grad():
        distribution = vae.encode(pixels).latent_dist
    noise = torch.randn(distribution.mean.shape, generator=torch.Generator().manual_seed(0))
    expected = (distribution.mean + distribution.std * noise) * vae.config.scaling_factor
    assert torch.allclose(first.latents, expected, atol=1e-5)


def test_repeats_of_a_picture_share_one_cache_entry(vae, tmp_path):
    samples = _samples(concept_pictures(tmp_path / "data", count=2))
    repeated = samples * 3  # what --repeats 3 makes
    source = LatentSource(vae, repeated, "memory", "center")
    seen = []
    source.prepare(lambda done, total: seen.append((done, total)))
    assert source.encoded == 2 and seen == [(1, 2), (2, 2)]
    batch = source.batch([0, 2, 4], torch.Generator().manual_seed(0), random.Random(0))
    assert source.encoded == 2 and batch.latents.shape == (3, 4, 16, 16)
    alone = LatentSource(vae, samples[:1], "memory", "center")
    alone.prepare()
    assert torch.equal(batch.latents[0], alone.batch([0], torch.Generator().manual_seed(0),
                                                     random.Random(0)).latents[0])


def test_disk_cache_is_reused_and_invalidated_by_a_changed_picture(vae, tmp_path):
    data = concept_pictures(tmp_path / "data", count=2)
    cache = tmp_path / "cache"
    first = LatentSource(vae, _samples(data), "disk", "center", cache)
    first.prepare()
    assert first.encoded == 2 and len(list(cache.glob("*.safetensors"))) == 2
    again = LatentSource(vae, _samples(data), "disk", "center", cache)
    again.prepare()
    assert again.encoded == 0
    draws = [source.batch([0], torch.Generator().manual_seed(0), random.Random(0)).latents for source in (first, again)]
    assert torch.equal(*draws)
    _picture(data / "0.png", colour="blue")
    changed = LatentSource(vae, _samples(data), "disk", "center", cache)
    changed.prepare()
    assert changed.encoded == 1


def test_uncached_latents_are_encoded_at_every_load(vae, tmp_path):
    source = LatentSource(vae, _samples(concept_pictures(tmp_path / "data", count=2)), "off", "random")
    source.prepare()
    assert source.encoded == 0
    source.batch([0, 1], torch.Generator().manual_seed(0), random.Random(0))
    source.batch([0], torch.Generator().manual_seed(0), random.Random(0))
    assert source.encoded == 3


def test_non_finite_latents_are_refused_naming_the_picture(vae, tmp_path):
    from diffusers import AutoencoderKL

    broken = AutoencoderKL.from_config(vae.config)
    with torch.no_grad():
        broken.encoder.conv_in.weight.fill_(float("nan"))
    data = concept_pictures(tmp_path / "data", count=1)
    with pytest.raises(SdkitError, match=r"0\.png: the VAE gave non-finite latents"):
        LatentSource(broken, _samples(data), "memory", "center").prepare()
