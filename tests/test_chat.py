"""`minke chat`: two turns, /reset, /exit through main() with stdin replaced; the reasoning is shown
apart from the answer."""

import io
import sys

import pytest

import minke
from chat_model import HI, SUM, make
from minke.serve import chat

pytestmark = pytest.mark.usefixtures("one_thread")


def test_chat_two_turns_reset_exit(tmp_path, monkeypatch, capsys):
    model, tok = make()
    minke.save(model, tmp_path)
    tok.save(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nWhat is 2 + 3?\n/reset\nWhat is 2 + 3?\n/exit\nhi\n"))
    assert chat.main(["--model", str(tmp_path), "--temperature", "0", "--max-tokens", "40"]) == 0
    out = capsys.readouterr().out
    turn1 = f"[think] {HI[0]}\n[answer] {HI[1].lstrip()}"
    turn2 = f"[think] {SUM[0]}\n[answer] {SUM[1].lstrip()}"
    assert turn1 in out and turn2 in out and "(conversation reset)" in out
    assert out.count("[think]") == 3  # after /reset the question comes without the history; /exit ends it
    assert "\x1b[" not in out  # not a terminal: no colour codes
    first, rest = out.split("(conversation reset)")
    assert first.index(turn1) < first.index(turn2)  # the second turn saw the first one
