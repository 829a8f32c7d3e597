"""``selfattn train``: the small GPT or ViT trained with a progress bar (loss, tokens/s); the
checkpoint, results, loss curve and attention pictures land in ``--out``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .console import UsageError, out_dir, progress

__all__ = ["cmd_train"]


def cmd_train(args: argparse.Namespace, con) -> int:
    """Train with a progress bar; checkpoint, loss curve and attention pictures into --out."""
    import torch

    from selfattn.testing import torch_threads
    from selfattn.trainer import TrainConfig

    out = out_dir(args.out)
    cfg = TrainConfig(
        task=args.model,
        steps=args.steps,
        batch_size=args.batch_size or 0,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here")
    with torch_threads(args.threads):
        return _train_with_bar(args, cfg, out, con)


def _train_with_bar(args: argparse.Namespace, cfg, out: Path, con) -> int:
    from selfattn.trainer import train

    with progress(con) as bar:
        task = bar.add_task(f"train {args.model}", total=args.steps, info="")

        def on_step(step: int, loss: float, tps: float) -> None:
            bar.update(task, completed=step, info=f"loss {loss:.3f}  {tps:,.0f} tokens/s")

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            bar.console.print(f"step {step}: {shown}", markup=False)

        try:
            res = train(cfg, out, resume=args.resume, on_step=on_step, on_eval=on_eval)
        except KeyboardInterrupt:
            bar.stop()
            why = f"interrupted: continue from the last checkpoint with --resume --out {out}"
            print(why, file=sys.stderr)
            return 130
        bar.update(task, completed=args.steps)
    if res["start_step"] >= args.steps:
        con.print(f"the checkpoint is already at step {res['start_step']}: nothing to train")
    final = "  ".join(f"{k} {v:.4f}" for k, v in res["final"].items())
    steps = f"steps {res['start_step']}..{res['step']} in {res['wall_time_s']:.1f} s"
    con.print(f"{res['params']:,} parameters, {steps}; {final}", markup=False)
    con.print(f"written to {out}:", markup=False)
    for k, p in res["files"].items():
        con.print(f"  {k:<10} {p}", markup=False, soft_wrap=True)
    return 0
