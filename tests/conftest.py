"""What several test files share: the repository's paths, the tiny models they build, and a few helpers.

Plain functions and constants, imported as ``from tests.conftest import tiny_llama`` (tests/ and its
subdirectories are packages; pyproject's ``pythonpath = ["."]`` puts the repository on the path). The
fixtures at the end are used by name. Where two files built the same kind of model with different
numbers, the builder takes those fields as arguments, so every test keeps its exact model.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, MambaConfig, MambaForCausalLM, PreTrainedModel

from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.llm.hybrid import mamba_mixers
from mambavlm.llm.mamba2_lm import SSDForCausalLM
from mambavlm.model import MambaVLM, build_model

# ---------------------------------------------------------------- paths

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "configs" / "model" / "tiny.yaml"
TINY_TRAIN = ROOT / "configs" / "train" / "tiny.yaml"

# ---------------------------------------------------------------- CUDA kernels

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_mamba_ssm = pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba_ssm")
needs_causal_conv1d = pytest.mark.skipif(
    importlib.util.find_spec("causal_conv1d") is None, reason="needs causal_conv1d"
)


def relative_close(got: Tensor, want: Tensor, rtol: float, name: str) -> None:
    """Elementwise closeness with atol = rtol * max|want|, so summed gradients get a fair scale."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item(), msg=lambda m, n=name: f"{n}: {m}")


WEIGHT_RTOL = 1e-4
"""Per tensor, ||a - b|| <= WEIGHT_RTOL ||a|| after a few AdamW steps in float32. Float32 rounding differs
with the batch shapes and the process count, and Adam's normalised steps carry it into the weights
(an element whose gradients nearly cancel moves by up to lr either way): seen up to 1.2e-5 per tensor
(micro 1 vs 4; single elements up to 5e-4 of their tensor's largest), and 1.1e-5 on one element of 512
for 2 processes against 1 in the four distillation stages. A mean of micro-batch means instead moves
weights by ~4e-3 absolute, orders above this."""


def assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float = WEIGHT_RTOL) -> None:
    """The same keys, and each tensor within ``rtol`` of ``a``'s in norm (``WEIGHT_RTOL``)."""
    assert a.keys() == b.keys()
    for name in a:
        error = (a[name].float() - b[name].float()).norm()
        assert error <= rtol * a[name].float().norm().clamp(min=1e-12), f"{name}: ||a - b|| = {error:.3g}"


# ---------------------------------------------------------------- vision: tiny timm ViTs

DINO = "vit_small_patch14_reg4_dinov2"
DINO_KWARGS = dict(depth=3, embed_dim=32, num_heads=2)  # 28 px -> 2 x 2 grid, 1 CLS + 4 registers
SIGLIP = "vit_so400m_patch14_siglip_384"
SIGLIP_KWARGS = dict(depth=2, embed_dim=48, num_heads=2, mlp_ratio=2.0)  # 42 px -> 3 x 3, no CLS


def three_stripes(width: int, height: int) -> Image.Image:
    """Red | green | blue vertical thirds."""
    image = Image.new("RGB", (width, height))
    third = width // 3
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image.paste(colour, (i * third, 0, (i + 1) * third, height))
    return image


# ---------------------------------------------------------------- projector inputs

PROJECTOR_GRID = (2, 3)  # H x W tokens per map
PROJECTOR_MAPS = 2
PROJECTOR_IN_DIMS = [5, 7]


