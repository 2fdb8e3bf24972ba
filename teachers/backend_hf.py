"""The transformers backend: batched forward passes with top-k + log-sum-exp on the device.

Sequences are sorted by length (a stable sort: batching stays deterministic for a given input list) and
packed greedily into batches of at most `batch_tokens` padded positions. On GPU a batch may mix lengths
(right padding + attention mask; causal attention means padding never changes a real position's logits).
On CPU a batch holds sequences of ONE length only: without padding there is no mask, and torch's SDPA
takes its fused causal kernel instead of materialising a [T, T] mask per head, while batching buys
nothing on CPU (SmolLM2-135M, 2 cores: 1x1024, 4x1024 and 8x512 tokens all ran at ~320 tok/s in fp32).

dtype "auto": bf16/fp16 on GPU; on CPU bf16 when the processor has native bf16 dot products
(avx512_bf16 / amx_bf16; ~2x the fp32 matmul rate), else fp32. Half precision covers the transformer
body only: the output projection runs in fp32 on fp32 weights, because bf16 logits of magnitude 16-32
are rounded to steps of 0.125 nats, which would distort the stored probabilities by up to ~6%.
Only [B, T, k] arrays cross to the host: log p = logit - logsumexp(logits), top-k taken on the logits.

Teachers: a HF model id or transformers directory, a .gguf file (transformers dequantises it), or a
student checkpoint directory of this project (built with student.model.GPT; same tokenizer as the student).
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import DistillError
from teachers.backend import TeacherScores, TeacherSpec

INHOUSE_DEFAULT_MAX_LEN = 32768  # RoPE has no hard limit: whole documents by default (--max-model-len caps)


def _pick_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (Linux /proc/cpuinfo flags; False when unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | None, on_gpu: bool, inhouse: bool):
    """--dtype -> torch dtype. In-house teachers stay fp32 on CPU (tiny models; their attention runs in
    the input dtype)."""
    import torch

    if dtype:
        return getattr(torch, dtype)
    if on_gpu:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if (cpu_has_bf16() and not inhouse) else torch.float32


def load_inhouse_model(path: str):
    """A student checkpoint dir -> GPT in eval mode (student.load_checkpoint when present)."""
    import torch

    try:
        from student.checkpoint import load_checkpoint  # the training stage's loader, when present
    except ModuleNotFoundError:
        load_checkpoint = None
    if load_checkpoint is not None:
        return load_checkpoint(path).float().eval()
    from safetensors.torch import load_file

    from student.model import GPT, ModelConfig

    cfg = json.loads((Path(path) / "config.json").read_text())
    if "model" not in cfg:
        raise DistillError(f"{path}/config.json: no 'model' section (not a student checkpoint)")
    model = GPT(ModelConfig.from_dict(cfg["model"]))
    state = load_file(str(Path(path) / "model.safetensors"))
    missing, _unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise DistillError(f"{path}/model.safetensors: missing weights {missing[:3]}")
    with torch.no_grad():
        return model.float().eval()


class HFBackend:
    name = "hf"

    def __init__(self, spec: TeacherSpec, *, max_model_len: int | None, batch_tokens: int, max_k: int,
                 device: str | None, dtype: str | None = None):
        from importlib.metadata import version

        import torch

        self.model_id = spec.model_id
        self.device = _pick_device(device)
        self.batch_tokens = int(batch_tokens)
        # importlib.metadata: recording the version must not cost the in-house path a transformers import
        self.version = f"transformers-{version('transformers')}+torch-{torch.__version__}"
        on_gpu = self.device.startswith("cuda")
        if spec.kind == "inhouse":
            self.model = load_inhouse_model(spec.path)
            self.vocab_size = int(self.model.config.vocab_size)
            ctx = INHOUSE_DEFAULT_MAX_LEN
            self._inhouse = True
            self.dtype = resolve_dtype(dtype, on_gpu, inhouse=True)
        else:
            from transformers import AutoModelForCausalLM

            self.dtype = resolve_dtype(dtype, on_gpu, inhouse=False)
            kwargs = {"dtype": self.dtype}
            if spec.gguf_file:
                kwargs["gguf_file"] = spec.gguf_file
            from transformers.utils import logging as hf_logging

            bar_was_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # its "Loading weights" bar would precede our one-line errors
            try:
                self.model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs).eval()
            except (OSError, ValueError, KeyError) as e:
                raise DistillError(f"{spec.model_id}: cannot load teacher ({str(e).splitlines()[0][:160]})") from None
            finally:
                if bar_was_on:
                    hf_logging.enable_progress_bar()
            cfg = self.model.config
            text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            self.vocab_size = int(text_cfg.vocab_size)
            ctx = int(getattr(text_cfg, "max_position_embeddings", 0) or getattr(text_cfg, "n_positions", 0) or 0)
            self._inhouse = False
        self.model.to(self.device, dtype=self.dtype)
        self.version += f"+{str(self.dtype).removeprefix('torch.')}"  # recorded in the cache manifest
        self._pad_free = not on_gpu
        self.on_progress = None  # optional callable(teacher tokens scored), called after every batch
        self._head32 = None if (self._inhouse or self.dtype == torch.float32) else self._fp32_head()
        if max_model_len:  # in-house (RoPE): any length; HF models: never past their trained context
            ctx = int(max_model_len) if (self._inhouse or not ctx) else min(ctx, int(max_model_len))
        if ctx < 4:  # overlapping windows need room for context and new rows
            raise DistillError(f"{spec.model_id}: teacher context {ctx} is unusable (need >= 4 tokens)")
        if self.vocab_size < 2:
            raise DistillError(f"{spec.model_id}: teacher vocab {self.vocab_size} is unusable")
        self.max_len = ctx
        self.max_k = min(self.vocab_size, 1024)
        if max_k > self.max_k:
            raise DistillError(f"--k {max_k}: above this teacher/engine's limit ({self.max_k})")

    def _fp32_head(self):
        """(body, fp32 output weight) when the model exposes them, else None (then logits come in dtype)."""
        import torch

        body = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None)
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if body is None or head is None or getattr(head, "bias", None) is not None:
            return None
        return body, head.weight.detach().to(torch.float32)

    def _batches(self, seqs: list[list[int]]) -> list[list[int]]:
        """Length-sorted greedy packing by padded size; pad-free (one length per batch) on CPU."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # stable: deterministic
        out: list[list[int]] = []
        cur: list[int] = []
        cur_max = 0
        for i in order:
            n = len(seqs[i])
            m = max(cur_max, n)
            if cur and (m * (len(cur) + 1) > self.batch_tokens or (self._pad_free and n != cur_max)):
                out.append(cur)
                cur, m = [], n
            cur.append(i)
            cur_max = m
        if cur:
            out.append(cur)
        return out

    def _logits(self, ids, mask):
        """[B, T, V] logits (float32 when the fp32 head is used)."""
        import torch

        if self._inhouse:
            return self.model(ids)
        if self._head32 is None:
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        body, w32 = self._head32
        hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return torch.nn.functional.linear(hidden.to(torch.float32), w32)

    def score(self, seqs: list[list[int]], k: int) -> list[TeacherScores]:
        import torch

        if k > self.max_k:
            raise DistillError(f"--k {k}: above this teacher/engine's limit ({self.max_k})")
        results: list[TeacherScores | None] = [None] * len(seqs)
        for idx in self._batches(seqs):
            lens = [len(seqs[i]) for i in idx]
            if min(lens) < 2 or max(lens) > self.max_len:
                raise ValueError(f"sequence length outside [2, {self.max_len}]")
            T = max(lens)
            ids = torch.zeros((len(idx), T), dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : lens[r]] = torch.as_tensor(seqs[i], dtype=torch.long)
                mask[r, : lens[r]] = 1
            # no mask when nothing is padded: SDPA then runs its fused causal kernel
            ids, mask = ids.to(self.device), (None if min(lens) == T else mask.to(self.device))
            with torch.inference_mode():
                logits = self._logits(ids, mask)
                logits = logits[:, :-1, : self.vocab_size].float()  # (B, T-1, V): row j predicts j+1
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                top_l, top_id = torch.topk(logits, k, dim=-1, sorted=True)
                top_lp = top_l - lse
                act = (torch.gather(logits, -1, ids[:, 1:, None]) - lse).squeeze(-1)
                top_lp, top_id, act = top_lp.cpu().numpy(), top_id.cpu().numpy(), act.cpu().numpy()
            del logits, lse
            for r, i in enumerate(idx):
                n1 = lens[r] - 1
                results[i] = TeacherScores(top_id[r, :n1], top_lp[r, :n1], act[r, :n1])
            if self.on_progress is not None:
                self.on_progress(sum(lens))
        return results  # type: ignore[return-value]
