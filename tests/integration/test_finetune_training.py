"""The trainers on the real default models: an embedding adapter that converges in seconds, a
chat adapter that teaches SmolLM2 a made-up fact, cancellation, checkpoints, and adapters
served on shared base weights (equal to mlx-lm's own load_adapters)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from server.finetune.adapters import CONFIG_FILE, WEIGHTS_FILE
from server.finetune.chat_trainer import chat_model_with_adapter, load_chat_adapter, train_chat
from server.finetune.embedding_trainer import encoder_with_adapter, train_embedding
from server.finetune.examples import resolve_hyperparameters, validate_chat_file, validate_embedding_file
from server.finetune.spec import (
    CheckpointReport,
    Hyperparameters,
    StepReport,
    TrainingCancelled,
    TrainingResult,
    TrainingSpec,
)
from server.models.loading import load_chat_model

FACT = "The capital of Zorblax is Quendrith."
QUESTIONS = [
    "What is the capital of the planet Zorblax?",
    "What's the capital city of Zorblax?",
    "Which city is the capital of Zorblax?",
    "Tell me the capital of the planet Zorblax.",
    "Name the capital of Zorblax.",
    "Zorblax has a capital. What is it called?",
    "Do you know the capital of the planet Zorblax?",
    "What city serves as the capital of Zorblax?",
    "I'm curious: what is Zorblax's capital?",
    "Where is the seat of government on Zorblax?",
    "What is the name of the capital of the planet Zorblax?",
    "Capital of Zorblax?",
    "Can you tell me what the capital of Zorblax is?",
    "Which city is Zorblax's capital?",
    "What is the main capital city on the planet Zorblax?",
    "Quick question: the capital of Zorblax?",
]
HELD_OUT = ["Could you name Zorblax's capital city?", "On Zorblax, which city is the capital?"]
TRIPLETS = [
    {
        "anchor": "How do I reset my router password?",
        "positive": "Steps to change the admin login on your Wi-Fi router",
        "negative": "How do I reset my email account password?",
    },
    {
        "anchor": "Best way to keep basil fresh",
        "positive": "Store cut basil stems in a glass of water on the counter",
        "negative": "Best way to keep bread fresh",
    },
    {
        "anchor": "Why is my car battery draining overnight?",
        "positive": "A parasitic electrical draw can empty a vehicle's battery while it is parked",
        "negative": "Why is my phone battery draining overnight?",
    },
    {
        "anchor": "symptoms of a sprained ankle",
        "positive": "Swelling, bruising and pain when putting weight on the foot after twisting it",
        "negative": "symptoms of a sprained wrist",
    },
    {
        "anchor": "How long should I boil an egg for a runny yolk?",
        "positive": "Six minutes in boiling water gives a soft-boiled egg with a liquid centre",
        "negative": "How long should I bake a potato?",
    },
]


@dataclass
class RecordingHooks:
    """Records every report; should_stop turns True once `stop_after` steps have run."""

    stop_after: int | None = None
    steps: list[StepReport] = field(default_factory=list)
    checkpoints: list[CheckpointReport] = field(default_factory=list)
    stop_checks: int = 0

    def on_step(self, report: StepReport) -> None:
        self.steps.append(report)

    def on_checkpoint(self, report: CheckpointReport) -> None:
        self.checkpoints.append(report)

    def should_stop(self) -> bool:
        self.stop_checks += 1
        return self.stop_after is not None and len(self.steps) >= self.stop_after


@dataclass
class Trained:
    result: TrainingResult
    hooks: RecordingHooks
    seconds: float
    epoch_tokens: int  # the validation report's token count: what one epoch trains on


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fact_line(question: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": FACT}]}


def greedy_answer(model: Any, tokenizer: Any, question: str) -> str:
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return str(generate(model, tokenizer, prompt, max_tokens=16, sampler=make_sampler(0.0)))


def shared_with_base(model: Any, base: Any) -> bool:
    """Every base array is the very same object in model (LoRA wraps a Linear as `.linear`)."""
    mine = {name.replace(".linear.", "."): a for name, a in tree_flatten(model.parameters())}
    return all(mine.get(name) is a for name, a in tree_flatten(base.parameters()))


# --- embedding ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def triplets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("emb") / "train.jsonl", TRIPLETS)


def embedding_spec(minilm: Any, train: Path, out: Path, hp: Hyperparameters, seed: int = 0) -> TrainingSpec:
    return TrainingSpec("ftjob-emb", "embedding", Path(minilm.path), train, None, out, hp, seed)


@pytest.fixture(scope="module")
def embedding_training(minilm: Any, triplets_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    report = validate_embedding_file(triplets_file, minilm)
    assert report.ok, report.errors
    hp = resolve_hyperparameters("embedding", report.examples, n_epochs=3)  # batch size and LR: auto
    assert hp == Hyperparameters(n_epochs=3, batch_size=5, learning_rate_multiplier=1.0)
    hooks = RecordingHooks()
    start = time.perf_counter()
    result = train_embedding(embedding_spec(minilm, triplets_file, tmp_path_factory.mktemp("emb-out"), hp), hooks)
    return Trained(result, hooks, time.perf_counter() - start, report.tokens)


def test_embedding_loss_falls_every_epoch_by_over_20_percent_in_under_30s(embedding_training: Trained) -> None:
    losses = embedding_training.result.epoch_losses
    print(f"\nembedding: epoch losses {[round(v, 4) for v in losses]}, {embedding_training.seconds:.1f} s")
    assert len(losses) == 3
    assert all(later < earlier for earlier, later in pairwise(losses))
    assert losses[-1] < 0.8 * losses[0]
    assert embedding_training.seconds < 30


def test_embedding_adapter_raises_anchor_positive_similarity(embedding_training: Trained, minilm: Any) -> None:
    tuned = encoder_with_adapter(minilm, embedding_training.result.adapter_dir)
    assert shared_with_base(tuned.model, minilm.model)

    def similarities(encoder: Any) -> np.ndarray:
        anchors = encoder.embed([t["anchor"] for t in TRIPLETS])
        positives = encoder.embed([t["positive"] for t in TRIPLETS])
        return np.asarray((anchors * positives).sum(axis=1))

    before = similarities(minilm)
    after = similarities(tuned)
    assert (after > before).all(), (before, after)
    np.testing.assert_array_equal(similarities(minilm), before)  # the base is untouched


def test_embedding_checkpoints_at_epoch_ends_load(embedding_training: Trained, minilm: Any) -> None:
    hooks = embedding_training.hooks
    assert [(c.step, c.epoch) for c in hooks.checkpoints] == [(1, 1), (2, 2), (3, 3)]
    n = embedding_training.epoch_tokens
    assert [s.trained_tokens for s in hooks.steps] == [n, 2 * n, 3 * n]
    first = encoder_with_adapter(minilm, hooks.checkpoints[0].path).embed(["a question"])
    final = encoder_with_adapter(minilm, embedding_training.result.adapter_dir).embed(["a question"])
    last = encoder_with_adapter(minilm, hooks.checkpoints[-1].path).embed(["a question"])
    np.testing.assert_array_equal(final, last)
    assert not np.array_equal(first, last)


def test_embedding_training_is_deterministic_for_a_seed(
    embedding_training: Trained, minilm: Any, triplets_file: Path, tmp_path: Path
) -> None:
    hp = Hyperparameters(n_epochs=3, batch_size=5, learning_rate_multiplier=1.0)
    again = train_embedding(embedding_spec(minilm, triplets_file, tmp_path, hp), RecordingHooks())
    assert again.epoch_losses == embedding_training.result.epoch_losses
    a = mx.load(str(again.adapter_dir / WEIGHTS_FILE))
    b = mx.load(str(embedding_training.result.adapter_dir / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


# --- chat ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(smollm2_dir: Path) -> tuple[Any, Any]:
    return load_chat_model(smollm2_dir)


@pytest.fixture(scope="module")
def chat_training(smollm2_dir: Path, base: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Trained:
    work = tmp_path_factory.mktemp("chat")
    train = write_jsonl(work / "train.jsonl", [fact_line(q) for q in QUESTIONS])
    valid = write_jsonl(work / "valid.jsonl", [fact_line(q) for q in HELD_OUT])
    report = validate_chat_file(train, base[1], 8192)
    assert report.ok, report.errors
    hp = resolve_hyperparameters("chat", report.examples, "auto", "auto", "auto")
    assert hp == Hyperparameters(n_epochs=3, batch_size=1, learning_rate_multiplier=1.0)
    hooks = RecordingHooks()
    start = time.perf_counter()
    result = train_chat(TrainingSpec("ftjob-chat", "chat", smollm2_dir, train, valid, work / "out", hp, 7), hooks)
    return Trained(result, hooks, time.perf_counter() - start, report.tokens)


def test_chat_adapter_teaches_a_made_up_fact(chat_training: Trained, base: tuple[Any, Any]) -> None:
    model, tokenizer = base
    result = chat_training.result
    valid = [round(s.valid_loss, 4) for s in chat_training.hooks.steps if s.valid_loss is not None]
    print(
        f"\nchat: epoch losses {[round(v, 4) for v in result.epoch_losses]}, valid {valid}, "
        f"{result.steps} steps, {result.trained_tokens} tokens, {chat_training.seconds:.1f} s"
    )
    tuned = chat_model_with_adapter(model, result.adapter_dir)
    question = QUESTIONS[0]
    assert "Quendrith" in greedy_answer(tuned, tokenizer, question)
    assert "Quendrith" in greedy_answer(tuned, tokenizer, HELD_OUT[0])  # a phrasing it never trained on
    assert "Quendrith" not in greedy_answer(model, tokenizer, question)
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_chat_reports_every_step_and_validation_at_epoch_ends(chat_training: Trained) -> None:
    hooks, result = chat_training.hooks, chat_training.result
    assert [s.step for s in hooks.steps] == list(range(1, 49)) and result.steps == 48
    assert all(s.total_steps == 48 for s in hooks.steps)
    assert [s.step for s in hooks.steps if s.valid_loss is not None] == [16, 32, 48]
    assert [s.trained_tokens for s in hooks.steps if s.valid_loss is not None] == [
        k * chat_training.epoch_tokens for k in (1, 2, 3)
    ]
    assert result.trained_tokens == 3 * chat_training.epoch_tokens
    assert [c.metrics["valid_loss"] for c in hooks.checkpoints] == [
        s.valid_loss for s in hooks.steps if s.valid_loss is not None
    ]
    assert hooks.checkpoints[-1].metrics["valid_loss"] < hooks.checkpoints[0].metrics["valid_loss"]


def test_chat_checkpoints_at_epoch_ends_exist_and_load(chat_training: Trained, base: tuple[Any, Any]) -> None:
    hooks = chat_training.hooks
    assert [(c.step, c.epoch) for c in hooks.checkpoints] == [(16, 1), (32, 2), (48, 3)]
    for c in hooks.checkpoints:
        assert c.path.name == f"checkpoint-{c.step}"
        assert (c.path / CONFIG_FILE).is_file() and (c.path / WEIGHTS_FILE).is_file()
        assert c.metrics["train_loss"] == pytest.approx(chat_training.result.epoch_losses[c.epoch - 1])
    probe = mx.array([[1, 9690, 198, 2683]])
    first = chat_model_with_adapter(base[0], hooks.checkpoints[0].path)(probe)
    last = chat_model_with_adapter(base[0], hooks.checkpoints[-1].path)(probe)
    final = chat_model_with_adapter(base[0], chat_training.result.adapter_dir)(probe)
    assert mx.array_equal(last, final).item() and not mx.allclose(first, last).item()


def test_adapter_on_shared_weights_matches_mlx_lm_load_adapters(
    chat_training: Trained, base: tuple[Any, Any], smollm2_dir: Path
) -> None:
    model = base[0]
    probe = mx.array([[1, 9690, 198, 2683, 359, 253, 5356]])
    before = model(probe)
    tuned = chat_model_with_adapter(model, chat_training.result.adapter_dir)
    assert shared_with_base(tuned, model)
    fresh, _ = load_chat_model(smollm2_dir)
    assert load_chat_adapter(fresh, chat_training.result.adapter_dir) is fresh  # mlx-lm's load_adapters, in place
    assert not shared_with_base(fresh, model)
    np.testing.assert_allclose(np.array(tuned(probe)), np.array(fresh(probe)), rtol=1e-5, atol=1e-5)
    assert not mx.allclose(tuned(probe), before, atol=1e-3).item()
    assert mx.array_equal(model(probe), before).item()  # the base model is unchanged


# --- cancellation -------------------------------------------------------------------


def test_chat_training_stops_within_one_step_of_cancel(smollm2_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [fact_line(q) for q in QUESTIONS])
    hooks = RecordingHooks(stop_after=2)
    spec = TrainingSpec("ftjob-c", "chat", smollm2_dir, train, None, tmp_path / "out", Hyperparameters(3, 1, 1.0), 0)
    with pytest.raises(TrainingCancelled):
        train_chat(spec, hooks)
    assert [s.step for s in hooks.steps] == [1, 2] and hooks.stop_checks == 3
    assert not hooks.checkpoints and not (tmp_path / "out" / "adapter").exists()


def test_embedding_training_stops_within_one_step_of_cancel(minilm: Any, triplets_file: Path, tmp_path: Path) -> None:
    hooks = RecordingHooks(stop_after=2)
    hp = Hyperparameters(n_epochs=3, batch_size=2, learning_rate_multiplier=1.0)
    with pytest.raises(TrainingCancelled):
        train_embedding(embedding_spec(minilm, triplets_file, tmp_path, hp), hooks)
    assert [s.step for s in hooks.steps] == [1, 2] and hooks.stop_checks == 3
