"""One spelling per concept across the ``cq`` sub-commands, checked on the parser alone (nothing runs):
``-n/--num-samples`` (the former ``--num`` / ``--samples`` still parse), ``--steps``, ``--seed``, ``cq --version``,
and every sub-command's ``--help`` ends with an example."""

from __future__ import annotations

import argparse

import pytest

import cq
from cq.cli import build_parser, main


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# sub-command -> (its positional arguments, the attribute that holds the sample count)
COUNTS = {
    "demo": ([], "num"),
    "fit": (["-o", "m.cq"], "samples"),
    "sample": (["m.cq"], "num"),
    "report": (["m.cq"], "samples"),
    "reproduce": (["demo"], "num"),
}


@pytest.mark.parametrize("command", sorted(COUNTS))
@pytest.mark.parametrize("spelling", ["-n", "--num-samples"])
def test_num_samples_is_one_spelling(command, spelling):
    rest, dest = COUNTS[command]
    args = build_parser().parse_args([command, *rest, spelling, "7"])
    assert getattr(args, dest) == 7


@pytest.mark.parametrize(
    ("command", "former"),
    [("demo", "--num"), ("fit", "--samples"), ("sample", "--num"), ("report", "--samples"), ("reproduce", "--num")],
)
def test_former_count_spellings_still_parse_unlisted(command, former):
    rest, dest = COUNTS[command]
    parser = build_parser()
    assert getattr(parser.parse_args([command, *rest, former, "5"]), dest) == 5
    default = getattr(parser.parse_args([command, *rest]), dest)
    assert default == {"demo": 64, "fit": 32, "sample": None, "report": 8, "reproduce": None}[command]
    listed = [a for a in _subcommands()[command]._actions if a.help is not argparse.SUPPRESS]
    assert not [a for a in listed if former in a.option_strings]


@pytest.mark.parametrize("command", ["demo", "fit", "train"])
def test_steps_and_seed(command):
    rest = COUNTS.get(command, ([], None))[0]
    args = build_parser().parse_args([command, *rest, "--steps", "12", "--seed", "3"])
    assert (args.steps, args.seed) == (12, 3)


@pytest.mark.parametrize("command", ["sample", "train-classifier"])
def test_seed(command):
    args = build_parser().parse_args([command, *(["m.cq"] if command == "sample" else []), "--seed", "3"])
    assert args.seed == 3


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"cq {cq.__version__}"


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_help_ends_with_an_example(command):
    text = _subcommands()[command].format_help().rstrip()
    last = text.split("\n\n")[-1]
    assert last.startswith("example:") and f"cq {command}" in last or "cq --plugin" in last, text
