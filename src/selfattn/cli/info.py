"""``selfattn info``: versions, devices, and each backend: available (with its rank in ``auto``'s
order), or the reason it is not."""

from __future__ import annotations

import argparse
import json
import os
import platform

from .console import version

__all__ = ["cmd_info"]


def cmd_info(args: argparse.Namespace, con) -> int:
    """Versions, devices, and each backend: available, or why not."""
    import torch
    from rich.table import Table

    import selfattn
    from selfattn.backends import BACKENDS, candidates

    versions = {
        "selfattn": selfattn.__version__,
        "python": platform.python_version(),
        **{d: version(d) for d in ("torch", "numpy", "triton", "transformers", "matplotlib")},
        **{d: version(d) for d in ("rich", "safetensors")},
    }
    cpu = f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(), "detail": cpu}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            detail = f"{p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
            devices.append({"device": f"cuda:{i}", "name": p.name, "detail": detail})
    else:
        why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device seen"
        devices.append({"device": "cuda", "name": "-", "detail": why})
    backends = []
    for name, b in BACKENDS.items():
        why = b.unavailable()
        order = {dev: candidates(torch.device(dev)) for dev in ("cpu", "cuda")}
        rank = {
            dev: names.index(name) + 1 if name in names else None for dev, names in order.items()
        }
        detail = b.detail() if why is None and hasattr(b, "detail") else ""
        row = {
            "backend": name,
            "available": why is None,
            "reason": why or "",
            "auto_rank": rank,
            "detail": detail,
        }
        backends.append(row)
    if args.json:
        con.print_json(json.dumps({"versions": versions, "devices": devices, "backends": backends}))
        return 0
    t = Table(title="versions", title_justify="left")
    t.add_column("package")
    t.add_column("version")
    for k, v in versions.items():
        t.add_row(k, v)
    con.print(t)
    t = Table(title="devices", title_justify="left")
    for c in ("device", "name", "detail"):
        t.add_column(c)
    for d in devices:
        t.add_row(d["device"], d["name"], d["detail"])
    con.print(t)
    t = Table(title="backends (auto tries them by rank)", title_justify="left")
    for c in ("backend", "available", "rank cpu/cuda", "what runs / why not"):
        t.add_column(c)
    for b in backends:
        ok = "[green]yes[/]" if b["available"] else "[red]no[/]"
        rank = "/".join(str(b["auto_rank"][d] or "-") for d in ("cpu", "cuda"))
        t.add_row(b["backend"], ok, rank, b["reason"] or b["detail"])
    con.print(t)
    return 0
