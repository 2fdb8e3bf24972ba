"""One typed config per training run: dataclass sections loaded from TOML, then `--key value` overrides.

Sections: [model] (= student.model.ModelConfig), [train], [optim], [data], [kd], [eval]. Defaults in code
are the challenge baseline (openai/parameter-golf train_gpt.py). An unknown key or a wrong type is a
one-line DistillError naming the file (or flag) and the key. `to_toml` writes a file `load_config`
accepts, so every run directory holds a re-runnable config.
"""

from __future__ import annotations

import json
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill.errors import DistillError
from student.model import ModelConfig


@dataclass
class TrainConfig:
    seed: int = 1337
    out: str = "runs/student"
    max_steps: int = 20000  # also stops at the wall-clock cap, whichever comes first
    max_wallclock_s: float = 600.0  # training time cap (eval excluded); 0 = no cap
    batch_tokens: int = 524_288  # global tokens per optimizer step (all ranks, all micro-steps)
    seq_len: int = 1024
    grad_accum_steps: int = 1  # micro-steps per optimizer step on each rank
    warmdown_steps: int = 1200  # linear LR warmdown over the last N (estimated) steps of the budget
    warmdown_frac: float = 0.0  # > 0: warm down over this fraction of the budget instead
    min_lr_scale: float = 0.0  # LR floor during the warmdown, as a fraction of each group's base lr
    lr_warmup_steps: int = 0  # linear LR warm-up (the baseline uses none)
    compile_warmup_steps: int = 0  # steps run then rolled back (primes torch.compile; baseline: 20)
    grad_clip_norm: float = 0.0  # global L2 norm over all grads (optim.muon_sharded: per rank, pre-average)
    loop_enable_frac: float = 0.35  # depth recurrence (a model with `looping_active`) on from this progress
    bf16_embed: bool = False  # CUDA: token embedding (and its Adam state) stored in bf16, as the baseline
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # bf16 autocast (CUDA only; ignored on CPU)
    compile: bool = True  # torch.compile (CUDA only; ignored on CPU)
    log_every: int = 1
    checkpoint_every: int = 0  # also save model + resume state every N steps (0 = only at the end)
    plot: bool = True
    ema: bool = False  # exponential moving average of the weights; saved weights = EMA when on
    ema_decay: float = 0.997
    # EMA warm-up: step t uses decay min(ema_decay, (1 + t) / (10 + t)), so the average never carries the initial
    # weights and spans ~t/9 steps early on (short runs average their own warm-down, not their first steps)
    ema_warmup: bool = False
    qat: bool = False  # late QAT: fake-quantize 2-D block matrices in the last qat_frac of the budget
    qat_frac: float = 0.15
    qat_bits: int = 6
    qat_clip: float = 1.0  # row clip as a fraction of |w|max (distill.quant.Clip absmax)


@dataclass
class OptimConfig:
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6  # untied input embedding
    head_lr: float = 0.008  # untied lm_head
    matrix_lr: float = 0.04  # Muon, 2-D block matrices
    scalar_lr: float = 0.04  # Adam, vectors / scalars / control tensors
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_nesterov: bool = True
    muon_coeffs: str = "quintic"  # quintic (baseline) | polar_express (per-iteration coefficients)
    muon_row_normalize: bool = False  # unit-norm rows of the update before orthogonalising
    muon_wd: float = 0.0  # decoupled weight decay on Muon matrices
    muon_sharded: bool = False  # reduce-scatter / orthogonalise local slice / all-gather (no DDP for grads)
    embed_wd: float = 0.0  # > 0: the embedding's Adam becomes AdamW with this decay
    scalar_wd: float = 0.0  # > 0: the scalar group's Adam becomes AdamW with this decay


@dataclass
class DataConfig:
    train_shards: str = "data/datasets/fineweb10B_sp1024/fineweb_train_*.bin"
    val_shards: str = "data/datasets/fineweb10B_sp1024/fineweb_val_*.bin"
    tokenizer: str = "data/tokenizers/fineweb_1024_bpe.model"
    prefetch: int = 4  # batches decoded ahead by the loader threads
    loader_workers: int = 0  # loader producer threads per rank; 0 = auto (2 when training on CUDA, else 1)
    # "stream": rows cut from the token stream (the baseline); "bos": each step starts at a document's BOS and
    # runs on contiguously, one (1, local_tokens) row per micro-step, for per-document attention (the record)
    packing: str = "stream"
    bos_id: int = 1  # the BOS token id the "bos" packing (and the model's per-document attention) looks for


