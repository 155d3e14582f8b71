import json

import pytest

from negbatch.lab import TrainConfig
from negbatch.lab.studies import STUDIES
from negbatch.lab.studies.negatives import build_configs
from negbatch.lab.sweep import read_results, run_configs, run_key

TINY = TrainConfig(n_train=48, n_test=32, batch_size=16, epochs=1, encoder_widths=(8,), head_widths=(8, 4), knn_k=3)


def test_registry_contract():
    for name, module in STUDIES.items():
        assert callable(module.add_arguments) and callable(module.run), name


def test_k_capped_by_the_batch_per_loss():
    configs, ks = build_configs(TINY, ["simclr", "relic"], [1, 15, 30, 100, "all"], [0, 1], [0.2], [1e-3])
    assert ks == {"simclr": [1, 15, "all"], "relic": [1, "all"]}  # candidates: 2B-2 = 30, B-1 = 15
    assert len(configs) == (3 + 2) * 2
    with pytest.raises(ValueError, match="unknown loss 'moco'"):
        build_configs(TINY, ["moco"], [1], [0], [0.2], [1e-3])


def test_run_configs_skips_finished_runs_and_writes_one_row_each(tmp_path, monkeypatch):
    configs = [TINY.replace(seed=s) for s in (0, 1)]
    first = run_configs(configs, tmp_path)
    rows = read_results(tmp_path)
    assert len(rows) == 2 and {r["seed"] for r in rows} == {0, 1}
    assert {"linear_acc", "knn_acc", "batch_size", "negatives", "run"} <= set(rows[0])
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
    # A rerun trains nothing: make training impossible and get the same summaries back.
    import negbatch.lab.trainer as trainer

    monkeypatch.setattr(trainer, "build_model", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
    again = run_configs(configs, tmp_path)
    assert sorted(json.dumps(s, sort_keys=True) for s in again) == sorted(json.dumps(s, sort_keys=True) for s in first)
    assert run_key(TINY) != run_key(TINY.replace(seed=1))
    assert run_key(TINY) == run_key(TINY.replace(progress=True))  # runtime-only options do not change the run
    with pytest.raises(ValueError, match="identical"):
        run_configs([TINY, TINY], tmp_path)
    with pytest.raises(ValueError, match="workers"):
        run_configs(configs, tmp_path, workers=0)


def test_parse_list_names_the_option():
    import pytest

    from negbatch.lab.sweep import parse_list

    assert parse_list("1, 2,all", str, "ks") == ["1", "2", "all"]
    assert parse_list("0,1", int, "seeds") == [0, 1]
    with pytest.raises(ValueError, match="--seeds"):
        parse_list("0,x", int, "seeds")
    with pytest.raises(ValueError, match="--ks must list at least one value"):
        parse_list(",", str, "ks")
    with pytest.raises(ValueError, match="--samplers lists a value twice"):
        parse_list("gcbs,gcbs", str, "samplers", unique=True)
