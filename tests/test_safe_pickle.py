"""The restricted unpickler reads plain data and refuses a pickle that would run code."""

import os
import pickle

import pytest

from jfacerec.core import safe_pickle


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_plain_data_loads_at_every_protocol():
    value = ([b"\xff\xd8", b"png"], [True, False], (1, 2.5))
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert safe_pickle.load(pickle.dumps(value, protocol), "x.bin") == value


def test_a_payload_is_refused_naming_the_file_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    data = pickle.dumps([b"a", WritesAFile(str(target))])
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"evil\.bin: .*(io|builtins)\.open"):
        safe_pickle.load(data, "evil.bin")
    assert not target.exists()
    pickle.loads(data)  # the same bytes do run code through the plain unpickler
    assert target.exists()
    os.remove(target)


def test_only_the_allowed_callables_are_called():
    data = pickle.dumps(complex(1, 2))
    with pytest.raises(safe_pickle.UnsafePickleError, match="builtins.complex"):
        safe_pickle.load(data, "c.pkl")
    assert safe_pickle.load(data, "c.pkl", allowed={("builtins", "complex"): complex}) == 1 + 2j


def test_a_truncated_pickle_is_a_value_error_naming_the_file():
    data = pickle.dumps(list(range(100)))
    with pytest.raises(ValueError, match=r"short\.bin: not a readable pickle"):
        safe_pickle.load(data[:-20], "short.bin")
