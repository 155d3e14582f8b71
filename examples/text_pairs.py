"""Train a small transformer dual encoder on Bible paraphrase pairs and report test retrieval.

    python examples/text_pairs.py                       # defaults below
    python examples/text_pairs.py --steps 50 --max-pairs 3000   # a quick smoke run
    python examples/text_pairs.py --minilm              # also: all-MiniLM-L6-v2, zero-shot and fine-tuned

Queries: ASV verses; documents: the same verses in BBE (Basic English); test = held-out chapters.

The training loop is written out here from the library's parts (a batch
sampler, the encoder, InfoNCE, AdamW), so that any encoder with the same call
fits, MiniLM included. For the scratch encoder alone, the lab runs the same
loop with checkpoints, resume and a report:
``negbatch train --data bible --max-pairs 3000 --steps 50 --out runs/bible``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from negbatch import InfoNCE
from negbatch.data.text import TextPairs, bible_pairs
from negbatch.evaluation.retrieval import evaluate_retrieval
from negbatch.models.text import TextTokenizer, TransformerTextEncoder
from negbatch.sampling import RandomBatchSampler


def train_pairs(encoder, tokenize, pairs: TextPairs, loss, *, batch_size: int, steps: int, lr: float, seed: int,
                device: str) -> list[float]:
    """``steps`` AdamW steps of ``loss(encoder(queries), encoder(documents))`` on batches drawn without
    replacement (a new permutation each epoch, the short tail dropped); returns the losses."""
    torch.manual_seed(seed)  # dropout and sampled negatives
    sampler = RandomBatchSampler(len(pairs), batch_size, drop_last=True, shuffle_batches=False,
                                 generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.01)
    encoder.to(device).train()

    def embed(texts):
        return encoder({k: v.to(device) for k, v in tokenize(texts).items()})

    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        sampler.set_epoch(epoch)
        for idx in sampler:
            value = loss(embed([pairs.queries[i] for i in idx]), embed([pairs.documents[i] for i in idx]))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            losses.append(float(value.detach()))
            if len(losses) == steps:
                break
        epoch += 1
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-pairs", type=int, default=None)
    parser.add_argument("--documents", default="bbe", choices=["bbe", "web"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--negatives", default="all", help="'all' or K sampled negatives per query")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minilm", action="store_true")
    parser.add_argument("--minilm-steps", type=int, default=None, help="fine-tuning steps (default: steps // 4)")
    args = parser.parse_args()
    negatives = args.negatives if args.negatives == "all" else int(args.negatives)

    split = bible_pairs("asv", args.documents, seed=args.seed, max_pairs=args.max_pairs)
    train, test = split.train, split.test
    tok = TextTokenizer.train(train.queries + train.documents, vocab_size=16000, max_length=96)
    torch.manual_seed(args.seed)
    enc = TransformerTextEncoder(tok.vocab_size, dim=args.dim, depth=args.depth, heads=4, dropout=0.1, max_length=96)
    loss = InfoNCE(temperature=args.temperature, negatives=negatives, form="query_document", symmetric=True)
    start = time.perf_counter()
    losses = train_pairs(enc, tok, train, loss, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                         seed=args.seed, device=args.device)
    seconds = time.perf_counter() - start
    report = {
        "train_pairs": len(train), "test_queries": len(test), "batch_size": args.batch_size, "steps": args.steps,
        "negatives": args.negatives, "seed": args.seed, "train_seconds": round(seconds, 1),
        "loss_first10": round(sum(losses[:10]) / 10, 4), "loss_last10": round(sum(losses[-10:]) / 10, 4),
        "scratch": evaluate_retrieval(enc, tok, test, device=args.device),
    }
    print(json.dumps(report, indent=1), flush=True)
    if args.minilm:
        from negbatch.models.text import SentenceTransformerEncoder, load_minilm

        st_enc = SentenceTransformerEncoder(load_minilm(args.device))
        report["minilm_zero_shot"] = evaluate_retrieval(st_enc, st_enc.tokenize, test, device=args.device)
        print(json.dumps({"minilm_zero_shot": report["minilm_zero_shot"]}, indent=1), flush=True)
        fine_tune_steps = args.minilm_steps if args.minilm_steps is not None else max(args.steps // 4, 1)
        fine_tune_loss = InfoNCE(temperature=args.temperature, negatives=negatives, form="query_document", symmetric=True)
        train_pairs(st_enc, st_enc.tokenize, train, fine_tune_loss, batch_size=min(args.batch_size, 64),
                    steps=fine_tune_steps, lr=2e-5, seed=args.seed, device=args.device)
        report["minilm_fine_tuned"] = evaluate_retrieval(st_enc, st_enc.tokenize, test, device=args.device)
        print(json.dumps({"minilm_fine_tuned": report["minilm_fine_tuned"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
