"""Static device tensors set with one copy a step (``amulet_core.device_tensors.StagedTensors``): on the CPU the
staged form (two host buffers in turn, one copy at commit) runs with plain copies, so its bookkeeping is tested here;
on a CUDA device the same code copies from pinned memory and waits on events."""

import torch

from amulet_core.device_tensors import StagedTensors

CPU = torch.device("cpu")


def fields() -> dict:
    return {
        "index": ((2, 4), torch.long, 3),
        "flags": ((3,), torch.bool, 1),
        "numbers": ((4,), torch.float32, 0.5),
        "tables": ((5, 3), torch.long, 9),
    }


def test_the_tensors_start_with_their_values_and_keep_their_addresses():
    staged = StagedTensors(fields(), CPU, staged=True)
    assert staged["index"].dtype == torch.long and staged["index"].shape == (2, 4)
    assert staged["index"].eq(3).all() and staged["flags"].all() and staged["numbers"].eq(0.5).all()
    assert staged["tables"].eq(9).all()
    addresses = {name: staged[name].data_ptr() for name in fields()}
    for step in range(3):
        staged.host("numbers")[:2] = torch.tensor([step, step + 1.0])
        staged.commit()
    assert {name: staged[name].data_ptr() for name in fields()} == addresses
    assert all(staged[name].data_ptr() % 16 == 0 for name in fields())


def test_what_the_host_writes_reaches_the_device_at_the_commit():
    staged = StagedTensors(fields(), CPU, staged=True)
    staged.host("index")[:, :2] = torch.tensor([[7, 8], [1, 2]])
    staged.host("flags")[1] = False
    assert staged["index"].eq(3).all() and staged["flags"].all()  # not before the commit
    staged.commit()
    assert staged["index"].tolist() == [[7, 8, 3, 3], [1, 2, 3, 3]]
    assert staged["flags"].tolist() == [True, False, True]


def test_the_two_host_buffers_take_turns():
    """A step writes the other host buffer than the step before: what it does not write is what that buffer held
    (valid values), and a write of one step never reaches the device at the next step's commit."""
    staged = StagedTensors(fields(), CPU, staged=True)
    staged.host("numbers")[:3] = torch.tensor([1.0, 2.0, 3.0])
    staged.commit()
    staged.host("numbers")[:1] = torch.tensor([10.0])
    staged.commit()
    assert staged["numbers"].tolist() == [10.0, 0.5, 0.5, 0.5]  # the second buffer's first values past the write
    staged.host("numbers")[1:2] = torch.tensor([20.0])
    staged.commit()
    assert staged["numbers"].tolist() == [1.0, 20.0, 3.0, 0.5]  # the first buffer again, as the first step left it


def test_a_commit_up_to_some_rows_of_the_last_tensor_leaves_the_rest():
    staged = StagedTensors(fields(), CPU, staged=True)
    host = staged.host("tables")
    host[:] = torch.arange(15).view(5, 3)
    staged.host("index")[0, 0] = 0
    staged.commit("tables", 2)
    assert staged["tables"][:2].tolist() == [[0, 1, 2], [3, 4, 5]] and staged["tables"][2:].eq(9).all()
    assert staged["index"][0, 0] == 0  # the tensors before it are copied whole


def test_unstaged_the_host_writes_the_device_tensor_itself():
    staged = StagedTensors(fields(), CPU)
    assert not staged.staged and staged.host("index") is staged["index"]
    staged.host("index")[0, 0] = 5
    assert staged["index"][0, 0] == 5
    staged.commit()
    assert staged["index"][0, 0] == 5
    assert [v.shape for v in staged.views("flags")] == [(3,)]