@dataclass
class KDConfig:
    teacher_cache: str = ""  # empty = plain CE training
    alpha: float = 0.5
    # both sides, on the split within the stored ids only (x T^2; the stored-vs-residual split stays at 1)
    temperature: float = 1.0
    # teacher-side smoothing: the stored top-k mass is tempered by this within itself (student untempered).
    # > 1 flattens the target toward what a far smaller student can fit (the capacity gap); 1 = off.
    target_temperature: float = 1.0
    top_k: int = 0  # KL over each row's top_k stored ids (0 = all the cache holds); the rest -> residual
    alpha_schedule: str = "constant"  # constant | warmup | anneal | warmup_anneal
    alpha_warmup_frac: float = 0.05  # α ramps 0 -> alpha over the first fraction of the budget
    alpha_anneal_frac: float = 0.2  # α -> alpha_final linearly over this fraction of the budget ...
    alpha_anneal_end: float = 1.0  # ... ending here (< 1: hand over BEFORE the LR warm-down, then stay at alpha_final)
    alpha_final: float = 0.0
    # KD only on the select_frac of each batch's rows with the highest teacher entropy (the rest: CE only);
    # 1.0 = every row (SE-KD, arXiv 2602.01395, found 20 % of positions by entropy beat full KD)
    select_frac: float = 1.0
    chunk_rows: int = 0  # rows per loss chunk (0 = all at once)


@dataclass
class EvalConfig:
    val_every: int = 1000  # steps between val evaluations (0 = only at the end)
    val_max_windows: int = 0  # cap on val windows (0 = the whole val stream)
    val_batch_size: int = 8
    val_stride: int = 0  # 0 = non-overlapping windows (the baseline's eval)
    final_eval: bool = True


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "train": TrainConfig, "optim": OptimConfig,
    "data": DataConfig, "kd": KDConfig, "eval": EvalConfig,
}

