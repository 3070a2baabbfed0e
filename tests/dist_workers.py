"""Worker functions for tests/test_distributed_wrappers.py, run in processes started by :func:`spawn`.

Every scenario family runs in one spawn (gloo, float64, CPU) and checks many things inside; a
failed check raises in the worker and :func:`spawn` re-raises it in pytest. The single-process
oracle is computed in every worker on an unwrapped copy of the same model: logits from
``lm_head`` and :func:`rspo_kernels.rspo_loss` (the logits path, itself checked against the
specification elsewhere), never the fused-linear op under test.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rspo_kernels as rk
from rspo_kernels.distributed import forward_redirect

V, H, B, T = 13, 8, 3, 5  # vocabulary, hidden size, responses per rank, tokens per response
# An entropy bonus too: its gradient crosses the same data-parallel reductions as the policy term.
LOSS_KW: dict[str, Any] = dict(epsilon_low=0.2, loss_agg_mode="token-mean", entropy_coeff=0.03)
BLOCKS = dict(chunk_rows=4, vocab_block=5)  # several blocks each way: the chunked op, not one matmul
TOL = 1e-10
COLLECTIVE_TIMEOUT_S = 60


# ---- harness ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, worker: Callable[..., None], init: bool, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world),
    )
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # torch.distributed deprecations DeepSpeed still calls
    if init:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        )
    worker(rank, world, *args)
    # Only once every rank is done: a rank that tears down its gloo pairs while another still
    # finishes its last collective aborts that one ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    # The worker passed. Leave without the interpreter's teardown: a gloo or DDP-reducer thread
    # still joinable when C++ static destructors run aborts the process ("terminate called without
    # an active exception", seen once on a loaded 2-core CI machine after every assertion passed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker: Callable[..., None], world: int, *args: Any, timeout: float = 180.0, init: bool = True) -> None:
    """Run ``worker(rank, world, *args)`` on ``world`` new processes; re-raise errors; kill them at ``timeout``."""
    ctx = mp.start_processes(
        _entry, args=(world, free_port(), worker, init, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{worker.__name__} on {world} processes did not finish in {timeout:.0f} s")


# ---- model, data, oracle ----------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


class TinyLM(nn.Module):
    """Embedding, two residual blocks, a final norm and an ``lm_head`` (with a bias unless tied)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(H)
        self.lm_head = nn.Linear(H, V, bias=not tied)
        if tied:
            self.lm_head.weight = self.embed.weight

    def backbone(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.backbone(ids))


def make_model(tied: bool) -> TinyLM:
    torch.manual_seed(1234)  # the same initial weights on every rank and for the oracle
    return TinyLM(tied).double()


def global_batch(world: int, step: int, model: TinyLM) -> list[dict[str, torch.Tensor]]:
    """One shard per rank: ids, target ids, a mask, per-response weights and old log-probs.

    The old log-probs are the model's own, jittered so that some ratios leave the clip range.
    """
    g = torch.Generator().manual_seed(100 + step)
    shards = []
    for _ in range(world):
        ids = torch.randint(0, V, (B, T), generator=g)
        tgt = torch.randint(0, V, (B, T), generator=g)
        mask = torch.rand(B, T, generator=g) < 0.8
        mask[:, 0] = True
        w = torch.randn(B, generator=g, dtype=torch.float64)
        with torch.no_grad():
            logp = rk.token_logprobs(model(ids), tgt)
        old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).masked_fill(~mask, 0.0)
        shards.append(dict(ids=ids, tgt=tgt, mask=mask, w=w, old=old))
    return shards


def oracle_loss(model: TinyLM, s: dict[str, torch.Tensor]) -> torch.Tensor:
    return rk.rspo_loss(model(s["ids"]), s["tgt"], s["w"], s["mask"], old_logprobs=s["old"], **LOSS_KW)


