"""The transformers backend: batched forward passes with log_softmax + topk on the device.

Sequences are packed greedily (in the given order, so batching is deterministic) into batches of at most
`batch_tokens` padded positions, padded on the right with an attention mask; causal attention means
padding never changes a real position's logits. Only [B, T, k] arrays cross to the host.

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
                 device: str | None):
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
            # the golf GPT computes attention in the input dtype; keep fp32 on CPU, bf16 on GPU
            self.dtype = torch.bfloat16 if on_gpu else torch.float32
        else:
            from transformers import AutoModelForCausalLM

            self.dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_gpu else torch.float32
            kwargs = {"dtype": self.dtype}
            if spec.gguf_file:
                kwargs["gguf_file"] = spec.gguf_file
            try:
                self.model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs).eval()
            except (OSError, ValueError, KeyError) as e:
                raise DistillError(f"{spec.model_id}: cannot load teacher ({str(e).splitlines()[0][:160]})") from None
            cfg = self.model.config
            text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            self.vocab_size = int(text_cfg.vocab_size)
            ctx = int(getattr(text_cfg, "max_position_embeddings", 0) or getattr(text_cfg, "n_positions", 0) or 0)
            self._inhouse = False
        self.model.to(self.device, dtype=self.dtype)
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

    def _batches(self, seqs: list[list[int]]) -> list[list[int]]:
        """Greedy, order-preserving packing by padded size (deterministic for a given input list)."""
        out: list[list[int]] = []
        cur: list[int] = []
        cur_max = 0
        for i, s in enumerate(seqs):
            m = max(cur_max, len(s))
            if cur and m * (len(cur) + 1) > self.batch_tokens:
                out.append(cur)
                cur, m = [], len(s)
            cur.append(i)
            cur_max = m
        if cur:
            out.append(cur)
        return out

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
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                if self._inhouse:
                    logits = self.model(ids)
                else:
                    logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logits = logits[:, :-1, : self.vocab_size].float()  # (B, T-1, V): row j predicts j+1
                logp = torch.log_softmax(logits, dim=-1)
                top_lp, top_id = torch.topk(logp, k, dim=-1, sorted=True)
                act = torch.gather(logp, -1, ids[:, 1:, None]).squeeze(-1)
                top_lp, top_id, act = top_lp.cpu().numpy(), top_id.cpu().numpy(), act.cpu().numpy()
            del logits, logp
            for r, i in enumerate(idx):
                n1 = lens[r] - 1
                results[i] = TeacherScores(top_id[r, :n1], top_lp[r, :n1], act[r, :n1])
        return results  # type: ignore[return-value]
