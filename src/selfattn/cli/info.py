"""``selfattn info``: versions, devices, and each backend: available (with its rank in ``auto``'s
order), or the reason it is not; where the native engine's build lives and its state.
``--build`` builds the engine first (again, if a failed build is recorded)."""

from __future__ import annotations

import argparse
import json
import os
import platform

from .console import version

__all__ = ["cmd_info"]


NOT_BUILT = (
    "not built yet: the first native call builds it (a minute or two), "
    "or `selfattn info --build` now"
)
BUILDING = "being built by another process now"


def cmd_info(args: argparse.Namespace, con) -> int:
    """Versions, devices, each backend (available, or why not) and the native build; with
    ``--build``, build the native engine first: 1 if it fails."""
    import torch
    from rich.table import Table

    import selfattn
    from selfattn.backends import BACKENDS, candidates
    from selfattn.backends.native import build

    built_ok = True
    if getattr(args, "build", False):
        try:
            build.load(rebuild=True)
        except build.BuildError:
            built_ok = False  # the reason is in the native build table below
    native = build.status()

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
        # info only looks: an engine not built yet is not built here (that takes a minute)
        pending = {"not built": NOT_BUILT, "building": BUILDING}.get(native["state"])
        why = pending if name == "native" and pending else b.unavailable()
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
        info = {"versions": versions, "devices": devices, "backends": backends}
        con.print_json(json.dumps({**info, "native_build": native}))
        return 0 if built_ok else 1
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
    con.print(_build_table(native))
    return 0 if built_ok else 1


def _build_table(native: dict):
    """The native engine's build: where it lives, its state, and the record behind the state."""
    from rich.table import Table

    t = Table(title="native engine build", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("folder", native["dir"] or "-")
    colour = {"built": "green", "failed": "red", "unavailable": "red"}.get(
        native["state"], "yellow"
    )
    t.add_row("state", f"[{colour}]{native['state']}[/]")
    done = native["built"]
    if native["state"] == "built" and done:
        took = f" in {done['seconds']:.0f} s" if done.get("seconds") is not None else ""
        t.add_row("built", f"{done.get('when', '?')}{took}, {done.get('compiler', '?')}")
    if native["reason"]:
        t.add_row("why", native["reason"])
    if native["log"]:
        t.add_row("log", native["log"])
    if native["state"] == "not built":
        t.add_row("next", NOT_BUILT.split(": ", 1)[1])
    return t
