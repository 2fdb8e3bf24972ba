"""`distill convert --from pg-record STATE.pt --config CONFIG --out DIR`: another code's weights -> our checkpoint.

pg-record: a state_dict saved from the 1.0611 record's `GPT` (openai/parameter-golf records/track_10min_16mb/
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611, `torch.save(base_model.state_dict())`, i.e. its
final_model.pt). The record stores each kind of block matrix of all layers in one "bank":
  qo_bank (2L, d, d):        [i] = layer i's query,   [L + i] = layer i's attention output projection
  kv_bank (2L, kv, d):       [i] = layer i's key,     [L + i] = layer i's value
  mlp_up_bank (L, h, d), mlp_down_bank (L, d, h)
and everything else (tok_emb.weight, blocks.i.attn.q_gain, blocks.i.attn.attn_gate_w, blocks.i.resid_mix, ...,
skip_weights, skip_gates, parallel_*_lambdas, smear_gate.weight, smear_lambda) under our own names already.

The config supplies what a state_dict cannot show (loop layout, RoPE dims, gate scale, ...); sizes must agree
with the tensors. Options whose presence the tensors do show follow the tensors, with a note: the record's code
defaults leave the sparse attention gate and SmearGate off (its submitted runs turn them on), so one config
converts both. The output is a checkpoint directory (model.safetensors + config.json) that
`student.load_checkpoint`, `distill score`, `distill pack` and KD read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.errors import DistillError
from student.cli import PassThroughParser

FORMATS = ("pg-record",)
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile / DDP wrappers around the saved module


def _load_state(path: Path) -> dict:
    import pickle

    import torch

    if not path.is_file():
        raise DistillError(f"{path}: state_dict file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DistillError(f"{path}: not a plain tensor state_dict (refused by torch.load(weights_only=True))") from None
    except Exception as e:  # noqa: BLE001 — torch raises many types for a corrupt or foreign file
        raise DistillError(f"{path}: unreadable ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DistillError(f"{path}: expected a state_dict (a dict of tensors)")
    state = {}
    for k, v in obj.items():
        for pre in _WRAPPER_PREFIXES:
            k = k.removeprefix(pre)
        state[k] = v
    return state


def _expect(source: str, name: str, got: int, key: str, want: int) -> None:
    if got != want:
        raise DistillError(f"{source}: {name} is {got} in the state_dict but model.{key} = {want} in the config")


def adapt_config(state: dict, cfg, source: str) -> list[str]:
    """Check the config's sizes against the record tensors and set the on/off options the tensors show (in
    place). Returns one note per option changed."""
    for k in ("tok_emb.weight", "qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
        if k not in state:
            raise DistillError(f"{source}: no '{k}': not a state_dict of the record's GPT")
    V, d = state["tok_emb.weight"].shape
    _expect(source, "vocab (tok_emb rows)", V, "vocab_size", cfg.vocab_size)
    _expect(source, "model dim (tok_emb columns)", d, "model_dim", cfg.model_dim)
    qo, kv, up = state["qo_bank"].shape, state["kv_bank"].shape, state["mlp_up_bank"].shape
    _expect(source, "layers (qo_bank rows / 2)", qo[0] // 2, "num_layers", cfg.num_layers)
    _expect(source, "KV width (kv_bank dim 1)", kv[1], "num_kv_heads x head_dim",
            cfg.num_kv_heads * cfg.model_dim // cfg.num_heads)
    _expect(source, "MLP width (mlp_up_bank dim 1)", up[1], "mlp_mult x model_dim", int(cfg.mlp_mult * d))
    notes = []

    def follow(key: str, value, why: str) -> None:
        if getattr(cfg, key) != value:
            notes.append(f"model.{key}: {getattr(cfg, key)} -> {value} ({why})")
            setattr(cfg, key, value)

    gate = state.get("blocks.0.attn.attn_gate_w")
    follow("attn_gate_window", 0 if gate is None else int(gate.shape[1]),
           "the state_dict's attn_gate_w" if gate is not None else "no attn_gate_w: SPARSE_ATTN_GATE_ENABLED=0")
    smear = state.get("smear_gate.weight")
    follow("smear_gate_window", 0 if smear is None else int(smear.shape[1]),
           "the state_dict's smear_gate" if smear is not None else "no smear_gate: SMEAR_GATE_ENABLED=0")
    follow("skip_gates", "skip_gates" in state, "skip_gates in the state_dict" if "skip_gates" in state
           else "no skip_gates: SKIP_GATES_ENABLED=0")
    follow("tie_embeddings", "lm_head.weight" not in state, "lm_head.weight in the state_dict"
           if "lm_head.weight" in state else "no lm_head.weight")
    if any(k.endswith("attn_gate_proj.weight") for k in state):
        raise DistillError(f"{source}: attn_gate_proj (ATTN_OUT_GATE_ENABLED=1) is not supported")
    return notes


def record_to_student(state: dict, num_layers: int) -> dict:
    """The record's names -> ours: banks split per layer; the rest keeps its name."""
    L = num_layers
    out = {}
    for k, v in state.items():
        if k == "qo_bank":
            for i in range(L):
                out[f"blocks.{i}.attn.c_q.weight"], out[f"blocks.{i}.attn.proj.weight"] = v[i], v[L + i]
        elif k == "kv_bank":
            for i in range(L):
                out[f"blocks.{i}.attn.c_k.weight"], out[f"blocks.{i}.attn.c_v.weight"] = v[i], v[L + i]
        elif k == "mlp_up_bank":
            for i in range(L):
                out[f"blocks.{i}.mlp.fc.weight"] = v[i]
        elif k == "mlp_down_bank":
            for i in range(L):
                out[f"blocks.{i}.mlp.proj.weight"] = v[i]
        else:
            out[k] = v
    return out


