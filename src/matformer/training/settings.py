"""The settings of a training run: `TrainConfig`, and what they mean (validation, the tiers each
rank trains, the model they build). Torch-free: `matformer train --help` reads these fields.

Every setting is one field declared with `setting(default, help, ...)`; the CLI generates its
flag from the field (name, type, default, help), so adding a setting is one edit here.

Vocabulary: `tier` is one uniform tier (width B >> tier); `trained_tiers` are the tiers the
objectives train (the paper's "granularities"; `--granularities` still works as a flag and the
key is read from old train_config.json files); a step's `plan` is the list of (tier, weight) one
rank trains at that step (matformer.training.objective). A *runtime* tier (`tier`, `rank_tiers`)
limits what a rank can run: it trains only tiers >= its runtime tier.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from matformer.data import text as D
from matformer.data.token_files import is_prepared
from matformer.errors import CheckpointError, ConfigError, TierError
from matformer.io.source import read_config_file
from matformer.models.lm.config import MatFormerConfig
from matformer.models.registry import family
from matformer.tiers import max_tier, width_of

OBJECTIVES = ("sample", "joint", "single")
ARCHS = ("lm", "vit")
DTYPES = ("float32", "bfloat16", "float16")
ADAMW_IMPLS = ("auto", "foreach", "fused")
# Model-shape overrides: TrainConfig field -> MatFormerConfig key.
SHAPE_KEYS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
              "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
              "max_positions": "max_position_embeddings"}

# Keys older train_config.json files used, mapped to today's field names.
LEGACY_KEYS = {"granularities": "trained_tiers", "granularity_probs": "tier_probs"}


def setting(default: Any, help: str, *, resumable: bool = False, **cli: Any) -> Any:
    """A TrainConfig field. `help` is the flag's help text; `resumable`: may change when a run is
    resumed (it does not change the math); `cli`: extra argparse keywords (aliases, metavar,
    choices, nargs/const)."""
    return field(default=default, metadata={"help": help, "resumable": resumable, "cli": cli})


@dataclass
class TrainConfig:
    """Settings of a training run (saved as train_config.json in every checkpoint)."""

    out: str = setting("runs/matformer", "output folder: checkpoints/step-*/ during training, the "
                       "final model in the folder itself", resumable=True)
    data: str | None = setting(None, "text file, folder of text files (.jsonl: one {\"text\": ...} "
                               "per line), or a datasets folder saved with save_to_disk (default: "
                               "the Python standard library's source, offline)")
    preset: str = setting("tiny", "model size: debug, tiny, small, base, 850m, or the FFN-heavy ffn8-micro, ffn8-tiny, "
                          "ffn8-small (FFN 8x hidden); the vocabulary size "
                          "comes from the trained tokenizer")
    arch: str = setting("lm", "model family: lm (Llama-compatible decoder on text) or vit (MatViT, "
                        "an image classifier: --data digits, the default, or a folder of class "
                        "folders; --preset debug/tiny/small/base are ViT shapes then)",
                        choices=ARCHS)
    steps: int = setting(240, "optimizer steps", resumable=True)
    objective: str = setting("sample", "sample: one tier per step; joint: every trained tier on "
                             "the same batch; single: one tier (baselines)", choices=OBJECTIVES)
    tier: int | None = setting(None, "runtime tier T: a full-width model of which only the first "
                               "B>>T FFN neurons are used and updated (with --objective single: "
                               "the tier trained)")
    rank_tiers: list[int] | None = setting(None, "one runtime tier per torchrun process "
                                           "(heterogeneous participants; overrides --tier)",
                                           metavar="T0,T1,...")
    nest_heads: bool = setting(False, "also nest attention heads: train the KV head granularities "
                               "G, G/2, ..., 1 jointly with the tiers (sample: one (tier, heads) "
                               "pair a step; joint: every pair of the grid; docs/TRAINING.md)")
    kv_heads: int | None = setting(None, "runtime KV heads G: only the first G KV heads (and their "
                                   "query heads) are used and updated", metavar="G")
    rank_kv_heads: list[int] | None = setting(None, "one runtime KV head count per torchrun "
                                              "process (overrides --kv-heads)",
                                              metavar="G0,G1,...")
    trained_tiers: list[int] | None = setting(None, "tiers the objectives train (default: 0,1,2,3, "
                                              "fewer if the base width can't be halved so often)",
                                              metavar="T,...", aliases=("--granularities",))
    tier_probs: list[float] | None = setting(None, "sample: probability of each trained tier, "
                                             "summing to 1 (default: uniform)",
                                             metavar="P0,P1,...", aliases=("--granularity-probs",))
    joint_weights: list[float] | None = setting(None, "joint: loss weight of each trained tier "
                                                "(default: 1 each, the plain sum)",
                                                metavar="W0,W1,...")
    batch_size: int = setting(16, "sequences per process per step")
    seq_len: int = setting(128, "tokens per sequence (training and held-out windows)")
    lr: float | None = setting(None, "peak learning rate (default: 6e-3 from scratch; 3e-4 with "
                               "--init-from, a fine-tuning rate: a pretrained model trained at "
                               "6e-3 is wrecked in a few steps)")
    min_lr_ratio: float = setting(0.1, "final learning rate of the cosine decay, as a fraction of --lr")
    warmup_steps: int | None = setting(None, "linear warm-up steps, at most a tenth of --steps "
                                       "(default: 20; with --init-from 10: a short warm-up for a pretrained start)")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay (matrices and embeddings)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "max global gradient norm, 0 = off")
    tail_lr_scale: float = setting(1.0, "learning-rate multiplier of the FFN tail: the neurons "
                                   "past the narrowest trained width (only wider tiers use them)")
    adamw_impl: str = setting("auto", "NestedAdamW's update: foreach (bit-identical to torch's "
                              "single-tensor AdamW), fused (torch's fused AdamW kernel on every "
                              "contiguous prefix; rounding may differ), auto: fused on CUDA",
                              resumable=True, choices=ADAMW_IMPLS)
    eval_every: int = setting(40, "steps between held-out evaluations of every trained tier",
                              resumable=True)
    eval_windows: int = setting(D.HELDOUT_WINDOWS, "held-out windows of --seq-len tokens per "
                                "evaluation, evenly spaced over the held-out split (matformer "
                                "eval uses the same ones)", resumable=True)
    save_every: int = setting(80, "steps between checkpoints", resumable=True)
    keep_checkpoints: int = setting(2, "newest checkpoints kept", resumable=True)
    seed: int = setting(0, "seed of the initialisation, data order and tier draws")
    vocab_size: int = setting(2048, "BPE vocabulary size to train")
    val_fraction: float = setting(D.DEFAULT_VAL_FRACTION, "held-out fraction of the documents")
    split_seed: int = setting(D.DEFAULT_SPLIT_SEED, "seed of the held-out split")
    max_corpus_bytes: int | None = setting(None, "cap on the default corpus (default: 3 MB of "
                                           "source); user data is not capped")
    cache_dir: str | None = setting(None, "token cache (default: $MATFORMER_CACHE or "
                                    "~/.cache/matformer)", resumable=True)
    resume: bool | str = setting(False, "continue a run from a complete checkpoint: bare, the "
                                 "newest one in --out; or SRC: a run folder, a step-*/ checkpoint "
                                 "folder or a file in one", resumable=True,
                                 nargs="?", const=True, metavar="SRC")
    init_from: str | None = setting(None, "start from this checkpoint's weights, architecture and "
                                    "tokenizer (e.g. the output of matformer convert) instead of "
                                    "a fresh --preset model", metavar="SRC")
    distill: str | None = setting(None, "teacher checkpoint (e.g. the dense model --init-from was "
                                  "converted from), frozen: each tier's loss is alpha * T^2 * "
                                  "KL(teacher || student at temperature T) + (1 - alpha) * LM "
                                  "loss", metavar="SRC")
    distill_alpha: float | None = setting(None, "--distill: weight alpha of the distillation loss "
                                          "(default: 0.5; 1.0 with --init-from: the widths learn "
                                          "the teacher, not the distillation data's domain)")
    distill_temperature: float = setting(1.0, "--distill: softmax temperature T")
    device: str = setting("auto", "auto, cpu or cuda", resumable=True)
    # ---- model shape (issue 12): any config, not only the presets ----
    model_config: str | None = setting(None, "config.json file giving the model's shape (its "
                                       "vocab_size is raised to the tokenizer's if smaller); "
                                       "replaces --preset", metavar="FILE")
    hidden_size: int | None = setting(None, "override of the preset's / config's hidden size")
    intermediate_size: int | None = setting(None, "override: FFN width of every layer (the "
                                            "tier-0 width B of the nested FFN)")
    num_layers: int | None = setting(None, "override: number of decoder layers")
    num_heads: int | None = setting(None, "override: attention heads")
    num_kv_heads: int | None = setting(None, "override: key/value heads (grouped-query attention)")
    head_dim: int | None = setting(None, "override: dimension per head (default hidden/heads)")
    max_positions: int | None = setting(None, "override: max_position_embeddings")
    # ---- precision, compile, distribution (issue 12) ----
    dtype: str = setting("float32", "compute dtype: autocast to bfloat16/float16 with float32 "
                         "master weights and optimizer state (float16: dynamic loss scaling)",
                         choices=DTYPES)
    save_dtype: str | None = setting(None, "dtype of the saved weights (default: --dtype); "
                                     "a non-float32 one keeps float32 master weights in the "
                                     "training state for exact resume", resumable=True,
                                     choices=DTYPES)
    compile: str | None = setting(None, "torch.compile the model (one graph per trained width); "
                                  "bare: the inductor backend", resumable=True,
                                  nargs="?", const="inductor", metavar="BACKEND")
    fsdp: bool = setting(False, "FSDP2 (fully_shard per decoder layer, then the root) under "
                         "torchrun: parameters, gradients and optimizer state sharded; sharded "
                         "training state through torch.distributed.checkpoint")
    grad_accum: int = setting(1, "micro-batches of --batch-size per optimizer step and process")
    activation_checkpointing: bool = setting(False, "recompute each decoder layer in backward "
                                             "(less memory, ~1/3 more compute)", resumable=True)
    data_workers: int | None = setting(None, "DataLoader worker processes reading batches "
                                       "ahead into pinned memory (0: in the training process; "
                                       "default: 2 on CUDA, 0 on CPU where they would take the "
                                       "compute threads' cores)", resumable=True)
    peak_tflops: float | None = setting(None, "peak dense TFLOP/s of one device for the MFU "
                                        "log (default: from the device name; unknown: no MFU)",
                                        resumable=True)
    tensorboard: bool = setting(False, "also write TensorBoard scalars to OUT/tensorboard "
                                "(needs the tensorboard package)", resumable=True)
    log_every: int = setting(1, "steps between log lines", resumable=True)
    quiet: bool = setting(False, "no progress output", resumable=True)
    skip_nonfinite: bool = setting(False, "skip an optimizer step whose loss or gradient norm is "
                                   "not finite (NaN/inf), up to 20 in a row (default: stop the "
                                   "run with exit status 2; nothing non-finite is ever saved)",
                                   resumable=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "train_config.json") -> TrainConfig:
        """Settings read back from a train_config.json (older key names accepted)."""
        return cls(**normalized(d, source))


def normalized(d: dict[str, Any], source: str) -> dict[str, Any]:
    """A saved settings dict with today's field names; unknown keys are a CheckpointError."""
    out = {LEGACY_KEYS.get(k, k): v for k, v in d.items()}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(out) - names)
    if unknown:
        raise CheckpointError(f"{source}: unknown training setting(s) {unknown} (written by a newer "
                              f"matformer?)")
    return out


