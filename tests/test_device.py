"""Where the served modules run: the `device` config parameter, else $IAM_DEVICE, else the CPU
(serving/runners.py). On this CPU-only machine: the choices resolve as documented, a CUDA
request fails with a clear message at load time, and an explicit `cpu` runner answers exactly
as the default one. benchmarks/gpu_serving.py checks the CUDA side on a GPU host."""

import numpy as np
import pytest
import torch

from serving.runners import DEVICE_ENV, RUNNERS, resolve_device


def test_default_is_the_cpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("") == torch.device("cpu")


def test_parameter_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_follows_what_torch_sees(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "auto")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_a_clear_error(small_build):
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        RUNNERS["unified"](small_build.repository / "unified" / "1", {"device": "cuda"})


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:x"])
def test_unknown_device_names_the_choices(name):
    with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N or auto"):
        resolve_device(name)


def test_explicit_cpu_runner_answers_as_the_default(small_build, monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    version = small_build.repository / "unified" / "1"
    users = small_build.world.user_ids[:4]
    requests = [{"user_id": np.array([[int(u)]], np.int64),
                 "filter": np.array([[f.encode()]], object),
                 "k": np.array([[10]], np.int32)}
                for u, f in zip(users, ["", "NOT category:comedy", "language:en", ""])]
    default = RUNNERS["unified"](version).run(requests)
    explicit = RUNNERS["unified"](version, {"device": "cpu"}).run(requests)
    for a, b in zip(default, explicit):
        assert isinstance(a, dict), a
        np.testing.assert_array_equal(a["item_ids"], b["item_ids"])
        np.testing.assert_array_equal(a["scores"], b["scores"])
