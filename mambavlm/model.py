"""The MambaVLM model: vision -> projector -> LLM, with loss, cached generation and save/load.

A transformers model: ``MambaVLM`` is a ``PreTrainedModel`` + ``GenerationMixin`` configured by a
``MambaVLMConfig``, registered with ``AutoConfig`` / ``AutoModelForImageTextToText`` when
``mambavlm`` is imported. ``save_pretrained`` writes transformers' layout (``config.json``, sharded
``model*.safetensors``, ``generation_config.json``) plus the tokenizer; ``from_pretrained`` reads it
(``dtype``, ``device_map``), and reads mambavlm's first layout too (``config.yaml``, ``llm/``,
``tokenizer/``, ``vision_projector.safetensors``) too: ``save_pretrained`` of such a model writes the
new layout.

Images enter the token sequence as placeholders: each ``<image>`` in a prompt becomes
``num_visual_tokens`` copies of ``IMAGE_TOKEN_INDEX`` when tokenised, and ``embed`` replaces exactly
those positions with the projector's output (one ``masked_scatter``). Sequence lengths are therefore
known before the model runs, padding and labels work as for text, and a sample without ``<image>`` is
plain text for the LLM.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    GenerationConfig,
    GenerationMixin,
    MambaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.generation.utils import GenerateOutput
from transformers.modeling_outputs import CausalLMOutputWithPast

from mambavlm.atomic import atomic_directory
from mambavlm.config import ConfigError, ModelConfig, VisionConfig, load_config
from mambavlm.configuration import MambaVLMConfig
from mambavlm.generation import (
    GenerationSettings,
    StaticDecoder,
    build_static_decoder,
    supports_static_decoding,
)
from mambavlm.generation.decoder import check_left_padded
from mambavlm.llm.factory import LLM_SECTION_CHECKS, build_llm, check_tokenizer_fits, family_classes
from mambavlm.llm.hybrid import layout_summary
from mambavlm.llm.mamba_training import (
    answer_token_loss,
    mamba_lm_hidden_states,
    zero3_partitioned,
)
from mambavlm.llm.templates import ConversationTemplate, get_template
from mambavlm.llm.tokenizer import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    build_tokenizer,
    tokenize_prompt,
)
from mambavlm.processing import MambaVLMImageProcessor, MambaVLMProcessor, left_pad
from mambavlm.projector import build_projector
from mambavlm.vision.long_sequence import VisualLongSequence

__all__ = ["MambaVLM", "build_model"]

LEGACY_CONFIG_FILE = "config.yaml"
"""The files of the layout mambavlm wrote before it was a transformers model (still loaded)."""
LEGACY_WEIGHTS_FILE = "vision_projector.safetensors"
LEGACY_LLM_DIR = "llm"
LEGACY_TOKENIZER_DIR = "tokenizer"
STATIC_CACHE = "static"
"""``generation_config.cache_implementation`` that selects the static-state (CUDA-graph) decoder."""
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt")
"""Files that say a directory holds a saved tokenizer."""


def _check_prompts(input_ids: Tensor, attention_mask: Tensor) -> None:
    """Generation's prompts: input_ids (B, L) with a left-padding attention_mask (B, L) (``check_left_padded``),
    on both paths (transformers' own generate cannot tell right padding from left with ``inputs_embeds``).
    Raises ValueError naming what is wrong."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)} (a single prompt: input_ids[None])")
    check_left_padded(attention_mask, tuple(input_ids.shape))


def is_mambavlm_directory(path: str | Path) -> bool:
    """Whether ``path`` holds a saved MambaVLM (either layout)."""
    path = Path(path)
    if (path / LEGACY_CONFIG_FILE).is_file() and (path / LEGACY_WEIGHTS_FILE).is_file():
        return True
    config_file = path / "config.json"
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("model_type") == MambaVLMConfig.model_type
    except (json.JSONDecodeError, AttributeError):
        return False


def missing_local_path(name: str | Path) -> bool:
    """Whether ``name`` does not exist yet is meant as a local path, not a Hub id (``name`` or
    ``org/name``): it starts with ``/``, ``~``, ``.``, has more than one ``/`` (or an empty part,
    or a backslash), or its first part is a directory here (``outputs/nope`` with ``outputs/``)."""
    if Path(name).exists():
        return False
    text = str(name)
    if text.startswith(("/", "~", ".")) or "\\" in text:
        return True
    parts = text.split("/")
    return len(parts) > 2 or "" in parts or (len(parts) == 2 and Path(parts[0]).is_dir())


def _architecture_only(vision: VisionConfig) -> VisionConfig:
    """``vision`` with no encoder weights to fetch (a saved model's come from its checkpoint)."""
    vision = vision.model_copy(deep=True)
    for encoder in vision.encoders:
        encoder.weights = None
    return vision