def resumable_settings() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resumable"]}


def model_config(cfg: TrainConfig, vocab_size: int,
                 specials: dict[str, int] | None = None) -> MatFormerConfig:
    """The model the settings describe: `--model-config FILE` or the preset, with the shape
    overrides applied, validated as a config.json is. The vocabulary is the tokenizer's (a file's
    larger vocab_size is kept: rows to spare, e.g. padded for fast matmuls), and so are the
    bos/eos/pad ids (`specials`, `data.tokenizer_files.special_ids`; default: a tokenizer trained
    here, `<s>`/`</s>`/`<pad>`)."""
    if cfg.model_config is not None:
        d = read_config_file(cfg.model_config, MatFormerConfig).to_dict()
        what = cfg.model_config
        vocab_size = max(vocab_size, d["vocab_size"])
    else:
        d = MatFormerConfig.from_preset(cfg.preset).to_dict()
        what = f"the {cfg.preset!r} preset"
    overrides = {key: getattr(cfg, f) for f, key in SHAPE_KEYS.items() if getattr(cfg, f) is not None}
    if overrides:
        what += " with " + " ".join(f"--{f.replace('_', '-')} {getattr(cfg, f)}"
                                    for f in SHAPE_KEYS if getattr(cfg, f) is not None)
        if "head_dim" not in overrides and {"hidden_size", "num_attention_heads"} & overrides.keys():
            d.pop("head_dim", None)  # derived again from the new hidden size / heads
        if "intermediate_size" in overrides:
            d["matformer_base_intermediate_size"] = overrides["intermediate_size"]
        if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
            d["num_key_value_heads"] = min(d["num_key_value_heads"], overrides["num_attention_heads"])
        if {"num_attention_heads", "num_key_value_heads"} & overrides.keys():
            d.pop("matformer_base_num_key_value_heads", None)  # the new heads are the base
    ids = {"bos": D.BOS_ID, "eos": D.EOS_ID, "pad": D.PAD_ID} if specials is None else specials
    d.update(overrides, vocab_size=vocab_size, bos_token_id=ids.get("bos"),
             eos_token_id=ids.get("eos"), pad_token_id=ids.get("pad"),
             torch_dtype="float32")  # float32 master weights
    d.pop("matformer_tier", None)
    mc = MatFormerConfig.from_dict(d, source=what)
    if mc.layer_widths != [mc.base] * mc.num_hidden_layers:
        raise ConfigError(f"{what}: intermediate_size={mc.intermediate_size} is not the full width "
                          f"matformer_base_intermediate_size={mc.base} in every layer; training "
                          f"builds the full-width model (drop the narrower sizes)")
    if mc.layer_kv_heads != [mc.base_kv_heads] * mc.num_hidden_layers:
        raise ConfigError(f"{what}: num_key_value_heads={mc.num_key_value_heads} is not the full "
                          f"matformer_base_num_key_value_heads={mc.base_kv_heads} in every layer; "
                          f"training builds the full model (drop the cut head counts)")
    if cfg.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds {what}'s max_position_embeddings="
                          f"{mc.max_position_embeddings}; lower --seq-len or raise --max-positions")
    return mc


