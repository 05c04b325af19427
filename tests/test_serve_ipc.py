"""The messages between serving processes: each survives pickling unchanged, and a failure crosses as the
same typed error (status, class, message), so a worker answers what the inference process caught."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from serve import errors, ipc
from toolkit.errors import ToolkitError
from toolkit.v2 import ProtocolError

MESSAGES = [cls for cls in vars(ipc).values()
            if isinstance(cls, type) and issubclass(cls, ipc.Message) and cls is not ipc.Message]


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
def test_every_message_pickles_to_an_equal_frozen_message(cls):
    values = [(7, "x", (1, 2))[i % 3] for i, _ in enumerate(dataclasses.fields(cls))]
    message = cls(*values)
    assert pickle.loads(pickle.dumps(message, protocol=5)) == message
    if values:
        with pytest.raises(dataclasses.FrozenInstanceError):
            message.__setattr__(dataclasses.fields(cls)[0].name, 8)


@pytest.mark.parametrize("error, cls, status", [
    (errors.QueueFullError("busy"), errors.QueueFullError, 503),
    (errors.QueueTimeoutError("late"), errors.QueueTimeoutError, 504),
    (errors.NotFoundError("gone"), errors.NotFoundError, 404),
    (errors.ModelLoadError("broken"), errors.ModelLoadError, 400),
    (ProtocolError("bad shape"), ToolkitError, 400),
])
def test_a_failure_is_raised_again_as_the_same_typed_error(error, cls, status):
    failure = pickle.loads(pickle.dumps(ipc.Failure.of(error)))
    again = failure.exception()
    assert type(again) is cls and again.http_status == status and str(again) == str(error)


def test_a_backend_failure_stays_a_server_error():
    again = ipc.Failure.of(ValueError("cuda out of memory")).exception()
    assert isinstance(again, RuntimeError) and "ValueError: cuda out of memory" in str(again)
