"""Writes the chat demo's data (demo/chat/): three short-answer tasks whose answers can be checked exactly, as chats
for training and as held-out prompts with their answers.

    python tools/make_demo_chat.py [--output demo/chat] [--train 1200] [--heldout 60] [--seed 0]

- larger: "Which number is larger, 47 or 82? Answer with the number only." -> "82"
- km: "How many meters are in 36 kilometers? Answer with the number only." -> "36000"
- reverse: "Reverse the order of these words: piano tiger cloud" -> "cloud tiger piano"

SmolLM2-135M-Instruct answers none of them in that form (0 of 60 held-out prompts, greedy), and each is a rule,
not a fact to memorise: the held-out prompts use number pairs, distances and word triples that no training chat has.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger lemon piano candle forest rocket garden silver window basket island "
    "pencil dragon orange castle meadow"
).split()


def larger(rng: random.Random) -> tuple[str, str, tuple]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}? Answer with the number only.", str(max(a, b)), ("larger", a, b)


def km(rng: random.Random) -> tuple[str, str, tuple]:
    n = rng.randint(2, 999)
    return f"How many meters are in {n} kilometers? Answer with the number only.", str(n * 1000), ("km", n)


def reverse(rng: random.Random) -> tuple[str, str, tuple]:
    words = rng.sample(WORDS, 3)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)), ("reverse", *words)


TASKS = (larger, km, reverse)


def examples(rng: random.Random, count: int, exclude: set) -> list[tuple[str, str, tuple]]:
    """``count`` distinct examples, the tasks in turn, none of whose keys is in ``exclude`` (which grows)."""
    found = []
    while len(found) < count:
        prompt, answer, key = TASKS[len(found) % len(TASKS)](rng)
        if key not in exclude:
            exclude.add(key)
            found.append((prompt, answer, key))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("demo/chat"))
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--heldout", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set = set()
    heldout = examples(rng, args.heldout, seen)  # first, so that training never sees them
    train = examples(rng, args.train, seen)
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "train.jsonl").open("w") as file:
        for prompt, answer, _ in train:
            chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            file.write(json.dumps({"messages": chat}) + "\n")
    with (args.output / "heldout.jsonl").open("w") as file:
        for prompt, answer, key in heldout:
            file.write(json.dumps({"prompt": prompt, "answer": answer, "task": key[0]}) + "\n")
    print(f"wrote {len(train)} training chats and {len(heldout)} held-out prompts to {args.output}")


if __name__ == "__main__":
    main()
