"""Checkpoint directories: model.safetensors (float32 GPT state_dict) + config.json + config.toml, and the
resume/ state (raw weights, optimizers, loader position, RNG) a `--resume` run continues from.

Every file is written atomically (distill.fsutil), so a run killed mid-save leaves the previous checkpoint.
Resume files hold only tensors and plain containers/ints/floats/strings (numpy arrays and scalars are stored
as tagged uint8 tensors and restored bit for bit), so they load with torch.load(weights_only=True): a
tampered resume file cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from distill.errors import DistillError
from distill.fsutil import atomic_path, write_json_atomic, write_text_atomic
from student.model import GPT, ModelConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RESUME_DIR = "resume"


def _float32_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def save_checkpoint(out_dir: str | os.PathLike, model: torch.nn.Module, config_dict: dict,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model.safetensors (float32; `state` overrides the model's own, e.g. EMA weights), config.json
    and config.toml (a file `student.train --config` accepts)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / MODEL_FILE, state if state is not None else _float32_state(model))
    write_json_atomic(out / CONFIG_FILE, config_dict)
    try:
        from student.config import RunConfig, to_toml

        write_text_atomic(out / "config.toml", to_toml(RunConfig.from_dict(config_dict, source=str(out))))
    except DistillError:
        pass  # a config_dict with foreign sections: config.json alone still describes the model
    return out


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise DistillError(f"{ckpt}: checkpoint directory not found")
    cfg_path = ckpt / CONFIG_FILE
    if not cfg_path.is_file():
        raise DistillError(f"{ckpt}: not a checkpoint (no {CONFIG_FILE})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{cfg_path}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise DistillError(f"{cfg_path}: no 'model' section")
    return cfg


def load_checkpoint(ckpt_dir: str | os.PathLike, device: str = "cpu") -> GPT:
    """A checkpoint directory -> GPT in eval mode; DistillError for a missing or inconsistent directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(ckpt_dir)
    cfg = read_config(ckpt)
    weights = ckpt / MODEL_FILE
    if not weights.is_file():
        raise DistillError(f"{ckpt}: not a checkpoint (no {MODEL_FILE})")
    try:
        model = GPT(ModelConfig.from_dict(cfg["model"]))
    except (TypeError, ValueError, AssertionError) as e:
        raise DistillError(f"{ckpt / CONFIG_FILE}: bad model config ({e})") from None
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise DistillError(f"{weights}: unreadable safetensors ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DistillError(f"{weights}: weights do not match the config "
                           f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise DistillError(f"--device: cannot use {device!r} ({str(e).splitlines()[0]})") from None
    return model.eval()


# ---------------------------------------------------------------------------------- resume state


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


_NDARRAY = "__distill_ndarray__"  # tag of an encoded numpy array / scalar in a resume file


def to_weights_only(obj):
    """A resume object -> the same structure built only from what torch.load(weights_only=True) accepts:
    numpy arrays/scalars become {_NDARRAY: uint8 tensor of their bytes, dtype, shape, scalar} (exact)."""
    if isinstance(obj, (np.ndarray, np.generic)):
        a = np.asarray(obj)
        if a.dtype.hasobject:
            raise TypeError(f"resume state: numpy object arrays cannot be stored ({a.dtype})")
        raw = torch.tensor(np.frombuffer(a.tobytes(), dtype=np.uint8))  # a copy: exact bytes, any dtype
        return {_NDARRAY: raw, "dtype": a.dtype.str, "shape": list(a.shape), "scalar": isinstance(obj, np.generic)}
    if isinstance(obj, dict):
        return type(obj)((k, to_weights_only(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_weights_only(v) for v in obj)
    return obj


def from_weights_only(obj):
    """Inverse of `to_weights_only`."""
    if isinstance(obj, dict):
        if _NDARRAY in obj:
            a = np.frombuffer(obj[_NDARRAY].numpy().tobytes(), dtype=np.dtype(obj["dtype"]))
            a = a.reshape(obj["shape"]).copy()
            return a[()] if obj["scalar"] else a
        return type(obj)((k, from_weights_only(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_weights_only(v) for v in obj)
    return obj


def save_resume(out_dir: str | os.PathLike, name: str, obj: dict) -> None:
    """resume/<name>.pt: rank 0 writes `state` (weights, optimizers, loader position, step, timers);
    every rank writes its own `rng_rank<r>` (each rank's generators differ). Stored in weights_only form."""
    path = Path(out_dir) / RESUME_DIR / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(to_weights_only(obj), tmp)


def load_resume(out_dir: str | os.PathLike, name: str, required: bool = True) -> dict | None:
    """resume/<name>.pt as saved (numpy values restored), loaded with weights_only=True: no code runs."""
    rdir = Path(out_dir) / RESUME_DIR
    path = rdir / f"{name}.pt"
    if not path.is_file():
        if not required:
            return None
        raise DistillError(f"{rdir}: no resume state {path.name} (run without --resume, or point --out at "
                           f"a run directory)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DistillError(f"{path}: not loadable as plain tensors/containers (weights_only=True): written by an "
                           "older distill or not a resume file; start the run again without --resume") from None
    except Exception as e:  # noqa: BLE001 — torch raises many types for a corrupt zip/pickle
        raise DistillError(f"{path}: unreadable resume state ({str(e).splitlines()[0][:120]})") from None
    return from_weights_only(obj)
