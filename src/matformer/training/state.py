"""Checkpoints of a run and resuming from them.

`OUT/checkpoints/step-NNNNNNN/` (written atomically through `save_model`) hold the weights, the
tokenizer, `train_config.json` and `training_state.safetensors` (optimizer moments, per-neuron
step counts, RNG state; the step, data position and history as JSON metadata). Only the newest
`keep_checkpoints` complete ones are kept. Resuming restores all of it: on CPU the result is
bit-identical to a run that was never interrupted. The final model goes to `OUT` itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from matformer.data import text as D
from matformer.errors import CheckpointError
from matformer.io.checkpoint import load_state_dict
from matformer.io.hub import download
from matformer.io.metadata import Fields, check_integer, check_number
from matformer.io.source import read_config_file, resolve_source
from matformer.models.lm.config import MatFormerConfig
from matformer.training import sharded
from matformer.training.distributed import Dist
from matformer.training.optimizer import NestedAdamW
from matformer.training.points import parse_key
from matformer.training.settings import TrainConfig, normalized, resumable_settings
from matformer.training.sharded import is_sharded
from matformer.training.weights import write_model

STATE_FILE = "training_state.safetensors"
CONVERTED_SETTINGS = {"fsdp"}
"""Settings that are not resumable only because the checkpoint's format follows them (--fsdp:
sharded DCP state, else single-file): a resumed run reads either format into either kind of run."""
CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "train_summary.json"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")

History = list[dict[str, Any]]
"""One entry per evaluation: {"step": int, "val_loss": {tier: loss}}."""


@dataclass
class TrainingState:
    """Where a run is: what `training_state.safetensors` records beside the optimizer tensors."""

    step: int = 0
    data_position: dict[str, int] = field(default_factory=dict)
    tokens_seen: int = 0
    world_size: int = 1
    lr: float = 0.0
    history: History = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Small state of optional parts (the float16 loss scale)."""

    def to_meta(self) -> dict[str, Any]:
        return {"step": self.step, "data_position": self.data_position,
                "tokens_seen": self.tokens_seen, "world_size": self.world_size, "lr": self.lr,
                "history": history_json(self.history), "extra": self.extra}

    @classmethod
    def from_meta(cls, meta: Any, source: str = "training state") -> TrainingState:
        """The state a checkpoint's metadata records, every field checked (types, ranges,
        finiteness: io.metadata) so a damaged or edited training_state.json is a one-line
        CheckpointError before anything is loaded or written."""
        f = Fields(meta, source, CheckpointError)
        pos = f.mapping("data_position")
        for k, v in pos.items():
            check_integer(v, f"data_position.{k}", f, lo=0)
        history = f.d.get("history", [])
        if not isinstance(history, list):
            raise f.fail("history", history, "a list")
        parsed: History = []
        for i, h in enumerate(history):
            hf = Fields(h, f"{source}: history[{i}]", CheckpointError)
            losses = hf.mapping("val_loss")
            try:
                keys = {parse_key(k): v for k, v in losses.items()}
            except (TypeError, ValueError):
                raise hf.fail("val_loss", losses, "tier keys") from None
            for k, v in losses.items():
                if v is not None:
                    check_number(v, f"val_loss.{k}", hf)
            parsed.append({"step": hf.integer("step", lo=0), "val_loss": keys})
        return cls(step=f.integer("step", lo=0), data_position=dict(pos),
                   tokens_seen=f.integer("tokens_seen", lo=0, default=0),
                   world_size=f.integer("world_size", lo=1, hi=2**20, default=1),
                   lr=f.number("lr", lo=0.0, default=0.0), history=parsed,
                   extra=dict(f.mapping("extra", default={})))


def history_json(history: History) -> list[dict[str, Any]]:
    return [{"step": h["step"], "val_loss": {str(k): v for k, v in h["val_loss"].items()}}
            for h in history]


# ---- finding checkpoints ---------------------------------------------------------------------


def checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under out/checkpoints, oldest first. A folder is complete once it has
    its name (save_model writes into a temporary folder and renames it)."""
    root = Path(out) / "checkpoints"
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and entry.is_dir() and has_state(entry) and (entry / "config.json").is_file():
                found.append((int(m.group(1)), entry))
    return sorted(found)


def has_state(folder: Path) -> bool:
    """The folder holds a complete training state: single-file or sharded (--fsdp)."""
    return (folder / STATE_FILE).is_file() or is_sharded(folder)


def resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from (None: a fresh run, into an unused --out).

    `resume=True`: the newest complete checkpoint in `out`. `resume=SRC`: a run folder (its newest
    checkpoint), a step-*/ checkpoint folder, or a file inside one; the run continues into `out`,
    which must then be that run's folder, or unused. A Hub repo id holding a step checkpoint
    works too."""
    out = Path(cfg.out)
    occupied = bool(checkpoints(out)) or (out / "config.json").exists()
    if cfg.resume is False or cfg.resume is None:
        if occupied:
            raise CheckpointError(f"{out}: already holds a training run; pass --resume to continue "
                                  f"it, or choose another --out (nothing was changed)")
        return None
    if cfg.resume is True:
        ckpt = _local(out)
    else:
        ckpt = _locate(Path(str(cfg.resume)))
    if occupied and out.resolve() not in ckpt.resolve().parents:
        raise CheckpointError(f"{out}: already holds another training run; resume {ckpt} into "
                              f"its own run folder or an unused --out (nothing was changed)")
    return ckpt


def _locate(src: Path) -> Path:
    """The checkpoint folder to resume from: a local folder or file (`_local`), otherwise a Hub
    repo id, resolved like every verb's SRC (io.source) with the training state fetched too."""
    if src.exists():
        return _local(resolve_source(src).folder if src.is_file() else src)
    source = resolve_source(src, companions=True)
    if source.repo_id is not None:
        download(source.repo_id, STATE_FILE, source.revision, missing_ok=True)
    if not (source.folder / STATE_FILE).is_file():
        raise CheckpointError(f"{src}: holds no {STATE_FILE} (a model, not a training checkpoint); "
                              f"only a checkpoint written by matformer train can be resumed")
    return source.folder


def _local(folder: Path) -> Path:
    """A step-*/ folder holding the training state, or a run folder's newest complete checkpoint."""
    if has_state(folder):
        return folder
    found = checkpoints(folder)
    if found:
        return found[-1][1]
    raise CheckpointError(f"{folder}: no complete checkpoint to resume from (expected "
                          f"{folder}/checkpoints/step-*/ or a step-*/ folder holding "
                          f"{STATE_FILE}); run without --resume")


# ---- saving ----------------------------------------------------------------------------------


def run_files(cfg: TrainConfig, tok: Any, max_positions: int | None = None) -> dict[str, bytes]:
    """What every saved folder of a run carries beside the weights: tokenizer and settings. A
    tokenizer that came with its files (--init-from, --resume, a prepared folder's) carries them
    unchanged; one trained here gets `model_max_length` = the model's `max_positions` (not the
    training --seq-len: the model reads longer texts than it was trained on, truncating them at
    --seq-len silently would be wrong)."""
    return {**D.tokenizer_files(tok, max_positions),
            CONFIG_FILE: (json.dumps(cfg.to_dict(), indent=2) + "\n").encode()}