# ---- which tiers are trained -----------------------------------------------------------------


def trained_tiers(cfg: TrainConfig, base: int) -> list[int]:
    """The tiers the objectives train (before runtime tiers limit a rank to some of them)."""
    if cfg.trained_tiers is not None:
        ts = list(cfg.trained_tiers)
        if not ts or len(set(ts)) != len(ts):
            raise ConfigError(f"trained_tiers must be distinct tiers, got {ts}")
        for t in ts:
            _check_tier(base, t, "trained_tiers")
        return ts
    return list(range(min(3, max_tier(base)) + 1))


def _check_tier(base: int, t: int, what: str) -> int:
    try:
        return width_of(base, t)
    except TierError as e:
        raise TierError(f"{what}: {e} (the model's FFN base width is {base})") from None


def runtime_tiers(cfg: TrainConfig, world: int) -> list[int]:
    """The runtime tier of every rank."""
    if cfg.rank_tiers is not None:
        if len(cfg.rank_tiers) != world:
            raise ConfigError(f"rank_tiers has {len(cfg.rank_tiers)} entries ({cfg.rank_tiers}) "
                              f"but {world} process(es) are running; give one tier per rank")
        return list(cfg.rank_tiers)
    return [cfg.tier if cfg.tier is not None else 0] * world