def convert_pg_record(state_path: str | Path, config_path: str | Path, out_dir: str | Path,
                      overrides: list[str] | None = None, log=print) -> Path:
    """STATE.pt (the record's GPT state_dict) + our run config -> checkpoint directory `out_dir`."""
    import torch

    from student.checkpoint import save_checkpoint
    from student.config import load_config, validate
    from student.model import GPT

    src = Path(state_path)
    state = _load_state(src)
    cfg = load_config(config_path, overrides)
    for note in adapt_config(state, cfg.model, str(src)):
        log(f"convert | note | {note}")
    validate(cfg)
    flat = record_to_student(state, cfg.model.num_layers)
    try:
        model = GPT(cfg.model)
    except (ValueError, AssertionError) as e:
        raise DistillError(f"{config_path}: bad model config ({e})") from None
    want = model.state_dict()
    if not cfg.model.parallel_start_layer:  # the record keeps its lane mix even with the parallel decoder off
        for k in ("parallel_post_lambdas", "parallel_resid_lambdas"):
            flat.pop(k, None)
    if "skip_weights" in flat and flat["skip_weights"].numel() == 0 and "skip_weights" not in want:
        flat.pop("skip_weights")
    missing, unexpected = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    if missing or unexpected:
        raise DistillError(f"{src}: tensors do not match the config {config_path} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, w in want.items():
        if tuple(flat[k].shape) != tuple(w.shape):
            raise DistillError(f"{src}: {k} has shape {tuple(flat[k].shape)}, the config needs {tuple(w.shape)}")
        if not flat[k].is_floating_point():
            raise DistillError(f"{src}: {k} is {flat[k].dtype}, expected a floating-point tensor")
    state32 = {k: v.detach().to(torch.float32).contiguous() for k, v in flat.items()}
    model.load_state_dict(state32, strict=True)
    cfg_dict = cfg.to_dict()
    cfg_dict["meta"] = {"converted_from": str(src), "format": "pg-record"}
    out = save_checkpoint(out_dir, model, cfg_dict, state=state32)
    log(f"convert | from:pg-record | state:{src} | params:{model.num_params():,} | out:{out}")
    return out


def handler(args: argparse.Namespace) -> int:
    if args.src_format != "pg-record":  # argparse's choices already refuse others; kept for direct callers
        raise DistillError(f"--from: unknown format {args.src_format!r} (known: {', '.join(FORMATS)})")
    convert_pg_record(args.state, args.config, args.out, overrides=args.overrides)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="another code's saved weights -> a checkpoint directory (pg-record: the 1.0611 record's GPT)",
        description="Convert STATE (a torch state_dict saved from another code's model) into a checkpoint "
                    "directory that `distill score`, `distill pack` and KD load. pg-record: the 1.0611 record's "
                    "GPT (its qo_bank/kv_bank/mlp_*_bank are split per layer; the other tensors keep their names).",
        epilog="Overrides: any config key as --section.key value (e.g. --model.rope_dims 16).",
    )
    p.__class__ = PassThroughParser  # unknown --section.key value pairs become config overrides
    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS, help="the saved model's code")
    p.add_argument("state", help="the saved state_dict (.pt), e.g. the record's final_model.pt")
    p.add_argument("--config", required=True,
                   help="run config describing the model, e.g. configs/record_sp8192.toml")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.set_defaults(func=handler, overrides=[])


if __name__ == "__main__":  # python -m distill.convert ...
    from distill.cli import main

    sys.exit(main(["convert", *sys.argv[1:]]))
