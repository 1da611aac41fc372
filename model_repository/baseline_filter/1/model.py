"""Triton Python-backend entry point of `baseline_filter` (logic: serving/baseline.py)."""

from serving.python_backend import make_model

TritonPythonModel = make_model("baseline_filter", "serving.baseline")
