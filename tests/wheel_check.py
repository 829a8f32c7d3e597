"""The installed wheel as a user meets it (``make check-wheel``; not a pytest file).

Run by the wheel's virtual environment's python from a folder outside the checkout, with
``SELFATTN_CACHE`` pointing at an empty folder, so that the native engine builds from the
wheel's own sources. Checks: selfattn comes from the venv, not the checkout; the first process
builds the engine and says so in exactly one stderr line, a second process loads it silently;
``native`` is available and agrees with ``math`` (and the float64 specification) on small odd
shapes; ``selfattn info --json`` reports the build. Exits non-zero with the reason otherwise.

Usage: python wheel_check.py CHECKOUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BUILD_LINE = "selfattn: building the native CPU engine"
PROBE = "import selfattn; print(','.join(selfattn.available_backends()))"


def fail(why: str) -> None:
    raise SystemExit(f"check-wheel: FAILED: {why}")


def probe() -> tuple[list[str], str]:
    """A fresh process's available backends, and its stderr."""
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    if res.returncode != 0:
        fail(f"`import selfattn` failed:\n{res.stderr}")
    return res.stdout.strip().split(","), res.stderr


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    checkout = Path(sys.argv[1]).resolve()
    import selfattn

    where = Path(selfattn.__file__).resolve()
    cwd = Path.cwd().resolve()
    if checkout / "src" in where.parents or cwd == checkout or checkout in cwd.parents:
        fail(f"selfattn imported from {where}, run from {cwd}: the checkout's, not the wheel's")
    print(f"check-wheel: selfattn {selfattn.__version__} from {where.parent}")

    first, err = probe()  # builds the engine from the wheel's csrc/
    sys.stderr.write(err)
    if "native" not in first:
        from selfattn.backends.native import build

        fail(f"native missing from the installed wheel: {build.unavailable()}")
    if err.count(BUILD_LINE) != 1:
        fail(f"the first use printed {err.count(BUILD_LINE)} build lines, not 1:\n{err}")
    second, err = probe()
    if "native" not in second or err.strip():
        fail(f"a second process: backends {second}, stderr {err!r} (expected silence)")

    import torch

    from selfattn.testing import assert_close, ref_attention

    gen = torch.Generator().manual_seed(0)
    for kwargs, (hq, hkv, nq, nk, d) in [
        ({"causal": True}, (6, 3, 37, 53, 24)),
        ({"window": (5, 2)}, (3, 1, 29, 29, 40)),
        ({}, (2, 2, 1, 61, 33)),
    ]:
        q = torch.randn(2, hq, nq, d, generator=gen)
        k = torch.randn(2, hkv, nk, d, generator=gen)
        v = torch.randn(2, hkv, nk, d, generator=gen)
        got = selfattn.attention(q, k, v, backend="native", **kwargs)
        want = selfattn.attention(q, k, v, backend="math", **kwargs)
        what = f"native on {tuple(q.shape)} {kwargs}"
        torch.testing.assert_close(
            got, want, atol=1e-5, rtol=1e-5, msg=lambda m, w=what: f"{w}: {m}"
        )
        assert_close(got, ref_attention(q, k, v, **kwargs)[0], want, torch.float32, what)
    print("check-wheel: native agrees with math on 3 odd shapes")

    exe = Path(sys.executable).with_name("selfattn")
    res = subprocess.run([str(exe), "info", "--json"], capture_output=True, text=True)
    if res.returncode != 0:
        fail(f"selfattn info --json: exit {res.returncode}\n{res.stderr}")
    native = json.loads(res.stdout)["native_build"]
    cache = Path(os.environ["SELFATTN_CACHE"]).resolve()
    if native["state"] != "built" or cache not in Path(native["dir"]).resolve().parents:
        fail(f"selfattn info --json says {native}, expected built under {cache}")
    print(f"check-wheel: ok, the engine was built in {native['built']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
