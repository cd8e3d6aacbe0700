"""The chat demo's verdict: held-out accuracy of the base model and of the trained adapter (``make demo-chat``).

    python tools/demo_chat.py --model runs/smollm2 --adapter runs/demo-chat/epoch1 [--heldout demo/chat/heldout.jsonl]

Each held-out prompt (tools/make_demo_chat.py) is answered greedily by the base model and by base + adapter, with
the chat template as served; an answer is right when it is exactly the expected one (surrounding spaces and a
final period aside). Prints a few answers side by side and the accuracy per task and overall.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from lit_qlp.export.generate import Decoding, generate, load_model


def is_right(answer: str, expected: str) -> bool:
    return answer.strip().rstrip(".").strip() == expected


def heldout_accuracy(model_dir: Path, adapter: Path, heldout: Path, max_new_tokens: int = 16) -> dict:
    """Both models' answers to every held-out prompt and their accuracy: ``{"base": {...}, "adapter": {...}}``,
    each with ``answers``, ``right`` per task and ``accuracy`` overall."""
    records = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in records]
    model, tokenizer = load_model(model_dir, adapter)
    decoding = Decoding(max_new_tokens=max_new_tokens)
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, decoding)
    adapted = generate(model, tokenizer, prompts, decoding)
    totals = Counter(r["task"] for r in records)
    results = {}
    for name, answers in (("base", base), ("adapter", adapted)):
        right = Counter(r["task"] for r, a in zip(records, answers) if is_right(a, r["answer"]))
        results[name] = {
            "answers": answers,
            "right": {task: right[task] for task in totals},
            "accuracy": sum(right.values()) / len(records),
        }
    results["tasks"] = dict(totals)
    results["records"] = records
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the base model directory")
    parser.add_argument("--adapter", type=Path, required=True, help="the trained adapter (an epoch export)")
    parser.add_argument("--heldout", type=Path, default=Path("demo/chat/heldout.jsonl"))
    parser.add_argument("--json", type=Path, help="also write the answers and accuracies here")
    args = parser.parse_args()
    results = heldout_accuracy(args.model, args.adapter, args.heldout)
    records = results["records"]
    for i in range(0, len(records), max(1, len(records) // 6)):
        print(f"prompt:   {records[i]['prompt']}\nexpected: {records[i]['answer']}")
        print(f"base:     {results['base']['answers'][i]!r}\nadapter:  {results['adapter']['answers'][i]!r}\n")
    print("| held-out accuracy | " + " | ".join(results["tasks"]) + " | all |")
    print("| --- |" + " --- |" * (len(results["tasks"]) + 1))
    for name in ("base", "adapter"):
        right = results[name]["right"]
        cells = " | ".join(f"{right[t]}/{n}" for t, n in results["tasks"].items())
        print(f"| {name} | {cells} | {results[name]['accuracy']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps({k: results[k] for k in ("base", "adapter", "tasks")}, indent=2))


if __name__ == "__main__":
    main()
