"""`distill export RUN_DIR --out DIR`: a packed student run -> a challenge submission folder.

  distill export runs/student_kd --out submission/ --author "A. Name" --github-id aname
  distill export data_cache/demo/student_kd --out sub/ --score data_cache/demo/logs/score_kd.log

RUN_DIR is a training run's --out (model.safetensors, config.json, config.toml, metrics.jsonl) holding ONE
packed artifact (`*.golf`, as `distill demo` writes; else --artifact FILE). DIR receives, as the records
in openai/parameter-golf do:

  final_model.golf   the artifact, copied (bytes_model)
  train_gpt.py       the standalone script (distill.bundle): eval / train / pack with only torch, numpy,
                     sentencepiece and zstandard installed (bytes_code; the same bytes `distill pack` counts)
  submission.json    name, author, github_id, blurb, date, track, val_loss, val_bpb, bytes_total,
                     bytes_code, bytes_model, seeds, seed_results, hardware, pytorch_version, ...
  README.md          configs, teacher/cache provenance (KD), results, the exact commands
  requirements.txt   config.json, config.toml, logs/ (metrics.jsonl and the run's logs)

val_loss / val_bpb are those of `distill score` on the artifact (the challenge's evaluation: the run's
data.val_shards, data.tokenizer and train.seq_len unless --val/--tokenizer/--seq-len), or of a saved
`distill score --json` output (--score FILE). bytes_total = bytes_code + bytes_model <= 16,000,000 is
enforced. Deterministic: the same run exported twice gives byte-identical folders (the only date is the
run's, from its model.safetensors; JSON keys sorted).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from distill import bundle
from distill.errors import DistillError
from distill.fsutil import sha256_bytes, sha256_file

BUDGET_BYTES = 16_000_000
TRACKS = ("non_record_16mb", "10min_16mb")
RECORD_TRAIN_SECONDS = 600.0


# ------------------------------------------------------------------------------------------ reading the run


def read_run(run: Path) -> dict:
    """config.json (+ checks the run is a finished checkpoint) -> the full config dict."""
    if not run.is_dir():
        raise DistillError(f"{run}: run directory not found")
    for name in ("config.json", "model.safetensors"):
        if not (run / name).is_file():
            raise DistillError(f"{run}: not a training run (no {name}); export a `distill train --out` directory")
    try:
        cfg = json.loads((run / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{run / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise DistillError(f"{run / 'config.json'}: no \"model\" section")
    return cfg


def find_artifact(run: Path, explicit: str | None) -> Path:
    """--artifact, else the one *.golf file in RUN_DIR."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise DistillError(f"--artifact: {p} not found")
        return p
    found = sorted(run.glob("*.golf"))
    if not found:
        raise DistillError(f"{run}: no packed artifact (*.golf); run `distill pack {run} --out {run / 'model.golf'}` "
                           "first, or pass --artifact FILE")
    if len(found) > 1:
        raise DistillError(f"{run}: several artifacts ({', '.join(p.name for p in found)}); pick one with --artifact")
    return found[0]


def read_metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DistillError(f"{p}:{i}: not valid JSON") from None
    return rows


