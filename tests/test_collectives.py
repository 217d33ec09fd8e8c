"""Every collective goes through lowmem.distributed, with its tensor on the collective's device.

NCCL has no CPU collectives, so a CPU tensor all-reduced on a GPU run crashes there (or, in a
cpu:gloo,cuda:nccl group, silently goes over gloo); the gloo tests cannot see either. Two checks
make that impossible by construction: no module but lowmem.distributed calls a torch.distributed
collective, and each function of lowmem.distributed hands torch a tensor on `DistInfo.device`
(seen here with a recording stand-in for torch.distributed and a device that is not the CPU).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lowmem.distributed as ld
from lowmem.distributed import DistInfo

SRC = Path(__file__).resolve().parents[1] / "src" / "lowmem"
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "broadcast_object_list", "all_gather",
    "all_gather_into_tensor", "all_gather_object", "all_gather_coalesced", "_all_gather_base", "gather",
    "gather_object", "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "send", "recv",
    "isend", "irecv", "batch_isend_irecv", "send_object_list", "recv_object_list",
}
DIST_MODULES = {"torch.distributed", "torch.distributed.distributed_c10d", "torch.distributed._functional_collectives"}


def direct_collective_calls(source: str) -> list[str]:
    """`line: call` for each call of a torch.distributed collective in `source`, however imported
    (`import torch.distributed as dist`, `from torch import distributed`, `from torch.distributed
    import all_reduce`, or the full `torch.distributed.all_reduce`)."""
    tree = ast.parse(source)
    modules: set[str] = set()  # local names bound to a torch.distributed module
    functions: dict[str, str] = {}  # local name -> collective imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in DIST_MODULES and alias.asname:
                    modules.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in DIST_MODULES:
                    modules.add(alias.asname or alias.name)
                elif node.module in DIST_MODULES and alias.name in COLLECTIVES:
                    functions[alias.asname or alias.name] = alias.name
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in functions:
            found.append(f"{node.lineno}: {func.id}()")
        elif isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
            base = ast.unparse(func.value)
            if base in modules or base in DIST_MODULES:
                found.append(f"{node.lineno}: {base}.{func.attr}()")
    return found


def test_no_module_but_lowmem_distributed_calls_a_collective():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "distributed.py":
            continue
        for call in direct_collective_calls(path.read_text()):
            offenders.append(f"{path.relative_to(SRC.parent)}:{call}")
    assert not offenders, ("torch.distributed collectives called outside lowmem.distributed (use its all_reduce, "
                           "all_reduce_sum, any_rank, broadcast, broadcast_object, barrier):\n" + "\n".join(offenders))


@pytest.mark.parametrize("source", [
    "import torch.distributed as dist\ndist.all_reduce(x)\n",
    "import torch.distributed\ntorch.distributed.broadcast(x, src=0)\n",
    "from torch import distributed as d\nd.barrier()\n",
    "from torch.distributed import all_gather_into_tensor as gather\ngather(out, x)\n",
    "def f(group):\n    import torch.distributed as dist\n    dist.broadcast_object_list(names, src=0)\n",
])
def test_the_check_finds_a_direct_call(source):
    assert direct_collective_calls(source)


def test_the_check_leaves_other_calls_alone():
    source = ("import torch.distributed as dist\nfrom lowmem.distributed import all_reduce\n"
              "dist.init_process_group('gloo')\ndist.get_rank()\nall_reduce(x, op=dist.ReduceOp.MAX)\nx.broadcast()\n")
    assert direct_collective_calls(source) == []


class Recorded(Exception):
    """Raised by the stand-in collective once it has seen its tensor (a meta tensor holds no values
    to copy back, so the call stops there)."""


@pytest.fixture
def recording(monkeypatch):
    """torch.distributed's tensor collectives replaced by a recorder of (name, device of the tensor)."""
    seen: list[tuple[str, torch.device]] = []

    def stand_in(name):
        def collective(tensor, *args, **kwargs):
            seen.append((name, tensor.device))
            raise Recorded

        return collective

    for name in ("all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, stand_in(name))
    return seen


ON_META = DistInfo(rank=0, world_size=2, device=torch.device("meta"))


@pytest.mark.parametrize("call", [
    lambda: ld.all_reduce_sum(torch.ones(3, dtype=torch.float64), ON_META),
    lambda: ld.all_reduce_sum(torch.tensor([7], dtype=torch.int64), ON_META),
    lambda: ld.all_reduce(torch.ones(2), op=dist.ReduceOp.MAX, info=ON_META),
    lambda: ld.any_rank(True, ON_META),
    lambda: ld.broadcast(torch.zeros(4, dtype=torch.int32), src=0, info=ON_META),
], ids=["sum-float64", "sum-int64", "max", "any_rank", "broadcast"])
def test_every_tensor_collective_gets_its_tensor_on_the_run_device(recording, call):
    # The caller's tensor is on the CPU (a count, a flag, float64 sums): the collective must see it
    # on the run's device, which NCCL needs; "meta" stands for a device that is not the CPU.
    with pytest.raises(Recorded):
        call()
    assert [device for _, device in recording] == [torch.device("meta")]


def test_the_trainers_totals_are_reduced_on_the_run_device(recording):
    from lowmem.train.evaluate import EvalTotals

    totals = EvalTotals()  # CPU sums, as lowmem eval builds them
    with pytest.raises(Recorded):
        totals.all_reduce(ON_META)
    assert recording == [("all_reduce", torch.device("meta"))]


def test_a_collective_on_the_run_device_reduces_in_place(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, **kwargs: tensor.mul_(2))  # two ranks holding the same
    info = DistInfo(rank=0, world_size=2, device=torch.device("cpu"))
    value = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert ld.all_reduce_sum(value, info) is value and value.tolist() == [3.0, 4.0]
    assert ld.any_rank(True, info) is True


def test_alone_no_collective_runs(recording):
    alone = DistInfo()
    value = torch.ones(2)
    assert ld.all_reduce_sum(value, alone) is value and value.tolist() == [1.0, 1.0]
    assert ld.any_rank(True, alone) is True and ld.any_rank(False, alone) is False
    assert ld.broadcast_object("name", alone) == "name"
    ld.barrier(alone)
    assert recording == []


def test_without_a_distinfo_the_process_group_says_where_collectives_run(monkeypatch):
    """Optimizers and structures pass no DistInfo: under NCCL their collectives go to the current GPU."""
    assert ld.current_info() == DistInfo()  # no group: one CPU process
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    info = ld.current_info()
    assert (info.rank, info.world_size, info.device, info.enabled) == (1, 2, torch.device("cuda", 1), True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert ld.current_info().device == torch.device("cpu")


@pytest.fixture
def fake_group(monkeypatch):
    """torchrun's environment for rank 1 of 2 and a process-group setup that records its calls."""
    calls: list[tuple] = []
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init_process_group" for c in calls))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(("init_process_group", a, k)))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: int(ld.os.environ["RANK"]))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: int(ld.os.environ["WORLD_SIZE"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    return calls


def test_a_gpu_rank_sets_its_device_then_one_group_for_both_devices(fake_group):
    info = ld.init_distributed("cuda")
    assert info == DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1), launched=True)
    assert fake_group == [("set_device", torch.device("cuda", 1)),
                          ("init_process_group", ("cpu:gloo,cuda:nccl",), {"device_id": torch.device("cuda", 1)})]


def test_a_cpu_rank_uses_gloo(fake_group):
    info = ld.init_distributed("cpu")
    assert info.device == torch.device("cpu") and info.enabled
    assert fake_group == [("init_process_group", ("gloo",), {})]


def test_one_process_under_torchrun_still_gets_a_group(fake_group, monkeypatch):
    """`torchrun --nproc-per-node 1 ... --distributed fsdp2` runs the distributed path (NCCL on a GPU)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    info = ld.init_distributed("cpu")
    assert info.world_size == 1 and info.enabled and fake_group == [("init_process_group", ("gloo",), {})]


def test_alone_no_group_is_made(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("no group for one process"))
    assert ld.init_distributed("cpu") == DistInfo()
