"""Train the small GPT with its sequence sharded over processes by ring attention.

Every rank holds ``N / W`` tokens of each sequence (zigzag layout) and runs the whole model on
them; only attention needs the other ranks' tokens, and ``ring_attention`` passes their keys and
values around. Each rank's loss is its share of the global mean, the gradients are summed over
the ranks (as data-parallel training does), so every rank takes the same optimizer step as one
process that sees the whole sequence. This script checks that: after the sharded run, rank 0
trains the same model on the whole sequences in one process and compares the loss curves.

    torchrun --nproc-per-node 2 examples/train_gpt_ring.py            # gloo on the CPU
    torchrun --nproc-per-node 2 examples/train_gpt_ring.py --dtype float64

On GPUs (one per rank) the same script runs with ``--backend nccl``. The data are Python's own
help texts (``pydoc_data.topics``, character level), read and batched by
``selfattn.trainer`` as in ``examples/train_gpt.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from selfattn.bench.machine import cpu_info
from selfattn.distributed import ring_attention, shard
from selfattn.layers import MultiHeadSelfAttention
from selfattn.models import GPT
from selfattn.trainer import char_ids, load_corpus, random_windows


def batch(data: torch.Tensor, step: int, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """The same (B, N) inputs and next-character targets on every rank (seeded by the step)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return random_windows(data, args.batch_size, args.seq_len, gen)


def ring_self_attention(
    attn: MultiHeadSelfAttention, x: torch.Tensor, positions: torch.Tensor, layout: str
) -> torch.Tensor:
    """The layer's own projections, with :func:`ring_attention` in place of ``attention``.

    ``x`` (B, n, E) is this rank's shard; ``positions`` (n,) its tokens' global positions,
    which RoPE needs (the ring handles causal visibility by itself).
    """
    b, n, _ = x.shape
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
    q = q.view(b, n, hq, d).transpose(1, 2)  # (B, Hq, n, D)
    k = k.view(b, n, hkv, d).transpose(1, 2)  # (B, Hkv, n, D)
    v = v.view(b, n, hkv, d).transpose(1, 2)  # (B, Hkv, n, D)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope is not None:
        q, k = attn.rope(q, positions), attn.rope(k, positions)
    out = ring_attention(q, k, v, causal=attn.causal, window=attn.window, layout=layout)
    return attn.out(out.transpose(1, 2).reshape(b, n, hq * d))  # (B, n, E)


def sharded_logits(
    model: GPT, idx: torch.Tensor, positions: torch.Tensor, layout: str
) -> torch.Tensor:
    """GPT.forward on a shard of each sequence: (B, n) token ids -> (B, n, V) logits."""
    x = model.drop(model.tok(idx))  # (B, n, E)
    for blk in model.blocks:
        x = x + blk.drop(ring_self_attention(blk.attn, blk.norm1(x), positions, layout))
        x = x + blk.drop(blk.mlp(blk.norm2(x)))
    return model.head(model.norm(x))


def make_model(vocab: int, args: argparse.Namespace, device: torch.device):
    """The GPT (same seed, so the same weights everywhere), AdamW and its schedule."""
    torch.manual_seed(args.seed)
    model = GPT(
        vocab, max_len=args.seq_len, embed_dim=args.embed_dim, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, positions="rope",
        device=device, dtype=getattr(torch, args.dtype),
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)

    def factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loss_dtype(args: argparse.Namespace) -> torch.dtype:
    """The loss in float32 at least, so that float64 runs stay float64 throughout."""
    return torch.promote_types(getattr(torch, args.dtype), torch.float32)


def train_sharded(data: torch.Tensor, vocab: int, args, device) -> tuple[list[float], float]:
    """Every rank trains on its shards; returns the global mean loss per step and the seconds
    the steps took."""
    world = dist.get_world_size()
    model, opt, sched = make_model(vocab, args, device)
    loss_dtype = _loss_dtype(args)
    positions = shard(torch.arange(args.seq_len, device=device), dim=0, layout=args.layout)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = (t.to(device) for t in batch(data, step, args))
        x, y = shard(x, dim=1, layout=args.layout), shard(y, dim=1, layout=args.layout)
        logits = sharded_logits(model, x, positions, args.layout)  # (B, n, V)
        # this rank's share of the mean over all B * N targets
        loss = F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), y.flatten(), reduction="sum")
        loss = loss / (args.batch_size * args.seq_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # the ranks' shares add up to the whole gradient (one flat all-reduce)
        grads = [p.grad for p in model.parameters()]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the same on every rank now
        opt.step()
        sched.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
        if dist.get_rank() == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"[ring W={world}] step {step:4d}  loss {losses[-1]:.5f}", flush=True)
    return losses, time.perf_counter() - t0


def train_single(data: torch.Tensor, vocab: int, args, device) -> tuple[list[float], float]:
    """The same training in one process on whole sequences (the plain GPT.forward)."""
    model, opt, sched = make_model(vocab, args, device)
    loss_dtype = _loss_dtype(args)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = (t.to(device) for t in batch(data, step, args))
        logits = model(x)  # (B, N, V)
        loss = F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            print(f"[single]     step {step:4d}  loss {losses[-1]:.5f}", flush=True)
    return losses, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--embed-dim", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo, nccl)")
    ap.add_argument("--out", default="benchmarks/results/train_gpt_ring.json")
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    data, chars = char_ids(load_corpus())
    vocab = len(chars)
    ring, ring_s = train_sharded(data, vocab, args, device)
    dist.destroy_process_group()
    if rank != 0:
        return
    single, single_s = train_single(data, vocab, args, device)
    diffs = [abs(a - b) for a, b in zip(ring, single)]
    result = {
        "what": "GPT trained with its sequence sharded by ring attention vs one process",
        "command": f"torchrun --nproc-per-node {world} examples/train_gpt_ring.py "
        f"--dtype {args.dtype} --layout {args.layout}",
        "world_size": world,
        "backend": args.backend,
        "cpu": cpu_info(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "backend")},
        "loss_ring": ring,
        "loss_single": single,
        "max_abs_diff": max(diffs),
        "final_loss": {"ring": ring[-1], "single": single[-1]},
        "seconds_for_the_steps": {"ring": round(ring_s, 2), "single": round(single_s, 2)},
    }
    print(
        f"max |loss_ring - loss_single| over {args.steps} steps: {max(diffs):.3g} "
        f"(final {ring[-1]:.5f} vs {single[-1]:.5f}); ring {ring_s:.1f} s, single {single_s:.1f} s"
    )
    out = Path(args.out)
    if out.suffix == ".json" and args.dtype != "float32":
        out = out.with_name(f"{out.stem}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
