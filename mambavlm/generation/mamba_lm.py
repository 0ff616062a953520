"""Static-state decoding for the Mamba (transformers' ``MambaForCausalLM``) and Mamba-2 (``SSDForCausalLM``) LMs.

``StaticStateDecoder(model)`` allocates one state per layer for a batch, fills it with one pass over
the prompt's ``inputs_embeds`` (visual tokens included), and then advances all layers one token at a
time in place (the loop and the CUDA graph: ``StaticDecoder``).

Mamba-1 layers run ``StatefulMambaMixer`` over transformers' mixer weights (``in_proj``, ``conv1d``,
its ``x_proj`` to (dt, B, C), its ``dt_proj``, ``out_proj``); Mamba-2 layers run their own mixer's
prefill (``forward`` with a ``Mamba2State``) and ``step``, the same code training and transformers-style
generation run. Each block boundary's residual add + RMSNorm is one fused kernel on CUDA (mamba_ssm's,
as its ``Block`` runs them), ``F.rms_norm`` with transformers' rounding elsewhere; the residual stream
is float32 when ``config.residual_in_fp32``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import MambaForCausalLM, PreTrainedModel

from mambavlm.generation.decoder import EOS_CHECK_INTERVAL, StaticDecoder, trim_after_eos
from mambavlm.generation.mamba1 import MambaState, StatefulMambaMixer
from mambavlm.generation.settings import GenerationSettings
from mambavlm.llm.mamba2 import Mamba2State
from mambavlm.llm.mamba2_lm import SSDForCausalLM
from mambavlm.ops.dispatch import triton_runs_on
from mambavlm.ops.mamba_stack_step import MAX_GREEDY_STEPS, MambaStackStep, stack_step_unsupported
from mambavlm.ops.norm import add_rms_norm, rms_norm

__all__ = ["FUSED_STEP_MAX_BATCH", "WHOLE_BLOCK_MAX_BATCH", "StaticStateDecoder"]

WHOLE_BLOCK_MAX_BATCH = 2
"""The largest batch the fused step runs as whole-block kernels (``step_block``). Their projection
kernels take up to 4 sequences. On an H200 (2026-12-01, MambaVLM-2.8B shapes, bf16, random weights, 128
CUDA-graph steps, three alternating repeats; ``benchmarks/RESULTS.md`` a8) a whole step took, in ms,
whole-block against two kernels between cuBLAS's projections: 2.438-2.440 against 2.601-2.603 at 2
sequences, but 4.039-4.041 against 2.674-2.677 at 3 and 4.043-4.045 against 2.745-2.746 at 4 (3 runs
as 4: the kernels hold a power-of-two batch); fed the same tokens, both paths' logits stayed as close to
the unfused step's at every batch (float32: within 1e-3 over six steps)."""
FUSED_STEP_MAX_BATCH = 4
"""The largest batch the fused step runs at all; larger batches step unfused (mamba_ssm's conv update
and state update, cuBLAS's ``x_proj``). On an H200 (2026-12-01, MambaVLM-2.8B, bf16,
``benchmarks/RESULTS.md`` a4) the fused step took 2.81-2.84 ms per token at batch 4 against 3.09-3.10
unfused, but 4.29 at 16 and 7.79 at 64 against 3.42 and 4.62: past a few sequences ``x_proj`` is a
matrix product, and the split-K atomic adds (one per channel block, sequence and row) and the
per-sequence re-reads of its weight cost more than the launches saved."""