def projector_grids(batch: int = 2, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """One random (B, H, W, C) grid per map, C from PROJECTOR_IN_DIMS."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, *PROJECTOR_GRID, c, generator=g, dtype=dtype) for c in PROJECTOR_IN_DIMS]


# ---------------------------------------------------------------- data


def to_tensor_at(size: int) -> Callable[[Image.Image], Tensor]:
    """An image transform standing in for one encoder's preprocessing: resize, (3, size, size) float."""
    return lambda image: TF.to_tensor(image.resize((size, size), Image.NEAREST))


# ---------------------------------------------------------------- tiny LLaMA

TINY_VOCAB = 97  # the vocabulary of the tiny LLaMA and Mamba LMs below (unless a test changes it)

TINY_LLAMA = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
# The distillation tests' teacher: the vocabulary of configs/model/tiny.yaml's LLM, 256 positions, larger
# initial weights.
DISTILL_LLAMA = {"vocab_size": 1024, "max_position_embeddings": 256, "initializer_range": 0.1}


def tiny_llama_config(**changes: object) -> LlamaConfig:
    """TINY_LLAMA's config with ``changes`` applied."""
    return LlamaConfig(**{**TINY_LLAMA, **changes})


def tiny_llama(seed: int = 0, **changes: object) -> LlamaForCausalLM:
    """A random 4-layer LLaMA (grouped-query attention, 4 heads, 2 KV) on SDPA, in eval mode."""
    torch.manual_seed(seed)
    config = tiny_llama_config(**changes)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


# One attention layer for the seeding tests: 4 query heads of 16 on 2 KV heads, width 64.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16


def tiny_llama_attention(attention_bias: bool = False) -> torch.nn.Module:
    """Layer 0's attention of a tiny random LlamaForCausalLM with grouped-query attention (4 heads, 2 KV)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        attention_bias=attention_bias,
        initializer_range=0.05,
    )
    attention = LlamaForCausalLM(config).model.layers[0].self_attn
    if attention_bias:
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(attention, name).bias.normal_(std=0.1)
    return attention


@torch.no_grad()
def perturb_mixers(model: torch.nn.Module, scale: float = 0.2, seed: int = 1) -> None:
    """Move every mixer parameter off its seeded value, as training would (non-identity conv, decays < 1)."""
    g = torch.Generator().manual_seed(seed)
    for mixer in mamba_mixers(model).values():
        for p in mixer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- tiny Mamba and Mamba-2 LMs


def tiny_mamba_config(**changes: object) -> MambaConfig:
    """A 2-layer Mamba-1 LM of width 32, d_state 8, untied, with ``changes`` applied."""
    fields = dict(
        hidden_size=32, num_hidden_layers=2, vocab_size=TINY_VOCAB, state_size=8, expand=2, tie_word_embeddings=False
    )
    return MambaConfig(**{**fields, **changes})


def tiny_mamba2_config(**changes: object) -> Mamba2Config:
    """A 2-layer Mamba-2 LM: width 64, 8 heads of 16, 2 groups, d_state 16, chunks of 16, untied; with
    ``changes`` applied. 16 is the smallest chunk mamba_ssm's Triton SSD kernels take; in_proj's width
    (328) is a multiple of 8, as causal_conv1d's kernel needs for the channel-last view transformers
    gives it."""
    fields = dict(
        hidden_size=64, num_hidden_layers=2, vocab_size=TINY_VOCAB, state_size=16, expand=2, num_heads=8,
        head_dim=16, n_groups=2, chunk_size=16, tie_word_embeddings=False,
    )
    return Mamba2Config(**{**fields, **changes})


def strengthen_mixers(model: PreTrainedModel) -> PreTrainedModel:
    """Scale the mixers' outputs up (so tokens depend on the context, not only on the last token) and
    give the convs a bias (so padded positions are non-zero unless masked, as transformers does)."""
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.out_proj.weight.mul_(10)
            layer.mixer.conv1d.bias.normal_()
    return model


def tiny_mamba(seed: int = 1) -> MambaForCausalLM:
    """tiny_mamba_config's LM, random, mixers strengthened, in eval mode."""
    torch.manual_seed(seed)
    model = MambaForCausalLM(tiny_mamba_config()).eval()
    return strengthen_mixers(model)


def tiny_mamba2(seed: int = 1) -> SSDForCausalLM:
    """tiny_mamba2_config's LM (the prompts of left_padded_prompt span two chunks), random, mixers
    strengthened, in eval mode."""
    torch.manual_seed(seed)
    model = SSDForCausalLM(tiny_mamba2_config()).eval()
    return strengthen_mixers(model)


TINY_LMS = {"mamba": tiny_mamba, "mamba2": tiny_mamba2}


def left_padded_prompt(model: PreTrainedModel, lengths: tuple[int, ...] = (19, 13)) -> tuple[Tensor, Tensor]:
    """Random prompts of the given lengths, left-padded: inputs_embeds (B, L, D), attention_mask (B, L)."""
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(0, TINY_VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    device = model.lm_head.weight.device
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids.to(device))
    return embeds, mask.to(device)


def assert_same_up_to_near_tie(ours: Tensor, reference: Tensor, ref_logits: Tensor, tol: float) -> None:
    """Tokens (B, T) equal, or equal until a step where the reference's own logits for the two tokens
    differ by at most ``tol`` (a near-tie that rounding may flip; after it the sequences continue from
    different tokens and are not compared)."""
    for row in range(ours.shape[0]):
        differ = (ours[row] != reference[row]).nonzero()
        if differ.numel() == 0:
            continue
        t = int(differ[0])
        gap = ref_logits[row, t, reference[row, t]] - ref_logits[row, t, ours[row, t]]
        assert gap <= tol, f"row {row} diverges at token {t} with a logit gap of {gap:.4g} > {tol}"


# ---------------------------------------------------------------- checkpoints in mamba_ssm's format

# Unpadded vocabulary of the tiny checkpoints; mamba_ssm pads it to a multiple of 8 -> 104.
RAW_VOCAB = 100
PADDED_VOCAB = 104

TINY_MAMBA = tiny_mamba_config(vocab_size=PADDED_VOCAB, tie_word_embeddings=True)
TINY_MAMBA_SSM_CONFIG = {
    "d_model": 32,
    "n_layer": 2,
    "vocab_size": RAW_VOCAB,
    "ssm_cfg": {"d_state": 8},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
TINY_MAMBA2 = tiny_mamba2_config(hidden_size=32, vocab_size=PADDED_VOCAB, num_heads=4, state_size=8, chunk_size=8)
TINY_MAMBA2_SSM_CONFIG = {
    "d_model": 32,
    "d_intermediate": 0,
    "n_layer": 2,
    "vocab_size": RAW_VOCAB,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": False,
}


def make_model(model_cls: type[PreTrainedModel], config) -> PreTrainedModel:
    """A random model in eval mode whose every parameter is perturbed, so no two weights coincide."""
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def logits(model: PreTrainedModel, vocab: int = RAW_VOCAB) -> Tensor:
    """Logits (2, 12, V) for fixed token ids (12 > chunk_size, so Mamba-2 scans several chunks)."""
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def write_mamba_ssm_dir(model: PreTrainedModel, config_json: dict, path: Path, weights_file: str) -> Path:
    """Write ``model`` as mamba_ssm saves: its key names, config.json, torch.save or safetensors."""
    path.mkdir()
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("backbone.embeddings."):
            key = key.replace("backbone.embeddings.", "backbone.embedding.", 1)
        state[key] = tensor.detach().clone().contiguous()
    if weights_file == "pytorch_model.bin":
        torch.save(state, path / weights_file)
    else:
        save_file(state, path / weights_file)
    (path / "config.json").write_text(json.dumps(config_json))
    return path


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the tiny MambaVLM (configs/model/tiny.yaml)


def tiny_vlm(*overrides: str, seed: int = 0, load_weights: bool = True, train: bool = False) -> MambaVLM:
    """The tiny MambaVLM with config ``overrides``, in eval mode (``train=True``: as build_model returns it)."""
    torch.manual_seed(seed)
    model = build_model(TINY_MODEL, list(overrides), load_weights=load_weights)
    return model if train else model.eval()


def fixed_batch(model: MambaVLM) -> dict:
    """Two images (red, blue) with a question each and the answer " red" as the only labels."""
    images = [Image.new("RGB", (40, 30), (230, 30, 30)), Image.new("RGB", (30, 40), (30, 30, 230))]
    input_ids, attention_mask, pixel_values = model._prompt_batch(images, ["what colour ?", "and this ?"])
    answer = torch.tensor(model.tokenizer.encode(" red", add_special_tokens=False))
    input_ids = torch.cat([input_ids, answer.expand(2, -1)], dim=1)
    attention_mask = torch.cat([attention_mask, torch.ones(2, answer.numel(), dtype=torch.long)], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer.numel():] = answer
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "labels": labels}


TINY_VLM_VOCAB = 1024
"""configs/model/tiny.yaml's llm.config.vocab_size: room for its builtin:tiny tokenizer (673 tokens)."""


def tiny_llama_vlm(seed: int = 0, **changes: object) -> MambaVLM:
    """The tiny MambaVLM on TINY_LLAMA (with ``changes``) as its LLM, in eval mode; its vocabulary is the
    tiny VLM's (TINY_LLAMA's 97 is smaller than the tokenizer, which the model build refuses)."""
    llm = "{" + ", ".join(f"{k}: {v}" for k, v in {**TINY_LLAMA, "vocab_size": TINY_VLM_VOCAB, **changes}.items()) + "}"
    return tiny_vlm("llm.family=llama", f"llm.config={llm}", seed=seed)


# ---------------------------------------------------------------- xdist workers


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, worker ``gwI`` of N runs on its own share of the cores (``cores[I::N]``), with
    that many torch threads, and so do the processes it starts. Unpinned, two workers on two cores ran
    two threads each (the training engine sets threads = cores / processes), and every tiny operator waited
    on a thread the other worker had descheduled: the distillation kill-and-resume test took 64 s in the
    suite and 5 s alone; pinned, 5 s beside a busy core. Without xdist, or with fewer cores than workers,
    nothing changes."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return
    mine = set(cores[int(worker.removeprefix("gw")) :: count])
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model() -> MambaVLM:
    """The tiny MambaVLM as build_model returns it, one per test module."""
    return tiny_vlm(train=True)


@pytest.fixture(scope="module")
def on_cpu() -> Iterator[None]:
    """Train on the CPU even where a GPU is present: the equality tests compare CPU arithmetic."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        yield


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny shapes: one thread avoids thread-pool stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- token-weighting data

LONG_ANSWER = " ".join(["red", "square"] * 20)  # 40 tokens of the tiny vocabulary


def four_records(root: Path) -> Path:
    """4 image records, one question each: two answered in 1 token, two in 40 (the mean of micro-batch
    means would differ from the token mean)."""
    train, _ = make_shapes_vqa(root, 4, 0, image_size=24)
    records = json.loads(train.read_text())
    for record, answer in zip(records, ["red", LONG_ANSWER, "blue", LONG_ANSWER]):
        record["conversations"] = record["conversations"][:2]
        record["conversations"][1]["value"] = answer
    train.write_text(json.dumps(records))
    return train


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a test's subprocess: this one's, with the repository first on PYTHONPATH
    (kept, not replaced: a machine may hold packages there)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_under_triton_interpreter(code: str, *args: str, expect: str, timeout: int = 300) -> None:
    """Run ``code`` (a script's text, given ``args``) in a subprocess under Triton's interpreter
    (``TRITON_INTERPRET`` is read when Triton loads, so it cannot be set in this process), and assert
    that it exits 0 and prints ``expect`` (its last output shown otherwise)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=subprocess_env(TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert expect in result.stdout
