"""The client's request half, without a server: what `build_inputs` puts on the wire for
either protocol (the optional `history` input above all: left out when not given, sent as
int64 [1, n] when given, [1, 0] when empty)."""

import numpy as np
import pytest
import tritonclient.grpc as grpc_module
import tritonclient.http as http_module

from client import build_inputs, history_array

MODULES = [http_module, grpc_module]


def sent(inputs) -> dict:
    """name -> (shape, Triton data type) of the InferInputs."""
    return {t.name(): (list(t.shape()), t.datatype()) for t in inputs}


@pytest.mark.parametrize("module", MODULES, ids=["http", "grpc"])
def test_build_inputs_without_history_sends_no_history_input(module):
    inputs = sent(build_inputs(module, 42, "language:en", 5))
    assert inputs == {"user_id": ([1, 1], "INT64"), "filter": ([1, 1], "BYTES"),
                      "k": ([1, 1], "INT32")}
    assert "history" not in sent(build_inputs(module, 42, history=None))


@pytest.mark.parametrize("module", MODULES, ids=["http", "grpc"])
def test_build_inputs_sends_history_as_int64_one_row(module):
    inputs = sent(build_inputs(module, 42, "", 10, [1.0, 0.0, 2.0], history=[1017, 33, 4096]))
    assert inputs["history"] == ([1, 3], "INT64")
    assert set(inputs) == {"user_id", "filter", "k", "task_weights", "history"}
    # an empty history is sent (a user known to have none), not left out
    assert sent(build_inputs(module, 42, history=[]))["history"] == ([1, 0], "INT64")
    assert sent(build_inputs(module, 42, history=np.array([7, 8], np.int32)))["history"] == \
        ([1, 2], "INT64")


def test_history_array_values_order_and_type():
    value = history_array((1017, 33, np.int64(2**62)))
    assert value.dtype == np.int64 and value.shape == (1, 3)
    assert value.tolist() == [[1017, 33, 2**62]]  # newest first, as given
    assert history_array([]).shape == (1, 0) and history_array([]).dtype == np.int64
    for bad in ([1.5], ["12"]):  # never truncated or parsed into some other id
        with pytest.raises(TypeError):
            history_array(bad)


def test_http_request_carries_the_history_values():
    """The bytes HTTP sends for `history` are the ids, little-endian int64, in order (and none
    for an empty history)."""
    by_name = {t.name(): t for t in build_inputs(http_module, 1, history=[5, 3, 9])}
    assert np.frombuffer(by_name["history"]._get_binary_data(), np.int64).tolist() == [5, 3, 9]
    empty = {t.name(): t for t in build_inputs(http_module, 1, history=[])}["history"]
    assert empty._get_binary_data() == b""


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_retriever_closes_its_connection_once(protocol):
    """Retriever.close() closes the tritonclient client once; closing again, and the client's
    own close when it is garbage-collected (its __del__), do nothing. (A gRPC channel closed
    a second time at interpreter exit under gevent blocked the load generator forever.)"""
    from client import Retriever

    r = Retriever("127.0.0.1:1", protocol)  # nothing listens: closing needs no server
    calls = []
    real_close = r.client.close
    r.client.close = lambda: (calls.append(1), real_close())[-1]
    r.close()
    r.close()
    r.client.__del__()
    assert calls == [1]
