"""LoRA fine-tuning of sentence encoders (server/embeddings/encoder.py) on anchor /
positive (/ negative) examples, and serving an encoder with a trained adapter.

Choices, and why:
- LoRA, not full fine-tuning: a fine-tuned embedding model is served next to its base on
  the same weights (`encoder_with_adapter`), an adapter is ~1% of the model on disk, and a
  handful of examples cannot wreck the base's general geometry. Rank 8, scale 20 on every
  Linear of every layer (query/key/value, attention output, intermediate, output).
- Loss: MultipleNegativesRanking (InfoNCE), as sentence-transformers trains these models.
  For anchor i the candidates are every positive and every explicit negative in the batch;
  the target is positive i; scores are cosine similarities x SCALE (20, its default).
  Every other example in the batch is a real negative, so a batch of 5 triplets gives each
  anchor 9 wrong candidates (4 positives, 5 negatives), and lines without a "negative"
  still train. A triplet margin loss would see only one negative per anchor.
- Adam at BASE_LEARNING_RATE x learning_rate_multiplier, constant. 5 triplets for 3 epochs
  at the auto batch size (the whole set) is 3 steps, and the loss must fall every epoch:
  on MiniLM 5e-5 takes it 2.46 -> 1.06 -> 0.12 while an unrelated pair's cosine stays put
  (0.055 -> 0.058); 1e-3 collapsed the space (that pair went to 0.66 in two steps).
- The exact pooling of the base (mean/cls/lasttoken), then L2 normalization for the cosine.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from server.embeddings.encoder import Encoder, EncoderModel, right_pad
from server.engine import host
from server.finetune.adapters import LoraSettings, add_lora, apply_adapter, rebuild_sharing_weights, save_adapter
from server.finetune.examples import EmbeddingExample, load_embedding_examples
from server.finetune.loop import run_training
from server.finetune.spec import TrainingHooks, TrainingResult, TrainingSpec

BASE_LEARNING_RATE = 5e-5
SCALE = 20.0  # cosine similarity -> logit
LORA = LoraSettings(rank=8, scale=20.0, dropout=0.0)


class EmbeddingRun:
    """Encoder, optimizer and tokenized examples of one run (a `Trainable` for the loop)."""

    def __init__(
        self,
        encoder: Encoder,
        train: list[EmbeddingExample],
        valid: list[EmbeddingExample],
        batch_size: int,
        learning_rate: float,
        adapter_config: dict[str, object],
    ):
        self.encoder = encoder
        self.train = [encoder.tokenize(list(e.texts)) for e in train]
        self.valid = [encoder.tokenize(list(e.texts)) for e in valid]
        self.batch_size = batch_size
        self.adapter_config = adapter_config
        self.optimizer = optim.Adam(learning_rate=learning_rate)
        self.loss_and_grad = nn.value_and_grad(encoder.model, self.loss)

    def embed(self, texts: list[list[int]]) -> mx.array:
        ids, mask = right_pad(texts, self.encoder.pad_id, self.encoder.max_length)
        pooled = self.encoder.pooling.pool(self.encoder.model(ids, mask), mask)
        return pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    def loss(self, examples: list[list[list[int]]]) -> mx.array:
        """Mean InfoNCE over the batch; all texts go through the encoder in one padded batch."""
        anchors = [e[0] for e in examples]
        candidates = [e[1] for e in examples] + [e[2] for e in examples if len(e) > 2]
        vectors = self.embed(anchors + candidates)
        a, c = vectors[: len(anchors)], vectors[len(anchors) :]
        scores = SCALE * (a @ c.T)
        return nn.losses.cross_entropy(scores, mx.arange(len(anchors)), reduction="mean")

    def train_step(self, batch: list[int]) -> tuple[float, int]:
        examples = [self.train[i] for i in batch]
        loss, grads = self.loss_and_grad(examples)
        self.optimizer.update(self.encoder.model, grads)
        mx.eval(loss, self.encoder.model.trainable_parameters(), self.optimizer.state)
        return loss.item(), sum(len(ids) for e in examples for ids in e)

    def valid_loss(self) -> float | None:
        if not self.valid:
            return None
        losses = [
            host.float_item(self.loss(self.valid[i : i + self.batch_size])) * len(self.valid[i : i + self.batch_size])
            for i in range(0, len(self.valid), self.batch_size)
        ]
        return sum(losses) / len(self.valid)

    def save_adapter(self, directory: Path) -> None:
        save_adapter(self.encoder.model, directory, self.adapter_config)


def train_embedding(spec: TrainingSpec, hooks: TrainingHooks) -> TrainingResult:
    """Train a LoRA adapter for the encoder at spec.base_path (see the module docstring)."""
    encoder = Encoder.load(spec.base_path)
    train = load_embedding_examples(spec.train_file, encoder)
    valid = load_embedding_examples(spec.validation_file, encoder) if spec.validation_file else []
    mx.random.seed(spec.seed)
    config = add_lora(encoder.model, LORA, {"model_kind": "embedding", "base_model": str(spec.base_path)})
    encoder.model.train()
    hp = spec.hyperparameters
    run = EmbeddingRun(encoder, train, valid, hp.batch_size, BASE_LEARNING_RATE * hp.learning_rate_multiplier, config)
    return run_training(run, len(train), hp, spec.seed, hooks, spec.output_dir)


def encoder_with_adapter(base_encoder: Encoder, adapter_dir: Path) -> Encoder:
    """An `Encoder` with the adapter whose network shares every base weight array with base_encoder
    (tokenizer, pooling and limits are the base's)."""
    base = base_encoder
    model = rebuild_sharing_weights(base.model, lambda: EncoderModel(base.model.config))
    apply_adapter(model, adapter_dir)
    return Encoder(model, base.tokenizer, base.pooling, base.max_length, base.pad_id, base.path)
