"""``selfattn chat`` as a user meets it: the real command in a child process, on a pseudo-terminal
where a terminal matters (the ``you>`` prompt, Ctrl-C sent as SIGINT), else on pipes. Each test
skips, naming the pip command, when SmolLM2's package is not installed.

Replies are kept short (a few tokens, or stopped with Ctrl-C) so that each test costs about one
model load (5-10 s here).
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from selfattn.cli.threads import SLACK, usable_cores

STORY = "Tell me a long story about a dragon who learns to cook."
#: a question SmolLM2 answers in 3 tokens, "No." and its end of turn
SHORT = "Is the sky blue? Answer yes or no."


@pytest.fixture(scope="module")
def smollm2_folder():
    """The converted SmolLM2 folder (converted here once, so the children only load it)."""
    from selfattn.pretrained import smollm2

    try:
        return smollm2.folder()
    except ValueError as exc:  # the message is the pip command
        pytest.skip(str(exc))


def _command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "selfattn", "chat", "--threads", "1", *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "TERM": "dumb", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


def _prompt_tokens(folder, *contents: str) -> int:
    """The chat template's length for user messages ``contents`` (the assistant's answers
    left out), as ``chat`` builds it."""
    from transformers import AutoTokenizer

    from selfattn.cli.chat import chat_ids

    tok = AutoTokenizer.from_pretrained(folder)
    return int(chat_ids(tok, [{"role": "user", "content": c} for c in contents]).shape[1])


def _foreground_signals() -> None:
    """In the child: Ctrl-C as a terminal's foreground job gets it. A command started in the
    background by a non-interactive shell (as CI may start the suite) inherits SIGINT ignored,
    and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """``selfattn chat ...`` with stdin, stdout and stderr on one pseudo-terminal."""

    def __init__(self, *argv: str) -> None:
        master, slave = os.openpty()
        self.proc = subprocess.Popen(
            _command(*argv),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=_env(),
            preexec_fn=_foreground_signals,
        )
        os.close(slave)
        self.fd, self.text, self.pos = master, "", 0

    def _read(self, wait: float) -> bool:
        """Read what the child wrote within ``wait`` seconds; False once it closed the pty."""
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every copy of the slave side is closed
            data = b""
        self.text += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(data)

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Wait for ``pattern`` (a regex) in what was written after the previous match."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if not self._read(0.2) or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"no {pattern!r} within {timeout} s; the terminal shows:\n{self.text}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def ctrl_c(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 60.0) -> int:
        """The exit status, after reading everything written."""
        deadline = time.monotonic() + timeout
        while self._read(0.2) and time.monotonic() < deadline:
            if self.proc.poll() is not None and not select.select([self.fd], [], [], 0.2)[0]:
                break
        rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        self.close()
        return rc

    def close(self) -> None:
        """Kill the child if it still runs; close our side (both at most once)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def terminal():
    """``terminal(*argv)`` starts a :class:`Terminal`; every one is closed after the test, even
    when an assertion failed half-way."""
    started: list[Terminal] = []

    def start(*argv: str) -> Terminal:
        started.append(Terminal(*argv))
        return started[-1]

    yield start
    for term in started:
        term.close()


def _stop_the_reply(term: Terminal, message: str, words: int = 0) -> int:
    """Send ``message``, press Ctrl-C once ``words`` words of the reply were shown, and return
    the prompt's token count from the speed line; ends back at the ``you>`` prompt."""
    term.send(message + "\n")
    term.expect(r"smollm2> " + r"\S+\s+" * words)
    term.ctrl_c()
    term.expect(r"\[stopped at \d+ tokens?: Ctrl-C\]")
    prompt = int(term.expect(r"prompt (\d+) tokens").group(1))
    term.expect(r"you> ")
    return prompt


def test_chat_ctrl_c_stops_the_reply_keeps_the_conversation_and_reset_forgets_it(
    smollm2_folder, terminal
):
    """Was: Ctrl-C while a reply streamed printed a 104-line traceback; no /reset."""
    term = terminal("--max-new-tokens", "200")
    term.expect(r"you> ")
    first = _stop_the_reply(term, STORY, words=3)
    assert first == _prompt_tokens(smollm2_folder, STORY)
    second = _stop_the_reply(term, "Hi")
    assert second > first + 3  # the story, its stopped reply and "Hi": earlier turns are kept
    for command in ("/reset", "/clear"):
        term.send(command + "\n")
        term.expect(r"\[conversation cleared\]")
        term.expect(r"you> ")
    assert _stop_the_reply(term, "Hi") == _prompt_tokens(smollm2_folder, "Hi")
    term.send("\x04")  # Ctrl-D at the prompt
    assert term.finish() == 0
    assert "Traceback" not in term.text and "KeyboardInterrupt" not in term.text


