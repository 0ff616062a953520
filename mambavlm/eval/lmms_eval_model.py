"""MambaVLM as an lmms-eval model: ``python -m lmms_eval --model mambavlm --model_args pretrained=DIR --tasks ...``.

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (``pyproject.toml``: ``mambavlm =
"mambavlm.eval.lmms_eval_model:manifest"``), so installing mambavlm with lmms-eval present (``pip install
"mambavlm[lmms-eval]"``) is all it takes; nothing is loaded with ``trust_remote_code``. This module
needs lmms-eval (imported at the top, as lmms-eval's own model modules do); the rest of mambavlm does not.

``generate_until``: greedy (or sampled, with ``temperature`` > 0) answers through ``MambaVLM.answer``,
in batches of ``batch_size`` requests sharing their generation arguments, cut at the first ``until``
string as lmms-eval's models do. ``loglikelihood``: ``MambaVLM.continuation_logprobs`` as the mean negative
log-likelihood per token, lmms-eval's LLaVA convention (see the method). A request with
more than one image is an error naming it: a MambaVLM takes one image per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm

from mambavlm.model import MambaVLM

__all__ = ["MambaVLMLmms", "manifest"]

MODEL_NAME = "mambavlm"
CLASS_PATH = "mambavlm.eval.lmms_eval_model.MambaVLMLmms"


def manifest() -> Any:
    """The entry point lmms-eval loads: a ``ModelManifest`` naming this module's class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def _one_image(visuals: Sequence[Any], where: str) -> Image.Image | None:
    images = [v for v in visuals if v is not None]
    if len(images) > 1:
        raise ValueError(f"{where}: {len(images)} images; a MambaVLM takes one image per prompt")
    if images and not isinstance(images[0], Image.Image):
        raise ValueError(f"{where}: expected a PIL image, got {type(images[0]).__name__}")
    return images[0].convert("RGB") if images else None


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class MambaVLMLmms(lmms):
    """A saved MambaVLM (``save_pretrained`` directory) for lmms-eval.

    pretrained: the model directory. device: "cuda", "cpu", ... (lmms-eval's ``--device``; default: this
    process's accelerator device). batch_size: requests per ``generate`` call (lmms-eval's
    ``--batch_size``; a number). max_batch_size: lmms-eval passes it for its automatic batch sizing,
    which needs ``batch_size=auto``; given with a number it changes nothing. max_new_tokens: the
    default when a task sets none.
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int | str = 64,
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"mambavlm needs a fixed batch size >= 1, got batch_size={batch_size!r}")
        accelerator = Accelerator()
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.model = MambaVLM.from_pretrained(pretrained).to(device or accelerator.device).eval()
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _visual(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Image.Image | None:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return _one_image(visuals or [], f"{task}/{split} doc {doc_id}")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="mambavlm generate_until")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.pop("until", [])
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.pop("temperature", 0) or 0)
            max_new_tokens = int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
            if int(gen_kwargs.pop("num_beams", 1) or 1) != 1:
                raise ValueError("mambavlm decodes greedily or by sampling; num_beams > 1 is not supported")
            sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                contexts, images = [], []
                for index in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    contexts.append(context)
                    images.append(self._visual(doc_to_visual, doc_id, task, split))
                texts = self.model.answer(images, contexts, max_new_tokens=max_new_tokens, **sample)
                for index, text in zip(batch, texts):
                    answers[index] = _cut(text, until)
                progress.update(len(batch))
        progress.close()
        return [a if a is not None else "" for a in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(score, is_greedy) per request, where score is the continuation's mean negative log-likelihood
        per token: what lmms-eval's reference LLaVA model returns (the LM loss over the continuation) and
        what its ``multiple_choice`` scoring takes the ``argmin`` of, not the summed log-probability its
        API docstring names."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="mambavlm loglikelihood"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            image = self._visual(doc_to_visual, doc_id, task, split)
            (logprob, greedy), = self.model.continuation_logprobs([image], [context], [continuation])
            num_tokens = len(self.model.tokenizer.encode(continuation, add_special_tokens=False))
            results.append((-logprob / num_tokens, greedy))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("mambavlm answers one round per request; multi-round tasks are not supported")

    def __repr__(self) -> str:
        return f"MambaVLMLmms({self.model.config.name}, batch_size={self.batch_size})"