def rank_choices(cfg: TrainConfig, base: int, rt: int) -> tuple[list[int], list[float]]:
    """The tiers a rank at runtime tier `rt` trains, with their probabilities (sample) or loss
    weights (joint)."""
    if cfg.objective == "single":
        return [rt], [1.0]
    ts = trained_tiers(cfg, base)
    if cfg.objective == "sample":
        probs = cfg.tier_probs or [1.0 / len(ts)] * len(ts)
    else:
        probs = cfg.joint_weights or [1.0] * len(ts)
    allowed = [(t, p) for t, p in zip(ts, probs, strict=False) if t >= rt]
    if not allowed:
        raise ConfigError(f"runtime tier {rt} leaves none of the trained tiers {ts} to train "
                          f"(a tier-{rt} participant can only train tiers >= {rt})")
    tiers, ps = [t for t, _ in allowed], [p for _, p in allowed]
    if cfg.objective == "sample":
        total = sum(ps)
        if total <= 0:
            raise ConfigError(f"tier_probs give probability 0 to every tier a runtime "
                              f"tier-{rt} rank can train ({tiers})")
        ps = [p / total for p in ps]  # renormalised over what this rank can run
    return tiers, ps


def all_trained_tiers(cfg: TrainConfig, base: int, world: int) -> list[int]:
    """Every tier some rank trains (what evaluation scores), sorted."""
    return sorted({t for rt in runtime_tiers(cfg, world) for t in rank_choices(cfg, base, rt)[0]})


