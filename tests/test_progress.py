"""Long work shows progress: model loading says what it does; evaluation has a bar of problems done."""

from __future__ import annotations

import pytest

from mathgrpo.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_loading_and_evaluation_report_progress(capsys, tiny_model_dir):
    from mathgrpo.data import load_problems
    from mathgrpo.evaluate import evaluate
    from mathgrpo.models import load_model

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "eval.num_samples=2", "eval.max_new_tokens=3",
                             "generation.max_batch=4", "data.arithmetic_size=40", "data.test_fraction=0.25"], base={})
    model, tok = load_model(cfg.model)
    err = capsys.readouterr().err
    assert f"loading model {tiny_model_dir} (float32 on cpu)" in err
    assert "loaded LlamaForCausalLM" in err and "M parameters, in" in err
    problems = load_problems(cfg.data, seed=1).test[:5]
    evaluate(model, tok, problems, cfg, label="base")  # 2 problems x 2 samples per batch: 3 batches
    err = capsys.readouterr().err
    assert "eval base" in err and "5/5" in err and "problems" in err
    assert "2/5" in err and "4/5" in err  # updated after every batch, not only at the end