def state_bytes(opt: NestedAdamW, state: TrainingState, master: nn.Module | None = None) -> bytes:
    """The single-file training state; `master`: also the model's float32 weights (when the
    checkpoint's weights are saved in a lower dtype, resuming needs the exact ones)."""
    from safetensors.torch import save

    tensors = opt.state_tensors()
    if master is not None:
        tensors.update({f"master.{k}": v.detach().cpu().clone()
                        for k, v in master.state_dict().items() if k in opt.names.values()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return save(tensors, metadata={"format": "pt", "matformer_training": json.dumps(state.to_meta())})


def save_checkpoint(out: Path, model: nn.Module, files: dict[str, bytes], state: bytes,
                    step: int, keep: int, save_dtype: str = "float32") -> Path:
    """Write step-NNNNNNN/ atomically, then drop all but the newest `keep` checkpoints."""
    path = write_model(model, step_folder(out, step), {**files, STATE_FILE: state}, save_dtype)
    rotate(out, keep)
    return path


def step_folder(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def rotate(out: Path, keep: int) -> None:
    """Drop all but the newest `keep` complete checkpoints."""
    for _, old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_final(out: Path, model: nn.Module, files: dict[str, bytes], summary: dict[str, Any],
               save_dtype: str = "float32", dist: Dist | None = None, sharded: bool = False) -> Path | None:
    """The final model in `out` (collective when `sharded`)."""
    return write_model(model, out, {**files, SUMMARY_FILE: (json.dumps(summary, indent=2) + "\n").encode()},
                       save_dtype, dist, sharded)


# ---- resuming --------------------------------------------------------------------------------


def read_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], TrainingState]:
    from safetensors import safe_open

    path = ckpt / STATE_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("matformer_training", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: cannot read the training state ({e})") from None
    if not isinstance(meta, dict) or not {"step", "data_position"} <= meta.keys():
        raise CheckpointError(f"{path}: no training metadata (not written by matformer train?)")
    try:
        state = TrainingState.from_meta(meta, f"{path} (training state)")
        _check_state(state, tensors)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{path}: damaged training state ({type(e).__name__}: "
                              f"{str(e)[:200]}); resume from another checkpoint") from None
    return tensors, state


def _check_state(state: TrainingState, tensors: dict[str, torch.Tensor]) -> None:
    """What from_meta's field checks cannot see: the RNG tensor beside them."""
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise KeyError("rng.torch (the random generator state) is missing or malformed")


def check_resume(cfg: TrainConfig, ckpt: Path, model_cfg: MatFormerConfig,
                 state: TrainingState) -> None:
    """A CheckpointError unless this run continues the checkpoint's with the same math."""
    try:
        saved = normalized(json.loads((ckpt / CONFIG_FILE).read_text(encoding="utf-8")),
                           str(ckpt / CONFIG_FILE))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: cannot read ({e})") from None
    now = cfg.to_dict()
    diff = [k for k in now if k not in resumable_settings() | CONVERTED_SETTINGS
            and saved.get(k) != now[k]]
    if diff:
        desc = ", ".join(f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in diff[:4])
        raise CheckpointError(f"{ckpt}: this run's settings differ from the checkpoint's ({desc}); "
                              f"resume with the same settings, or train into a new --out")
    if state.step > cfg.steps:
        # Resuming would write the weights of a longer run as this run's final model.
        raise CheckpointError(f"{ckpt}: the checkpoint is at step {state.step}, past --steps "
                              f"{cfg.steps}; resume with --steps {state.step} or more")
    saved_model = read_config_file(ckpt / "config.json", type(model_cfg)).to_dict()  # LM or MatViT
    now_model = model_cfg.to_dict()
    mdiff = [k for k in now_model if saved_model.get(k) != now_model[k]
             and k not in ("dtype", "torch_dtype")]
    if mdiff:
        desc = ", ".join(f"{k}: saved {saved_model.get(k)!r}, now {now_model[k]!r}" for k in mdiff[:4])
        raise CheckpointError(f"{ckpt}: holds another model ({desc}); resume with the same "
                              f"--preset, or train into a new --out")


def resume_note(state: TrainingState, cfg: TrainConfig, world: int) -> str:
    """What differs from the run the checkpoint came from (appended to the "resumed" line)."""
    if state.world_size == world:
        return ""
    per_step = cfg.batch_size * cfg.grad_accum
    return (f" with {world} process(es), saved by {state.world_size}: {world * per_step} windows "
            f"per step instead of {state.world_size * per_step}, so not the original run's math")


def load_weights(model: nn.Module, ckpt: Path) -> None:
    sd = load_state_dict(ckpt)
    model.load_state_dict({k: v.clone() for k, v in sd.items()},
                          strict=not model.config.tie_word_embeddings)


def restore(tensors: dict[str, torch.Tensor], ckpt: Path, opt: NestedAdamW, sampler: D.WindowSampler,
            state: TrainingState, device: torch.device) -> None:
    """Optimizer moments, data position and RNG as the checkpoint left them."""
    try:
        _restore(tensors, ckpt, opt, sampler, state, device)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: cannot restore the training state "
                              f"({type(e).__name__}: {str(e)[:200]}); resume from another "
                              f"checkpoint") from None


def _laid_out(tensors: dict[str, torch.Tensor], opt: NestedAdamW) -> dict[str, torch.Tensor]:
    """The state's moments and master weights sharded as their parameters (an --fsdp run
    resuming a single-file state); step counts and RNG are replicated, kept whole."""
    by_name = {name: p for p, name in opt.names.items()}
    out = dict(tensors)
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        name = rest if kind == "master" else rest.rsplit(".", 1)[0] if kind == "optim" else None
        if name in by_name and not key.endswith(".step"):
            out[key] = sharded.like(t, by_name[name])
    return out


def _restore(tensors: dict[str, torch.Tensor], ckpt: Path, opt: NestedAdamW,
             sampler: D.WindowSampler, state: TrainingState, device: torch.device) -> None:
    tensors = _laid_out(tensors, opt)
    opt.load_state_tensors(tensors, str(ckpt / STATE_FILE))
    master = {k.removeprefix("master."): v for k, v in tensors.items() if k.startswith("master.")}
    if master:  # float32 weights beside lower-precision saved ones
        with torch.no_grad():
            for p, name in opt.names.items():
                p.copy_(master[name])
    sampler.load_state(state.data_position)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