def oracle_grads(model: TinyLM, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Gradient of the data-parallel objective: the mean over ranks of each rank's loss."""
    model.zero_grad(set_to_none=True)
    loss = sum(oracle_loss(model, s) for s in shards) / len(shards)
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def fused_loss(model: TinyLM, s: dict[str, torch.Tensor], head: Any = None) -> torch.Tensor:
    """The fused-linear loss of one shard, head given as the module (default) or a tensor."""
    hidden = model.backbone(s["ids"])
    head = model.lm_head if head is None else head
    kw = {} if isinstance(head, nn.Module) else {"bias": model.lm_head.bias}
    out = rk.rspo_linear_loss(
        hidden, head, s["tgt"], s["w"], s["mask"], old_logprobs=s["old"], **kw, **LOSS_KW, **BLOCKS
    )
    assert isinstance(out, torch.Tensor)
    return out


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    err = (got - want).abs().max().item()
    assert err <= tol, f"{name}: max abs error {err:.3e} > {tol:.0e}"


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def replicas_identical(x: torch.Tensor) -> bool:
    got = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(got, x)
    return all(torch.equal(got[0], y) for y in got[1:])


# ---- DDP --------------------------------------------------------------------------------------


def ddp_worker(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    lr, steps = 0.5, 3
    for tied in (False, True):
        oracle = make_model(tied)
        for head_as in ("module", "weight"):
            model = make_model(tied)
            ddp = DDP(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=lr)
            ref = copy.deepcopy(oracle)
            ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
            for step in range(steps):
                shards = global_batch(world, step, ref)
                want = oracle_grads(ref, shards)
                opt.zero_grad(set_to_none=True)
                head = model.lm_head if head_as == "module" else model.lm_head.weight
                loss = forward_redirect(ddp, fused_loss, model, shards[rank], head)
                loss.backward()
                where = f"DDP tied={tied} head={head_as} step={step}"
                for n, p in model.named_parameters():
                    assert_close(f"{where} grad {n}", p.grad, want[n])
                opt.step()
                ref_opt.step()
                assert replicas_identical(flat_params(model)), f"{where}: replicas differ after the step"
                assert_close(f"{where} params", flat_params(model), flat_params(ref))

    # The rule's reason: the same loss outside DDP's forward is never all-reduced.
    model = make_model(tied=False)
    ddp = DDP(model)
    shards = global_batch(world, 0, model)
    local = oracle_grads(copy.deepcopy(model), [shards[rank]])
    fused_loss(model, shards[rank]).backward()  # the unwrapped backbone and head: no redirect
    for n, p in model.named_parameters():
        assert_close(f"naive DDP grad {n} is this rank's own", p.grad, local[n])
    torch.optim.SGD(model.parameters(), lr=lr).step()
    assert not replicas_identical(flat_params(model)), "naive call: replicas should have drifted apart"


# ---- FSDP2 ------------------------------------------------------------------------------------


def fsdp2_worker(rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    configs = [(False, head_unit, reshard) for head_unit in ("root", "own") for reshard in (True, False)]
    configs.append((True, "root", True))  # a tied head shares the embedding's unit
    for tied, head_unit, reshard in configs:
        where = f"FSDP2 tied={tied} head={head_unit} reshard_after_forward={reshard}"
        model = make_model(tied)
        for layer in model.layers:
            fully_shard(layer, reshard_after_forward=reshard)
        if head_unit == "own":
            fully_shard(model.lm_head, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        hidden = torch.zeros(B, T, H, dtype=torch.float64)
        shards0 = global_batch(world, 0, make_model(tied))
        s = shards0[rank]
        try:  # the weight outside any forward is a Shard(0) DTensor
            rk.rspo_linear_loss(hidden, model.lm_head.weight, s["tgt"], s["w"], s["mask"])
            raise AssertionError(f"{where}: a DTensor weight was accepted")
        except ValueError as e:
            assert "is a DTensor" in str(e) and "pass the module" in str(e), str(e)

        oracle = make_model(tied)
        micro = [shards0, global_batch(world, 1, oracle)]
        want: dict[str, torch.Tensor] = {}
        for shards in micro:  # gradient accumulation: the oracle's gradients add up
            for n, g in oracle_grads(oracle, shards).items():
                want[n] = want[n] + g if n in want else g
        for i, shards in enumerate(micro):
            model.set_requires_gradient_sync(i == len(micro) - 1)
            loss = forward_redirect(model, fused_loss, model, shards[rank])
            loss.backward()
        for n, p in model.named_parameters():
            assert_close(f"{where} grad {n}", p.grad.full_tensor(), want[n])

    # A head that is still a DTensor inside its own forward is tensor parallel, not FSDP2: say where to go.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    tp_head = parallelize_module(nn.Linear(H, V).double(), init_device_mesh("cpu", (world,)), ColwiseParallel())
    s = global_batch(world, 0, make_model(False))[rank]
    try:
        rk.token_logprobs_linear(torch.zeros(B, T, H, dtype=torch.float64), tp_head, s["tgt"])
        raise AssertionError("a tensor-parallel DTensor head was accepted")
    except ValueError as e:
        assert "still a DTensor" in str(e) and "tp_group=" in str(e), str(e)


# ---- DeepSpeed ZeRO-3 -------------------------------------------------------------------------


def _summing_into(store: dict[str, torch.Tensor], name: str) -> Callable[[torch.Tensor], None]:
    def hook(g: torch.Tensor) -> None:
        store[name] = store[name] + g if name in store else g.clone()

    return hook


def zero3_worker(rank: int, world: int) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import deepspeed.comm.torch

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (minutes of C++) when its
    # communication backend starts; gloo does the same collectives, so skip building it.
    deepspeed.comm.torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    config = {
        "train_micro_batch_size_per_gpu": B,
        "gradient_accumulation_steps": 1,
        # Partition every parameter, however small (the defaults keep small ones whole on every rank).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    # redirect=False: the loss called outside the engine's forward, the head given as the module.
    # DeepSpeed hooks every submodule, so the backbone's and the head's own forwards gather their
    # parameters: it runs and its gradients are right too (docs/distributed.md says so).
    for tied, redirect in ((False, True), (True, True), (False, False), (True, False)):
        where = f"ZeRO-3 tied={tied} redirect={redirect}"
        model = make_model(tied)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=config
        )
        head = engine.module.lm_head
        assert head.weight.numel() == 0, f"{where}: lm_head.weight was not partitioned"
        shards = global_batch(world, 0, make_model(tied))
        s = shards[rank]
        try:  # the placeholder outside the module's forward
            rk.rspo_linear_loss(torch.zeros(B, T, H, dtype=torch.float64), head.weight, s["tgt"], s["w"], s["mask"])
            raise AssertionError(f"{where}: a ZeRO-3 placeholder weight was accepted")
        except ValueError as e:
            assert "ZeRO-3 partitioned parameter" in str(e) and "pass the module" in str(e), str(e)

        # This rank's full gradient as the backward produces it (before DeepSpeed reduces it):
        # right only if the weight was gathered in forward and again for the recomputing backward.
        local: dict[str, torch.Tensor] = {}
        hooks = [p.register_hook(_summing_into(local, n)) for n, p in engine.module.named_parameters()]
        loss = forward_redirect(engine, fused_loss, engine.module, s) if redirect else fused_loss(engine.module, s)
        # Released after the forward: the backward, which recomputes the logits, must gather it again.
        assert head.weight.numel() == 0, f"{where}: lm_head.weight still gathered after the forward"
        engine.backward(loss)
        for h in hooks:
            h.remove()
        want_local = oracle_grads(make_model(tied), [s])
        for n in want_local:
            assert_close(f"{where} rank {rank} local grad {n}", local[n], want_local[n])
        # DeepSpeed reduce-scatters ZeRO-3 gradients in float32 at best (it asserts a
        # communication_data_type of fp16, bf16 or fp32) and keeps float32 partitions, so the
        # reduced gradient is checked to float32's resolution.
        want = oracle_grads(make_model(tied), shards)
        for n, p in engine.module.named_parameters():
            got = deepspeed.utils.safe_get_full_grad(p)
            assert got is not None, f"{where}: no reduced gradient for {n}"
            torch.testing.assert_close(got.double(), want[n], rtol=1.3e-6, atol=1e-6, msg=f"{where} reduced grad {n}")
        engine.step()
        engine.destroy()