# ---- validation ------------------------------------------------------------------------------


def inputs_of(cfg: TrainConfig) -> list[str]:
    """What a run reads and its --out must not be, lie in, or contain (`io.outputs`): the
    --init-from and --distill checkpoints and --data, those that are local paths."""
    return [p for p in (cfg.init_from, cfg.distill, cfg.data) if p and os.path.lexists(p)]


SCRATCH_LR, SCRATCH_WARMUP, SCRATCH_ALPHA = 6e-3, 20, 0.5
"""Defaults of a run from scratch (the presets were tuned at these)."""
FINETUNE_LR, FINETUNE_WARMUP, FINETUNE_ALPHA = 3e-4, 10, 1.0
"""Defaults of a run from a pretrained checkpoint (--init-from), measured in docs/CONVERT.md: a
tiny pretrained model converted and distilled on one domain kept tier 0 within 0.01 nats of the
source on another domain's held-out text, and every narrow tier improved on both (at 6e-3 and
alpha 0.5 tier 0 lost 0.8 nats out of domain; SmolLM2-135M went from loss 4.3 to 23.6 in three
steps at 6e-3)."""


def resolve_defaults(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """`cfg` with the defaults that depend on the start filled in (lr, warmup_steps,
    distill_alpha left None: from scratch, or fine-tuning with --init-from), and one line per
    default chosen for a pretrained start (printed, so the user knows). Idempotent."""
    tuned = cfg.init_from is not None
    values: dict[str, Any] = {}
    if cfg.lr is None:
        values["lr"] = FINETUNE_LR if tuned else SCRATCH_LR
    if cfg.warmup_steps is None:
        # A count, not a fraction of --steps: a resumed run may change --steps, not its schedule
        values["warmup_steps"] = FINETUNE_WARMUP if tuned else SCRATCH_WARMUP
    if cfg.distill_alpha is None:
        values["distill_alpha"] = FINETUNE_ALPHA if tuned else SCRATCH_ALPHA
    notes = []
    if tuned and values:
        said = {"lr": "--lr {:g}", "warmup_steps": "--warmup-steps {}",
                "distill_alpha": "--distill-alpha {:g}"}
        chosen = [said[k].format(v) for k, v in values.items()
                  if k != "distill_alpha" or cfg.distill]
        if chosen:
            notes.append(f"--init-from: fine-tuning defaults {', '.join(chosen)} (a pretrained "
                         f"start; pass the flags to choose)")
    return dataclasses.replace(cfg, **values), notes


def validate(cfg: TrainConfig, base: int | None = None, world: int = 1) -> None:
    """Raise a ConfigError/TierError naming the setting on bad input (before anything is written)."""
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.arch not in ARCHS:
        raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    for key in ("steps", "batch_size", "seq_len", "eval_every", "save_every", "eval_windows",
                "keep_checkpoints", "log_every"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    cfg = resolve_defaults(cfg)[0]
    _validate_finite(cfg)
    for key in ("lr", "eps"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)!r}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise ConfigError(f"beta1/beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0 or cfg.warmup_steps < 0:
        raise ConfigError("weight_decay, grad_clip and warmup_steps must be non-negative")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0 <= cfg.distill_alpha <= 1 or not cfg.distill_temperature > 0:
        raise ConfigError(f"distill_alpha must be in [0, 1] and distill_temperature positive, got "
                          f"{cfg.distill_alpha}, {cfg.distill_temperature}")
    _validate_scale(cfg)
    _validate_sources(cfg)
    if base is None:  # from_preset raises the ConfigError listing the presets
        base = model_config(cfg, cfg.vocab_size).base
    _validate_tiers(cfg, base, world)


def _validate_scale(cfg: TrainConfig) -> None:
    """The issue-12 settings: shapes, precision, accumulation, workers, logs."""
    for key in (*SHAPE_KEYS, "grad_accum"):
        v = getattr(cfg, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    for key in ("dtype", "save_dtype"):
        v = getattr(cfg, key)
        if v is not None and v not in DTYPES:
            raise ConfigError(f"{key} must be one of {', '.join(DTYPES)}, got {v!r}")
    if cfg.data_workers is not None and (isinstance(cfg.data_workers, bool) or not isinstance(
            cfg.data_workers, int) or cfg.data_workers < 0):
        raise ConfigError(f"data_workers must be a non-negative integer, got {cfg.data_workers!r}")
    if cfg.adamw_impl not in ADAMW_IMPLS:
        raise ConfigError(f"adamw_impl must be one of {', '.join(ADAMW_IMPLS)}, got {cfg.adamw_impl!r}")
    if not (isinstance(cfg.tail_lr_scale, int | float) and cfg.tail_lr_scale > 0):
        raise ConfigError(f"tail_lr_scale must be a positive number, got {cfg.tail_lr_scale!r}")
    if cfg.peak_tflops is not None and not cfg.peak_tflops > 0:
        raise ConfigError(f"peak_tflops must be positive, got {cfg.peak_tflops!r}")
    if cfg.compile is not None and (not isinstance(cfg.compile, str) or not cfg.compile):
        raise ConfigError(f"compile must name a torch.compile backend, got {cfg.compile!r}")


def _validate_sources(cfg: TrainConfig) -> None:
    """Flags that the chosen source of the model or tokenizer would silently ignore are refused:
    --init-from takes the architecture from its checkpoint (a --hidden-size beside it used to be
    dropped without a word), and a BPE is trained only from raw text with --vocab-size in range
    (the tokenizers library aborts the process for ~10^8)."""
    if cfg.init_from:
        given = [f"--{f.replace('_', '-')}" for f in SHAPE_KEYS if getattr(cfg, f) is not None]
        if cfg.model_config is not None:
            given.append("--model-config")
        if given:
            raise ConfigError(f"{' '.join(given)}: the architecture comes from --init-from "
                              f"{cfg.init_from}; drop {'them' if len(given) > 1 else 'it'} (or "
                              f"train from scratch without --init-from)")
    if family(cfg.arch).text and not cfg.init_from and not is_prepared(cfg.data):
        D.check_vocab_size(cfg.vocab_size)


def _validate_finite(cfg: TrainConfig) -> None:
    """Every number a finite number, every seed one torch and numpy take (NaN passes every
    comparison, so the range checks below would not see it)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{f.name} must be a finite number, got {x!r}")
    for key in ("seed", "split_seed"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise ConfigError(f"{key} must be an integer in [0, 2^63), got {v!r}")


def _validate_tiers(cfg: TrainConfig, base: int, world: int) -> None:
    ts = trained_tiers(cfg, base)
    if cfg.tier_probs is not None:
        ps = list(cfg.tier_probs)
        if len(ps) != len(ts):
            raise ConfigError(f"tier_probs has {len(ps)} values {ps} for {len(ts)} trained "
                              f"tiers ({ts}); give one probability per tier")
        if any(p < 0 for p in ps) or abs(sum(ps) - 1.0) > 1e-6:
            raise ConfigError(f"tier_probs {ps} must be non-negative and sum to 1 "
                              f"(they sum to {sum(ps):g})")
    if cfg.joint_weights is not None and len(cfg.joint_weights) != len(ts):
        raise ConfigError(f"joint_weights has {len(cfg.joint_weights)} values for {len(ts)} "
                          f"trained tiers ({ts})")
    if cfg.tier is not None:
        _check_tier(base, cfg.tier, "tier")
    for t in cfg.rank_tiers or []:
        _check_tier(base, t, "rank_tiers")
    for rt in runtime_tiers(cfg, world):
        rank_choices(cfg, base, rt)
