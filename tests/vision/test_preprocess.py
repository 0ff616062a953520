"""Per-encoder image preprocessing: the encoder's mean, std and resize rule; picklable for data loaders."""

from __future__ import annotations

import pickle

import timm
import torch
from PIL import Image

from mambavlm.config import EncoderConfig
from mambavlm.vision.encoder import create_encoder
from mambavlm.vision.preprocess import ImagePreprocess
from tests.conftest import DINO, DINO_KWARGS, three_stripes


def test_preprocess_uses_the_encoders_mean_std_and_resize_rule():
    enc = create_encoder(EncoderConfig(name=f"timm:{DINO}", image_size=28, kwargs=DINO_KWARGS))
    data = timm.data.resolve_data_config(
        model=timm.create_model(DINO, pretrained=False, **DINO_KWARGS)
    )
    pre = enc.preprocess
    assert (pre.mean, pre.std, pre.resize_strategy) == (data["mean"], data["std"], "resize-crop")  # timm's center

    colour = (200, 30, 90, 255)
    out = pre(Image.new("RGBA", (40, 20), colour))
    expected = [
        (c / 255 - m) / s for c, m, s in zip(colour[:3], data["mean"], data["std"], strict=True)
    ]
    assert out.shape == (3, 28, 28)
    torch.testing.assert_close(out, torch.tensor(expected).view(3, 1, 1).expand(3, 28, 28))

    centre = pre(three_stripes(84, 28))  # shorter side already 28: only the green middle is kept
    green = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor(data["mean"])) / torch.tensor(data["std"])
    torch.testing.assert_close(centre, green.view(3, 1, 1).expand(3, 28, 28))

    squash = ImagePreprocess(28, pre.mean, pre.std, resize_strategy="resize-naive")(three_stripes(84, 28))
    assert squash[0, :, 0].min() > squash[0, :, 27].max()  # red on the left edge
    assert squash[2, :, 27].min() > squash[2, :, 0].max()  # blue on the right edge


def test_preprocess_is_picklable():
    pre = ImagePreprocess(28, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_strategy="letterbox")
    image = three_stripes(60, 33)
    first = pre(image)
    clone = pickle.loads(pickle.dumps(pre))
    assert clone == pre
    torch.testing.assert_close(clone(image), first)