class StaticStateDecoder(StaticDecoder):
    """Prefill + per-token step of a ``MambaForCausalLM`` / ``SSDForCausalLM`` on static state.

    fused_step: Mamba-1 steps through Triton kernels (``mambavlm.ops.mamba_step``): up to
    ``WHOLE_BLOCK_MAX_BATCH`` sequences, each block in three (``StatefulMambaMixer.step_block``: norm +
    in_proj + conv + x_proj, dt + state update + gate, out_proj + residual add), the residual stream in
    float32 throughout (so with a ``residual_in_fp32`` model, or in float32, and bias-free
    projections); otherwise, up to ``FUSED_STEP_MAX_BATCH`` sequences, two kernels between cuBLAS's
    projections (``step_fused``); larger batches step unfused, where that is faster. Raises
    ValueError for it with another model, or without CUDA (Triton's interpreter,
    ``TRITON_INTERPRET=1``, runs it anywhere, slowly).

    persistent_step: one sequence steps through one persistent CUDA kernel for the whole model
    (``mambavlm.ops.mamba_stack_step``: every block, the final norm and lm_head in one launch), built with nvcc
    on first use; greedy decoding runs up to ``MAX_GREEDY_STEPS`` tokens in one launch (the argmax and the next
    token's embedding in the kernel, ``EOS_CHECK_INTERVAL`` tokens a launch where an EOS can end it), sampling
    one step a CUDA-graph replay; other batches step as ``fused_step`` says. Raises ValueError where it cannot
    run at batch 1 (``stack_step_unsupported``: not CUDA, before compute capability 9.0, no nvcc, a bias, ...).
    """

    supported_models = (MambaForCausalLM, SSDForCausalLM)

    def __init__(
        self, model: PreTrainedModel, cuda_graph: bool | None = None, fused_step: bool = False,
        persistent_step: bool = False,
    ) -> None:
        super().__init__(model, cuda_graph)
        if persistent_step:
            if not isinstance(model, MambaForCausalLM):
                raise ValueError(f"persistent_step runs Mamba-1 mixers; {type(model).__name__} has none")
            reason = stack_step_unsupported(model, 1)
            if reason is not None:
                raise ValueError(f"persistent_step cannot run this model: {reason}")
        if fused_step and not isinstance(model, MambaForCausalLM):
            raise ValueError(f"fused_step runs Mamba-1 mixers; {type(model).__name__} has none")
        if fused_step and not triton_runs_on(torch.empty(0, device=self.device)):
            raise ValueError("fused_step needs Triton on CUDA (or TRITON_INTERPRET=1 to interpret its kernels)")
        self.fused_step = fused_step
        self.persistent_step = persistent_step
        self._stack: MambaStackStep | None = None
        self.mamba1 = isinstance(model, MambaForCausalLM)
        layers = model.backbone.layers
        self.mamba1_mixers = [StatefulMambaMixer(layer.mixer) for layer in layers] if self.mamba1 else []
        self.mamba1_bias_free = all(
            mixer.mixer.in_proj.bias is None and mixer.mixer.out_proj.bias is None for mixer in self.mamba1_mixers
        )
        self._states: list[MambaState] | list[Mamba2State] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> StaticStateDecoder:
        return type(self)(copy.deepcopy(self.model, memo), self.cuda_graph, self.fused_step, self.persistent_step)

    def _allocate(self, batch: int, capacity: int) -> None:
        self._stack = None
        if self.mamba1:
            self._states = [mixer.allocate(batch) for mixer in self.mamba1_mixers]
            if self.persistent_step and batch == 1:
                self._stack = MambaStackStep(self.model, self._states)
        else:
            weight = self.model.get_input_embeddings().weight
            self._states = [
                layer.mixer.allocate_state(batch, weight.device, weight.dtype) for layer in self.model.backbone.layers
            ]

    def _blocks(self, hidden: Tensor, mixer_fn: Callable[[int, Tensor], Tensor], last_only: bool) -> Tensor:
        """The residual blocks: hidden -> norm -> mixer_fn(layer index, normed) -> + residual, each
        boundary's add + norm in one fused kernel on CUDA (``add_rms_norm``). Returns the final residual
        stream (B, L, D), or its last position (B, D) with ``last_only`` (the one the logits need)."""
        residual_in_fp32 = self.model.config.residual_in_fp32
        residual = None
        for index, layer in enumerate(self.model.backbone.layers):
            normed, residual = add_rms_norm(layer.norm, hidden, residual, residual_in_fp32, fused=True)
            hidden = mixer_fn(index, normed)
        if last_only:
            return residual[:, -1] + hidden[:, -1]
        return residual + hidden

    def _logits(self, hidden: Tensor) -> Tensor:
        """Last hidden state (B, D) -> float32 logits (B, V), through the final norm and lm_head."""
        hidden = rms_norm(self.model.backbone.norm_f, hidden)
        return self.model.lm_head(hidden.to(self.model.lm_head.weight.dtype)).float()

    def _whole_block_steps(self, batch: int) -> bool:
        """Whether the fused step runs each block in three kernels (``step_block``) at this batch."""
        config = self.model.config
        fp32_residual = config.residual_in_fp32 or self.model.get_input_embeddings().weight.dtype == torch.float32
        return (self.mamba1 and self.fused_step and self.mamba1_bias_free and fp32_residual
                and batch <= WHOLE_BLOCK_MAX_BATCH)

    def _fused_mixer_steps(self, batch: int) -> bool:
        """Whether the fused step runs the mixers' middle kernels (``step_fused``) at this batch."""
        return self.mamba1 and self.fused_step and batch <= FUSED_STEP_MAX_BATCH

    def _step_eager(self, input_ids: Tensor) -> Tensor:
        hidden = self.model.get_input_embeddings()(input_ids)
        if self._stack is not None:  # its logits are a buffer the next launch overwrites, as a graph's output is
            logits = self._stack(hidden.float())
            return logits if torch.cuda.is_current_stream_capturing() else logits.clone()
        if self._whole_block_steps(input_ids.shape[0]):
            residual = hidden.float()
            rows = self.model.backbone.layers[0].mixer.x_proj.out_features
            xdbl = torch.zeros(input_ids.shape[0], rows, device=residual.device)  # each block leaves it zero
            # the rows' sums of squares, ping-pong: block i reads squares[i % 2] (block 0 reduces its rows
            # itself), its in_proj zeroes squares[(i + 1) % 2] and its out_proj sums into it: no memset
            squares = torch.empty(2, input_ids.shape[0], device=residual.device)
            layers = self.model.backbone.layers
            for i, layer in enumerate(layers):
                after = layers[i + 1].mixer.in_proj.weight if i + 1 < len(layers) else self.model.lm_head.weight
                self.mamba1_mixers[i].step_block(residual, layer.norm, self._states[i], xdbl, next_weight=after,
                                                 sum_squares=(squares[i % 2] if i else None, squares[(i + 1) % 2]))
            return self._logits(residual)
        if self._fused_mixer_steps(input_ids.shape[0]):
            step = lambda i, x: self.mamba1_mixers[i].step_fused(x, self._states[i])
        elif self.mamba1:
            step = lambda i, x: self.mamba1_mixers[i].step(x, self._states[i])
        else:
            layers = self.model.backbone.layers
            step = lambda i, x: layers[i].mixer.step(x, self._states[i])
        return self._logits(self._blocks(hidden, step, last_only=False))

    def decode(
        self, logits: Tensor, settings: GenerationSettings, generator: torch.Generator | None = None
    ) -> Tensor:
        """From the prefill's logits (B, V): choose, step, repeat -> new token ids (B, T). With the persistent
        step, greedy decoding runs in the kernel (``_decode_in_kernel``); otherwise ``StaticDecoder.decode``."""
        if self._stack is None or settings.do_sample:
            return super().decode(logits, settings, generator)
        return self._decode_in_kernel(logits, settings)

    def _decode_in_kernel(self, logits: Tensor, settings: GenerationSettings) -> Tensor:
        """Greedy decoding of one sequence, many tokens a launch (``MambaStackStep.greedy``): the tokens
        ``StaticDecoder.decode`` chooses (the kernel's logits and argmax are the one-step path's bit for bit).
        Without EOS ids, ``MAX_GREEDY_STEPS`` tokens a launch and no sync; with them ``EOS_CHECK_INTERVAL``, the
        tokens of each launch copied to the host behind it and checked while the next one runs, so that the GPU
        never waits for the host and at most two launches' tokens follow the first EOS (trimmed, as there)."""
        total = settings.max_new_tokens
        tokens = torch.empty(1, total, dtype=torch.long, device=logits.device)
        tokens[:, 0] = torch.argmax(logits, dim=-1)
        eos = set(settings.eos_token_ids or ())
        chunk = EOS_CHECK_INTERVAL if eos else MAX_GREEDY_STEPS
        host = torch.empty(total, dtype=torch.long, pin_memory=True) if eos else None
        produced, copied = 1, 0  # tokens decoded, tokens sent to the host for the EOS check
        pending: list[tuple[torch.cuda.Event, int, int]] = []  # launches whose tokens are on their way to the host
        with torch.cuda.device(logits.device):
            while produced < total:
                steps = min(chunk, total - produced)
                self._stack.greedy(tokens[0, produced - 1 : produced], tokens[0, produced : produced + steps])
                self._length += steps
                produced += steps
                if host is None:
                    continue
                host[copied:produced].copy_(tokens[0, copied:produced], non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                pending.append((event, copied, produced))
                copied = produced
                if len(pending) == 2:  # the launch before this one is done: did its tokens end the sequence?
                    event, start, end = pending.pop(0)
                    event.synchronize()
                    if eos.intersection(host[start:end].tolist()):
                        break
        eos_ids = torch.tensor(sorted(eos), device=logits.device) if eos else None
        return trim_after_eos(tokens[:, :produced], eos_ids)

    def _prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None) -> Tensor:
        padding = attention_mask
        if self._stack is not None:  # the weights may have changed in place since the last prefill
            self._stack.refresh()
        if self.mamba1:
            # Bias-free blocks keep a zero residual stream zero (see StatefulMambaMixer.prefill): more
            # left padding changes nothing, and the padding is zeroed once here, not in every layer.
            # (With an in_proj bias a padded position feeds the bias to the conv, as in transformers.)
            if self.mamba1_bias_free:
                inputs_embeds, padding = _align_length(inputs_embeds, padding)
            zeroed = padding is not None and self.mamba1_bias_free
            if zeroed:
                inputs_embeds = inputs_embeds * padding[:, :, None].to(inputs_embeds.dtype)
            hidden = self._blocks(
                inputs_embeds,
                lambda i, x: self.mamba1_mixers[i].prefill(x, padding, self._states[i], hidden_zeroed=zeroed),
                last_only=True,
            )
        else:
            layers = self.model.backbone.layers

            def prefill(i: int, x: Tensor) -> Tensor:
                layers[i].mixer.reset_state(self._states[i])
                return layers[i].mixer(x, self._states[i], padding)

            hidden = self._blocks(inputs_embeds, prefill, last_only=True)
        return self._logits(hidden)


LENGTH_MULTIPLE = 8
"""The Mamba-1 prefill pads the prompts on the left until batch x length is a multiple of this."""


def _align_length(inputs_embeds: Tensor, padding: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Left-pad (B, L, D) embeddings and their (B, L) mask so that B L is a multiple of
    ``LENGTH_MULTIPLE``; unchanged when it already is.

    The Mamba-1 prefill multiplies (D_out, D_in) weights with (D_in, B L) activations; with B L not
    a multiple of 8 their bf16 rows are not 16-byte aligned, which cuBLAS serves with slower
    kernels. For bias-free blocks (Mamba's), masked positions before a prompt leave its state and
    outputs unchanged.
    """
    batch, length, _ = inputs_embeds.shape
    if batch * length % LENGTH_MULTIPLE == 0:
        return inputs_embeds, padding
    extra = -length % LENGTH_MULTIPLE
    if padding is None:
        padding = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
    inputs_embeds = torch.cat([inputs_embeds.new_zeros(batch, extra, inputs_embeds.shape[-1]), inputs_embeds], dim=1)
    return inputs_embeds, torch.cat([padding.new_zeros(batch, extra), padding], dim=1)
