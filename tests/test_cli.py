"""leopard_jax.cli: the one way commands parse flags and report errors."""

import pytest
from absl import flags

from leopard_jax import cli


class _Bad(ValueError):
    pass


def _command():
    fv = flags.FlagValues()
    out = flags.DEFINE_string("out", None, "where to write", flag_values=fv, required=True)
    k = flags.DEFINE_integer("k", 5, "how many", flag_values=fv, lower_bound=1)
    seen = []

    def body(rest):
        if out.value == "bad":
            raise _Bad("bad: pass another --out")
        seen.append((rest, out.value, k.value))

    return fv, body, seen


def test_parses_flags_and_positionals_and_starts_from_defaults_each_call():
    fv, body, seen = _command()
    assert cli.run(fv, body, ["export", "--out", "a", "--k", "3"], prog="x") == 0
    assert cli.run(fv, body, ["--out", "b"], prog="x") == 0
    assert seen == [(["export"], "a", 3), ([], "b", 5)]  # k back to its default


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--out"),  # required flag missing
        (["--out", "a", "--kk", "3"], "kk"),  # unknown flag
        (["--out", "a", "--k", "0"], "--k"),  # below its bound
        (["--out", "bad"], "bad: pass another --out"),  # a known error from the body
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    fv, body, seen = _command()
    assert cli.run(fv, body, argv, errors=(_Bad,), prog="x") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert seen == []


def test_help_lists_every_flag(capsys):
    fv, body, _ = _command()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(fv, body, ["--help"], prog="x", doc="Does a thing.")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "Does a thing." in text and "--out" in text and "--k" in text and "how many" in text
