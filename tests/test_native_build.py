"""The native engine's build as an installed library lives it: the one stderr line of a build, a
failed build recorded on disk and not retried by the next process (nor by one waiting on the
lock), rebuilds on demand, stale folders cleaned, ``selfattn info`` (``--build``, ``--json``)
reporting the build without making one, ninja found off PATH, and the wheel carrying csrc/.

A failing compile is a real one: ``CXX`` points to a small shell script that answers
``--version`` and fails every compile (logging each call), in processes of their own with
``SELFATTN_CACHE`` in a temporary folder. ``make check-wheel`` covers a successful build from an
installed wheel (a minute or two)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from selfattn.backends.native import build, cache

ROOT = Path(__file__).resolve().parents[1]
LOAD = "from selfattn.backends import native; print(repr(native.unavailable()))"
ERROR = "kernels.cpp:1:1: error: no vectors today"


def fake_compiler(tmp_path: Path, gate: Path | None = None) -> Path:
    """A compiler that fails every compile (after ``gate`` exists, if given), logging each call
    in ``calls``."""
    fake = tmp_path / "fake-g++"
    wait = f'while [ ! -e "{gate}" ]; do sleep 0.1; done\n' if gate else ""
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "fake g++ 1.0"; exit 0; fi\n'
        f'echo compile >> "{tmp_path / "calls"}"\n'
        f"{wait}"
        f'echo "{ERROR}" >&2; exit 1\n'
    )
    fake.chmod(0o755)
    return fake


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, CXX=str(fake_compiler(tmp_path)), SELFATTN_CACHE=str(tmp_path / "c"))
    env.pop("SELFATTN_NATIVE_REBUILD", None)
    return {**env, **extra}


def calls(tmp_path: Path) -> int:
    path = tmp_path / "calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300
    )


def folders(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "c").glob("native-*"))


def test_failed_build_is_recorded_and_a_second_process_does_not_rebuild(tmp_path):
    env = env_for(tmp_path)
    first = run(["-c", LOAD], env)
    n = calls(tmp_path)
    assert n >= 1 and ERROR in first.stdout and "(recorded" in first.stdout
    assert first.stderr.count("selfattn: building the native CPU engine") == 1
    (folder,) = folders(tmp_path)
    rec = json.loads((folder / "failed.json").read_text())
    assert rec["reason"] == f"C++ build failed: {ERROR}" and rec["compiler"] == "fake g++ 1.0"
    assert rec["log"] == str(folder / "failed.log") and ERROR in Path(rec["log"]).read_text()

    second = run(["-c", LOAD], env)
    assert calls(tmp_path) == n  # the compiler never ran again
    assert second.stderr == ""  # no build line: nothing is being built
    (line,) = second.stdout.strip().splitlines()
    assert (
        ERROR in line and f"(recorded {rec['when']}; rebuild with `selfattn info --build`" in line
    )
    assert "SELFATTN_NATIVE_REBUILD=1" in line


def test_rebuild_env_and_flag_try_a_recorded_failure_again(tmp_path):
    env = env_for(tmp_path)
    run(["-c", LOAD], env)
    n = calls(tmp_path)
    again = run(["-c", LOAD], {**env, "SELFATTN_NATIVE_REBUILD": "1"})
    assert calls(tmp_path) == 2 * n and ERROR in again.stdout
    res = run(["-m", "selfattn.backends.native.build", "--rebuild"], env)
    assert res.returncode == 1 and calls(tmp_path) == 3 * n
    assert f"selfattn native: unavailable: C++ build failed: {ERROR}" in res.stderr
    res = run(["-m", "selfattn.backends.native.build"], env)  # without --rebuild: the record
    assert res.returncode == 1 and calls(tmp_path) == 3 * n and "(recorded" in res.stderr


def test_a_process_waiting_on_the_build_lock_reads_the_failure_instead_of_compiling(tmp_path):
    """Two processes at once: the second waits on the folder's lock (and says so), then finds
    the first one's record; without the lock both would compile into the same folder."""
    gate = tmp_path / "gate"
    env = env_for(tmp_path)
    env["CXX"] = str(fake_compiler(tmp_path, gate))
    first = subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while calls(tmp_path) == 0:  # the first process is compiling (and holds the lock)
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    second = subprocess.Popen(
        [sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    waiting = second.stderr.readline().decode()
    assert waiting.startswith("selfattn: waiting for another process building the native")
    n = calls(tmp_path)
    gate.touch()
    out1, _ = first.communicate(timeout=240)
    out2, err2 = second.communicate(timeout=240)
    assert ERROR in out1.decode() and "(recorded" in out2.decode()
    assert calls(tmp_path) == n and err2.decode() == ""  # the second never compiled


def test_info_build_retries_a_recorded_failure_and_exits_1(tmp_path):
    env = env_for(tmp_path)
    run(["-c", LOAD], env)
    n = calls(tmp_path)
    res = run(["-m", "selfattn", "info", "--json", "--build"], env)
    assert res.returncode == 1 and calls(tmp_path) == 2 * n
    assert res.stderr.count("selfattn: building the native CPU engine") == 1
    info = json.loads(res.stdout)
    nb = info["native_build"]
    assert nb["state"] == "failed" and nb["dir"] == str(folders(tmp_path)[0])
    assert ERROR in nb["reason"] and nb["log"].endswith("failed.log")
    row = next(b for b in info["backends"] if b["backend"] == "native")
    assert not row["available"] and row["reason"] == nb["reason"]
    res = run(["-m", "selfattn", "info"], env)  # the tables: the folder, the state, the log
    assert res.returncode == 0 and calls(tmp_path) == 2 * n
    assert "native engine build" in res.stdout and "failed" in res.stdout


def test_info_reports_a_build_not_made_yet_without_making_it(tmp_path):
    env = env_for(tmp_path)
    res = run(["-m", "selfattn", "info", "--json"], env)
    assert res.returncode == 0 and res.stderr == "" and calls(tmp_path) == 0
    info = json.loads(res.stdout)
    nb = info["native_build"]
    assert nb["state"] == "not built" and nb["dir"].startswith(str(tmp_path / "c" / "native-"))
    assert not Path(nb["dir"]).exists()
    row = next(b for b in info["backends"] if b["backend"] == "native")
    assert not row["available"] and row["reason"].startswith("not built yet")
    assert "selfattn info --build" in row["reason"]


def test_info_without_a_compiler_says_why(tmp_path):
    env = env_for(tmp_path, CXX="/nonexistent/g++")
    info = json.loads(run(["-m", "selfattn", "info", "--json"], env).stdout)
    nb = info["native_build"]
    assert nb["state"] == "unavailable" and nb["dir"] is None
    assert "no C++ compiler found" in nb["reason"]


def test_the_built_engine_is_reported_and_its_use_stamped():
    """The engine this suite runs on: ``status`` and ``info --json`` say built, where, and each
    load stamps the folder's last use (what stale cleanup reads)."""
    if build.unavailable() is not None:
        pytest.skip(build.unavailable())
    folder = build.build_dir()
    stamp = folder / cache.LAST_USE
    old = time.time() - 40 * 86400
    os.utime(stamp, (old, old))
    res = run(["-m", "selfattn", "info", "--json"], dict(os.environ))
    assert stamp.stat().st_mtime > old + 86400  # the load (info's backend row) stamped it
    nb = json.loads(res.stdout)["native_build"]
    assert nb["state"] == "built" and nb["dir"] == str(folder) and nb["reason"] == ""
    assert nb["built"]["torch"] and nb["built"]["compiler"]


def test_sources_changed_during_a_build_do_not_enter_it_under_the_old_hash(tmp_path, monkeypatch):
    """A checkout rebased while the engine builds: the build hashed the sources, then compiled
    whatever was on disk, so a folder named for the old sources held objects of new ones (seen
    in a session). Now the compiles read the snapshot that was hashed, copied into the build
    folder. The fake compiler edits the checkout's csrc/ at its first call and logs what it was
    asked to compile."""
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    victim = csrc / "kernels_generic.cpp"
    original = victim.read_bytes()
    fake = tmp_path / "fake-g++"
    log = tmp_path / "compiled"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "fake g++ 1.0"; exit 0; fi\n'
        f'echo "// a rebase" >> "{victim}"\n'
        'src=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = "-c" ] && src="$a"; prev="$a"; done\n'
        f'echo "$src" >> "{log}"\n'
        'echo "error: stop here" >&2; exit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(build, "CSRC", csrc)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("SELFATTN_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("SELFATTN_NATIVE_REBUILD", raising=False)
    snap = {p.relative_to(csrc).as_posix(): p.read_bytes() for p in build.sources()}
    folder = build.build_dir("fake g++ 1.0", snap)
    with pytest.raises(build.BuildError, match="stop here"):
        build._load(rebuild=False)
    assert victim.read_bytes() != original  # the checkout did change under the build
    compiled = [Path(line) for line in log.read_text().splitlines()]
    assert compiled and all(p.parent == folder / "src" for p in compiled)
    assert (folder / "src" / "kernels_generic.cpp").read_bytes() == original
    for rel, data in snap.items():  # the folder's name is the hash of what it compiled
        assert (folder / "src" / rel).read_bytes() == data


def test_clean_stale_removes_only_our_old_unlocked_folders(tmp_path):
    import fcntl

    old = time.time() - 40 * 86400
    names = {
        "keep": "native-00000000000000aa",
        "stale": "native-00000000000000bb",
        "recent": "native-00000000000000cc",
        "locked": "native-00000000000000dd",
        "stamped": "native-00000000000000ee",  # an old folder whose last-use stamp is recent
        "other": "smollm2-135m",
        "odd": "native-notahash",
    }
    for what, name in names.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "x.o").write_text("x")
        if what != "recent":
            os.utime(folder, (old, old))
        if what == "stamped":
            (folder / cache.LAST_USE).touch()
    with open(tmp_path / names["locked"] / cache.LOCK, "a") as fh:
        os.utime(tmp_path / names["locked"], (old, old))
        fcntl.flock(fh, fcntl.LOCK_EX)  # a build in progress there
        removed = cache.clean_stale(keep=tmp_path / names["keep"])
    assert removed == [tmp_path / names["stale"]]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(n for w, n in names.items() if w != "stale")


def test_ninja_off_path_is_found_through_the_ninja_package(tmp_path, monkeypatch):
    """A venv used without activation has its ninja off PATH: the build puts the ninja
    package's binary there for the build only."""
    pytest.importorskip("ninja")
    from torch.utils import cpp_extension

    monkeypatch.setenv("PATH", str(tmp_path))
    assert not cpp_extension.is_ninja_available()
    with build._ninja():
        assert cpp_extension.is_ninja_available()
    assert os.environ["PATH"] == str(tmp_path)


def test_the_wheel_carries_every_csrc_file_and_needs_ninja(tmp_path):
    """``pip wheel`` of a copy of the project: every file of csrc/ is in it (all are sources the
    build reads and hashes: no other kind of file lives there), and ninja is a requirement."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=junk)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ".", "-w", "dist"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("selfattn-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    csrc = ROOT / "src" / "selfattn" / "backends" / "native" / "csrc"
    others = [p for p in csrc.rglob("*") if p.is_file() and p.suffix not in build.SOURCES]
    assert not others, f"build.SOURCES and package-data do not cover {others}"
    want = {
        f"selfattn/backends/native/csrc/{p.relative_to(csrc).as_posix()}"
        for p in csrc.rglob("*")
        if p.is_file()
    }
    assert want and want <= names, sorted(want - names)
    assert {
        f"selfattn/backends/native/{p.relative_to(csrc.parent).as_posix()}" for p in build.sources()
    } <= names
    assert "Requires-Dist: ninja" in meta