class MambaVLM(PreTrainedModel, GenerationMixin):
    """A vision-language model: ``forward`` for training, ``generate`` (transformers') for token ids,
    ``answer`` for strings.

    ``MambaVLM(config)`` builds every part from ``config`` with random weights (what
    ``from_pretrained`` fills); ``build_model`` builds from the YAML schema, fetching the encoders' and
    the LLM's pretrained weights, and passes the parts in.
    """

    config_class = MambaVLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(
        self,
        config: MambaVLMConfig,
        vision: VisualLongSequence | None = None,
        projector: nn.Module | None = None,
        llm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__(config)
        if config.vision is None or config.llm is None or config.text_config is None:
            raise ValueError("MambaVLM needs a MambaVLMConfig with vision, llm and text_config")
        self.vision = vision if vision is not None else VisualLongSequence(_architecture_only(config.vision))
        self.llm = llm if llm is not None else family_classes(config.llm.family)[1]._from_config(
            config.text_config, dtype=torch.get_default_dtype()  # transformers sets it for from_pretrained(dtype=...)
        )
        self.projector = projector if projector is not None else build_projector(
            config.projector,
            in_dims=self.vision.out_dims,
            out_dim=self.llm.config.hidden_size,
            grid_size=self.vision.grid_size,
            num_maps=self.vision.num_maps,
        )
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.template: ConversationTemplate = get_template(config.llm.template)
        # FSDP auto-wrap (configs/accelerate/fsdp.yaml) wraps the LLM's own decoder blocks
        self._no_split_modules = list(getattr(self.llm, "_no_split_modules", None) or [])
        self._static_decoder: StaticDecoder | None = None
        self._fused_decode_step = False
        self._persistent_decode_step = False
        self.post_init()
        self.generation_config = GenerationConfig.from_dict(self.llm.generation_config.to_dict())
        self.attach_tokenizer(tokenizer)

    def _init_weights(self, module: nn.Module) -> None:
        """Weights: nothing, every part initialises its own when built (timm / open_clip, the
        projector's Mamba initialisation, the LLM's ``post_init``) and ``from_pretrained`` fills them
        all. Buffers that are not saved (the projector's scan orders) are recomputed."""
        if hasattr(module, "reset_index_buffers"):
            with torch.no_grad():
                module.reset_index_buffers()

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image (M*h*w; 1458 for the paper's DINOv2 + SigLIP at 384 px)."""
        return self.vision.num_visual_tokens

    @property
    def add_bos(self) -> bool:
        """LLaMA-family tokenisation starts with BOS; GPT-NeoX (Mamba) does not."""
        return self.config.llm.family in ("llama", "hybrid_llama")

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def encode_images(self, pixel_values: Sequence[Tensor]) -> Tensor:
        """One (N, 3, H_m, W_m) tensor per encoder -> visual tokens (N, num_visual_tokens, D_llm)."""
        grids = self.vision(pixel_values)
        return self.projector(grids)

    def embed(self, input_ids: Tensor, pixel_values: Sequence[Tensor] | None = None) -> Tensor:
        """input_ids (B, L) with IMAGE_TOKEN_INDEX placeholders -> inputs_embeds (B, L, D_llm)."""
        image_mask = input_ids == IMAGE_TOKEN_INDEX
        embed_tokens = self.llm.get_input_embeddings()
        embeds = embed_tokens(input_ids.masked_fill(image_mask, 0))
        num_placeholders = int(image_mask.sum())
        if num_placeholders == 0:
            return embeds
        if pixel_values is None:
            raise ValueError(
                f"input_ids hold {num_placeholders} image placeholder tokens but no pixel_values"
            )
        features = self.encode_images(pixel_values)
        if features.shape[0] * features.shape[1] != num_placeholders:
            raise ValueError(
                f"input_ids hold {num_placeholders} image placeholder tokens, but pixel_values give "
                f"{features.shape[0]} images x {features.shape[1]} visual tokens"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def _check_length(self, length: int) -> None:
        if length > self.config.max_sequence_length:
            raise ValueError(
                f"sequence too long: {length} tokens > max_length={self.config.max_sequence_length} "
                f"({self.num_visual_tokens} of them per image)"
            )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        pixel_values: Sequence[Tensor] | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **llm_kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids, attention_mask, labels (B, L); pixel_values: per encoder (N_img, 3, H, W); or
        inputs_embeds (B, L, D) in place of input_ids and pixel_values.

        Returns the LLM's output: ``logits`` (B, L, V) and, given labels (-100 = ignored), ``loss``
        (transformers' normalisation: ``num_items_in_batch`` among ``llm_kwargs``). Raises ValueError
        for a sequence longer than ``config.max_sequence_length`` and for placeholders that do not
        match the images.

        Training a Mamba-1 LLM (train mode, labels given, no other LLM arguments) runs mamba_ssm's
        layout instead (``mambavlm.llm.mamba_training``): fused residual add + RMSNorm at each block
        boundary, and the LM head at the scored positions only; the output then holds the ``loss``
        and no ``logits``, as Liger-Kernel's fused-loss forwards return in training. The same loss and
        gradients as the LLM's own forward (float32; bf16 within rounding). Under DeepSpeed ZeRO-3 the
        LLM's own forward runs (ZeRO-3 gathers each submodule's parameters in that submodule's forward).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            self._check_length(input_ids.shape[1])
            inputs_embeds = self.embed(input_ids, pixel_values)
        mamba_lm = self._mamba_lm()
        if labels is not None and self.training and mamba_lm is not None and set(llm_kwargs) <= {"num_items_in_batch"}:
            hidden = mamba_lm_hidden_states(mamba_lm, inputs_embeds, attention_mask)
            return CausalLMOutputWithPast(
                loss=answer_token_loss(mamba_lm, hidden, labels, llm_kwargs.get("num_items_in_batch"))
            )
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)

    def _mamba_lm(self) -> MambaForCausalLM | None:
        """The Mamba-1 LM under ``self.llm`` (under peft's wrapper, with its adapters) that can train in
        mamba_ssm's layout, or None (another family, or parameters partitioned by ZeRO-3:
        ``zero3_partitioned``)."""
        llm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return llm if isinstance(llm, MambaForCausalLM) and not zero3_partitioned(llm) else None

    def preprocess_images(self, images: Sequence[Image.Image]) -> list[Tensor]:
        """PIL images -> one (N, 3, H_m, W_m) tensor per encoder, each with its own preprocessing."""
        per_image = [self.vision.preprocess(img) for img in images]
        return [torch.stack(column) for column in zip(*per_image)]

    def build_prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        """A user message -> the template's generation prompt, tokenised with image placeholders."""
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer")
        if with_image and IMAGE_TOKEN not in prompt:
            prompt = f"{IMAGE_TOKEN}\n{prompt}"
        if not with_image and IMAGE_TOKEN in prompt:
            raise ValueError(f"prompt contains {IMAGE_TOKEN} but no image was given")
        text = self.template.prompt(prompt, eos_token=self.tokenizer.eos_token or "")
        return tokenize_prompt(text, self.tokenizer, self.num_visual_tokens, self.add_bos)

    def checked_prompt_ids(self, prompt: object, with_image: bool, max_new_tokens: int = 0) -> list[int]:
        """``build_prompt_ids`` for a prompt that can be answered with ``max_new_tokens`` new tokens.

        Raises ValueError saying why it cannot: not a string, ``<image>`` placeholders that do not
        match the image (more than one, or one without an image), or a prompt that with
        ``max_new_tokens`` exceeds ``config.max_sequence_length`` (the numbers are in the message).
        """
        if not isinstance(prompt, str):
            raise ValueError(f"the question is a {type(prompt).__name__}, not a string")
        placeholders = prompt.count(IMAGE_TOKEN)
        if with_image and placeholders > 1:
            raise ValueError(f"the question holds {placeholders} {IMAGE_TOKEN} placeholders for one image")
        if not with_image and placeholders:
            raise ValueError(f"the question holds {IMAGE_TOKEN} but the record has no image")
        ids = self.build_prompt_ids(prompt, with_image)
        if len(ids) + max_new_tokens > self.config.max_sequence_length:
            raise ValueError(
                f"the prompt is {len(ids)} tokens ({self.num_visual_tokens} of them visual); with "
                f"{max_new_tokens} new tokens it exceeds max_length={self.config.max_sequence_length}"
            )
        return ids

    def prompt_problem(self, prompt: object, with_image: bool, max_new_tokens: int = 0) -> str | None:
        """Why ``prompt`` cannot be answered (``checked_prompt_ids``' message), or None if it can."""
        try:
            self.checked_prompt_ids(prompt, with_image, max_new_tokens)
        except ValueError as err:
            return str(err)
        return None

    def set_fused_decode_step(self, enabled: bool = True, persistent: bool = False) -> None:
        """Whether the static-state decoder (``generate_ids``' fast path, ``cache_implementation="static"``)
        steps a Mamba-1 LLM through the fused Triton kernels (``mambavlm.ops.mamba_step``; three per block
        for one sequence): on an H200, MambaVLM-2.8B at batch 1 takes 2.01-2.04 ms per token fused against
        3.18-3.30 for mamba_ssm's ``generate(cg=True)`` and 2.86-3.16 unfused (``benchmarks/RESULTS.md``
        a2, a8). Off by default: ``x_proj``'s split-K sums and the norm's row sums are float32 atomic adds,
        whose order, so the last bits of the logits (and at a near tie a greedy token), can vary from run
        to run; unfused, decoding repeats exactly. Greedy tokens equal the unfused path's in float32
        (tested on the H200 and under Triton's interpreter). Raises ValueError for an LLM without Mamba-1
        mixers (a Mamba-2 layer's step kernel runs by default: it sums nothing across programs); the first
        decode raises ValueError where Triton cannot run (not CUDA, outside ``TRITON_INTERPRET=1``).

        ``persistent``: one sequence steps through one persistent CUDA kernel for the whole LLM instead
        (``mambavlm.ops.mamba_stack_step``, built with nvcc on first use): 1.67-1.80 ms per token against 2.0
        for the Triton kernels and 3.29-3.41 for mamba_ssm in the same runs (H200, ``benchmarks/RESULTS.md`` a13);
        its sums are exact in fixed point, so it repeats bit for bit. Other batches step as ``enabled``
        says. The first decode raises ValueError where it cannot run (``stack_step_unsupported``: not CUDA,
        a GPU before compute capability 9.0, no nvcc, ...)."""
        if (enabled or persistent) and not isinstance(self.llm, MambaForCausalLM):
            raise ValueError(f"the fused decode step runs Mamba-1 mixers; this model's LLM is a "
                             f"{type(self.llm).__name__} (a Mamba-2 layer's step kernel runs without it)")
        self._fused_decode_step = enabled
        self._persistent_decode_step = persistent

    def static_decoder(self) -> StaticDecoder:
        """The LLM's static-cache decoder, built on first use and kept (with its CUDA graph); rebuilt when
        the LLM, its device or ``set_fused_decode_step`` changed."""
        decoder = self._static_decoder
        if (decoder is None or decoder.model is not self.llm or decoder.device != self.device
                or getattr(decoder, "fused_step", False) != self._fused_decode_step
                or getattr(decoder, "persistent_step", False) != self._persistent_decode_step):
            self._static_decoder = build_static_decoder(self.llm, fused_step=self._fused_decode_step,
                                                        persistent_step=self._persistent_decode_step)
        return self._static_decoder

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Sequence[Tensor] | None = None,
        fast: bool | None = None,
        **generate_kwargs: Any,
    ) -> Tensor:
        """Left-padded prompts (B, L) -> new token ids (B, T).

        The prompt (visual tokens included) is processed once; each new token reuses the LLM's state
        (KV for attention, conv + SSM state for Mamba). ``fast=True``: the static-cache decoder
        (Mamba / Mamba-2, LLaMA and hybrid LLMs; CUDA-graph steps on CUDA); ``False``: the LLM's HF ``generate``;
        None: the fast path when the LLM is on CUDA, supported, and the arguments are ones it handles.
        """
        _check_prompts(input_ids, attention_mask)
        self._check_length(input_ids.shape[1] + generate_kwargs.get("max_new_tokens", 0))
        inputs_embeds = self.embed(input_ids, pixel_values)
        tok = self.tokenizer
        if tok is not None:
            generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
            generate_kwargs.setdefault("eos_token_id", tok.eos_token_id)
        if fast is None:
            fast = (
                self.device.type == "cuda"
                and supports_static_decoding(self.llm)
                and GenerationSettings.accepts(generate_kwargs, self.llm.generation_config)
            )
        if fast:
            return self.static_decoder().generate(inputs_embeds, attention_mask, **generate_kwargs)
        return self.llm.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        pixel_values: Sequence[Tensor] | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Tensor | GenerateOutput:
        """transformers' ``generate``: left-padded input_ids (B, L) with image placeholders, their
        attention_mask and pixel_values (per encoder (N_img, 3, H, W), as the processor gives them)
        -> the prompt followed by the new tokens, (B, L + T), the image placeholders shown as the
        pad token (so that the whole sequence decodes), or transformers' output object with
        ``return_dict_in_generate=True`` (its ``sequences`` likewise).

        The images are embedded once and the LLM's own ``generate`` continues from the embeddings, so
        every transformers argument applies (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_p``, ``num_beams``, ``streamer``, logits processors, ...) with this model's
        ``generation_config`` under them. ``cache_implementation="static"`` (an argument or in the
        generation config) decodes with the static-state decoder instead (its step a CUDA graph on
        CUDA; greedy tokens equal the default path's): greedy or sampled (temperature, top-k, top-p),
        EOS and padding, returning the tensor; other options are a ValueError naming them. Raises ValueError without input_ids, for a prompt plus
        ``max_new_tokens`` beyond ``config.max_sequence_length``, and for placeholders that do not
        match the images.
        """
        if input_ids is None:
            raise ValueError("MambaVLM.generate needs input_ids (the processor's output)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _check_prompts(input_ids, attention_mask)
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        kwargs = config.update(**kwargs)
        self._check_length(input_ids.shape[1] + (config.max_new_tokens or 0))
        inputs_embeds = self.embed(input_ids, pixel_values)
        prompt = input_ids.masked_fill(input_ids == self.config.image_token_index, config.pad_token_id or 0)
        if config.cache_implementation == STATIC_CACHE:
            problems = [f"argument {key!r}" for key in kwargs] + [
                f"generation_config.{name}={getattr(config, name)!r}"
                for name in ("return_dict_in_generate", "output_scores", "output_logits")
                if getattr(config, name, False)
            ]
            problems += GenerationSettings.unsupported({}, config)
            if problems or not supports_static_decoding(self.llm):
                raise ValueError(
                    f"cache_implementation={STATIC_CACHE!r} (the static-state decoder) does not implement "
                    + (", ".join(problems) or f"a {type(self.llm).__name__}")
                    + "; leave cache_implementation unset for transformers' generate"
                )
            settings = {name: getattr(config, name) for name in ("max_new_tokens", "do_sample", "temperature",
                                                                  "top_k", "top_p", "eos_token_id", "pad_token_id")}
            new = self.static_decoder().generate(inputs_embeds, attention_mask, **settings)
            return torch.cat([prompt, new], dim=1)
        out = self.llm.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=config, **kwargs
        )
        if isinstance(out, Tensor):
            return torch.cat([prompt, out], dim=1)
        out.sequences = torch.cat([prompt, out.sequences], dim=1)
        return out

    @torch.no_grad()
    def answer(
        self,
        images: Sequence[Image.Image | None] | None,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        pixel_values: Sequence[Tensor] | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Answer ``prompts`` (one per image; None for text-only) -> decoded answers.

        Greedy by default; ``do_sample=True`` with temperature / top_p / top_k samples.
        ``pixel_values``: the images already through ``preprocess_images`` (one (N, 3, H_m, W_m) per
        encoder, N = the images that are not None, in order), so that a caller can prepare them ahead
        (the evaluation loop does, in a background thread); ``images`` then only says which prompts
        have one. ``generate_kwargs`` go to ``generate_ids`` (``fast=...`` included).
        """
        input_ids, attention_mask, pixel_values = self._prompt_batch(images, prompts, pixel_values)
        out = self.generate_ids(
            input_ids,
            attention_mask,
            pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            **generate_kwargs,
        )
        return self.decode_answers(out)

    def decode_answers(self, new_ids: Tensor) -> list[str]:
        """New token ids (B, T) -> B answers: decoded without special tokens, stripped."""
        return [s.strip() for s in self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]

    def _prompt_batch(
        self,
        images: Sequence[Image.Image | None] | None,
        prompts: Sequence[str],
        pixel_values: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """Prompts (one per image; None for text-only) -> left-padded input_ids (B, L), attention_mask
        (B, L) and pixel values on the model's device (``pixel_values`` as ``answer`` takes them)."""
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer")
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        ids = [self.build_prompt_ids(p, img is not None) for p, img in zip(prompts, images)]
        input_ids, attention_mask = left_pad(ids, self.tokenizer.pad_token_id)
        present = [img for img in images if img is not None]
        if pixel_values is None and present:
            pixel_values = self.preprocess_images(present)
        if pixel_values is not None:
            if any(p.shape[0] != len(present) for p in pixel_values):
                raise ValueError(
                    f"pixel_values hold {[p.shape[0] for p in pixel_values]} images for {len(present)} images given"
                )
            pixel_values = [p.to(self.device, non_blocking=p.is_pinned()) for p in pixel_values] if present else None
        return input_ids.to(self.device), attention_mask.to(self.device), pixel_values

    def option_token_ids(self, options: Sequence[str]) -> list[int]:
        """Each option's one token id (``tokenizer.encode(option, add_special_tokens=False)``).

        Raises ValueError naming an option that is not exactly one token, or options sharing a token.
        """
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer")
        token_ids = []
        for option in options:
            encoded = self.tokenizer.encode(option, add_special_tokens=False)
            if len(encoded) != 1 or encoded[0] == self.tokenizer.unk_token_id:
                raise ValueError(f"option {option!r} must be one known token of the tokenizer, got ids {encoded}")
            token_ids.append(encoded[0])
        if len(set(token_ids)) != len(token_ids):
            raise ValueError(f"options {list(options)} share tokens: {token_ids}")
        return token_ids

    @torch.no_grad()
    def option_logprobs(
        self,
        images: Sequence[Image.Image | None] | None,
        prompts: Sequence[str],
        options: Sequence[str],
        pixel_values: Sequence[Tensor] | None = None,
    ) -> list[dict[str, float]]:
        """Closed-set answers by likelihood: per prompt, {option: log p(option's token)} at the answer's
        first position, normalised over the options (log-softmax over them).

        Prismatic's evaluation harness (TRI-ML/vlm-evaluation, ``generate_answer(...,
        return_string_probabilities=options)``) scores TallyQA, VSR and its other closed-set tasks this
        way: the softmax over the vocabulary at the first generated position, read at each option's one
        token, renormalised over the options. Arguments as ``answer``; raises ValueError for an option
        that is not one token (``option_token_ids``).
        """
        input_ids, attention_mask, pixel_values = self._prompt_batch(images, prompts, pixel_values)
        return self.option_logprobs_ids(input_ids, attention_mask, pixel_values, options)

    @torch.no_grad()
    def option_logprobs_ids(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Sequence[Tensor] | None, options: Sequence[str]
    ) -> list[dict[str, float]]:
        """``option_logprobs`` of prompts already tokenised and left-padded: input_ids, attention_mask
        (B, L) and pixel values on the model's device (``generate_ids``' inputs)."""
        token_ids = torch.tensor(self.option_token_ids(options), device=self.device)
        inputs_embeds = self.embed(input_ids, pixel_values)
        if supports_static_decoding(self.llm):
            logits = self.static_decoder().prefill(inputs_embeds, attention_mask)
        else:
            logits = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, logits_to_keep=1).logits[:, -1]
        chosen = torch.log_softmax(logits.float(), dim=-1)[:, token_ids]
        chosen = torch.log_softmax(chosen, dim=-1).cpu()
        return [dict(zip(options, row.tolist())) for row in chosen]

    @torch.no_grad()
    def continuation_logprobs(
        self,
        images: Sequence[Image.Image | None] | None,
        prompts: Sequence[str],
        continuations: Sequence[str],
    ) -> list[tuple[float, bool]]:
        """Per prompt: (log p(continuation | prompt), whether greedy decoding would produce it).

        The continuation is tokenised on its own (``add_special_tokens=False``) and appended to the
        template's generation prompt, as LLaVA's lmms-eval model appends the answer to the assistant
        turn; the log-probability is the sum over its tokens in float32. One forward per prompt (B = 1,
        no padding). Raises ValueError for an empty continuation or lengths that do not match.
        """
        images = list(images) if images is not None else [None] * len(prompts)
        if not len(images) == len(prompts) == len(continuations):
            raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(continuations)} continuations")
        results = []
        for image, prompt, continuation in zip(images, prompts, continuations):
            target = self.tokenizer.encode(continuation, add_special_tokens=False)
            if not target:
                raise ValueError(f"continuation {continuation!r} has no tokens")
            context = self.build_prompt_ids(prompt, image is not None)
            ids = torch.tensor([context + target], device=self.device)
            pixels = None if image is None else [p.to(self.device) for p in self.preprocess_images([image])]
            logits = self(input_ids=ids, pixel_values=pixels).logits[0, len(context) - 1 : -1].float()
            target_ids = torch.tensor(target, device=self.device)
            logprob = torch.log_softmax(logits, dim=-1).gather(-1, target_ids[:, None]).sum()
            results.append((float(logprob), bool((logits.argmax(-1) == target_ids).all())))
        return results

    def attach_tokenizer(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Use ``tokenizer`` for prompts and answers. Its chat template becomes the model's conversation
        format (``ConversationTemplate.chat_template``: ``tokenizer.apply_chat_template`` gives the text
        ``answer`` prompts with), and its EOS, PAD and BOS ids the generation defaults where the generation
        config has none or was derived from the LLM's config (whose class defaults, MambaConfig's 0 for all
        three, need not be the tokenizer's); a saved ``generation_config.json`` keeps its own.

        Raises LLMBuildError (``check_tokenizer_fits``) when the tokenizer has more tokens than the LLM has
        token embeddings (``llm.config.vocab_size`` too small)."""
        if tokenizer is not None:
            llm_section = getattr(self.config, "llm", None)
            check_tokenizer_fits(self.llm, tokenizer, getattr(llm_section, "tokenizer", None))
        self.tokenizer = tokenizer
        if tokenizer is None:
            return
        tokenizer.chat_template = self.template.chat_template
        for config in (self.generation_config, self.llm.generation_config):
            # a generation config derived from the LLM's config (not a saved generation_config.json) holds that
            # config class's default ids (MambaConfig: 0 for EOS, BOS and PAD), which need not be the tokenizer's
            derived = bool(getattr(config, "_from_model_config", False))
            for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
                ours = getattr(tokenizer, name, None)
                current = getattr(config, name)
                if ours is None or current == ours or (isinstance(current, list) and ours in current):
                    continue
                if current is None or derived:
                    setattr(config, name, ours)

    def processor(self) -> MambaVLMProcessor:
        """This model's processor: its encoders' image preprocessing, its tokenizer and its conversation
        format as the chat template (``AutoProcessor.from_pretrained`` of a saved model gives the same).
        Raises RuntimeError for a model built without a tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer")
        return MambaVLMProcessor(
            MambaVLMImageProcessor([encoder.preprocess for encoder in self.vision.encoders]),
            self.tokenizer,
            chat_template=self.template.chat_template,
            num_visual_tokens=self.num_visual_tokens,
            add_bos=self.add_bos,
        )

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """transformers' ``save_pretrained`` (``config.json``, ``model*.safetensors`` shards of at most
        ``max_shard_size``, ``generation_config.json``) plus the processor (tokenizer, image
        processor, chat template), written atomically: the directory appears complete or not at all.
        ``kwargs`` go to transformers."""
        path = Path(save_directory)
        with atomic_directory(path) as tmp:
            super().save_pretrained(tmp, **kwargs)
            if self.tokenizer is not None:
                self.processor().save_pretrained(tmp)
        return path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any) -> MambaVLM:
        """transformers' ``from_pretrained`` (``dtype``, ``device_map``, ...) of a saved MambaVLM,
        with its tokenizer when one was saved; nothing is downloaded for a local directory, and no
        remote code runs. A directory in the layout mambavlm wrote before (``config.yaml``, ``llm/``,
        ``vision_projector.safetensors``) loads too (``dtype`` and ``device_map`` as one device):
        ``save_pretrained`` it once to convert it. Raises FileNotFoundError for a local path that
        holds neither layout, ValueError naming every weight the checkpoint lacks, has in excess or
        holds in another shape (``ignore_mismatched_sizes=True``: transformers' leniency instead)."""
        path = Path(pretrained_model_name_or_path)
        if missing_local_path(pretrained_model_name_or_path):
            raise FileNotFoundError(f"{pretrained_model_name_or_path}: no such directory")
        if (path / LEGACY_CONFIG_FILE).is_file() and not (path / "config.json").is_file():
            return _from_legacy_directory(path, **kwargs)
        if path.exists() and not is_mambavlm_directory(path):
            raise FileNotFoundError(
                f"{path} is not a MambaVLM directory (no config.json of model_type "
                f"{MambaVLMConfig.model_type!r}, no {LEGACY_CONFIG_FILE})"
            )
        want_info = kwargs.pop("output_loading_info", False)
        lenient = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        problems = [
            f"{key}: checkpoint has shape {tuple(stored)}, model expects {tuple(expected)}"
            for key, stored, expected in info.get("mismatched_keys", ())
        ]
        problems += [f"{key}: missing from checkpoint" for key in sorted(info.get("missing_keys", ()))]
        problems += [f"{key}: unexpected in checkpoint" for key in sorted(info.get("unexpected_keys", ()))]
        if problems and not lenient:
            raise ValueError(f"cannot load {pretrained_model_name_or_path}:\n  " + "\n  ".join(problems))
        if path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES):
            llm_section = model.config.llm.model_copy(update={"tokenizer": str(path)})
            model.attach_tokenizer(build_tokenizer(llm_section))
        return (model, info) if want_info else model


