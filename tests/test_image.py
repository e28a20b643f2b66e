"""qwen3vl_lab.image vs transformers' Qwen2VLImageProcessorPil with the Qwen3-VL values (reference)."""

import math

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

from transformers.image_utils import SizeDict  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.vision_utils import get_vision_position_ids  # noqa: E402

from qwen3vl_lab.errors import UserError  # noqa: E402
from qwen3vl_lab.image import (  # noqa: E402
    ImageProcessorConfig,
    load_image,
    patch_positions,
    patchify,
    preprocess,
    rescale_and_normalize,
    resize_image,
    smart_resize,
    unpatchify,
)

# preprocessor_config.json as transformers 5.24 writes it for Qwen3-VL
QWEN3VL_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "merge_size": 2, "patch_size": 16, "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "temporal_patch_size": 2,
}
CFG = ImageProcessorConfig.from_dict(QWEN3VL_PREPROCESSOR)


@pytest.fixture(scope="module")
def hf():
    kw = {k: v for k, v in QWEN3VL_PREPROCESSOR.items() if k != "image_processor_type"}
    return Qwen2VLImageProcessorPil(**kw)


def hf_run(hf, images, **kw):
    out = hf(images=images, return_tensors="np", **kw)
    return out["pixel_values"], out["image_grid_thw"]


def assert_same(ours, ref):
    pv, grid = ours
    ref_pv, ref_grid = ref
    assert pv.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(grid, ref_grid)
    assert pv.shape == ref_pv.shape
    assert np.abs(pv - ref_pv).max() == 0.0  # pixel-exact


