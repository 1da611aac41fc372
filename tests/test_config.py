"""Every config.pbtxt agrees with the runners' tensors and with the exported modules."""

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder.build import configure_tasks
from serving.baseline import RUNNERS as BASELINE_RUNNERS
from serving.runners import RUNNERS, config_tasks, resolve_specs

REPO = Path(__file__).resolve().parents[1] / "model_repository"
NP = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "STRING": np.object_}


def load_config(name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((REPO / name / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())


def tensors(entries):
    return {t.name: (model_config_pb2.DataType.Name(t.data_type)[len("TYPE_"):],
                     tuple(t.dims), getattr(t, "optional", False)) for t in entries}


ALL_RUNNERS = {**RUNNERS, **BASELINE_RUNNERS}


@pytest.mark.parametrize("stage", sorted(ALL_RUNNERS))
def test_stage_config_matches_runner(stage):
    """Every Python-backend model (the four stages, `unified` and the baseline's two)."""
    config = load_config(stage)
    runner = ALL_RUNNERS[stage]
    assert config.name == stage and config.backend == "python"
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    params = {k: v.string_value for k, v in config.parameters.items()}
    num_tasks = len(config_tasks(params))
    inputs, outputs = (resolve_specs(s, num_tasks) for s in (runner.INPUTS, runner.OUTPUTS))
    assert tensors(config.input) == {s.name: (s.dtype, s.dims, s.optional) for s in inputs}
    assert tensors(config.output) == {s.name: (s.dtype, s.dims, s.optional) for s in outputs}
    assert (REPO / stage / "1" / "model.py").exists()


@pytest.mark.parametrize("ensemble", ["retrieval", "baseline"])
def test_ensemble_wiring_is_consistent(ensemble):
    ens = load_config(ensemble)
    assert ens.platform == "ensemble"
    produced = {name: spec for name, spec in tensors(ens.input).items()}
    for step in ens.ensemble_scheduling.step:
        stage = load_config(step.model_name)
        ins, outs = tensors(stage.input), tensors(stage.output)
        for key, value in step.input_map.items():
            assert value in produced, f"{step.model_name}.{key} <- {value}: nothing produces it"
            assert produced[value][0] == ins[key][0], f"dtype of {value} into {step.model_name}"
            assert len(produced[value][1]) == len(ins[key][1]), f"rank of {value}"
        missing = {n for n, s in ins.items() if not s[2]} - set(step.input_map)
        assert not missing, f"{step.model_name} inputs not mapped: {missing}"
        for key, value in step.output_map.items():
            produced[value] = outs[key]
    for name, spec in tensors(ens.output).items():
        assert produced[name][:2] == spec[:2], name


def test_runner_outputs_match_config_on_a_real_build(small_build):
    """Run each exported module through its runner and check dtypes and ranks."""
    repo = small_build.repository
    runners = {s: RUNNERS[s](repo / s / "1") for s in RUNNERS}
    user = np.array([[int(small_build.world.user_ids[0])]])
    k = np.array([[4]], dtype=np.int32)
    out = {}
    out.update(runners["filter"].run([{"filter": np.array([[b"language:en"]], object)}])[0])
    out.update(runners["ann"].run([{"user_id": user, "filter_bits": out["filter_bits"],
                                    "k": k}])[0])
    out.update(runners["scorer"].run([{n: out[n] for n in ("user_embedding",
                                                           "candidate_rows")}])[0])
    out.update(runners["aggregator"].run([{"candidate_rows": out["candidate_rows"],
                                           "candidate_task_scores": out["candidate_task_scores"],
                                           "k": k}])[0])
    unified = runners["unified"].run([{"user_id": user, "k": k, "filter": np.array(
        [[b"language:en"]], object)}])[0]
    for name, value in unified.items():
        np.testing.assert_array_equal(value, out[name])
    for runner in runners.values():
        for spec in runner.OUTPUTS:
            value = out[spec.name]
            assert value.dtype == NP[spec.dtype], spec.name
            assert value.ndim == 1 + len(spec.dims), spec.name
            for got, want in zip(value.shape[1:], spec.dims):
                assert want == -1 or got == want, spec.name


@pytest.mark.parametrize("model", ["unified", "baseline"])
def test_model_has_the_ensemble_contract(model):
    """unified answers exactly what retrieval answers; the FAISS service chain the same
    minus the request history (it stands for what users run today)."""
    want = tensors(load_config("retrieval").input)
    assert "history" in want
    if model == "baseline":
        del want["history"]
    assert tensors(load_config(model).input) == want
    assert tensors(load_config(model).output) == tensors(load_config("retrieval").output)


@pytest.mark.parametrize("tasks", [("rated", "liked", "loved"), ("similarity",),
                                   ("click", "add_to_cart", "buy", "share", "like")])
def test_configs_for_other_tasks_match_runners(tasks):
    """The builder's configs for a catalog's tasks: every task dimension is T, the `tasks`
    parameter names them, and the runners resolve the same shapes from it."""
    for stage in ("filter", "scorer", "aggregator", "unified"):
        text = configure_tasks((REPO / stage / "config.pbtxt").read_text(), tasks)
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert config_tasks(params) == tasks
        runner = RUNNERS[stage]
        inputs, outputs = (resolve_specs(s, len(tasks)) for s in (runner.INPUTS, runner.OUTPUTS))
        assert tensors(config.input) == {s.name: (s.dtype, s.dims, s.optional) for s in inputs}
        assert tensors(config.output) == {s.name: (s.dtype, s.dims, s.optional)
                                          for s in outputs}
    for ensemble in ("retrieval", "baseline"):
        text = configure_tasks((REPO / ensemble / "config.pbtxt").read_text(), tasks)
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        dims = {t.name: tuple(t.dims) for t in list(config.input) + list(config.output)}
        assert dims["task_weights"] == (len(tasks),)
        assert dims["task_scores"] == (-1, len(tasks))


def test_a_new_repository_starts_its_ensembles_on_version_1(tmp_path, monkeypatch):
    """A swap of a repository served from the template rewrites the template's ensemble
    steps (model_version: 2); a version-1 build still writes version 1 into every step."""
    import shutil

    import builder.build as build_module

    template = tmp_path / "template"
    shutil.copytree(REPO, template)
    path = template / "retrieval" / "config.pbtxt"
    path.write_text(build_module.pin_step_versions(path.read_text(), 2))
    monkeypatch.setattr(build_module, "TEMPLATE", template)
    build_module.prepare_repository(tmp_path / "new", ("click", "like", "share"))
    for ensemble in ("retrieval", "baseline"):
        config = text_format.Parse((tmp_path / "new" / ensemble / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert {s.model_version for s in config.ensemble_scheduling.step} == {1}
