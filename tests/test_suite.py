"""benchmarks/suite.py runs: in ``--smoke`` mode (tiny sizes, one thread, two rounds of
one call) every model of issue 13's suite compiles, agrees with its PyTorch version and
hand-written NumPy (loss and every gradient, float32 tolerances), the loop and vocabulary
models (LSTM, GPT block) with jax.jit too, and the per-statement profile runs.  Nothing here looks at the times: on a shared machine they are noise, and
the suite proper is run by hand (see the README's Benchmarks section)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("threadpoolctl")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import suite  # noqa: E402


def test_suite_smoke(tmp_path, capsys):
    out = tmp_path / "suite.json"
    assert suite.main(["--smoke", "--peers", "hand_numpy,torch_eager", "--profile", "transformer",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "-- profile of the generated value_and_grad: transformer" in text
    assert "| geometric mean |" in text
    result = json.loads(out.read_text())
    assert set(result["models"]) == set(suite.MODELS)
    for name, m in result["models"].items():
        assert {"backcomp", "torch_eager"} <= set(m["median_s"]), name
        assert max(m["deviation"].values()) < 1e-3, name
    assert "hand_numpy" in result["models"]["relu_mlp"]["median_s"]


def test_profile_times_every_statement():
    module = suite.build_module("rnn", smoke=True)
    params, inputs = suite.make_data("rnn", module, smoke=True)
    rows = suite.statement_profile(module.value_and_grad, dict(vars(module), params=params, inputs=inputs),
                                   repeats=2)
    texts = [t for _, t in rows]
    assert texts[0].endswith("_validate(params, inputs)") and texts[-1].startswith("_returned = ")
    assert all(s >= 0 for s, _ in rows)


def test_suite_smoke_lstm_and_gpt_block_agree_with_torch_and_jax(tmp_path, capsys):
    """jax is in the test extra: this comparison runs in CI, it never skips."""
    out = tmp_path / "suite.json"
    assert suite.main(["--smoke", "--only", "lstm,gpt_block", "--peers", "hand_numpy,torch_eager,jax_jit",
                       "--profile", "lstm", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "-- profile of the generated value_and_grad: LSTM scan" in text
    assert "for t in range(T - 1, -1, -1):" in text          # the backward loop is one statement,
    assert "inside loop 2 (all steps):" in text and "@ WhT" in text   # and its body is profiled too
    models = json.loads(out.read_text())["models"]
    assert set(models) == {"lstm", "gpt_block"}
    assert set(models["lstm"]["deviation"]) == {"hand_numpy", "torch_eager", "jax_jit"}
    assert set(models["gpt_block"]["deviation"]) == {"torch_eager", "jax_jit"}
    for name, m in models.items():
        assert max(m["deviation"].values()) < 1e-3, name
        assert {"backcomp", "torch_eager", "jax_jit"} <= set(m["median_s"]), name



def test_loop_profile_times_the_statements_of_each_loop_body():
    module = suite.build_module("lstm", smoke=True)
    params, inputs = suite.make_data("lstm", module, smoke=True)
    rows = suite.loop_profile(module.value_and_grad, dict(vars(module), params=params, inputs=inputs), repeats=2)
    assert {k for _, k, _ in rows} == {0, 1}                  # the forward loop and the reversed one
    assert any("h @ Wh" in text for _, k, text in rows if k == 0)
    assert any("@ WhT" in text for _, k, text in rows if k == 1)
    assert all(s >= 0 for s, _, _ in rows)
