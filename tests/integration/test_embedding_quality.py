"""Embedding quality: the MLX encoder against sentence-transformers (torch CPU) on the
same all-MiniLM-L6-v2 directory, over a fixed multilingual sample, plus semantic sanity."""

from __future__ import annotations

import numpy as np
import pytest

from server.embeddings.encoder import Encoder

LONG_PARAGRAPH = (
    "Sentence embeddings map a piece of text to a single fixed-size vector so that texts "
    "with similar meanings end up close to each other. A typical model starts from a "
    "pretrained transformer encoder such as BERT, runs every token through several layers "
    "of self-attention and feed-forward blocks, and then pools the resulting token vectors, "
    "most often by averaging them while ignoring padding. The model is then fine-tuned on "
    "large collections of sentence pairs, for example questions and their answers, titles "
    "and abstracts, or duplicate posts from community forums, with a contrastive objective "
    "that pulls matching pairs together and pushes the other pairs in the batch apart. The "
    "result is useful for semantic search, clustering, deduplication and retrieval-augmented "
    "generation, where a query is embedded once and compared with millions of stored "
    "document vectors using a simple dot product. Because the vectors are normalized, the "
    "dot product equals the cosine similarity, which keeps the arithmetic cheap and the "
    "scores easy to compare across queries and collections of documents."
)

SAMPLE = [
    "The weather is lovely today, let's go for a walk in the park.",
    "Le chat dort paisiblement sur le canapé du salon.",
    "Ich habe gestern ein sehr interessantes Buch über Geschichte gelesen.",
    "¿Dónde está la estación de tren más cercana?",
    "机器学习是人工智能的一个重要分支。",
    "今日はとても良い天気ですね。散歩に行きましょう。",
    "Москва — столица России и крупнейший город страны.",
    "القراءة غذاء العقل والروح.",
    "🎉🔥 Party tonight!!! 🍕🍻😂",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    LONG_PARAGRAPH,
    "Hello",
    "a",
]

# (anchor, related, unrelated): the anchor must score higher with `related`.
# all-MiniLM-L6-v2 is an English model, so the pairs are English prose and code.
SEMANTIC_TRIPLES = [
    (
        "def add(a, b):\n    return a + b",
        "A function that returns the sum of two numbers.",
        "The cathedral was built in the twelfth century.",
    ),
    (
        "for line in open('data.txt'):\n    print(line.strip())",
        "Read a text file and print every line.",
        "Penguins live mostly in the southern hemisphere.",
    ),
    (
        "How do I sort a list in Python?",
        "sorted(my_list) returns a new list in ascending order.",
        "The recipe calls for two cups of flour and an egg.",
    ),
    (
        "A man is playing the guitar on stage.",
        "A musician performs a song with his guitar.",
        "The stock market fell sharply this morning.",
    ),
    (
        "The cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "Quarterly revenue exceeded analyst expectations.",
    ),
]


@pytest.fixture(scope="module")
def reference(minilm: Encoder):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - depends on the test environment
        pytest.skip(
            f"sentence-transformers is not installed ({exc}); "
            "pip install 'sentence-transformers>=3' to run the reference comparison"
        )
    return SentenceTransformer(str(minilm.path), device="cpu")


def _embed(enc: Encoder, texts: list[str]) -> np.ndarray:
    return enc.embed_ids(enc.tokenize(texts))


def test_sample_covers_lengths(minilm: Encoder):
    lengths = [len(ids) for ids in minilm.tokenize(SAMPLE)]
    assert 180 <= max(lengths) <= minilm.max_length, lengths
    assert min(lengths) == 3  # [CLS] a [SEP]


def test_matches_sentence_transformers(minilm: Encoder, reference):
    mine = _embed(minilm, SAMPLE)
    theirs = reference.encode(SAMPLE, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    assert mine.shape == theirs.shape == (len(SAMPLE), 384)
    np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-3)
    cos = (mine * theirs).sum(axis=1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(theirs, axis=1))
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.999, f"min cosine {cos.min():.6f} on {SAMPLE[worst]!r}"


def test_batching_matches_one_at_a_time(minilm: Encoder):
    batched = _embed(minilm, SAMPLE)
    single = np.concatenate([_embed(minilm, [t]) for t in SAMPLE])
    assert np.abs(batched - single).max() < 1e-5


def test_semantic_sanity(minilm: Encoder):
    for anchor, related, unrelated in SEMANTIC_TRIPLES:
        a, r, u = _embed(minilm, [anchor, related, unrelated])
        rel, unrel = float(a @ r), float(a @ u)
        assert rel > unrel + 0.05, f"{anchor!r}: related {rel:.3f} vs unrelated {unrel:.3f}"