# short flags -> dotted keys
ALIASES = {
    "max_steps": "train.max_steps", "out": "train.out", "seed": "train.seed",
    "teacher_cache": "kd.teacher_cache", "kd_alpha": "kd.alpha", "alpha": "kd.alpha",
    "max_wallclock_s": "train.max_wallclock_s", "val_every": "eval.val_every",
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return {name: asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> RunConfig:
        cfg = cls()
        for section, values in d.items():
            if section not in SECTIONS:
                if section in ("meta",):  # provenance written beside the config, not a setting
                    continue
                raise DistillError(f"{source}: unknown section '{section}'")
            if not isinstance(values, dict):
                raise DistillError(f"{source}: '{section}' must be a table")
            for key, value in values.items():
                set_value(cfg, f"{section}.{key}", value, source, from_string=False)
        return cfg


def _field_type(section_cls: type, key: str):
    hints = typing.get_type_hints(section_cls)
    return hints.get(key)


def _coerce(tp, value, from_string: bool, where: str, key: str):
    """Check (TOML values) or parse (CLI strings) `value` as type `tp`; DistillError on a mismatch."""
    bad = DistillError(f"{where}: {key} must be {getattr(tp, '__name__', str(tp))}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (from_string and str(value).lower() in ("none", "null", "")):
            return None
        return _coerce(args[0], value, from_string, where, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_string and str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if from_string and str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_string:
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_string:
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def set_value(cfg: RunConfig, dotted: str, value, where: str, from_string: bool) -> None:
    if "." not in dotted:
        raise DistillError(f"{where}: unknown key '{dotted}'")
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise DistillError(f"{where}: unknown key '{dotted}'")
    obj = getattr(cfg, section)
    tp = _field_type(type(obj), key)
    if tp is None:
        raise DistillError(f"{where}: unknown key '{dotted}'")
    setattr(obj, key, _coerce(tp, value, from_string, where, dotted))


def parse_overrides(cfg: RunConfig, argv: list[str]) -> None:
    """Apply `--section.key value`, `--section.key=value` and short aliases (`--max-steps 3`) in order."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise DistillError(f"{arg}: unexpected argument (overrides are --key value)")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise DistillError(f"{arg}: missing value")
            value = argv[i + 1]
            i += 1
        i += 1
        dotted = name if "." in name else ALIASES.get(name.replace("-", "_"))
        if dotted is None:
            raise DistillError(f"{arg}: unknown key '{name}'")
        section, _, key = dotted.partition(".")
        set_value(cfg, f"{section}.{key.replace('-', '_')}", value, f"--{name}", from_string=True)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """TOML file (or JSON, e.g. a run's config.json) -> RunConfig, then the CLI overrides."""
    if path is None:
        cfg = RunConfig()
    else:
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"{path}: config not found")
        try:
            if path.suffix == ".json":
                raw = json.loads(path.read_text())
            else:
                raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DistillError(f"{path}: not valid TOML/JSON ({str(e).splitlines()[0]})") from None
        cfg = RunConfig.from_dict(raw, source=str(path))
    parse_overrides(cfg, list(overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that would otherwise fail deep inside training."""
    m, t, k = cfg.model, cfg.train, cfg.kd
    try:  # the model's own cross-field checks (record options vs the sizes), as one line
        m.validate()
    except ValueError as e:
        raise DistillError(f"model: {e} (shrinking a config? override these too)") from None
    if m.model_dim % m.num_heads or m.num_heads % m.num_kv_heads:
        raise DistillError(f"model: model_dim ({m.model_dim}) % num_heads ({m.num_heads}) and num_heads % "
                           f"num_kv_heads ({m.num_kv_heads}) must be 0")
    if (m.model_dim // m.num_heads) % 2:
        raise DistillError(f"model: head_dim {m.model_dim // m.num_heads} must be even (RoPE)")
    for name in ("max_steps", "batch_tokens", "seq_len", "grad_accum_steps"):
        if getattr(t, name) <= 0:
            raise DistillError(f"train.{name}: must be positive, got {getattr(t, name)}")
    if t.batch_tokens % t.seq_len:
        raise DistillError(f"train.batch_tokens: {t.batch_tokens} is not a multiple of seq_len {t.seq_len}")
    if cfg.data.packing not in ("stream", "bos"):
        raise DistillError(f"data.packing: must be stream or bos, got {cfg.data.packing!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise DistillError(f"train.device: must be auto, cpu or cuda, got {t.device!r}")
    if not 0.0 <= k.alpha <= 1.0:
        raise DistillError(f"kd.alpha: must lie in [0, 1], got {k.alpha}")
    if k.alpha_schedule not in ("constant", "warmup", "anneal", "warmup_anneal"):
        raise DistillError(f"kd.alpha_schedule: must be constant, warmup, anneal or warmup_anneal, "
                           f"got {k.alpha_schedule!r}")
    if k.top_k < 0:
        raise DistillError(f"kd.top_k: must be >= 0, got {k.top_k}")
    if not 0.0 < k.select_frac <= 1.0:
        raise DistillError(f"kd.select_frac: must lie in (0, 1], got {k.select_frac}")
    if not 0.0 < k.alpha_anneal_end <= 1.0 or not 0.0 <= k.alpha_anneal_frac <= k.alpha_anneal_end:
        raise DistillError(f"kd.alpha_anneal_frac / alpha_anneal_end: need 0 <= frac <= end <= 1 and end > 0, "
                           f"got {k.alpha_anneal_frac} / {k.alpha_anneal_end}")
    if not 0.0 <= k.alpha_final <= 1.0:
        raise DistillError(f"kd.alpha_final: must lie in [0, 1], got {k.alpha_final}")
    if k.temperature <= 0:
        raise DistillError(f"kd.temperature: must be positive, got {k.temperature}")
    if k.target_temperature <= 0:
        raise DistillError(f"kd.target_temperature: must be positive, got {k.target_temperature}")
    if not 0.0 <= t.min_lr_scale <= 1.0:
        raise DistillError(f"train.min_lr_scale: must lie in [0, 1], got {t.min_lr_scale}")
    if cfg.optim.muon_coeffs not in ("quintic", "polar_express"):
        raise DistillError(f"optim.muon_coeffs: must be quintic or polar_express, got {cfg.optim.muon_coeffs!r}")
    if t.qat_bits not in (2, 3, 4, 5, 6, 7, 8):
        raise DistillError(f"train.qat_bits: must be in 2..8, got {t.qat_bits}")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escaping is valid TOML basic-string escaping
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: RunConfig) -> str:
    """A TOML text `load_config` reads back to an equal RunConfig (None values are left out)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
