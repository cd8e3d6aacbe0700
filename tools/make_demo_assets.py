"""Build the bundled demo assets: a tiny pre-trained Llama model and a LoRA fine-tuning data set.

Usage:
    python tools/make_demo_assets.py

Writes, relative to the repository root:
    demo/model/  Hugging Face checkpoint loadable offline with ``AutoModelForCausalLM`` / ``AutoTokenizer``:
                 config.json, generation_config.json, model.safetensors (float32), tokenizer.json,
                 tokenizer_config.json and a chat template. The tokenizer is a 2048-entry byte-level BPE
                 trained on the pre-training corpus; the model is a ~0.8M parameter Llama pre-trained on it
                 for a few hundred CPU steps.
    demo/data/train.jsonl  Fine-tuning documents (``{"text": ...}`` per line): invented field-guide entries.
    demo/data/notes.txt    One extra plain-text document in the same style, for the .txt loader.

The pre-training corpus is the docstrings of a fixed list of Python standard-library modules, so nothing is
downloaded. Every random choice is seeded, so rerunning the script on the same machine and package versions
rewrites byte-identical files.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import random
import time
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "demo" / "model"
DATA_DIR = ROOT / "demo" / "data"

SEED = 1234
VOCAB_SIZE = 2048
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MIN_DOC_CHARS = 40

# Docstrings are part of the CPython sources, so the corpus depends on the Python version rather than on the
# machine (a few members are platform-specific); modules needing optional extensions (ssl, sqlite3, tkinter) are
# left out.
CORPUS_MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.streams", "asyncio.tasks", "base64", "bisect", "calendar",
    "cmd", "codecs", "collections", "collections.abc", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "doctest", "email.message", "email.utils", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "hmac", "html", "html.parser",
    "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "linecache", "logging", "mailbox", "math", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "pickletools", "plistlib", "poplib", "pprint", "pydoc", "queue", "random", "runpy", "sched", "selectors", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "trace", "traceback", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile", "zipimport",
)  # fmt: skip

# Fine-tuning grammar: invented nature notes, far from the docstring corpus in topic and layout, and rigid
# enough that a LoRA fine-tune picks up the pattern within a few dozen steps.
GRAMMAR = {
    "colour": ("Amber", "Silver", "Copper", "Violet", "Ashen", "Golden", "Moss", "Pale", "Crimson", "Dusky"),
    "creature": ("glimmerfox", "thornhare", "mistowl", "reedling", "pebblebat", "fernmole", "dewfinch", "bramblecat",
                 "moonvole", "larkhound", "quillrat", "saltheron"),
    "place": ("misty cedar valleys", "salt marshes", "quiet birch groves", "high chalk meadows", "slow river banks",
              "old orchard walls", "windy heather moors", "shaded fern gullies"),
    "region": ("the northern coast", "the Lantern Hills", "the Amberwold", "the Seven Fords", "Hollow Vale"),
    "call": ("a soft, rising whistle", "a low, hollow hoot", "two sharp clicks", "a purring trill",
             "a thin silver chirp"),
    "repeats": ("twice", "three times", "four times", "until answered"),
    "gift": ("a bowl of warm water", "a handful of oats", "a saucer of honey", "a pile of dry leaves",
             "a bright button"),
    "spot": ("by the door", "under the hedge", "beside the well", "on the garden wall", "near the woodpile"),
    "season": ("the first frost", "the spring thaw", "midsummer", "the harvest moon", "the autumn rains"),
}  # fmt: skip
FOODS = ("wild honey", "beetles", "fallen plums", "clover seeds", "river snails", "acorns", "moth larvae",
         "sweet moss", "blackberries", "tiny minnows")  # fmt: skip

PRETRAIN = {
    "seq_len": 128,
    "batch_size": 16,
    "steps": 300,
    "lr": 3e-3,
    "warmup": 30,
    "weight_decay": 0.1,
    "eval_windows": 32,
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}:\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)


def stdlib_docstrings() -> list[str]:
    """Collects the docstrings of the corpus modules and of their public classes, methods and functions.

    Returns:
        Unique docstrings in a fixed order (module list order, then sorted member names).
    """
    docs: dict[str, None] = {}

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        # Very short docstrings ("Return self.") are near-duplicates that only add noise.
        if doc and len(doc) >= MIN_DOC_CHARS:
            docs.setdefault(doc.strip(), None)

    # Touching deprecated aliases (typing.io, typing.re) warns; the warnings are irrelevant here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in CORPUS_MODULES:
            module = importlib.import_module(module_name)
            add(module)
            for name in sorted(vars(module)):
                obj = vars(module)[name]
                if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                    continue
                if inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    add(obj)
                elif inspect.isclass(obj):
                    add(obj)
                    for attr in sorted(vars(obj)):
                        if not attr.startswith("_") and callable(vars(obj)[attr]):
                            add(vars(obj)[attr])
    return list(docs)


def field_guide_entry(rng: random.Random, number: int) -> str:
    """Generates one invented field-guide entry from the template grammar.

    Args:
        rng: Seeded random source; all choices are drawn from it, slot by slot in a fixed order.
        number: Entry number printed in the title.

    Returns:
        The entry as multi-line text; it stays under 128 tokens with the demo tokenizer, BOS and EOS included.
    """
    pick = {slot: rng.choice(options) for slot, options in GRAMMAR.items()}
    food_a, food_b = rng.sample(FOODS, 2)
    return (
        f"Field Guide Entry {number}: The {pick['colour']} {pick['creature'].title()}\n"
        f"Habitat: {pick['place']} of {pick['region']}\n"
        f"Diet: {food_a} and {food_b}\n"
        f"Call: {pick['call']}, repeated {pick['repeats']}\n"
        f"Tip: Leave {pick['gift']} {pick['spot']} before {pick['season']}."
    )


def write_data(rng: random.Random, n_train: int = 400) -> list[str]:
    """Writes the fine-tuning documents and the extra plain-text note.

    Args:
        rng: Seeded random source.
        n_train: Number of train.jsonl documents.

    Returns:
        The train documents.
    """
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    train = [field_guide_entry(rng, number) for number in range(1, n_train + 1)]
    with open(DATA_DIR / "train.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for text in train:
            f.write(json.dumps({"text": text}) + "\n")
    notes = "\n\n".join(field_guide_entry(rng, number) for number in range(n_train + 1, n_train + 6)) + "\n"
    (DATA_DIR / "notes.txt").write_text(notes, encoding="utf-8", newline="\n")
    return train


def train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer and wraps it as a Llama-style fast tokenizer.

    Args:
        corpus: Training texts.

    Returns:
        Tokenizer that prepends BOS to every encoded text and knows BOS/EOS/PAD and the chat template.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        # The full byte alphabet guarantees any input is encodable even if a byte never occurs in the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, corpus: list[str]) -> torch.Tensor:
    """Encodes documents as one packed stream, each document as BOS + text + EOS.

    Args:
        tokenizer: Tokenizer that adds BOS itself.
        corpus: Documents.

    Returns:
        1-D tensor of token ids.
    """
    ids: list[int] = []
    # The backend tokenizer skips the max-length warning that long docstrings would trigger; windows are cut later.
    for encoding in tokenizer.backend_tokenizer.encode_batch(corpus):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, count: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Draws ``count`` random contiguous windows of ``seq_len`` tokens.

    Args:
        stream: Packed token ids.
        count: Number of windows.
        seq_len: Window length.
        gen: Seeded generator for the start offsets.

    Returns:
        Tensor of shape (count, seq_len).
    """
    starts = torch.randint(0, len(stream) - seq_len, (count,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, batch: torch.Tensor) -> float:
    """Returns the model's mean next-token loss on a batch; leaves the model in eval mode."""
    model.eval()
    return model(input_ids=batch, labels=batch).loss.item()


def pretrain(model: LlamaForCausalLM, stream: torch.Tensor) -> None:
    """Pre-trains the model on random windows of the token stream with AdamW and warmup + cosine decay.

    Args:
        model: Freshly initialised model, trained in place.
        stream: Packed pre-training token ids; the last 5% are held out for the before/after loss.
    """
    cfg = PRETRAIN
    split = int(len(stream) * 0.95)
    train_ids, eval_ids = stream[:split], stream[split:]
    gen = torch.Generator().manual_seed(SEED)
    eval_batch = sample_windows(eval_ids, cfg["eval_windows"], cfg["seq_len"], gen)

    # Norm gains and biases are not decayed, as is usual for transformer pre-training.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:
        if step < cfg["warmup"]:
            return (step + 1) / cfg["warmup"]
        progress = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    eval_before = mean_loss(model, eval_batch)
    print(f"pretrain: {len(train_ids):,} train tokens, held-out loss before {eval_before:.4f}")
    model.train()
    for step in range(cfg["steps"]):
        batch = sample_windows(train_ids, cfg["batch_size"], cfg["seq_len"], gen)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step == 0 or (step + 1) % 50 == 0:
            print(f"pretrain step {step + 1:4d}/{cfg['steps']}  train loss {loss.item():.4f}")
    print(f"pretrain: held-out loss after {mean_loss(model, eval_batch):.4f}")


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Creates the randomly initialised tiny Llama model matching the tokenizer's special ids."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(torch.float32)


def main() -> None:
    """Generates the data, trains tokenizer and model, and saves everything under demo/."""
    start = time.perf_counter()
    # A fixed thread count keeps CPU reduction order, and therefore the saved weights, reproducible.
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    train_docs = write_data(random.Random(SEED))
    corpus = stdlib_docstrings()
    print(f"pretraining corpus: {len(corpus)} docstrings, {sum(map(len, corpus)):,} characters")
    print(f"fine-tuning data: {len(train_docs)} documents in {DATA_DIR.relative_to(ROOT)}")

    tokenizer = train_tokenizer(corpus)
    model = build_model(tokenizer)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    pretrain(model, token_stream(tokenizer, corpus))

    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR)
    tokenizer.save_pretrained(MODEL_DIR)
    print(f"saved model and tokenizer to {MODEL_DIR.relative_to(ROOT)} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
