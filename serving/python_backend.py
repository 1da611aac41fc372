"""Adapter from Triton's Python backend to a `StageRunner` (serving/runners.py).

Each `model_repository/<model>/1/model.py` is one line: `TritonPythonModel = make_model(name)`
(`make_model(name, "serving.baseline")` for the baseline models, whose runners live there).
The config is parsed once in `initialize`; `execute` answers every request of the batch with
its own response, so a bad request gets an error response without failing its batch-mates.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path


def instance_params(args: dict, params: dict) -> dict:
    """The runner's parameters for this model instance: an instance of a `KIND_GPU` group
    runs on the GPU Triton gave it (`instance_group [{kind: KIND_GPU, gpus: [1]}]` ->
    `cuda:1`), so one server can put an instance on each GPU of the host; a `device`
    parameter in the config still wins, and other kinds keep IAM_DEVICE's choice."""
    if "device" in params or args.get("model_instance_kind") != "GPU":
        return params
    return {**params, "device": f"cuda:{int(args['model_instance_device_id'])}"}


def make_model(stage: str, runners: str = "serving.runners"):
    """The Python-backend model class of `stage`, run by `RUNNERS[stage]` of module `runners`."""

    class TritonPythonModel:
        def initialize(self, args):
            import importlib

            import numpy as np
            import torch
            import triton_python_backend_utils as pb_utils

            from serving.runners import RequestError

            self.pb = pb_utils
            self.RequestError = RequestError
            config = json.loads(args["model_config"])
            params = instance_params(args, {k: v["string_value"]
                                            for k, v in config.get("parameters", {}).items()})
            torch.set_num_threads(int(params.get("torch_threads", "1")))
            version_dir = Path(args["model_repository"]) / args["model_version"]
            runner_cls = importlib.import_module(runners).RUNNERS[stage]
            self.runner = runner_cls(version_dir, params)
            self.inputs = [s.name for s in runner_cls.INPUTS]
            self.output_dtypes = {
                o["name"]: pb_utils.triton_string_to_numpy(o["data_type"])
                for o in config["output"]}
            self.np = np

        def execute(self, requests):
            pb = self.pb
            decoded, responses = [], [None] * len(requests)
            for request in requests:
                arrays = {}
                for name in self.inputs:
                    tensor = pb.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        arrays[name] = tensor.as_numpy()
                decoded.append(arrays)
            try:
                results = self.runner.run(decoded)
            except Exception:  # a bug, not a bad request: fail this batch loudly, keep serving
                message = f"{stage}: internal error: {traceback.format_exc(limit=3)}"
                return [pb.InferenceResponse(error=pb.TritonError(message)) for _ in requests]
            for i, result in enumerate(results):
                if isinstance(result, self.RequestError):
                    # INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT): the caller's mistake;
                    # INTERNAL (500): the module failed on this request alone
                    responses[i] = pb.InferenceResponse(error=pb.TritonError(
                        str(result), getattr(pb.TritonError, result.status)))
                else:
                    responses[i] = pb.InferenceResponse(output_tensors=[
                        pb.Tensor(name, self.np.ascontiguousarray(
                            value.astype(self.output_dtypes[name], copy=False)))
                        for name, value in result.items()])
            return responses

        def finalize(self):
            self.runner = None

    TritonPythonModel.__name__ = "TritonPythonModel"
    TritonPythonModel.__doc__ = f"Triton Python-backend model of the `{stage}` stage."
    return TritonPythonModel
