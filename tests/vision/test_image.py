"""One image decoder: every PIL mode becomes the RGB a viewer shows, EXIF orientation applied; training,
evaluation and generate all go through it. The images are drawn here, pixel values worked by hand."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mambavlm.data.collate import VLMCollator
from mambavlm.data.llava import LlavaDataset
from mambavlm.llm.templates import get_template
from mambavlm.llm.tokenizer import build_tiny_tokenizer
from mambavlm.training.evaluation import _open_image
from mambavlm.vision.image import open_image, to_rgb

WHITE = (255, 255, 255)


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel((x, y))


def test_rgba_logo_on_a_transparent_background_is_shown_over_white() -> None:
    logo = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # transparent black, as editors store it
    logo.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    logo.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red: 255 * a + 255 * (1 - a)
    rgb = to_rgb(logo)
    assert pixel(rgb, 0, 0) == (255, 0, 0)
    assert pixel(rgb, 1, 0) == (255, 127, 127)
    assert pixel(rgb, 3, 1) == WHITE
    assert np.asarray(Image.new("RGBA", (2, 2), (0, 0, 0, 0)).convert("RGB")).max() == 0  # what PIL alone gives


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (2, 2), 77), (77, 77, 77)),
        (lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
        (lambda: Image.new("LA", (2, 2), (100, 0)), WHITE),
        (lambda: Image.new("LA", (2, 2), (100, 255)), (100, 100, 100)),
        (lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("YCbCr", (2, 2), (76, 85, 255)), (254, 0, 0)),
        (lambda: Image.new("HSV", (2, 2), (0, 255, 255)), (255, 0, 0)),
        (lambda: Image.new("RGBa", (2, 2), (64, 0, 0, 128)), (191, 127, 127)),  # colour 64 / 0.5 = 128, half over white
    ],
    ids=["L", "1", "LA-transparent", "LA-opaque", "CMYK", "YCbCr", "HSV", "RGBa-premultiplied"],
)
def test_every_mode_becomes_viewer_rgb(make, expected) -> None:
    rgb = to_rgb(make())
    assert rgb.mode == "RGB" and rgb.size == (2, 2)
    assert all(abs(a - b) <= 1 for a, b in zip(pixel(rgb, 1, 1), expected)), pixel(rgb, 1, 1)


def test_palette_with_a_transparent_index() -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, 1 blue
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    palette_image.info["transparency"] = 0
    rgb = to_rgb(palette_image)
    assert pixel(rgb, 0, 0) == WHITE and pixel(rgb, 1, 0) == (0, 0, 255)
    palette_image.info.pop("transparency")
    assert pixel(to_rgb(palette_image), 0, 0) == (0, 0, 0)


def test_high_bit_depth_and_float_images_are_scaled_not_clipped() -> None:
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))  # I;16
    assert [pixel(to_rgb(sixteen), x, 0)[0] for x in range(3)] == [0, 128, 255]
    as_int = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32), mode="I")
    assert [pixel(to_rgb(as_int), x, 0)[0] for x in range(3)] == [0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert [pixel(to_rgb(unit), x, 0)[0] for x in range(3)] == [0, 128, 255]
    assert np.asarray(sixteen.convert("RGB")).max() == 255 and np.asarray(sixteen.convert("RGB"))[0, 1, 0] == 255


def sideways_jpeg(path: Path) -> Path:
    """What a phone stores: pixels 48 wide x 32 tall with a red left half, EXIF Orientation=6
    (rotate 90 degrees clockwise to view), so a viewer shows 32 x 48 with the red half on top."""
    image = Image.new("RGB", (48, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 24, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = open_image(sideways_jpeg(tmp_path / "phone.jpg"))
    assert upright.size == (32, 48)
    top, bottom = pixel(upright, 16, 2), pixel(upright, 16, 45)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_animated_images_give_their_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert pixel(open_image(tmp_path / "anim.gif"), 2, 2)[0] > 200


def test_training_evaluation_and_generate_see_the_same_pixels(tmp_path: Path) -> None:
    """A transparent PNG and a sideways JPEG through the dataset, the evaluator's reader and the model's
    own preprocessing (what generate calls) give identical tensors."""
    from tests.conftest import tiny_vlm

    logo = Image.new("RGBA", (40, 24), (0, 0, 0, 0))
    logo.paste((200, 30, 30, 255), (4, 4, 20, 20))
    logo.save(tmp_path / "logo.png")
    sideways_jpeg(tmp_path / "phone.jpg")
    records = [
        {"id": name, "image": name, "conversations": [{"from": "human", "value": "<image>\ncolor ?"},
                                                        {"from": "gpt", "value": "red"}]}
        for name in ("logo.png", "phone.jpg")
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    model = tiny_vlm()
    dataset = LlavaDataset(
        tmp_path / "data.json", tmp_path, build_tiny_tokenizer(), get_template("plain"),
        [e.preprocess for e in model.vision.encoders], model.num_visual_tokens, 256, False,
    )
    seen = {}
    for index, name in enumerate(("logo.png", "phone.jpg")):
        trained = VLMCollator(0)([dataset[index]])["pixel_values"]
        evaluated = model.preprocess_images([_open_image(tmp_path / name, blind=False)])
        with Image.open(tmp_path / name) as raw:  # what a user hands to generate
            generated = model.preprocess_images([raw])
        for a, b, c in zip(trained, evaluated, generated):
            assert torch.equal(a, b) and torch.equal(a, c), name
        preprocess = model.vision.encoders[0].preprocess
        mean, std = torch.tensor(preprocess.mean)[:, None, None], torch.tensor(preprocess.std)[:, None, None]
        seen[name] = trained[0][0] * std + mean  # back to [0, 1] RGB, (3, S, S)
    assert seen["logo.png"][:, 0, 0].min() > 0.95  # the transparent corner is white, not black
    phone = seen["phone.jpg"]
    assert phone[0, 1].mean() > 0.8 and phone[2, 1].mean() < 0.25  # upright: the red row is on top
    assert phone[2, -2].mean() > 0.8 and phone[0, -2].mean() < 0.25


def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected a PIL.Image.Image, got bytes"):
        to_rgb(b"not an image")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="image file not found"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(IsADirectoryError, match="is a directory, not a file"):
        open_image(tmp_path)
    (tmp_path / "bad.png").write_bytes(io.BytesIO(b"garbage").getvalue())
    with pytest.raises(OSError):
        open_image(tmp_path / "bad.png")