@pytest.mark.parametrize("how, status", [("ctrl-c", 130), ("/exit", 0)])
def test_chat_ends_cleanly_at_the_prompt(smollm2_folder, terminal, how, status):
    """Ctrl-C at the prompt ends as llama-cli does (status 130); /exit ends with 0."""
    term = terminal()
    term.expect(r"you> ")
    if how == "ctrl-c":
        term.ctrl_c()
    else:
        term.send(how + "\n")
    assert term.finish() == status
    assert "Traceback" not in term.text and "KeyboardInterrupt" not in term.text


def test_chat_one_shot_ctrl_c_is_one_line_and_status_130(smollm2_folder, terminal):
    term = terminal(STORY, "--max-new-tokens", "200")
    term.expect(r"smollm2> \S+\s+\S+\s+")
    term.ctrl_c()
    assert term.finish() == 130
    assert "Traceback" not in term.text
    assert term.text.rstrip().splitlines()[-1] == "selfattn chat: interrupted"


def test_chat_prints_only_the_reply_on_stdout_and_marks_a_cut_reply(smollm2_folder):
    """Was: "loaded ...", the tokens/s line and the "smollm2>" label went to stdout, and a
    reply cut by --max-new-tokens looked finished."""
    res = subprocess.run(
        _command("What is the capital of France?", "--max-new-tokens", "3"),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "The capital of\n"
    err = res.stderr.splitlines()
    assert err[0].startswith("loaded LlamaForCausalLM in")
    assert "[cut at 3 tokens: --max-new-tokens]" in err
    assert "tokens/s" in err[-1] and "1 thread)" in err[-1]


def test_chat_json_marks_cut_replies_and_picks_fewer_threads_under_load(smollm2_folder):
    """Piped messages with --json under one busy loop: the cut reply says so, /reset and
    /clear forget, /exit ends; threads left to chat (no --threads) avoid the busy core."""
    stdin = f"{STORY}\n/reset\n{SHORT}\n/clear\n/exit\nnever read\n"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)  # the busy loop is running when chat measures
        cmd = [sys.executable, "-m", "selfattn", "chat", "--json", "--max-new-tokens", "4"]
        res = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=300, env=_env()
        )
    finally:
        busy.kill()
        busy.wait()
    assert res.returncode == 0, res.stderr
    cut, whole = (json.loads(line) for line in res.stdout.splitlines())
    assert (cut["prompt"], cut["tokens"]) == (STORY, 4)
    assert cut["finish_reason"] == "length" and cut["truncated"] is True
    assert (whole["reply"], whole["finish_reason"], whole["truncated"]) == ("No.", "stop", False)
    assert whole["prompt_tokens"] == _prompt_tokens(smollm2_folder, SHORT)  # /reset forgot
    import torch

    cap, cores = torch.get_num_threads(), usable_cores()
    most = max(1, min(cap, math.floor(cap * (cores - 1) / cores + SLACK)))
    assert 1 <= cut["threads"] <= most and 1 <= whole["threads"] <= most, (cap, cores)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc/stat")
def test_cpu_watch_counts_another_process_and_chooses_fewer_threads():
    from selfattn.cli.threads import CpuWatch

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        watch, used, t0 = CpuWatch(), _cpu_seconds(busy.pid), time.monotonic()
        time.sleep(1.0)
        share = (_cpu_seconds(busy.pid) - used) / (time.monotonic() - t0)
        others = watch.others_busy()
        cap = max(2, int(usable_cores()))  # torch's default on an idle machine, about
        threads = watch.threads(cap)
    finally:
        busy.kill()
        busy.wait()
    assert others >= share - 0.1, (others, share)  # the busy loop's time is counted
    cores = usable_cores()
    assert 1 <= threads <= max(1, math.floor(cap * (cores - share + 0.1) / cores + SLACK))
    assert threads < cap or share < 0.7  # one core fewer once the loop holds most of one


def test_chat_help_names_threads_the_loop_commands_and_ctrl_c(capsys):
    from selfattn.cli import main

    assert main(["chat", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in ("--threads", "earlier turns", "/reset", "/clear", "/exit", "Ctrl-C", "130"):
        assert needle in out, needle