def _from_legacy_directory(
    path: Path, dtype: torch.dtype | str | None = None, device_map: str | torch.device | None = None, **kwargs: Any
) -> MambaVLM:
    """A model saved in mambavlm's first layout: config.yaml (the YAML schema), llm/ (the LLM's
    transformers directory), tokenizer/, vision_projector.safetensors."""
    if kwargs:
        raise TypeError(
            f"{path} is in mambavlm's first checkpoint layout, which loads with dtype and device_map only "
            f"(got {sorted(kwargs)}); load it once and save_pretrained it to convert it"
        )
    if not (path / LEGACY_WEIGHTS_FILE).is_file():
        saved = [sub for sub in ("final", "student") if is_mambavlm_directory(path / sub)]
        hint = f" (a training run's output directory? its model is {path / saved[0]})" if saved else ""
        raise FileNotFoundError(f"{path} has {LEGACY_CONFIG_FILE} but no {LEGACY_WEIGHTS_FILE}{hint}")
    config = load_config(ModelConfig, path / LEGACY_CONFIG_FILE, section_checks=LLM_SECTION_CHECKS)
    local = config.model_copy(deep=True)
    local.llm.source = str(path / LEGACY_LLM_DIR)
    local.llm.config = {}
    tokenizer_dir = path / LEGACY_TOKENIZER_DIR
    local.llm.tokenizer = str(tokenizer_dir) if tokenizer_dir.is_dir() else None
    model = build_model(local, load_tokenizer=local.llm.tokenizer is not None, fetch_encoders=False)
    model.config.vision, model.config.llm = config.vision, config.llm
    load_into(model, load_file(str(path / LEGACY_WEIGHTS_FILE)), source=str(path / LEGACY_WEIGHTS_FILE))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    return model.to(device=device_map, dtype=dtype if isinstance(dtype, torch.dtype) else None)


