"""Fine-tuning a packaged encoder into a sentence classifier (the demo's "team hands us a model").

A plain PyTorch loop: dynamic padding, AdamW with linear decay, a fixed seed. The result is
saved with `save_pretrained` (model + tokenizer) atomically, so a later run reuses it.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from .sentiment_data import LABELS, Example


def length_grouped_batches(
    lengths: list[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Shuffled batches of similar-length examples: less padding, same randomness across epochs."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 16
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def finetune(
    base_model: Path,
    train: list[Example],
    out_dir: Path,
    epochs: float = 1.0,
    batch_size: int = 32,
    lr: float = 1e-4,
    max_length: int = 64,
    seed: int = 0,
    progress: Callable[[int, int, float], None] = lambda step, total, loss: None,
) -> Path:
    """Train a BertForSequenceClassification head + encoder on `train`; returns `out_dir`."""
    import torch
    import transformers
    from transformers import (
        AutoTokenizer,
        BertForSequenceClassification,
        get_linear_schedule_with_warmup,
    )

    transformers.logging.set_verbosity_error()  # "newly initialized head" is the point here

    torch.manual_seed(seed)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    model = BertForSequenceClassification.from_pretrained(
        str(base_model), num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    # The word-embedding table is half the parameters; freezing it halves optimizer work and keeps
    # the pre-trained vocabulary geometry, at no cost in accuracy for short sentiment snippets.
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    total = max(1, int(steps_per_epoch * epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    lengths = [len(e.text) for e in train]
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * total), total)
    rng = random.Random(seed)
    model.train()
    step = 0
    while step < total:
        for indices in length_grouped_batches(lengths, batch_size, rng):
            if step >= total:
                break
            batch = [train[i] for i in indices]
            encoded = tokenizer(
                [e.text for e in batch],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            labels = torch.tensor([e.label for e in batch])
            loss = model(**encoded, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            progress(step, total, loss.item())
    model.eval()
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    return out_dir
