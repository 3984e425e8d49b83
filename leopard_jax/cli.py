"""The one way a leopard_jax command is written: absl flags, one-line errors, exit codes.

Each command module keeps its flags on its own `flags.FlagValues` (not absl's global
`FLAGS`), so several commands can be imported into one process (tests, the demo) without
their `--out` flags clashing, and `main(argv)` can be called again with other arguments.

    FLAGS = flags.FlagValues()
    _OUT = flags.DEFINE_string("out", None, "output .npz", flag_values=FLAGS, required=True)

    def run(argv) -> int | None: ...          # reads _OUT.value; raises on bad input

    def main(argv=None) -> int:
        return cli.run(FLAGS, run, argv, errors=(EmbedError,))

    if __name__ == "__main__":
        sys.exit(main())

`--help` lists every flag with its help text and default. A missing required flag, an
unknown flag or a bad value exits 2 with one line; so does any exception in `errors`
(the message names the file and the fix); Ctrl-C exits 130.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags


class CommandError(ValueError):
    """Bad input to a command; the message names the file or flag and the fix."""


def usage(flag_values: flags.FlagValues, prog: str, doc: str | None) -> str:
    """The command's docstring, then every flag it defines (main module's flags first)."""
    return (
        f"{(doc or prog).strip()}\n\nflags:\n{flag_values.get_help(include_special_flags=False)}\n"
    )


def run(
    flag_values: flags.FlagValues,
    body: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    *,
    errors: tuple[type[BaseException], ...] = (),
    prog: str | None = None,
    doc: str | None = None,
) -> int:
    """Parse `argv` (default: the process's) into `flag_values`, call `body` with the
    positional arguments left over, and turn the known failures into exit codes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or sys.argv[0]
    if doc is None:
        doc = getattr(sys.modules.get(getattr(body, "__module__", ""), None), "__doc__", None)
    if "--help" in argv or "-h" in argv or "--helpfull" in argv:
        print(usage(flag_values, prog, doc))
        raise SystemExit(0)
    flag_values.unparse_flags()  # a second call in one process starts from the defaults
    try:
        rest = flag_values([prog, *argv])
    except flags.Error as e:
        print(f"error: {e}; see {prog} --help", file=sys.stderr)
        return 2
    try:
        code = body(rest[1:])
    except (CommandError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr
        )
        return 130
    return 0 if code is None else int(code)