def load_into(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load vision+projector weights, naming any missing, unexpected or mis-shaped parameter."""
    own = {k: v for k, v in module.state_dict().items() if not k.startswith("llm.")}
    problems = [
        f"{k}: checkpoint has shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems += [f"{k}: missing from checkpoint" for k in own if k not in state]
    problems += [f"{k}: unexpected in checkpoint" for k in state if k not in own]
    if problems:
        raise ValueError(f"cannot load {source}:\n  " + "\n  ".join(problems))
    module.load_state_dict(state, strict=False)


def build_model(
    config: ModelConfig | str | Path,
    overrides: Sequence[str] = (),
    load_weights: bool = True,
    load_tokenizer: bool = True,
    fetch_encoders: bool | None = None,
) -> MambaVLM:
    """Assemble a MambaVLM from the YAML schema (object or YAML path, plus ``key=value`` overrides).

    ``load_weights=False`` builds the architecture only (random init, nothing read or downloaded);
    wrap the call in ``with torch.device("meta"):`` to build without memory. ``fetch_encoders``
    (default: ``load_weights``) loads the encoders' ``weights``; the LLM's come from ``llm.source``.

    Raises:
        ConfigError: an invalid config (each bad key named), an encoder image smaller than its patch, an
            unknown ``builtin:`` tokenizer.
        LLMBuildError: an LLM config that does not fit its source, or a tokenizer with more tokens than
            ``llm.config.vocab_size``.
        FileNotFoundError: a local ``llm.source`` or ``llm.tokenizer`` path that is not a directory.
    """
    if not isinstance(config, ModelConfig):
        config = load_config(ModelConfig, config, overrides, section_checks=LLM_SECTION_CHECKS)
    elif overrides:
        raise ConfigError("pass overrides with a config path, or apply them to the config first")
    fetch = load_weights if fetch_encoders is None else fetch_encoders
    vision = VisualLongSequence(config.vision if fetch else _architecture_only(config.vision))
    llm = build_llm(config.llm, load_weights=load_weights)
    projector = build_projector(
        config.projector,
        in_dims=vision.out_dims,
        out_dim=llm.config.hidden_size,
        grid_size=vision.grid_size,
        num_maps=vision.num_maps,
    )
    model = MambaVLM(MambaVLMConfig.from_spec(config, llm.config), vision, projector, llm)
    model.attach_tokenizer(build_tokenizer(config.llm) if load_tokenizer else None)
    return model


def parameter_table(model: MambaVLM) -> list[dict[str, Any]]:
    """Per-part parameter counts: vision encoders, projector, LLM (embeddings, layers, head)."""
    rows = []

    def add(name: str, module: nn.Module, detail: str = "") -> None:
        params = list(module.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        rows.append({"part": name, "detail": detail, "params": total, "trainable": trainable})

    for i, (enc_cfg, enc) in enumerate(zip(model.config.vision.encoders, model.vision.encoders)):
        add(f"vision.encoders.{i}", enc, enc_cfg.name)
    projector = model.config.projector
    detail = projector.type
    if projector.type == "mamba":
        detail += f" ({projector.scan_mode}, d_state {projector.d_state}, depth {projector.depth})"
    add("projector", model.projector, detail)
    add("llm", model.llm, model.config.llm.family)
    return rows


def describe(model: MambaVLM) -> str:
    """A human-readable parameter table plus the ``num_visual_tokens: N`` line; for a hybrid LLM
    (``hybrid_llama``), between them, an ``llm layers:`` line saying which layers are Mamba-2 and how many
    keep attention (``layout_summary``)."""
    rows = parameter_table(model)
    total = sum(r["params"] for r in rows)
    lines = [f"{'part':<22}{'detail':<44}{'params':>16}{'trainable':>16}"]
    for r in rows:
        lines.append(f"{r['part']:<22}{r['detail']:<44}{r['params']:>16,}{r['trainable']:>16,}")
    lines.append(f"{'total':<66}{total:>16,}{sum(r['trainable'] for r in rows):>16,}")
    if model.config.llm.family == "hybrid_llama":
        lines.append(f"llm layers: {layout_summary(model.llm.config)}")
    lines.append(f"num_visual_tokens: {model.num_visual_tokens}")
    return "\n".join(lines)

