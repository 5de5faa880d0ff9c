"""core.parallel: calls side by side in spawned processes, results in order, errors raised here."""
import operator
import os

import pytest

from pipeline.core.parallel import cpu_cores, map_processes


def threads_and_pid() -> tuple[int, int]:
    import torch

    return torch.get_num_threads(), os.getpid()


def test_calls_run_in_other_processes_in_order_with_a_share_of_the_cores_each():
    assert map_processes(pow, [(2, 3), (3, 2), (5, 1)], workers=2) == [8, 9, 5]
    got = map_processes(threads_and_pid, [(), (), ()], workers=2)
    assert [threads for threads, _ in got] == [max(1, cpu_cores() // 2)] * 2 + [cpu_cores()]  # the last one alone
    assert os.getpid() not in {pid for _, pid in got}


def test_one_worker_or_one_call_stays_in_this_process():
    assert map_processes(threads_and_pid, [()], workers=4)[0][1] == os.getpid()
    assert [pid for _, pid in map_processes(threads_and_pid, [(), ()], workers=1)] == [os.getpid()] * 2
    assert map_processes(pow, [], workers=2) == []


def test_an_error_in_a_call_is_raised_here():
    with pytest.raises(ZeroDivisionError):
        map_processes(operator.truediv, [(1, 1), (1, 0), (2, 1)], workers=2)
