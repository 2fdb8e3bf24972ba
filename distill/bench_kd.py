"""`distill bench kd` — does distillation pay? CE-only vs KD students at equal wall-clock, several seeds.

Each seed's CE and KD students train side by side by default, each pinned to half the cores: outside load
on a shared machine then slows both alike, and "equal wall-clock" stays equal compute (run one after the
other, one loaded run once lost 22 % of its steps). `--sequential` trains them one after the other on all
cores (separate run dirs: the compute per run differs).

Workdir layout (every stage is reused when its output exists, so a rerun resumes):
  tokenizer.model            student tokenizer (challenge spec; or --tokenizer)
  train/ val/                challenge-format shards of --train-docs / --val-docs (val docs never trained on)
  cache_f2/ cache_val_f2/    teacher targets (cache format 2, the default) on the train shards (KD) and on
                             the val shards (teacher bpb); cache/ cache_val/ with --cache-format 1; a teacher
                             top-k other than 16 or stored ids k_s other than k add _k{k}[s{k_s}] (cache_f2_k128s16)
  runs/ce_m{M}[_sbs]_s{seed}/   CE student checkpoints + metrics.jsonl (reused by every KD setting)
  runs/kd_a{α}_k{k_s}[_t{k}]_{schedule}[_tt{τ_t}]_m{M}[_f2][_sbs]_s{seed}/   KD students, one directory per setting (a sweep
                             shares the workdir and its CE runs)
  kd_vs_ce.png, result.json  the latest invocation; result_{kd tag}.json keeps each setting's result
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from distill.errors import DistillError
from distill.fsutil import write_json_atomic
from distill.runner import distill_cmd, run_side_by_side, run_stage, split_cores, train_cmd

if TYPE_CHECKING:  # numpy loads inside the functions: `distill bench --help` stays fast
    import numpy as np

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# defaults: the sweeps in docs/RESULTS.md (12 min side by side: alpha 0.5 constant beat anneal and alpha 0.9;
# at ~10 epochs of the data, annealing toward CE at the end lets CE re-memorise the one-hot labels)
DEFAULT_MINUTES = 12.0
DEFAULT_ALPHA = 0.5
DEFAULT_TOP_K = 0  # 0 = every id the cache holds (--k-student)
# teacher top-k 128, 16 student ids stored per row: with projection v3 the deeper candidate list gains most
# (docs/RESULTS.md "Teacher top-k 128 as the default": P=2 and 12 minutes, 3 seeds each)
DEFAULT_K = 128
DEFAULT_K_STUDENT = 16
DEFAULT_SCHEDULE = "constant"
DEFAULT_TARGET_TEMPERATURE = 1.0
NOISE_RATIO = 1.10
SCHEDULES = ("constant", "warmup", "anneal", "warmup_anneal")


def _num(x: float) -> str:
    return f"{x:g}".replace(".", "p")


def _read_metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _evals(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import numpy as np

    ev = [r for r in rows if "val_bpb" in r]
    return (np.array([r.get("elapsed_s", 0.0) for r in ev]), np.array([r.get("tokens", 0) for r in ev], float),
            np.array([r["val_bpb"] for r in ev]))


def _bpb_at_tokens(rows: list[dict], tokens: float) -> float | None:
    import numpy as np

    _, tok, bpb = _evals(rows)
    if len(tok) < 2 or tokens < tok[0]:
        return None
    return float(np.interp(tokens, tok, bpb))


def run_bench_kd(teacher: str, train_docs: Path, val_docs: Path, workdir: Path, tokenizer: Path | None = None,
                 minutes: float = DEFAULT_MINUTES, seeds: int = 3, k: int = DEFAULT_K, k_student: int | None = None,
                 kd_alpha: float = DEFAULT_ALPHA, kd_top_k: int = DEFAULT_TOP_K,
                 kd_schedule: str = DEFAULT_SCHEDULE, kd_target_temperature: float = DEFAULT_TARGET_TEMPERATURE,
                 config: Path | None = None, backend: str = "hf",
                 vocab_size: int = 1024, max_model_len: int | None = 2048, sequential: bool = False,
                 cache_format: int = 2, passes: float | None = None, kd_alpha_final: float = 0.0,
                 kd_anneal_frac: float = 0.2, kd_anneal_end: float = 1.0, kd_select_frac: float = 1.0,
                 kd_temperature: float = 1.0) -> dict:
    """CE vs KD students, `seeds` pairs. Budget: `minutes` of training per run, or with `passes` P the steps
    that make P passes over the training tokens (the LR warm-down and α schedule placed by that step budget;
    `minutes` stays a cap), so CE and KD see the same tokens whatever their step times."""
    ks = min(DEFAULT_K_STUDENT, k) if k_student is None else k_student
    if not 0 < ks <= k:
        raise DistillError(f"--k-student {ks}: expected 1..--k ({k})")
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    for p in (train_docs, val_docs):
        if not Path(p).is_file():
            raise DistillError(f"{p}: file not found")
    tok = Path(tokenizer) if tokenizer else workdir / "tokenizer.model"
    if not tok.exists():
        if tokenizer:
            raise DistillError(f"{tok}: tokenizer not found")
        run_stage("tokenizer", distill_cmd("data", "tokenizer", "--docs", str(train_docs), "--vocab-size",
                                           str(vocab_size), "--out", str(tok)), logs / "tokenizer.log")
    for split, docs, extra in (("train", train_docs, ["--val-docs", "0"]),
                               ("val", val_docs, ["--val-docs", "1000000000", "--no-curate"])):
        if not (workdir / split / "manifest.json").exists():
            run_stage(f"shards-{split}", distill_cmd("data", "build", "--docs", str(docs), "--tokenizer", str(tok),
                                                     "--out", str(workdir / split), *extra), logs / f"{split}.log")
    train_glob, val_glob = str(workdir / "train" / "fineweb_train_*.bin"), str(workdir / "val" / "fineweb_val_*.bin")
    mml = ["--max-model-len", str(max_model_len)] if max_model_len else []
    if cache_format not in (1, 2):
        raise DistillError(f"--cache-format {cache_format}: expected 1 or 2")
    # format 1 keeps the names of workdirs made before format 2 existed (their caches are format 1)
    fsuf = "" if cache_format == 1 else f"_f{cache_format}"
    # teacher top-k k and stored ids k_s name the cache dirs, so one workdir holds several (k = k_s = 16 keeps
    # the plain names of workdirs made before --k-student); an existing cache is checked against them
    ksuf = "" if k == ks == 16 else f"_k{k}" + (f"s{ks}" if ks != k else "")
    cache_dir, cache_val = workdir / f"cache{fsuf}{ksuf}", workdir / f"cache_val{fsuf}{ksuf}"
    for cdir, glob in ((cache_dir, train_glob), (cache_val, val_glob)):
        if not (cdir / "manifest.json").exists():
            run_stage(f"precompute-{cdir.name}", distill_cmd(
                "teacher", "precompute", "--teacher", teacher, "--backend", backend, "--tokenizer", str(tok),
                "--shards", glob, "--k", str(k), "--k-student", str(ks), "--format-version", str(cache_format),
                "--out", str(cdir), *mml), logs / f"{cdir.name}.log")
        _check_cache(cdir, k, ks)
    info = run_stage("cache-info", distill_cmd("cache", "info", str(cache_val), "--json"),
                     logs / "cache_info.log", json_last=True, echo=False)
    train_info = run_stage("cache-info-train", distill_cmd("cache", "info", str(cache_dir), "--json"),
                           logs / "cache_info_train.log", json_last=True, echo=False)

    cfg = Path(config) if config else REPO_CONFIGS / "demo_student.toml"
    if not cfg.is_file():
        raise DistillError(f"{cfg}: config not found")
    # passes each run saw are reported for wall-clock budgets too (steps x batch tokens / train tokens)
    train_tokens = sum(int(sh["tokens"]) for sh in json.loads((workdir / "train" / "manifest.json").read_text())
                       ["shards"])
    budget: list[str] = []
    if passes is not None:
        if not passes > 0:
            raise DistillError(f"--passes: must be positive, got {passes}")
        from student.config import load_config

        batch_tokens = load_config(cfg).train.batch_tokens
        max_steps = max(1, round(passes * train_tokens / batch_tokens))
        # periodic evals about ten times per run (they are excluded from the training clock)
        budget = ["--train.max_steps", str(max_steps), "--eval.val_every", str(max(10, max_steps // 10))]
    data = ["--data.train_shards", train_glob, "--data.val_shards", val_glob, "--data.tokenizer", str(tok)]
    results: dict[str, list[dict]] = {"ce": [], "kd": []}
    if kd_schedule not in SCHEDULES:
        raise DistillError(f"--kd-schedule: expected one of {', '.join(SCHEDULES)}, got {kd_schedule!r}")
    if not kd_target_temperature > 0:
        raise DistillError(f"--kd-target-temperature: must be positive, got {kd_target_temperature}")
    if not kd_temperature > 0 or not 0 < kd_select_frac <= 1:
        raise DistillError(f"--kd-temperature must be positive and --kd-select-frac in (0, 1], got "
                           f"{kd_temperature}, {kd_select_frac}")
    tt = "" if kd_target_temperature == 1.0 else f"_tt{_num(kd_target_temperature)}"
    # recipe pieces appear in the run names only when they differ from the defaults (older workdirs keep theirs)
    if "anneal" in kd_schedule and (kd_alpha_final, kd_anneal_frac, kd_anneal_end) != (0.0, 0.2, 1.0):
        tt += f"_to{_num(kd_alpha_final)}w{_num(kd_anneal_frac)}e{_num(kd_anneal_end)}"
    if kd_select_frac < 1.0:
        tt += f"_sel{_num(kd_select_frac)}"
    if kd_temperature != 1.0:
        tt += f"_T{_num(kd_temperature)}"
    bud = f"_p{_num(passes)}_m{_num(minutes)}" if passes is not None else f"_m{_num(minutes)}"
    # the student config's content names the runs too: a workdir reused after the config changed trains afresh
    # instead of reusing runs of another recipe (runs named before this tag existed are never reused)
    bud += "_c" + hashlib.sha256(cfg.read_bytes()).hexdigest()[:8]
    # a teacher top-k deeper than the stored ids is named (_t{k}); k = k_s keeps the names it always had
    kd_tag = f"kd_a{_num(kd_alpha)}_k{kd_top_k or ks}{'' if k == ks else f'_t{k}'}_{kd_schedule}{tt}{bud}{fsuf}"
    halves = None if sequential else split_cores(2)
    lay = "" if halves is None else "_sbs"  # side-by-side runs get their own dirs: half the cores each
    kd_tag += lay

    def run_dir(mode: str, seed: int) -> Path:
        return workdir / "runs" / (f"ce{bud}{lay}_s{seed}" if mode == "ce" else f"{kd_tag}_s{seed}")

    for seed in range(seeds):
        todo = []
        for mode in ("ce", "kd"):
            out = run_dir(mode, seed)
            extra = [] if mode == "ce" else ["--teacher-cache", str(cache_dir), "--kd.alpha", str(kd_alpha),
                                             "--kd.top_k", str(kd_top_k), "--kd.alpha_schedule", kd_schedule,
                                             "--kd.target_temperature", str(kd_target_temperature),
                                             "--kd.alpha_final", str(kd_alpha_final),
                                             "--kd.alpha_anneal_frac", str(kd_anneal_frac),
                                             "--kd.alpha_anneal_end", str(kd_anneal_end),
                                             "--kd.select_frac", str(kd_select_frac),
                                             "--kd.temperature", str(kd_temperature)]
            if not (out / "model.safetensors").exists():
                todo.append((mode, (f"train-{mode}-s{seed}", train_cmd(
                    "--config", str(cfg), "--out", str(out), *data, "--seed", str(seed),
                    "--train.max_wallclock_s", str(minutes * 60), *budget, *extra), logs / f"{out.name}.log")))
        if halves is None:
            for _, stage in todo:
                run_stage(*stage)
        elif todo:  # CE on one half of the cores, KD on the other, at the same time; the halves swap every
            # other seed, so a slower core (interrupts, a neighbour pinned there) does not always hit one side
            ce_half = seed % 2
            run_side_by_side([stage for _, stage in todo], [halves[ce_half if m == "ce" else 1 - ce_half]
                                                            for m, _ in todo])
        for mode in ("ce", "kd"):
            out = run_dir(mode, seed)
            seq_len = int(json.loads((out / "config.json").read_text())["train"]["seq_len"])
            score = _score(out, tok, val_glob, seq_len, logs / f"score_{out.name}.log", f"score-{mode}-s{seed}")
            rows = _read_metrics(out)
            steps = [r for r in rows if "step_ms" in r]
            results[mode].append({"seed": seed, "val_bpb": score["val_bpb"], "val_loss": score["val_loss"],
                                  "tokens": steps[-1]["tokens"] if steps else 0,
                                  "steps": steps[-1]["step"] if steps else 0, "rows": rows,
                                  "passes": (steps[-1]["tokens"] / train_tokens if steps and train_tokens else None),
                                  "step_ms_median": (statistics.median(r["step_ms"] for r in steps)
                                                     if steps else None)})
    # equal tokens: KD's final val bpb against CE's val-bpb curve interpolated at KD's token count (and v.v.)
    eq_tokens = []
    for ce, kd in zip(results["ce"], results["kd"]):
        t = min(ce["tokens"], kd["tokens"])
        eq_tokens.append({"seed": ce["seed"], "tokens": t, "ce_bpb": _bpb_at_tokens(ce["rows"], t),
                          "kd_bpb": _bpb_at_tokens(kd["rows"], t)})
    # a shared machine slows single runs: equal wall-clock then compares unequal compute. Flag pairs whose
    # median step times differ by more than NOISE_RATIO beyond the KD step overhead (~1.0x, bench overhead)
    noisy = [ce["seed"] for ce, kd in zip(results["ce"], results["kd"])
             if passes is None and ce["step_ms_median"] and kd["step_ms_median"]
             and not 1 / NOISE_RATIO <= kd["step_ms_median"] / ce["step_ms_median"] <= NOISE_RATIO]
    if noisy:
        print(f"bench kd: warning: seeds {noisy}: KD and CE median step times differ by more than "
              f"{NOISE_RATIO - 1:.0%} (a loaded machine?): their equal-wall-clock comparison is unequal compute",
              file=sys.stderr)
    # --passes: a run the wall-clock cap stopped before its step budget saw fewer tokens (and placed its LR
    # warm-down by time): that pair is not an equal-token comparison
    capped = [] if passes is None else [
        ce["seed"] for ce, kd in zip(results["ce"], results["kd"]) if min(ce["steps"], kd["steps"]) < max_steps]
    if capped:
        print(f"bench kd: warning: seeds {capped}: a run stopped at the {minutes:g}-minute cap before its "
              f"{max_steps} steps (a loaded machine?): not an equal-token comparison; rerun with a larger --minutes",
              file=sys.stderr)
    plot_path = workdir / "kd_vs_ce.png"
    _plot(results, plot_path, info)
    ce_b = [r["val_bpb"] for r in results["ce"]]
    kd_b = [r["val_bpb"] for r in results["kd"]]
    out = {
        "ce_bpb_mean": statistics.fmean(ce_b), "kd_bpb_mean": statistics.fmean(kd_b),
        "delta_bpb_mean": statistics.fmean(kd_b) - statistics.fmean(ce_b),
        "ce_bpb": ce_b, "kd_bpb": kd_b,
        "ce_bpb_std": statistics.pstdev(ce_b), "kd_bpb_std": statistics.pstdev(kd_b),
        "ce_tokens": [r["tokens"] for r in results["ce"]], "kd_tokens": [r["tokens"] for r in results["kd"]],
        "ce_steps": [r["steps"] for r in results["ce"]], "kd_steps": [r["steps"] for r in results["kd"]],
        "ce_passes": [r["passes"] for r in results["ce"]], "kd_passes": [r["passes"] for r in results["kd"]],
        "equal_tokens": eq_tokens,
        "ce_step_ms": [r["step_ms_median"] for r in results["ce"]],
        "kd_step_ms": [r["step_ms_median"] for r in results["kd"]], "noisy_seeds": noisy,
        "capped_seeds": capped,
        "teacher_bpb": info.get("teacher_bpb", info.get("projected_teacher_bpb")),
        "projected_teacher_bpb": info.get("projected_teacher_bpb"),
        "aligned_fraction": info.get("aligned_fraction"),
        "cache_format": cache_format, "cache_bytes_per_token": train_info.get("bytes_per_token"),
        "settings": {"teacher": teacher, "backend": backend, "k": k, "k_student": ks, "kd_alpha": kd_alpha,
                     "kd_top_k": kd_top_k or ks, "teacher_cache": str(cache_dir), "kd_schedule": kd_schedule,
                     "kd_target_temperature": kd_target_temperature, "kd_alpha_final": kd_alpha_final,
                     "kd_anneal_frac": kd_anneal_frac, "kd_anneal_end": kd_anneal_end,
                     "kd_select_frac": kd_select_frac, "kd_temperature": kd_temperature, "passes": passes,
                     "train_tokens": train_tokens or None,
                     "max_model_len": max_model_len, "minutes": minutes,
                     "layout": "sequential" if halves is None else "side-by-side",
                     "cores_per_run": None if halves is None else len(halves[0]),
                     "seeds": seeds, "config": str(cfg), "tokenizer": str(tok), "train_docs": str(train_docs),
                     "val_docs": str(val_docs)},
        "plot": str(plot_path),
    }
    write_json_atomic(workdir / "result.json", out)
    write_json_atomic(workdir / f"result_{kd_tag}.json", out)
    return out


def _check_cache(cdir: Path, k: int, ks: int) -> None:
    """An existing cache is reused only when it holds what this run asks for: teacher top-k, stored ids and
    (foreign teachers) the current projection. One line naming the cache otherwise, never a silent mix."""
    from teachers.projection import PROJECTION_VERSION

    try:
        m = json.loads((cdir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"{cdir / 'manifest.json'}: unreadable ({e})") from None
    proj = m.get("projection") or {}
    got_k, got_ks = int(m.get("teacher_k", m.get("k", 0))), int(m.get("k", 0))
    if (got_k, got_ks) != (k, ks):
        raise DistillError(f"{cdir}: holds teacher top-k {got_k} with {got_ks} stored ids, this run asks for --k {k} "
                           f"--k-student {ks} (delete it, or use another --workdir)")
    if proj.get("kind") == "topk-chain" and proj.get("version") != PROJECTION_VERSION:
        raise DistillError(f"{cdir}: made with projection v{proj.get('version')}, this version writes "
                           f"v{PROJECTION_VERSION} (delete it to rebuild, or use another --workdir)")


def _score(run: Path, tok: Path, val_glob: str, seq_len: int, log: Path, stage: str) -> dict:
    """`distill score` of a finished run, memoized in the run dir (bench_score.json) for the same model
    file, tokenizer and val shards, so a sweep sharing the workdir does not re-score its CE runs."""
    memo = run / "bench_score.json"
    st = (run / "model.safetensors").stat()
    key = {"model_size": st.st_size, "model_mtime_ns": st.st_mtime_ns, "tokenizer": str(tok), "val": val_glob,
           "seq_len": seq_len}
    if memo.is_file():
        try:
            cached = json.loads(memo.read_text())
            if cached.get("key") == key:
                return cached["score"]
        except (OSError, ValueError, KeyError):
            pass
    score = run_stage(stage, distill_cmd("score", str(run), "--tokenizer", str(tok), "--val", val_glob, "--seq-len",
                                         str(seq_len), "--json"), log, json_last=True, echo=False)
    write_json_atomic(memo, {"key": key, "score": score})
    return score


def _plot(results: dict, path: Path, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, x_of, xlabel in ((axes[0], 0, "training wall-clock (s)"), (axes[1], 1, "training tokens")):
        for mode, color in (("ce", "tab:blue"), ("kd", "tab:red")):
            for i, r in enumerate(results[mode]):
                ev = _evals(r["rows"])
                if len(ev[0]):
                    ax.plot(ev[x_of], ev[2], color=color, alpha=0.8, marker="o", ms=3,
                            label=f"{mode.upper()} ({len(results[mode])} seed{'s' * (len(results[mode]) != 1)})"
                            if i == 0 else None)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val bpb (periodic eval subset)")
    axes[0].legend()
    tb = info.get("projected_teacher_bpb")
    fig.suptitle("KD vs CE: equal wall-clock (left), equal tokens (right)"
                 + (f"; teacher (projected onto the student vocab) {tb:.3f} bpb" if tb else ""))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def print_table(r: dict) -> None:
    print(f"{'seed':>4}  {'CE bpb':>8}  {'KD bpb':>8}  {'Δ':>8}  {'CE tok':>9}  {'KD tok':>9}")
    for i, (c, k) in enumerate(zip(r["ce_bpb"], r["kd_bpb"])):
        print(f"{i:>4}  {c:8.4f}  {k:8.4f}  {k - c:+8.4f}  {r['ce_tokens'][i]:>9}  {r['kd_tokens'][i]:>9}")
    print(f"{'mean':>4}  {r['ce_bpb_mean']:8.4f}  {r['kd_bpb_mean']:8.4f}  {r['delta_bpb_mean']:+8.4f}")
    if r.get("projected_teacher_bpb"):
        print(f"teacher (projected onto the student vocab) val bpb: {r['projected_teacher_bpb']:.4f}")


def add_subparser(sub) -> None:
    p = sub.add_parser("kd", help="CE-only vs KD students at equal wall-clock over several seeds")
    p.add_argument("--teacher", required=True, help="HF id, local dir, .gguf file or a student checkpoint dir")
    p.add_argument("--train-docs", required=True, type=Path, help="JSONL of training documents")
    p.add_argument("--val-docs", required=True, type=Path, help="JSONL of validation documents (never trained on)")
    p.add_argument("--tokenizer", type=Path, default=None, help="student SentencePiece (default: train sp1024)")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help=f"wall-clock per student run (default {DEFAULT_MINUTES:g})")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--k", type=int, default=DEFAULT_K,
                   help=f"teacher top-k, the candidates the projection sees (default {DEFAULT_K})")
    p.add_argument("--k-student", type=int, default=None,
                   help=f"student ids stored per row after the projection (default min({DEFAULT_K_STUDENT}, --k))")
    p.add_argument("--kd-alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"KD weight alpha (default {DEFAULT_ALPHA:g}, the sweep's best)")
    p.add_argument("--kd-top-k", type=int, default=DEFAULT_TOP_K,
                   help="k_s: KL over each row's top k_s cached ids (default: all --k)")
    p.add_argument("--kd-schedule", default=DEFAULT_SCHEDULE, choices=list(SCHEDULES),
                   help=f"alpha schedule over the wall-clock budget (default {DEFAULT_SCHEDULE}; anneal = toward CE "
                        "over the last 20%%)")
    p.add_argument("--kd-target-temperature", type=float, default=DEFAULT_TARGET_TEMPERATURE,
                   help="smooth the teacher's stored mass by this temperature (student untempered; default "
                        f"{DEFAULT_TARGET_TEMPERATURE:g})")
    p.add_argument("--kd-alpha-final", type=float, default=0.0,
                   help="anneal schedules: alpha at the end of the anneal (default 0 = CE)")
    p.add_argument("--kd-anneal-frac", type=float, default=0.2,
                   help="anneal schedules: length of the anneal as a fraction of the budget (default 0.2)")
    p.add_argument("--kd-anneal-end", type=float, default=1.0,
                   help="anneal schedules: where the anneal ends (default 1 = the end; < 1 hands over before the "
                        "LR warm-down, e.g. --kd-alpha 0.9 --kd-anneal-frac 0.4 --kd-anneal-end 0.7)")
    p.add_argument("--kd-select-frac", type=float, default=1.0,
                   help="KD only on this fraction of each batch's rows, those of highest teacher entropy (default 1)")
    p.add_argument("--kd-temperature", type=float, default=1.0,
                   help="temperature on both sides of the split within the stored ids (x T^2; the "
                        "stored-vs-rest split stays at T = 1: distill/losses.py; default 1)")
    p.add_argument("--passes", type=float, default=None,
                   help="budget each run by P passes over the training tokens (steps = P x train tokens / batch "
                        "tokens; LR warm-down and alpha schedule placed by it; --minutes stays a cap) instead of "
                        "by wall-clock; JSON ce_passes/kd_passes record what each run saw")
    p.add_argument("--config", type=Path, default=None, help="student config (default configs/demo_student.toml)")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="teacher window in teacher tokens (default 2048: SmolLM2's training context; longer windows "
                        "cost attention time on CPU)")
    p.add_argument("--sequential", action="store_true",
                   help="train CE and KD one after the other on all cores (default: side by side, each pinned to "
                        "half the cores, so outside load on a shared machine hits both alike)")
    p.add_argument("--cache-format", type=int, default=2, choices=[1, 2],
                   help="teacher cache format (default 2; 1 = the old full-precision format, for comparisons)")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    r = run_bench_kd(args.teacher, args.train_docs, args.val_docs, args.workdir, tokenizer=args.tokenizer,
                     minutes=args.minutes, seeds=args.seeds, k=args.k, k_student=args.k_student,
                     kd_alpha=args.kd_alpha,
                     kd_top_k=args.kd_top_k, kd_schedule=args.kd_schedule,
                     kd_target_temperature=args.kd_target_temperature, config=args.config,
                     backend=args.backend, max_model_len=args.max_model_len, sequential=args.sequential,
                     cache_format=args.cache_format, passes=args.passes, kd_alpha_final=args.kd_alpha_final,
                     kd_anneal_frac=args.kd_anneal_frac, kd_anneal_end=args.kd_anneal_end,
                     kd_select_frac=args.kd_select_frac, kd_temperature=args.kd_temperature)
    print_table(r)
    print(f"plot: {r['plot']}", file=sys.stderr)
    if args.json:
        print(json.dumps(r))
    return 0
