"""Triton Python-backend entry point of `baseline_ann` (logic: serving/baseline.py)."""

from serving.python_backend import make_model

TritonPythonModel = make_model("baseline_ann", "serving.baseline")
