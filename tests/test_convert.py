"""`distill convert --from pg-record`: a state_dict under the 1.0611 record's names/shapes (banked block
matrices) -> a checkpoint directory whose model gives the same logits; bad input -> one line.

The record-format state_dicts here are synthetic: built in this file from our own model by stacking its layers'
matrices into the record's banks (qo_bank = [q_0..q_{L-1}, out_0..out_{L-1}], kv_bank = [k..., v...],
mlp_up_bank, mlp_down_bank), everything else under its own name.

Run: python -m pytest -q tests/test_convert.py      (~10 s)
"""

from __future__ import annotations

import json

import pytest
import torch

from distill.cli import main
from student.checkpoint import load_checkpoint
from student.model import GPT, ModelConfig

TINY = dict(
    vocab_size=61, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=4.0, qk_gain_init=5.0,
    mlp_act="leaky_relu2", layer_input_scale=True, rope_dims=4, xsa_last_n=5, attn_gate_window=6,
    attn_gate_scale=0.5, smear_gate_window=6, skip_gates=True, parallel_start_layer=3, loop_start=1, loop_end=2,
    loop_count=3, init="orthogonal", doc_attention=True, doc_max_len=8,
)


def toml_of(model_kw: dict) -> str:
    def val(v):
        return json.dumps(v) if isinstance(v, str) else ("true" if v is True else "false" if v is False else repr(v))

    return "[model]\n" + "".join(f"{k} = {val(v)}\n" for k, v in model_kw.items())


def record_state(model: GPT) -> dict[str, torch.Tensor]:
    """Our model's weights under the record's names: per-layer matrices stacked into its four banks."""
    sd, L = model.state_dict(), model.config.num_layers
    banks = {
        "qo_bank": [f"blocks.{i}.attn.c_q.weight" for i in range(L)] + [f"blocks.{i}.attn.proj.weight" for i in range(L)],
        "kv_bank": [f"blocks.{i}.attn.c_k.weight" for i in range(L)] + [f"blocks.{i}.attn.c_v.weight" for i in range(L)],
        "mlp_up_bank": [f"blocks.{i}.mlp.fc.weight" for i in range(L)],
        "mlp_down_bank": [f"blocks.{i}.mlp.proj.weight" for i in range(L)],
    }
    out = {name: torch.stack([sd[k] for k in keys]) for name, keys in banks.items()}
    banked = {k for keys in banks.values() for k in keys}
    out.update({k: v.clone() for k, v in sd.items() if k not in banked})
    return out


def random_model(**kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(**{**TINY, **kw}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


def ids() -> torch.Tensor:
    x = torch.randint(2, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    x[0, [4, 11]] = 1
    return x


def run(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["convert", "--from", "pg-record", *map(str, args)])
    return rc, capsys.readouterr().err


def test_convert_roundtrip_gives_identical_logits(tmp_path, capsys):
    m = random_model()
    state = record_state(m)
    state = {f"_orig_mod.{k}": v for k, v in state.items()}  # saved from a torch.compile'd module
    torch.save(state, tmp_path / "final_model.pt")
    (tmp_path / "rec.toml").write_text(toml_of(TINY))
    rc, err = run([tmp_path / "final_model.pt", "--config", tmp_path / "rec.toml", "--out", tmp_path / "ckpt"], capsys)
    assert rc == 0, err
    got = load_checkpoint(tmp_path / "ckpt")
    assert got.looping_active and got.config == m.config
    with torch.no_grad():
        assert torch.equal(got(ids()), m(ids()))
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["meta"]["format"] == "pg-record" and cfg["model"]["loop_count"] == 3


def test_gates_follow_the_state_dict(tmp_path, capsys):
    """The record's code defaults (no sparse gate, no SmearGate) convert with the full record config."""
    m = random_model(attn_gate_window=0, smear_gate_window=0)
    torch.save(record_state(m), tmp_path / "s.pt")
    (tmp_path / "rec.toml").write_text(toml_of(TINY))
    assert main(["convert", "--from", "pg-record", str(tmp_path / "s.pt"), "--config", str(tmp_path / "rec.toml"),
                 "--out", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "model.attn_gate_window: 6 -> 0" in out and "model.smear_gate_window: 6 -> 0" in out
    got = load_checkpoint(tmp_path / "ckpt")
    assert got.config.attn_gate_window == 0 and got.config.smear_gate_window == 0
    with torch.no_grad():
        assert torch.equal(got(ids()), m(ids()))


def test_overrides_after_the_options(tmp_path, capsys):
    m = random_model(rope_dims=8)
    torch.save(record_state(m), tmp_path / "s.pt")
    (tmp_path / "rec.toml").write_text(toml_of(TINY))
    rc, err = run([tmp_path / "s.pt", "--config", tmp_path / "rec.toml", "--out", tmp_path / "ckpt",
                   "--model.rope_dims", "8"], capsys)
    assert rc == 0, err
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "ckpt")(ids()), m(ids()))


def _bad(tmp_path, state) -> str:
    torch.save(state, tmp_path / "bad.pt")
    return str(tmp_path / "bad.pt")


@pytest.mark.parametrize("case, needle", [
    ("missing", "state_dict file not found"),
    ("not_a_dict", "expected a state_dict"),
    ("no_banks", "not a state_dict of the record's GPT"),
    ("vocab", "model.vocab_size = 61"),
    ("layers", "model.num_layers = 5"),
    ("q_gain_shape", "blocks.2.attn.q_gain has shape (3,)"),
    ("attn_out_gate", "attn_gate_proj (ATTN_OUT_GATE_ENABLED=1) is not supported"),
    ("extra", "unexpected ['foo']"),
    ("int", "expected a floating-point tensor"),
])
def test_bad_input_is_one_line(tmp_path, capsys, case, needle):
    state = record_state(random_model())
    path = str(tmp_path / "nope.pt")
    if case == "not_a_dict":
        path = _bad(tmp_path, [torch.zeros(3)])
    elif case == "no_banks":
        path = _bad(tmp_path, {k: v for k, v in state.items() if k != "kv_bank"})
    elif case == "vocab":
        path = _bad(tmp_path, {**state, "tok_emb.weight": torch.zeros(60, 32)})
    elif case == "layers":
        path = _bad(tmp_path, {**state, "qo_bank": state["qo_bank"][:8]})
    elif case == "q_gain_shape":
        path = _bad(tmp_path, {**state, "blocks.2.attn.q_gain": torch.zeros(3)})
    elif case == "attn_out_gate":
        path = _bad(tmp_path, {**state, "blocks.0.attn.attn_gate_proj.weight": torch.zeros(4, 6)})
    elif case == "extra":
        path = _bad(tmp_path, {**state, "foo": torch.zeros(2)})
    elif case == "int":
        path = _bad(tmp_path, {**state, "smear_lambda": torch.zeros(1, dtype=torch.int64)})
    (tmp_path / "rec.toml").write_text(toml_of(TINY))
    rc, err = run([path, "--config", tmp_path / "rec.toml", "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "ckpt").exists()