def rand_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- config
def test_config_defaults_and_from_dict():
    assert CFG == ImageProcessorConfig()
    assert CFG.factor == 32 and CFG.patch_dim == 1536
    legacy = ImageProcessorConfig.from_dict(
        {"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 1, "longest_edge": 2}}
    )
    assert (legacy.min_pixels, legacy.max_pixels) == (3136, 12845056)  # top-level min/max_pixels win, like transformers
    old = ImageProcessorConfig.from_dict({"size": {"min_pixels": 4096, "max_pixels": 8192}, "image_mean": 0.25})
    assert (old.min_pixels, old.max_pixels, old.image_mean) == (4096, 8192, (0.25, 0.25, 0.25))


def test_from_dir_reads_what_transformers_saves(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    assert ImageProcessorConfig.from_dir(tmp_path) == CFG
    reloaded = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    img = rand_u8((120, 200, 3))
    assert_same(preprocess(img, ImageProcessorConfig.from_dir(tmp_path)), hf_run(reloaded, img))


def test_from_dir_errors(tmp_path):
    with pytest.raises(UserError, match="no preprocessor_config.json"):
        ImageProcessorConfig.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ImageProcessorConfig.from_dir(tmp_path)
    with pytest.raises(UserError, match="not Qwen3-VL"):
        ImageProcessorConfig.from_dict({"image_processor_type": "SiglipImageProcessor"})
    with pytest.raises(UserError, match="image_mean"):
        ImageProcessorConfig.from_dict({"image_mean": [0.5, 0.5]})


# ----------------------------------------------------------------------------- smart_resize
@pytest.mark.parametrize(
    "hw,resized",
    [
        ((300, 400), (288, 384)), ((64, 64), (256, 256)), ((224, 224), (256, 256)), ((1080, 1920), (1088, 1920)),
        ((768, 1366), (768, 1376)), ((4000, 3000), (4000, 3008)), ((5000, 8000), (3232, 5152)), ((32, 1000), (64, 1440)),
    ],
)
def test_smart_resize_facts_table(hw, resized):
    assert smart_resize(*hw, 32, 65536, 16777216) == resized


def test_smart_resize_matches_transformers_everywhere():
    rng = np.random.default_rng(0)
    sizes = [(h, w) for h in (1, 2, 15, 16, 17, 48, 80, 112, 255, 256, 257, 999) for w in (1, 3, 48, 80, 200, 1000, 4097)]
    sizes += [tuple(int(v) for v in rng.integers(1, 9000, 2)) for _ in range(300)]
    for h, w in sizes:
        args = (h, w, 32, 65536, 16777216)
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError):
                hf_smart_resize(*args)
            with pytest.raises(UserError, match="aspect ratio"):
                smart_resize(*args)
        else:
            assert smart_resize(*args) == hf_smart_resize(*args), (h, w)
    # half-to-even: 48/32 = 1.5 -> 2, 80/32 = 2.5 -> 2 (Python round), seen through a large min_pixels-free call
    assert smart_resize(48 * 10, 80 * 10, 32, 1, 10**9) == hf_smart_resize(480, 800, 32, 1, 10**9)
    assert smart_resize(80, 48 * 3, 32, 1, 10**9) == (64, 128)


# ----------------------------------------------------------------------------- pixel-exact pipeline
@pytest.mark.parametrize(
    "hw",
    [(300, 400), (64, 64), (1080, 1920), (32, 6000), (6000, 32), (1, 1), (2, 3), (10, 10), (1, 150), (33, 31), (257, 511)],
)
def test_rgb_sizes_pixel_exact(hf, hw):
    img = rand_u8((*hw, 3), seed=sum(hw))
    assert_same(preprocess(Image.fromarray(img)), hf_run(hf, Image.fromarray(img)))
    # numpy: transformers guesses channels-first when the first dim is 1, 3 or 4; we always read (H, W, C)
    assert_same(preprocess(img), hf_run(hf, img, input_data_format="channels_last"))


def test_several_images_concatenate_in_order(hf):
    imgs = [Image.fromarray(rand_u8(s, i)) for i, s in enumerate([(300, 400, 3), (64, 64, 3), (50, 700, 3)])]
    pv, grid = preprocess(imgs)
    assert_same((pv, grid), hf_run(hf, imgs))
    assert grid.tolist() == [[1, 18, 24], [1, 16, 16], [1, 6, 60]]


def pil_variants():
    rgba = rand_u8((90, 120, 4), 1)
    rgba[..., 3] = np.where(rgba[..., 3] > 128, rgba[..., 3], 0)  # some fully transparent pixels
    gray = rand_u8((90, 120), 2)
    pal = Image.fromarray(rand_u8((90, 120, 3), 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    i16 = Image.fromarray(np.random.default_rng(4).integers(0, 600, (90, 120)).astype(np.uint16))
    assert i16.mode == "I;16"
    return {
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "LA": Image.fromarray(rand_u8((90, 120, 2), 5), "LA"),
        "L": Image.fromarray(gray),
        "1": Image.fromarray(gray > 100),
        "P": pal,
        "P+transparency": pal_t,
        "I;16": i16,
        "I": Image.fromarray(np.random.default_rng(6).integers(0, 300, (90, 120)).astype(np.int32)),
        "CMYK": Image.fromarray(rand_u8((90, 120, 3), 7)).convert("CMYK"),
    }


@pytest.mark.parametrize("mode", list(pil_variants()))
def test_pil_modes_pixel_exact(hf, mode):
    img = pil_variants()[mode]
    assert_same(preprocess(img), hf_run(hf, img))


def test_rgba_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    assert (load_image(Image.fromarray(rgba, "RGBA")) == 255).all()
    assert (load_image(rgba) == 255).all()


def test_16bit_saturates_like_transformers():
    """PIL's I;16 -> RGB clips at 255 (no rescale); transformers does the same, so a 16-bit PNG turns mostly white."""
    i16 = Image.fromarray(np.full((8, 8), 1000, np.uint16))
    assert (load_image(i16) == 255).all()


@pytest.mark.parametrize(
    "name",
    ["HWC uint8", "HW1 uint8", "HWC4 uint8", "float 0..255 integers", "uint16 in 0..255", "int64 in 0..255", "bool"],
)
def test_numpy_inputs_pixel_exact(hf, name):
    base = rand_u8((70, 130, 3), 8)
    arr = {
        "HWC uint8": base,
        "HW1 uint8": base[..., :1],
        "HWC4 uint8": rand_u8((70, 130, 4), 9),
        "float 0..255 integers": base.astype(np.float32),
        "uint16 in 0..255": base.astype(np.uint16),
        "int64 in 0..255": base.astype(np.int64),
        "bool": base > 128,
    }[name]
    assert_same(preprocess(arr), hf_run(hf, arr))


def test_numpy_grayscale_hw(hf):
    """transformers refuses a 2-D array; it takes (H, W, 1). We accept (H, W) as that."""
    gray = rand_u8((70, 130), 10)
    assert_same(preprocess(gray), hf_run(hf, gray[..., None]))


def test_numpy_float01(hf):
    """Floats in [0, 1] become uint8 by x*255 truncation. transformers then rescales by 1/255 a second time
    (its resize already undid the *255), so it matches us only with do_rescale=False."""
    arr = np.random.default_rng(11).random((70, 130, 3)).astype(np.float32)
    assert_same(preprocess(arr), hf_run(hf, arr, do_rescale=False))
    np.testing.assert_array_equal(load_image(arr), (arr.astype(np.float64) * 255).astype(np.float32).astype(np.uint8))


def test_paths_png_and_exif_jpeg(hf, tmp_path):
    img = Image.fromarray(rand_u8((100, 140, 3), 12))
    png = tmp_path / "a.png"
    img.save(png)
    assert_same(preprocess(str(png)), hf_run(hf, str(png)))
    assert_same(preprocess(png), hf_run(hf, str(png)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    jpg = tmp_path / "b.jpg"
    img.save(jpg, exif=exif.tobytes(), quality=95)
    ours = preprocess(jpg)
    assert_same(ours, hf_run(hf, str(jpg)))
    assert ours[1].tolist() == [[1, 20, 14]]  # upright 140 x 100 (h x w), not the stored 100 x 140 -> (1, 14, 20)


def test_path_rgba_png_is_composited_on_white(hf, tmp_path):
    """Our paths follow the processor's convert_to_rgb (white background). transformers' own load_image(path)
    uses convert("RGB") instead, which keeps whatever color sits under transparent pixels."""
    rgba = rand_u8((60, 80, 4), 13)
    path = tmp_path / "c.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert_same(preprocess(path), hf_run(hf, Image.open(path)))


# ----------------------------------------------------------------------------- fixed size, patch helpers
@pytest.mark.parametrize("image_size,hw", [(384, (384, 384)), ((256, 448), (256, 448))])
def test_fixed_image_size(hf, image_size, hw):
    img = rand_u8((300, 500, 3), 14)
    pv, grid = preprocess(img, image_size=image_size)
    # reference: transformers' own resize (exact size) + rescale + normalize + patchify
    chw = np.moveaxis(img, -1, 0)
    resized = super(Qwen2VLImageProcessorPil, hf).resize(chw, SizeDict(height=hw[0], width=hw[1]), resample=3)
    x = hf.normalize(hf.rescale(resized, 1 / 255), [0.5] * 3, [0.5] * 3)
    ref_pv, gh, gw = hf.patchify(x, 16, 2, 2)
    assert grid.tolist() == [[1, gh, gw]] and np.abs(pv - ref_pv).max() == 0.0


def test_patchify_and_unpatchify_roundtrip(hf):
    img = rand_u8((96, 160, 3), 15)
    chw = rescale_and_normalize(resize_image(img, 96, 160), CFG)
    pv = patchify(chw)
    ref_pv, _, _ = hf.patchify(chw, 16, 2, 2)
    np.testing.assert_array_equal(pv, ref_pv)
    frames = unpatchify(pv, [1, 6, 10])
    assert frames.shape == (2, 3, 96, 160)
    np.testing.assert_array_equal(frames[0], chw)
    np.testing.assert_array_equal(frames[1], chw)
    # video layout: t = 2 temporal patches, each with its own two frames
    video = np.random.default_rng(0).random((4, 3, 64, 32)).astype(np.float32)
    pv_video = np.concatenate([_video_patchify(video[2 * k : 2 * k + 2]) for k in range(2)])
    np.testing.assert_array_equal(unpatchify(pv_video, [2, 4, 2]), video)


def _video_patchify(two_frames):
    """(2, C, H, W) -> (h*w, 1536): the temporal pair fills the T slots (transformers' video layout)."""
    t, c, h, w = two_frames.shape
    x = two_frames.reshape(1, 2, c, h // 32, 2, 16, w // 32, 2, 16)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (1, bh, bw, ih, iw, C, T, P, P)
    return x.reshape(-1, c * 2 * 256)


def test_patch_positions_locate_patches(hf):
    img = rand_u8((300, 400, 3), 16)
    pv, grid = preprocess(img)
    pos = patch_positions(grid[0])
    np.testing.assert_array_equal(pos, get_vision_position_ids(__import__("torch").tensor(grid), 2).numpy())
    chw = unpatchify(pv, grid[0])[0]
    for i in (0, 1, 2, 3, 4, 47, 48, 431):
        r, c = pos[i]
        patch = chw[:, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
        np.testing.assert_array_equal(pv[i].reshape(3, 2, 16, 16)[:, 0], patch)
    assert pos[:5].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2]] and pos[48].tolist() == [2, 0]


# ----------------------------------------------------------------------------- errors
def test_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        preprocess(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(UserError, match="not a readable image"):
        load_image(bad)
    trunc = tmp_path / "trunc.png"
    Image.fromarray(rand_u8((64, 64, 3))).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(UserError, match="not a readable image"):
        load_image(trunc)
    with pytest.raises(UserError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(UserError, match="zero size"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(UserError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(UserError, match="aspect ratio"):
        preprocess(np.zeros((2, 500, 3), np.uint8))
    with pytest.raises(UserError, match="shape"):
        load_image(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(UserError, match="outside 0..255"):
        load_image(np.full((10, 10, 3), 1000, np.uint16))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        load_image(np.full((10, 10, 3), 1.5, np.float32))
    with pytest.raises(UserError, match="multiples of 32"):
        preprocess(np.zeros((10, 10, 3), np.uint8), image_size=100)
    with pytest.raises(UserError, match="cannot use"):
        load_image(12)
    with pytest.raises(UserError, match="no images"):
        preprocess([])
    assert math.isclose(CFG.rescale_factor, 1 / 255)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((0, 10, 3), np.uint8), np.zeros((2, 500, 3), np.uint8), np.full((4, 4, 3), np.nan, np.float32), "nope.png"],
)
def test_error_messages_are_one_line(bad):
    with pytest.raises(UserError) as e:
        preprocess(bad)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200
