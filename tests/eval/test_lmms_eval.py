"""lmms-eval runs MambaVLM through its plugin entry point, offline, on small local tasks written here:
``python -m lmms_eval --model mambavlm --model_args pretrained=DIR ...``. The answers lmms-eval logs
must be the model's own (``MambaVLM.generate`` / ``continuation_logprobs`` on the same prompts).
Skipped where lmms-eval (the ``lmms-eval`` extra) is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.model import MambaVLM
from tests.conftest import ROOT, subprocess_env, tiny_vlm

pytest.importorskip("lmms_eval")

UTILS = '''
from pathlib import Path
from PIL import Image

ROOT = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(ROOT / doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return ["red", "green", "blue", "yellow"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''

GENERATE_TASK = '''task: shapes_generate
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''

def test_lmms_eval_runs_mambavlm_offline(tmp_path: Path) -> None:
    model = tiny_vlm(seed=5)
    with torch.no_grad():  # wide random matrices: answers that differ between questions
        for weight in model.llm.parameters():
            if weight.dim() == 2:
                weight.normal_(std=0.5)
    model.save_pretrained(tmp_path / "model")
    tasks = tmp_path / "tasks"
    _, val = make_shapes_vqa(tasks, 0, 4, image_size=32)
    docs = [
        {"image": r["image"], "question": r["conversations"][0]["value"].replace("<image>\n", ""),
         "answer": r["conversations"][1]["value"], "label": 0}
        for r in json.loads(val.read_text())
    ]
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "shapes_generate.yaml").write_text(GENERATE_TASK.format(data=data))
    env = subprocess_env()
    env.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    result = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "mambavlm",
         "--model_args", f"pretrained={tmp_path / 'model'}", "--device", "cpu", "--batch_size", "2",
         "--tasks", "shapes_generate", "--include_path", str(tasks),
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    [path] = (tmp_path / "out").rglob("*_samples_shapes_generate.jsonl")
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    loaded = MambaVLM.from_pretrained(tmp_path / "model").eval()
    images = [Image.open(tasks / d["image"]).convert("RGB") for d in docs]
    expected = loaded.answer(images, [d["question"] for d in docs], max_new_tokens=3)
    generated = {s["doc_id"]: s["filtered_resps"] for s in samples}
    assert [generated[i] for i in range(len(docs))] == expected and len(set(expected)) > 1


def test_loglikelihood_is_the_mean_negative_log_likelihood_lmms_eval_takes_the_argmin_of(tmp_path: Path) -> None:
    # lmms-eval's multiple_choice scoring picks argmin over the returned numbers (its LLaVA model returns
    # the LM loss); ours: -(sum of the continuation's token log-probs) / its token count.
    from lmms_eval.api.instance import Instance

    from mambavlm.eval.lmms_eval_model import MambaVLMLmms

    model = tiny_vlm(seed=6)
    model.save_pretrained(tmp_path / "model")
    lmm = MambaVLMLmms(pretrained=str(tmp_path / "model"), device="cpu")
    red = Image.new("RGB", (32, 32), (230, 30, 30))
    lmm.task_dict = {"t": {"test": {0: {"image": red}, 1: {"image": None}}}}
    visual = lambda doc: [doc["image"]] if doc["image"] is not None else []  # noqa: E731
    def request(args: tuple, doc_id: int) -> Instance:
        return Instance("loglikelihood", args, doc_id, {"task": "t", "doc_id": doc_id, "repeats": 1})

    requests = [
        request(("what color is it ?", " red square", visual, 0, "t", "test"), 0),
        request(("how many objects are there ?", "two", visual, 1, "t", "test"), 1),
    ]
    got = lmm.loglikelihood(requests)
    want = [lmm.model.continuation_logprobs([red], ["what color is it ?"], [" red square"])[0],
            lmm.model.continuation_logprobs(None, ["how many objects are there ?"], ["two"])[0]]
    assert got[0][0] == pytest.approx(-want[0][0] / 2) and got[1][0] == pytest.approx(-want[1][0])
    assert [g[1] for g in got] == [w[1] for w in want]
    with pytest.raises(ValueError, match="2 images; a MambaVLM takes one image per prompt"):
        lmm.loglikelihood([request(("q", "a", lambda doc: [red, red], 0, "t", "test"), 0)])
