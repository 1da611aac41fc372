"""Triton Python-backend entry point of the `unified` model (logic: serving/runners.py)."""

from serving.python_backend import make_model

TritonPythonModel = make_model("unified")
