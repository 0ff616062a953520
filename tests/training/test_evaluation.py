"""Evaluation helpers: answer normalisation and exact match, blind mode (blank images)."""

from __future__ import annotations

import torch
from PIL import Image

from mambavlm.data.llava import LlavaDataset
from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.training import BlankImage, exact_match, normalize_answer
from mambavlm.training.evaluation import BLANK_COLOR


def test_answer_normalisation():
    assert normalize_answer("  Red.\n") == "red"
    assert normalize_answer("Two  Objects!") == "two objects"
    assert exact_match("Circle", "circle ")
    assert not exact_match("circles", "circle")


def test_blind_mode_blanks_the_images(tmp_path, tiny_model):
    train_json, _ = make_shapes_vqa(tmp_path, num_train=6, num_val=0, image_size=32)
    transforms = [e.preprocess for e in tiny_model.vision.encoders]

    def dataset(image_transforms):
        return LlavaDataset(
            train_json, tmp_path, tiny_model.tokenizer, tiny_model.template, image_transforms,
            tiny_model.num_visual_tokens, 256, tiny_model.add_bos,
        )

    seeing, blind = dataset(transforms), dataset([BlankImage(t) for t in transforms])
    grey = Image.new("RGB", (32, 32), BLANK_COLOR)
    for i in range(len(seeing)):
        for k, transform in enumerate(transforms):
            assert torch.equal(blind[i]["pixel_values"][k], transform(grey))
            assert not torch.equal(seeing[i]["pixel_values"][k], transform(grey))
        assert torch.equal(blind[i]["input_ids"], seeing[i]["input_ids"])
