"""duo_compile.checks.check_int: the one rule for integer arguments."""
import numpy as np
import pytest
import torch

from duo_compile.checks import check_int


@pytest.mark.parametrize("value, expected", [
    (0, 0),
    (7, 7),
    (2**40, 2**40),
    (np.int64(5), 5),
    (np.int32(3), 3),
    (np.uint8(1), 1),
    (torch.tensor(4), 4),  # a 0-d integer tensor: operator.index accepts it
])
def test_integers_are_accepted_and_returned_as_python_int(value, expected):
    got = check_int("size", value, 0)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), torch.tensor(True)])
def test_booleans_are_rejected(value):
    with pytest.raises(ValueError, match=r"^flag must be an integer >= 0, got "):
        check_int("flag", value, 0)


@pytest.mark.parametrize("value", [1.5, 2.0, np.float64(3.0), torch.tensor(2.0), "8", None, [1], torch.tensor([1, 2])])
def test_non_integers_are_rejected(value):
    with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got "):
        check_int("n", value, 1)


@pytest.mark.parametrize("value, minimum", [(0, 1), (-1, 0), (np.int64(-3), 0), (4, 5)])
def test_values_below_the_minimum_are_rejected(value, minimum):
    with pytest.raises(ValueError, match=rf"^n must be an integer >= {minimum}, got "):
        check_int("n", value, minimum)


def test_the_minimum_itself_is_accepted():
    assert check_int("n", 1, 1) == 1
    assert check_int("n", -2, -2) == -2


@pytest.mark.parametrize("value", [-1, 1.5, "8", True])
def test_message_names_the_argument_and_the_bad_value(value):
    with pytest.raises(ValueError) as info:
        check_int("recent_size", value, 1)
    assert str(info.value) == f"recent_size must be an integer >= 1, got {value!r}"


def test_entry_points_share_the_rule():
    """Engine, masks and identify all go through check_int: numpy integers in, Python ints stored."""
    from duo_compile.runtime.engine import EngineConfig
    from duo_compile.masks import HeadMasks

    config = EngineConfig(np.int64(4), np.int32(8), np.int64(64), np.int64(16))
    assert (config.sink_size, config.recent_size, config.max_seq_len, config.prefill_chunk_size) == (4, 8, 64, 16)
    assert all(type(v) is int for v in (config.sink_size, config.recent_size, config.max_seq_len,
                                        config.prefill_chunk_size))
    assert HeadMasks.all_retrieval(np.int64(2), np.int64(3)).shape == (2, 3)
    for call in (lambda: EngineConfig(True, 8, 64), lambda: HeadMasks.all_retrieval(True, 3)):
        with pytest.raises(ValueError, match=r"must be an integer >= \d, got True"):
            call()
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got -1$"):
        HeadMasks.random(2, 2, 0.5, -1)
