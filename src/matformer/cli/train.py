"""Train a MatFormer: every nested width at once (sample / joint), or one width (single).

With no --data it trains on the embedded default corpus (the Python standard library's own
source files), offline. Checkpoints go to OUT/checkpoints/step-*/ and the final model to OUT.
Under `torchrun --nproc-per-node N` the same command trains data-parallel (gloo on CPU, NCCL
on GPU); --rank-tiers gives each process its own runtime tier. Every flag is a field of
matformer.TrainConfig (same name, dashes for underscores).

examples:
  matformer train --out runs/demo                       # the demo: tiny preset, default corpus
  matformer train --preset debug --steps 50 --objective joint --out runs/joint
  matformer train --tier 2 --out runs/t2                 # runtime tier 2: first B/4 neurons only
  matformer train --out runs/demo --resume               # continue from the newest checkpoint
  torchrun --nproc-per-node 2 -m matformer.cli train --rank-tiers 0,1 --out runs/ddp
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from matformer.errors import ConfigError
from matformer.tiers import parse_int_list
from matformer.training.settings import TrainConfig


def _fields() -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field: --name-with-dashes, typed from the annotation."""
    for f, hint in _fields():
        cli = dict(f.metadata["cli"])
        names = [f"--{f.name.replace('_', '-')}", *cli.pop("aliases", ())]
        helptext = f.metadata["help"]
        if f.default not in (None, False):
            helptext += " (default: %(default)s)"
        kw: dict[str, Any] = dict(dest=f.name, default=f.default, help=helptext, **cli)
        if hint is bool:
            kw["action"] = "store_true"
        elif "nargs" not in kw:
            kw["type"] = _scalar_type(hint)
        p.add_argument(*names, **kw)


def _scalar_type(hint: Any) -> type:
    """int or float for such fields (also when optional), else str (lists are read as text and
    parsed by `config_from_args`)."""
    for t in (int, float):
        if hint is t or t in typing.get_args(hint):
            return t
    return str


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe (list flags parsed from their comma text)."""
    values = {}
    for f, hint in _fields():
        v = getattr(args, f.name)
        item = _list_item(hint)
        if isinstance(v, str) and item is not None:
            flag = f"--{f.name.replace('_', '-')}"
            v = parse_int_list(v, flag) if item is int else _floats(v, flag)
        values[f.name] = v
    return TrainConfig(**values)


def _list_item(hint: Any) -> type | None:
    """X for a `list[X]` or `list[X] | None` annotation, else None."""
    for h in (hint, *typing.get_args(hint)):
        if typing.get_origin(h) is list:
            return typing.get_args(h)[0]
    return None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from matformer.training import train

    train(config_from_args(args))
    return 0
