"""The generated train_gpt.py's runtime (distill/bundle.py builds the script; this module runs inside it):
stand-ins for optional dependencies (accelerate, safetensors, tqdm) so the script needs only torch, numpy,
sentencepiece and zstandard, and the script's commands — eval, train, pack, sources.

Kept apart from distill/bundle.py so that packing (which asks bundle for the code size) and the script's
`pack` command (which imports the packer) form no import cycle.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from distill.bundle import ARTIFACT_NAME, SCRIPT_NAME, module_path, read_bundled_sources
from distill.errors import DistillError

# -------------------------------------------------------------- stand-ins for optional dependencies


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


class _Accelerator:
    """Single-process stand-in for accelerate.Accelerator (the calls student.train makes). Multi-GPU runs
    need the real accelerate."""

    def __init__(self, cpu: bool = False, **_kw):
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
        self.process_index, self.num_processes, self.is_main_process = 0, 1, True

    def prepare(self, *objs):
        return objs[0] if len(objs) == 1 else objs

    def backward(self, loss):
        loss.backward()

    def no_sync(self, _model):
        import contextlib

        return contextlib.nullcontext()

    def wait_for_everyone(self):
        pass


class SafetensorError(Exception):
    pass


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def st_save_file(tensors: dict, filename, metadata: dict | None = None) -> None:
    """Minimal safetensors writer: u64 header length, JSON header {name: dtype, shape, data_offsets}
    (padded with spaces to 8 bytes), then the little-endian tensor bytes in header order."""
    import struct

    import torch

    codes = {getattr(torch, v): k for k, v in _ST_DTYPES.items()}
    header, chunks, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(chunks))


def st_load_file(filename, device: str = "cpu") -> dict:
    """Minimal safetensors reader (the inverse of `st_save_file`; reads files the real library writes)."""
    import struct

    import torch

    data = Path(filename).read_bytes()
    try:
        (n,) = struct.unpack_from("<Q", data)
        header = json.loads(data[8 : 8 + n])
        out = {}
        for name, h in header.items():
            if name == "__metadata__":
                continue
            b, e = h["data_offsets"]
            buf = bytearray(data[8 + n + b : 8 + n + e])
            flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            out[name] = flat.view(getattr(torch, _ST_DTYPES[h["dtype"]])).reshape(h["shape"]).to(device)
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SafetensorError(f"{filename}: not a safetensors file ({type(e).__name__}: {e})") from None
    return out


class _Tqdm:
    """No-op stand-in for tqdm (progress bars are cosmetic)."""

    def __init__(self, iterable=None, *_a, **_kw):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, _n=1):
        pass

    def close(self):
        pass


def install_fallbacks() -> list[str]:
    """Register stand-ins for accelerate / safetensors / tqdm where they are not installed -> their names."""
    import importlib.machinery
    import types

    def module(name: str) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec(name) works
        return mod

    made = []
    if _missing("accelerate"):
        acc = module("accelerate")
        acc.Accelerator, acc.__version__ = _Accelerator, "standalone-stand-in"
        sys.modules["accelerate"] = acc
        made.append("accelerate")
    if _missing("safetensors"):
        st, st_torch = module("safetensors"), module("safetensors.torch")
        st.SafetensorError, st.torch = SafetensorError, st_torch
        st_torch.save_file, st_torch.load_file = st_save_file, st_load_file
        sys.modules["safetensors"], sys.modules["safetensors.torch"] = st, st_torch
        made.append("safetensors")
    if _missing("tqdm"):
        tq = module("tqdm")
        tq.tqdm = _Tqdm
        sys.modules["tqdm"] = tq
        made.append("tqdm")
    return made


# ------------------------------------------------------------------------------ the script's commands


def _eval(args, script: Path) -> int:
    import os

    from distill.score import score

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    art = Path(args.artifact) if args.artifact else script.parent / ARTIFACT_NAME
    res = score(str(art), args.tokenizer, args.val, args.seq_len, stride=args.stride, batch_size=args.batch_size,
                device=device, max_windows=args.max_windows, tokenizer_check=not args.no_tokenizer_check,
                progress=False)
    code = script.read_bytes()
    res.update(bytes_code=len(code), bytes_model=os.path.getsize(art),
               bytes_total=len(code) + os.path.getsize(art))
    print(f"eval | tokens:{res['tokens']} | bytes:{res['bytes']} | val_loss:{res['val_loss']:.8f} | "
          f"val_bpb:{res['val_bpb']:.8f} | bytes_total:{res['bytes_total']}")
    print(json.dumps(res, sort_keys=True))
    return 0


def _train(argv: list[str]) -> int:
    from student.train import cli_main

    if _missing("matplotlib"):
        argv = ["--train.plot", "false", *argv]
    return cli_main(argv)


def _sources(args, script: Path) -> int:
    from distill.fsutil import write_text_atomic

    for rel, src in sorted(read_bundled_sources(script.read_bytes()).items()):
        write_text_atomic(Path(args.dir) / rel, src)
    print(f"{args.dir}: wrote the bundled sources")
    return 0


def _serve_model_source() -> None:
    """distill.artifact.model_source reads student/model.py from disk; inside the script the file is in
    memory, so it is read through its loader instead (same bytes: the artifact's embedded-code check and
    `pack` then work unchanged)."""
    import distill.artifact as art
    import student.model as sm

    if not Path(sm.__file__).is_file():
        art.model_source = lambda: module_path("student.model")[1]


def main(argv: list[str] | None = None, script: str | None = None) -> int:
    """The generated script's command line (see the module docstring). A DistillError is one line, exit 2."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    script_path = Path(script or sys.argv[0]).resolve()
    install_fallbacks()
    try:
        _serve_model_source()
        if argv[:1] == ["train"]:  # every option after `train` is student.train's
            return _train(argv[1:])
        from distill.pack_cli import add_parser as add_pack_parser

        ap = argparse.ArgumentParser(prog=SCRIPT_NAME, description="Parameter Golf submission (distill).")
        sub = ap.add_subparsers(dest="command", metavar="COMMAND")
        e = sub.add_parser("eval", help="val_bpb of the artifact (the challenge's metric); JSON last line")
        e.add_argument("--val", required=True, help="validation shard glob, e.g. 'fineweb_val_*.bin'")
        e.add_argument("--tokenizer", required=True, help="SentencePiece .model the shards were encoded with")
        e.add_argument("--seq-len", type=int, required=True, help="window length L")
        e.add_argument("--artifact", default=None, help=f"packed model (default: {ARTIFACT_NAME} beside this script)")
        e.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: none)")
        e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
        e.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        e.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
        e.add_argument("--no-tokenizer-check", action="store_true", help="skip the standalone-space check")
        sub.add_parser("train", help="train a student: python train_gpt.py train --config FILE [overrides]")
        add_pack_parser(sub)
        s = sub.add_parser("sources", help="write the bundled sources into DIR")
        s.add_argument("dir")
        args = ap.parse_args(argv)
        if args.command == "eval":
            return _eval(args, script_path)
        if args.command == "sources":
            return _sources(args, script_path)
        if args.command == "pack":
            return args.func(args)
        ap.print_help()
        return 1
    except DistillError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
