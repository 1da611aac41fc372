"""Triton Python-backend entry point of the `item_updates` model (logic: serving/updates.py)."""

from serving.python_backend import make_model

TritonPythonModel = make_model("item_updates", "serving.updates")
