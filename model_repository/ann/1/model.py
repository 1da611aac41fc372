"""Triton Python-backend entry point of the `ann` stage (logic: serving/runners.py)."""

from serving.python_backend import make_model

TritonPythonModel = make_model("ann")
