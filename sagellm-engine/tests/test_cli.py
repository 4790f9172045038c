"""The sagellm command."""

from __future__ import annotations

import io

import pytest

from sagellm.engine.cli import main

from .conftest import TINY_OPTIONS

COMMANDS = ["serve", "generate", "chat", "bench", "components", "doctor"]


def tiny_flags(tiny_model) -> list[str]:
    return [
        "--model",
        str(tiny_model),
        "--dtype",
        "float32",
        "--threads",
        "1",
        "--block-size",
        str(TINY_OPTIONS["block_size"]),
        "--max-model-len",
        "256",
        "--num-blocks",
        "256",
    ]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: sagellm " + command in capsys.readouterr().out


def test_components_lists_the_slots(capsys) -> None:
    assert main(["components"]) == 0
    out = capsys.readouterr().out
    assert "kv_pool" in out and "paged" in out and "sagellm-kv-pool" in out
    assert "runtime" in out and "native" in out and "sagellm-engine" in out


def test_generate_prints_the_completion(tiny_model, capsys) -> None:
    code = main(
        ["generate", "hello world", "--max-tokens", "5", "--no-echo", *tiny_flags(tiny_model)]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip() != "" or captured.out == "\n"
    assert "5 tokens" in captured.err


def test_chat_reads_turns_from_a_pipe(tiny_model, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you\n"))
    assert main(["chat", "--max-tokens", "4", *tiny_flags(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) >= 2  # one answer per non-empty line


def test_errors_are_reported_without_a_traceback(tiny_model, capsys) -> None:
    code = main(["generate", "x", *tiny_flags(tiny_model), "--scheduler", "nope"])
    assert code == 2
    assert "sagellm: error: no sagellm.scheduler implementation named 'nope'" in (
        capsys.readouterr().err
    )


def test_doctor_reports_each_check(capsys) -> None:
    main(["doctor"])
    out = capsys.readouterr().out
    for what in ("python", "torch", "memory", "model", "kv_pool", "scheduler", "runtime"):
        assert f"] {what}:" in out
