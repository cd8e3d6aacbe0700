"""Building a million tokens stays fast (a smoke bound, not a benchmark)."""

from __future__ import annotations

import json
import random
import time

import pytest

from lit_qlp.data.sources import DatasetSource
from lit_qlp.data.text import TextDataModule
from tests.data.helpers import DEMO_MODEL, write_jsonl

# ----------------------------------------------------------------------------------------------------- performance

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can out some who them up into "
    "do than its time only could new these two may first then other after over any most like also made such where "
    "through long river valley garden north winter summer morning evening stone forest village water light small "
    "great old young green quiet bright heavy narrow ancient silver golden bird fox hare cedar orchard meadow honey "
    "seed path wall door window bridge hill cloud rain snow wind field harvest season market letter story journey "
    "travel walked carried remembered noticed gathered followed answered listened watched opened closed returned "
    "slowly quickly carefully gently almost always never often perhaps together beneath between beyond toward"
).split()


def english_like_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(n):
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            sentences = []
            for _ in range(rng.randint(3, 8)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(5, 18))]
                if rng.random() < 0.3:
                    words.insert(rng.randint(1, len(words) - 1), f"{rng.randint(2, 1999)},")
                sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
            paragraphs.append(" ".join(sentences))
        documents.append("\n\n".join(paragraphs))
    return documents


@pytest.mark.slow
def test_performance_one_million_tokens(tmp_path):
    """Build (read, tokenise, pack, write) and cache-read times for about 1,000,000 tokens of JSONL."""
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in english_like_documents(2850)])
    options = dict(eval_fraction=0.01, sequence_len=2048, seed=0, cache_dir=tmp_path / "cache")
    start = time.perf_counter()
    first = TextDataModule(datasets=[DatasetSource(str(path))], tokenizer_dir=DEMO_MODEL, **options)
    first.setup("fit")
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second = TextDataModule(datasets=[DatasetSource(str(path))], tokenizer_dir=DEMO_MODEL, **options)
    second.setup("fit")
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    read_tokens = sum(int(second.train_set[i]["input_ids"].numel()) for i in range(len(second.train_set)))
    iterate_seconds = time.perf_counter() - start
    tokens = json.loads((first.cache_path / "summary.json").read_text())["datasets"][0]["tokens"]
    size = path.stat().st_size / 1e6
    print(
        f"\n{tokens} tokens ({size:.1f} MB JSONL, {len(first.train_set)} + {len(first.eval_set)} sequences of 2048): "
        f"setup with build {build_seconds:.2f} s ({tokens / build_seconds:,.0f} tokens/s), setup from the cache "
        f"{read_seconds:.3f} s, then every training sequence read once {iterate_seconds:.2f} s"
    )
    assert read_tokens == len(second.train_set) * 2048
    assert 900_000 <= tokens <= 1_200_000
    assert second.cache_path == first.cache_path and len(second.train_set) == len(first.train_set)