def cache_provenance(cache_dir: str) -> dict | None:
    """What a KD run's teacher cache manifest says about the teacher (None when it is gone)."""
    m = Path(cache_dir) / "manifest.json"
    if not cache_dir or not m.is_file():
        return None
    try:
        man = json.loads(m.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    stats = man.get("stats") or {}
    keep = ("tokens", "teacher_bpb", "projected_teacher_bpb", "aligned_fraction", "bytes_on_disk", "bytes_per_token")
    return {"manifest_sha256": sha256_file(m), "teacher": man.get("teacher"), "backend": man.get("backend"),
            "projection": man.get("projection"), "k": man.get("k"), "format_version": man.get("format_version"),
            "student_tokenizer_sha256": man.get("student_tokenizer_sha256"),
            "shards": len(man.get("shards") or []), "stats": {k: stats[k] for k in keep if k in stats}}


def collect_logs(run: Path, extra: list[str]) -> dict[str, Path]:
    """{name in DIR/logs: file}: metrics.jsonl, *.log in RUN_DIR and RUN_DIR/logs, the demo's sibling
    logs/<stage>_<name>.log for this student (student_, pack_, score_), and every --log FILE."""
    files = [run / "metrics.jsonl"] + sorted(run.glob("*.log")) + sorted((run / "logs").glob("*.log"))
    if run.name.startswith("student_"):  # distill demo: workdir/student_kd + workdir/logs/student_kd.log
        tag = run.name[len("student_"):]
        files += [run.parent / "logs" / f"{stage}_{tag}.log" for stage in ("student", "pack", "score")]
    for x in extra:
        if not Path(x).is_file():
            raise DistillError(f"--log: {x} not found")
    out: dict[str, Path] = {}
    for f in files + [Path(x) for x in extra]:
        if not f.is_file() or any(f.resolve() == g.resolve() for g in out.values()):
            continue
        if f.name in out:
            raise DistillError(f"--log: two logs named {f.name} ({out[f.name]}, {f}); rename one")
        out[f.name] = f
    return out


def score_result(args, cfg: dict, artifact: Path) -> dict:
    """The val numbers: a saved `distill score --json` output (--score), else scored now."""
    if args.score:
        p = Path(args.score)
        if not p.is_file():
            raise DistillError(f"--score: {p} not found")
        res = None
        for line in reversed(p.read_text().splitlines()):
            if line.startswith("{"):
                try:
                    res = json.loads(line)
                    break
                except json.JSONDecodeError:
                    pass
        if not isinstance(res, dict) or not {"val_loss", "val_bpb", "tokens", "bytes"} <= set(res):
            raise DistillError(f"--score: {p} has no `distill score --json` result (a JSON line with val_bpb)")
        if res.get("partial"):
            raise DistillError(f"--score: {p} scored only the first windows (--max-windows); not a submission number")
        if not res.get("model") or Path(res["model"]).resolve() != artifact.resolve():
            raise DistillError(f"--score: {p} scored {res.get('model')!r}, not {artifact}")
        return res
    from distill.score import score

    data, train = cfg.get("data") or {}, cfg.get("train") or {}
    tok, val = args.tokenizer or data.get("tokenizer"), args.val or data.get("val_shards")
    seq_len = args.seq_len or train.get("seq_len")
    for flag, v, key in (("--tokenizer", tok, "data.tokenizer"), ("--val", val, "data.val_shards"),
                         ("--seq-len", seq_len, "train.seq_len")):
        if not v:
            raise DistillError(f"{flag}: not given and the run's config.json has no {key}")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return score(str(artifact), tok, val, int(seq_len), stride=args.stride, device=device, progress=False)


# ------------------------------------------------------------------------------------------ writing


def run_date(run: Path) -> str:
    """The run's own date: when its weights were written (UTC)."""
    t = (run / "model.safetensors").stat().st_mtime
    return datetime.fromtimestamp(int(t), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_track(track: str, cfg: dict, train_s: float | None) -> None:
    if track not in TRACKS:
        raise DistillError(f"--track: expected one of {', '.join(TRACKS)}, got {track!r}")
    if track != "10min_16mb":
        return
    if (cfg.get("kd") or {}).get("teacher_cache"):
        raise DistillError("--track 10min_16mb: this run distils from an offline teacher cache, whose teacher pass "
                           "is outside the 10-minute budget; use --track non_record_16mb")
    cap = float((cfg.get("train") or {}).get("max_wallclock_s") or 0)
    if not 0 < cap <= RECORD_TRAIN_SECONDS or (train_s is not None and train_s > RECORD_TRAIN_SECONDS):
        raise DistillError(f"--track 10min_16mb: training must be capped at {RECORD_TRAIN_SECONDS:g} s "
                           f"(train.max_wallclock_s {cap:g}, trained {train_s} s)")


def requirements(codecs: set[str], torch_version: str | None) -> str:
    lines = ["# What train_gpt.py imports. accelerate / safetensors / tqdm / matplotlib are used when present",
             "# (single-process stand-ins otherwise; multi-GPU training needs accelerate).",
             "torch" + (f"  # the run used {torch_version}" if torch_version else ""),
             "numpy", "sentencepiece", "zstandard"]
    if "brotli" in codecs:
        lines.append("brotli  # the artifact uses the brotli codec")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def smoke_command(cfg: dict) -> str:
    """A few CPU steps of a tiny model on the run's own data (KD off: the cache is not part of the folder)."""
    data = cfg.get("data") or {}
    return ("python train_gpt.py train --config config.toml --out smoke_run --max-steps 3 "
            "--train.max_wallclock_s 0 --train.device cpu --train.plot false --model.num_layers 2 "
            "--model.model_dim 64 --model.num_heads 2 --model.num_kv_heads 1 --train.seq_len 64 "
            "--train.batch_tokens 512 --eval.val_max_windows 2 --kd.teacher_cache '' "
            f"--data.train_shards '{data.get('train_shards', 'TRAIN_GLOB')}' "
            f"--data.val_shards '{data.get('val_shards', 'VAL_GLOB')}' "
            f"--data.tokenizer '{data.get('tokenizer', 'TOKENIZER')}'")


def render_readme(s: dict, cfg: dict, res: dict, info: dict, kd: dict | None, summary: dict,
                  logs: list[str], val_glob: str) -> str:
    m, t, data = cfg["model"], cfg.get("train") or {}, cfg.get("data") or {}
    L = []
    L += [f"# {s['name']}", "", s["blurb"], "",
          (f"**val_bpb: {s['val_bpb']:.8f}** (val_loss {s['val_loss']:.8f}) | **{s['bytes_total']:,} bytes** "
          f"(code {s['bytes_code']:,} + model {s['bytes_model']:,}) | track `{s['track']}` | {s['hardware']}"), ""]
    L += ["## Results", "", "| Seed | Steps | Train s | val_loss | val_bpb | Artifact bytes (code + model) |",
          "|------|-------|---------|----------|---------|-------------------------------|",
          (f"| {t.get('seed')} | {summary.get('steps')} | {summary.get('train_s')} | {s['val_loss']:.8f} | "
          f"{s['val_bpb']:.8f} | {s['bytes_total']:,} |"), ""]
    L += [f"Scored on the ROUNDTRIPPED artifact (`final_model.golf`, dequantized exactly as the evaluator "
          f"does): {res['tokens']:,} val tokens, {res['bytes']:,} bytes of text, seq_len {res['seq_len']}, "
          + ("non-overlapping windows (the challenge's default evaluation)" if not res.get("stride")
             else f"sliding windows, stride {res['stride']}") + f", tokenizer sha256 "
          f"`{res.get('tokenizer_sha256', '?')}`."]
    if summary.get("pre_quant_val_bpb") is not None:
        L += ["", f"Training's own final eval of the float weights: val_bpb {summary['pre_quant_val_bpb']:.6f}"
              + (f" (first {summary['val_max_windows']} windows only)" if summary.get("val_max_windows") else "")
              + "."]
    L += ["", "## Track", ""]
    if kd:
        L += [("Distilled from an offline teacher pass (a top-k cache computed before training): that pass is "
              "outside the 10-minute training budget, so this result belongs to the **non-record / unlimited-"
              "compute track**. The student's own training respects the wall-clock cap below, so it is "
              "comparable with record-track runs.")]
    else:
        L += [("Plain cross-entropy training (no teacher). A teacher pass computed offline, when used, is outside "
              "the 10-minute budget (non-record track).")]
    L += ["", (f"Training wall-clock cap `train.max_wallclock_s` = {t.get('max_wallclock_s')}; trained "
          f"{summary.get('train_s')} s on {s['hardware']} (torch {s.get('pytorch_version')}).")]
    L += ["", "## Model", "", "| key | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(m.items())]
    L += ["", (f"{info['params']:,} parameters. Artifact: block matrices at {summary.get('bits')} bits, "
          f"codec {info['codec']}, layout {info['layout']}, sha256 `{s['distill']['artifact_sha256']}`.")]
    L += ["", "## Training config", "", "| key | value |", "|---|---|"]
    for section in ("train", "optim", "kd", "eval"):
        for k, v in sorted((cfg.get(section) or {}).items()):
            L.append(f"| {section}.{k} | {_fmt(v)} |")
    L += ["", (f"Data: train `{data.get('train_shards')}`, val `{data.get('val_shards')}`, tokenizer "
          f"`{data.get('tokenizer')}`. Full resolved config: `config.json` (re-runnable: `config.toml`).")]
    if kd:
        L += ["", "## Teacher and cache (KD)", "", (f"Cache `{(cfg.get('kd') or {}).get('teacher_cache')}`, manifest "
              f"sha256 `{kd['manifest_sha256']}`."), "", "| key | value |", "|---|---|"]
        for k in ("teacher", "backend", "projection", "k", "format_version", "shards", "student_tokenizer_sha256"):
            L.append(f"| {k} | {json.dumps(kd.get(k), sort_keys=True) if isinstance(kd.get(k), dict) else kd.get(k)} |")
        L += [f"| stats.{k} | {_fmt(v)} |" for k, v in sorted(kd["stats"].items())]
    elif (cfg.get("kd") or {}).get("teacher_cache"):
        L += ["", "## Teacher and cache (KD)", "", (f"Cache `{cfg['kd']['teacher_cache']}` (its manifest was not "
              "readable at export time).")]
    L += ["", "## Reproducing", "", "Evaluate (prints a JSON object as its last line; writes nothing):", "", "```bash",
          f"python train_gpt.py eval --val '{val_glob}' "
          f"--tokenizer '{res.get('tokenizer')}' --seq-len {res['seq_len']}"
          + (f" --stride {res['stride']}" if res.get("stride") else ""), "```", "",
          "Train this configuration again (then pack it into final_model.golf):", "", "```bash",
          "python train_gpt.py train --config config.toml --out run",
          "python train_gpt.py pack run --out final_model.golf", "```", "",
          "A few CPU steps of a tiny model (smoke test, ~a minute on 2 cores):", "", "```bash",
          smoke_command(cfg), "```", "",
          "`python train_gpt.py sources src/` writes the bundled Python sources out to read.", ""]
    L += ["## Files", "", "- `train_gpt.py` — the standalone script (bundled sources; the code bytes counted).",
          "- `final_model.golf` — the packed model (checksummed; quantized weights + model config).",
          "- `submission.json`, `requirements.txt`, `config.json`, `config.toml`."]
    L += [f"- `logs/{name}`" for name in logs]
    return "\n".join(L) + "\n"


def export_run(args: argparse.Namespace) -> dict:
    """Everything `distill export` does -> a summary dict."""
    from distill.artifact import read_artifact_info

    run, out = Path(args.run_dir), Path(args.out)
    cfg = read_run(run)
    artifact = find_artifact(run, args.artifact)
    info = read_artifact_info(artifact)  # checksum verified
    if info["config"] != cfg["model"]:
        raise DistillError(f"{artifact}: packed from a different model config than {run / 'config.json'} "
                           f"(re-pack: distill pack {run} --out {artifact})")
    model_src = bundle.module_path("student.model")[1]
    if info.get("code_sha256", sha256_bytes(model_src)) != sha256_bytes(model_src):
        raise DistillError(f"{artifact}: packed with another student/model.py than the one train_gpt.py would "
                           f"carry; re-pack: distill pack {run} --out {artifact}")
    code = bundle.build_script()
    model_bytes = artifact.stat().st_size
    total = len(code) + model_bytes
    if total > BUDGET_BYTES:
        raise DistillError(f"{artifact}: {model_bytes} bytes + {len(code)} bytes of code = {total}, over the "
                           f"{BUDGET_BYTES} byte budget (re-pack with `distill pack --fit`)")
    rows = read_metrics(run)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_bpb" in r]
    train_s = round(float(steps[-1]["elapsed_s"]), 3) if steps and "elapsed_s" in steps[-1] else None
    check_track(args.track, cfg, train_s)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise DistillError(f"--out: {out} exists and is not empty (pass --force to replace it)")
    res = score_result(args, cfg, artifact)
    kd_on = bool((cfg.get("kd") or {}).get("teacher_cache"))
    kd = cache_provenance(cfg["kd"]["teacher_cache"]) if kd_on else None
    meta, m = cfg.get("meta") or {}, cfg["model"]
    tensors_bits = sorted({t["bits"] for t in info["tensors"] if t["bits"] != "fp16"})
    summary = {"steps": steps[-1]["step"] if steps else None, "train_s": train_s,
               "pre_quant_val_bpb": evals[-1]["val_bpb"] if evals else None,
               "val_max_windows": (cfg.get("eval") or {}).get("val_max_windows") or 0,
               "bits": "/".join(str(b) for b in tensors_bits) or "16"}
    seed = (cfg.get("train") or {}).get("seed")
    hardware = args.hardware or f"{meta.get('world_size', '?')}x {meta.get('device', '?')}"
    kind = "KD" if kd_on else "CE"
    teacher = (kd or {}).get("teacher") or {}
    name = args.name or (f"distill {kind} student {m.get('num_layers')}x{m.get('model_dim')}, "
                         f"{info['params'] / 1e6:.2f}M params")
    blurb = args.blurb or (
        f"{m.get('num_layers')}-layer {m.get('model_dim')}-dim golf GPT (vocab {m.get('vocab_size')}) trained "
        + (f"with knowledge distillation from {teacher.get('id', 'a teacher')} (top-{(kd or {}).get('k')} "
           "cache computed offline) " if kd_on else "with cross-entropy ")
        + f"for {summary['steps']} steps; {summary['bits']}-bit {info['tensors'][0]['method'] if info['tensors'] else ''}"
        f" quantization + {info['codec']}; score of the roundtripped artifact under the 16,000,000-byte cap.")
    sub = {
        "name": name, "author": args.author or "", "github_id": args.github_id or "", "blurb": blurb,
        "date": args.date or run_date(run), "track": args.track,
        "val_loss": res["val_loss"], "val_bpb": res["val_bpb"],
        "bytes_total": total, "bytes_code": len(code), "bytes_model": model_bytes,
        "seeds": [seed], "seed_results": {str(seed): {"val_loss": res["val_loss"], "val_bpb": res["val_bpb"],
                                                      "bytes_total": total, "steps": summary["steps"],
                                                      "train_seconds": train_s}},
        "hardware": hardware, "pytorch_version": meta.get("torch"),
        "eval": {"seq_len": res["seq_len"], "stride": res.get("stride"), "tokens": res["tokens"],
                 "bytes": res["bytes"], "tokenizer_sha256": res.get("tokenizer_sha256")},
        "distill": {"version": meta.get("distill"), "git_commit": (meta.get("git") or {}).get("commit"),
                    "git_dirty": (meta.get("git") or {}).get("dirty"), "code_sha256": sha256_bytes(code),
                    "artifact_sha256": sha256_file(artifact)},
        "kd": kd,
    }
    logs = collect_logs(run, args.log or [])
    codecs = {info["codec"], info["code_codec"], info["meta_codec"]}
    files = {
        bundle.SCRIPT_NAME: code,
        bundle.ARTIFACT_NAME: artifact.read_bytes(),
        "submission.json": (json.dumps(sub, indent=2, sort_keys=True) + "\n").encode(),
        "README.md": render_readme(sub, cfg, res, info, kd, summary, sorted(logs),
                                   args.val or (cfg.get("data") or {}).get("val_shards", "VAL_GLOB")).encode(),
        "requirements.txt": requirements(codecs, meta.get("torch")).encode(),
        "config.json": (run / "config.json").read_bytes(),
    }
    if (run / "config.toml").is_file():
        files["config.toml"] = (run / "config.toml").read_bytes()
    files.update({f"logs/{n}": p.read_bytes() for n, p in logs.items()})
    write_folder(out, files, force=args.force)
    return {"out": str(out), "files": sorted(files), **{k: sub[k] for k in
            ("val_loss", "val_bpb", "bytes_total", "bytes_code", "bytes_model", "track")}}


def write_folder(out: Path, files: dict[str, bytes], force: bool) -> None:
    """Write every file into a fresh sibling folder, then move it into place (a failed export leaves no
    half-written DIR; --force replaces an existing one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, data in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        tmp.chmod(0o755)
        if out.exists():
            if not force and any(out.iterdir()):
                raise DistillError(f"--out: {out} exists and is not empty (pass --force to replace it)")
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def handle(args: argparse.Namespace) -> int:
    rep = export_run(args)
    print(f"{rep['out']}: val_bpb {rep['val_bpb']:.6f} | bytes_total {rep['bytes_total']:,} = code "
          f"{rep['bytes_code']:,} + model {rep['bytes_model']:,} | track {rep['track']} | {len(rep['files'])} files",
          file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="a packed run -> a challenge submission folder (train_gpt.py, "
                              "final_model.golf, submission.json, README.md)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="training run directory holding one packed *.golf artifact")
    p.add_argument("--out", required=True, help="submission folder to write")
    p.add_argument("--track", default="non_record_16mb", choices=list(TRACKS),
                   help="challenge track (default non_record_16mb; 10min_16mb is refused for KD runs)")
    p.add_argument("--name", help="submission name (default: from the model config)")
    p.add_argument("--author", help="author name")
    p.add_argument("--github-id", help="GitHub user id")
    p.add_argument("--blurb", help="one-paragraph description (default: generated from the run)")
    p.add_argument("--date", help="ISO date (default: when the run wrote model.safetensors, UTC)")
    p.add_argument("--hardware", help="hardware line (default: the run's world size x device)")
    p.add_argument("--artifact", help="the packed artifact (default: the one *.golf in RUN_DIR)")
    p.add_argument("--score", help="a saved `distill score --json` output for this artifact (skips scoring)")
    p.add_argument("--val", help="validation shard glob (default: the run's data.val_shards)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the run's data.tokenizer)")
    p.add_argument("--seq-len", type=int, help="eval window length (default: the run's train.seq_len)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window eval stride (default: none)")
    p.add_argument("--device", default=None, help="scoring device (default: cuda if available, else cpu)")
    p.add_argument("--log", action="append", help="another log file to include (repeatable)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    p.set_defaults(func=handle)
