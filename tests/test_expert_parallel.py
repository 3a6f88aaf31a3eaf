"""Expert parallelism: gloo process groups on CPU must reproduce the single-process MoE layer.

Each distributed test runs its ranks as separate processes (this file, run as a script with --worker) on
127.0.0.1 and judges them only by the result files they write: a gloo process can abort (SIGABRT) at interpreter
exit after every check has passed, so an exit code alone proves nothing either way.

The reference is a deliberately dumb single-process layer in float64: a per-token loop over the chosen
experts, with its own softmax/top-k. Tolerance: fp32 results within 1e-5 of the float64 reference, relative
to the reference's largest magnitude (`assert_rel_close`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

E, H, I = 8, 16, 24  # experts, hidden, intermediate (tiny: 2 shared cores)
REL_TOL = 1e-5
WORLD_SIZES = (2, 4)
WORKER_TIMEOUT_S = 120


# --------------------------------------------------------------------------- the single-process reference


def reference_layer(x, router_weight, ban, gate_up, down, top_k: int, renormalize: bool):
    """Router + SwiGLU experts, one token and one chosen expert at a time, in the inputs' dtype."""
    probs = torch.softmax(x @ router_weight.T + ban, dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros_like(x[t])
        for j in range(top_k):
            e = int(indices[t, j])
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            row = row + weights[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
        rows.append(row)
    return torch.stack(rows), indices


def single_process_layer(case: dict):
    """moekit's own single-process `MoELayer` holding the case's weights."""
    from moekit.runtime import MoELayer

    layer = MoELayer.build(H, I, E, case["top_k"], router=case["routing"], backend="torch")
    with torch.no_grad():
        layer.router.weight.copy_(case["router_weight"])
        layer.experts.gate_up_proj.copy_(case["gate_up"])
        layer.experts.down_proj.copy_(case["down"])
    return layer


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(1e-30)
    err = float((actual.double() - expected.double()).abs().max() / scale)
    assert err <= REL_TOL, f"{what}: max relative error {err:.2e} > {REL_TOL:.0e}"


# --------------------------------------------------------------------------- cases


def make_case(
    seed: int, world_size: int, tokens_per_rank: list[int], mode: str, top_k: int, routing: str, ban_rank
):
    """Random fp32 inputs for one scenario. `ban_rank`: a rank whose experts the router can never pick."""
    g = torch.Generator().manual_seed(seed)
    total = sum(tokens_per_rank) if mode != "replicated" else tokens_per_rank[0]
    ban = torch.zeros(E)
    if ban_rank is not None:
        per_rank = E // world_size
        ban[ban_rank * per_rank : (ban_rank + 1) * per_rank] = -1e4  # softmax weight exp(-1e4) == 0 in fp32
    return {
        "mode": mode,
        "tokens_per_rank": tokens_per_rank,
        "top_k": top_k,
        "routing": routing,
        "x": torch.randn(total, H, generator=g),
        "router_weight": torch.randn(E, H, generator=g) * 0.5,
        "ban": ban,
        "gate_up": torch.randn(E, 2 * I, H, generator=g) * H**-0.5,
        "down": torch.randn(E, H, I, generator=g) * I**-0.5,
        "grad_out": torch.randn(total, H, generator=g),
    }


def cases_for(world_size: int) -> dict[str, dict]:
    idle = world_size - 1
    no_tokens = [5, 0, 7, 4][:world_size]
    return {
        # ExpertParallelMoE.from_layer(MoELayer): data-parallel tokens, uneven per rank.
        "module": make_case(
            1, world_size, [6, 3, 8, 5][:world_size], "module", 2, "softmax_topk_renorm", None
        ),
        # The last rank's experts are never chosen, so it receives no rows; rank 1 has no tokens to send.
        "idle_rank": make_case(2, world_size, no_tokens, "local", 2, "softmax_topk_renorm", idle),
        # Top-1 without renormalisation (Qwen2-MoE style), so the router still gets a gradient.
        "top1": make_case(3, world_size, [4, 6, 2, 5][:world_size], "local", 1, "softmax_topk", 0),
        # Every rank holds the same 9 tokens and shares the expert work out (the launcher's mode).
        "replicated": make_case(
            4, world_size, [9] * world_size, "replicated", 2, "softmax_topk_renorm", None
        ),
    }


# --------------------------------------------------------------------------- the worker (one rank)


def run_rank(rank: int, world_size: int, cases: dict[str, dict], group) -> dict[str, dict]:
    """This rank's outputs and gradients for every case, with the experts sharded over `group`."""
    from moekit.runtime.expert_parallel import ExpertParallelExperts, ExpertParallelMoE, local_experts
    from moekit.runtime.routing import route

    results = {}
    mine = local_experts(E, rank, world_size)
    for name, case in cases.items():
        counts = case["tokens_per_rank"]
        start = sum(counts[:rank]) if case["mode"] != "replicated" else 0
        x = case["x"][start : start + counts[rank]].clone().requires_grad_()
        grad_out = case["grad_out"][start : start + counts[rank]]
        gate_up = case["gate_up"][mine.start : mine.stop].clone()
        down = case["down"][mine.start : mine.stop].clone()
        if case["mode"] == "module":
            layer = ExpertParallelMoE.from_layer(single_process_layer(case), group)
            out = layer(x).hidden
            router_weight, experts = layer.router.weight, layer.experts
        else:
            router_weight = case["router_weight"].clone().requires_grad_()
            experts = ExpertParallelExperts(
                gate_up, down, E, group, replicated_tokens=case["mode"] == "replicated"
            )
            weights, indices = route(x @ router_weight.T + case["ban"], case["top_k"], case["routing"])
            out = experts(x, indices, weights)
        (out * grad_out).sum().backward()
        results[name] = {
            "out": out.detach(),
            "grad_x": x.grad,
            "grad_router": router_weight.grad,
            "grad_gate_up": experts.gate_up_proj.grad,
            "grad_down": experts.down_proj.grad,
        }
    return results


def worker_main(rank: int, world_size: int, port: int, workdir: Path) -> None:
    """One rank of WORLD_SIZES[-1] processes: the cases of every world size w, on a group of the first w ranks
    (one set of processes serves every world size; process start-up dominates the test's time)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S),
    )
    try:
        cases = torch.load(workdir / "cases.pt", weights_only=True)
        results = {}
        for w in WORLD_SIZES:
            group = (
                dist.new_group(list(range(w))) if w < world_size else dist.group.WORLD
            )  # collective: all call
            if rank < w:
                results[w] = run_rank(rank, w, cases[w], group)
        torch.save(results, workdir / f"rank{rank}.tmp")
        os.replace(workdir / f"rank{rank}.tmp", workdir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env() -> dict[str, str]:
    # gloo picks its interface from the host name; pin it to loopback so nothing leaves 127.0.0.1.
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def run_workers(world_size: int, workdir: Path) -> list[dict]:
    """Start one process per rank, wait, and return every rank's results (a missing file fails the test)."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), str(world_size), str(port), str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=local_env(),
        )
        for rank in range(world_size)
    ]
    logs = [p.communicate(timeout=WORKER_TIMEOUT_S + 30)[0] for p in procs]
    results = []
    for rank in range(world_size):
        path = workdir / f"rank{rank}.pt"
        assert path.is_file(), (
            f"rank {rank} wrote no results (exit {procs[rank].returncode}):\n{logs[rank][-3000:]}"
        )
        results.append(torch.load(path, weights_only=True))
    return results


# --------------------------------------------------------------------------- tests


@pytest.mark.distributed
def test_matches_single_process_layer(tmp_path):
    cases = {w: cases_for(w) for w in WORLD_SIZES}
    torch.save(cases, tmp_path / "cases.pt")
    ranks = run_workers(WORLD_SIZES[-1], tmp_path)
    for world_size in WORLD_SIZES:
        for name, case in cases[world_size].items():
            check_case(f"{name}, world {world_size}", case, [r[world_size][name] for r in ranks[:world_size]])


def check_case(what: str, case: dict, ranks: list[dict]) -> None:
    """Every rank's output and gradients against the float64 single-process reference."""
    per_rank = E // len(ranks)
    f64 = {
        k: v.double().requires_grad_()
        for k, v in case.items()
        if k in ("x", "router_weight", "gate_up", "down")
    }
    renorm = case["routing"] == "softmax_topk_renorm"
    expected, indices = reference_layer(
        f64["x"],
        f64["router_weight"],
        case["ban"].double(),
        f64["gate_up"],
        f64["down"],
        case["top_k"],
        renorm,
    )
    (expected * case["grad_out"].double()).sum().backward()
    assert not (case["ban"][indices] < 0).any(), f"{what}: the router picked a banned expert"
    if case["mode"] == "module":  # the fp32 MoELayer is a second single-process reference
        layer, x = single_process_layer(case), case["x"].clone().requires_grad_()
        (layer(x).hidden * case["grad_out"]).sum().backward()
        assert_rel_close(
            layer(case["x"]).hidden.detach(), expected.detach(), f"{what}: MoELayer vs reference"
        )
        assert_rel_close(
            layer.experts.gate_up_proj.grad, f64["gate_up"].grad, f"{what}: MoELayer grad vs reference"
        )
    counts, replicated = case["tokens_per_rank"], case["mode"] == "replicated"
    grad_router_sum = torch.zeros_like(f64["router_weight"])
    for rank, r in enumerate(ranks):
        rows = slice(0, counts[0]) if replicated else slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        experts = slice(rank * per_rank, (rank + 1) * per_rank)
        where = f"{what}, rank {rank}"
        assert_rel_close(r["out"], expected[rows].detach(), f"{where}: output")
        assert_rel_close(r["grad_x"], f64["x"].grad[rows], f"{where}: grad of the input")
        assert_rel_close(r["grad_gate_up"], f64["gate_up"].grad[experts], f"{where}: grad of gate_up_proj")
        assert_rel_close(r["grad_down"], f64["down"].grad[experts], f"{where}: grad of down_proj")
        if replicated:  # every rank computed the whole loss: it must hold the whole router gradient
            assert_rel_close(r["grad_router"], f64["router_weight"].grad, f"{where}: grad of the router")
        grad_router_sum += r["grad_router"].double()
    if not replicated:  # data parallel: the ranks' router gradients add up (what DDP's all-reduce does)
        assert_rel_close(grad_router_sum, f64["router_weight"].grad, f"{what}: summed router grad")


def test_traffic_counts_rows_for_other_ranks():
    from moekit.runtime.expert_parallel import dispatch_traffic

    indices = torch.tensor([[0, 5], [7, 1], [2, 3], [6, 8]])  # 8 = dropped (outside [0, E))
    t = dispatch_traffic(indices, num_experts=8, rank=1, world_size=4, row_bytes=64)
    owners = [0, 2, 3, 0, 1, 1, 3]  # experts 0,5,7,1,2,3,6 over 4 ranks of 2 experts
    assert (t.local_rows, t.remote_rows) == (owners.count(1), len(owners) - owners.count(1))
    assert t.remote_bytes == t.remote_rows * 64


# --------------------------------------------------------------------------- loading a rank's experts


def make_tiny_qwen2_moe(out: Path, seed: int) -> Path:
    """A random tiny Qwen2-MoE with tied embeddings, saved by transformers (hub per-expert names), experts
    scaled up so that they dominate the residual stream and wrong experts would change the greedy tokens."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, num_experts_per_tok=2, intermediate_size=48, moe_intermediate_size=40,
        shared_expert_intermediate_size=24, num_experts=4, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.mul_(25.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_moes(tmp_path_factory) -> dict[str, Path]:
    """`mixtral`: a clown MoE built by `moekit merge` from four distinct "fine-tunes" of a tiny Llama (with a
    tokenizer); `qwen2_moe`: a tied-embedding Qwen2-MoE saved by transformers."""
    import moekit
    from moekit.demo.tiny_models import make_base, make_finetune

    root = tmp_path_factory.mktemp("ep_models")
    base = make_base(root / "base", seed=0, hidden_size=32, intermediate_size=64, num_layers=2)
    # Far-apart fine-tunes (noise 0.3 against weights of 0.02), so that swapped experts change the tokens.
    experts = [
        {"source_model": str(make_finetune(base, root / f"ft{i}", seed=i, scale=0.3))} for i in range(4)
    ]
    config = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2, "experts": experts}
    return {
        "mixtral": moekit.merge(config, root / "mixtral", seed=5),
        "qwen2_moe": make_tiny_qwen2_moe(root / "qwen2_moe", seed=1),
    }


class RecordingReader:
    """A TensorReader that records what it reads."""

    def __init__(self, model_dir: Path):
        from moekit.io.safetensors_reader import TensorReader, checkpoint_infos

        self.inner = TensorReader(checkpoint_infos(model_dir))
        self.infos = self.inner.infos
        self.read_names: list[tuple[str, object]] = []

    def __contains__(self, name):
        return name in self.inner

    def read(self, name, rows=None):
        self.read_names.append((name, rows))
        return self.inner.read(name, rows)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_loads_only_own_experts(tiny_moes, family):
    from transformers import AutoModelForCausalLM

    from moekit.runtime.ep_checkpoint import load_local_experts

    model = AutoModelForCausalLM.from_pretrained(tiny_moes[family])
    for layer in range(2):
        experts = model.model.layers[layer].mlp.experts
        for rank in range(2):
            reader = RecordingReader(tiny_moes[family])
            local = load_local_experts(reader, layer, 4, rank, 2)
            assert torch.equal(local.gate_up_proj, experts.gate_up_proj[2 * rank : 2 * rank + 2])
            assert torch.equal(local.down_proj, experts.down_proj[2 * rank : 2 * rank + 2])
            read_experts = {int(name.split(".experts.")[1].split(".")[0]) for name, _ in reader.read_names}
            assert read_experts == {2 * rank, 2 * rank + 1}, reader.read_names


def test_loads_rows_of_fused_experts(tmp_path):
    from safetensors.torch import save_file

    from moekit.runtime.ep_checkpoint import load_local_experts

    gate_up, down = torch.randn(4, 2 * I, H), torch.randn(4, H, I)
    prefix = "model.layers.0.mlp.experts."
    save_file(
        {f"{prefix}gate_up_proj": gate_up, f"{prefix}down_proj": down}, str(tmp_path / "model.safetensors")
    )
    reader = RecordingReader(tmp_path)
    local = load_local_experts(reader, 0, 4, rank=1, world_size=2)
    assert torch.equal(local.gate_up_proj, gate_up[2:]) and torch.equal(local.down_proj, down[2:])
    assert {rows for _, rows in reader.read_names} == {(2, 4)}


def test_uneven_expert_split_is_a_user_error():
    from moekit.errors import UserError
    from moekit.runtime.expert_parallel import local_experts

    with pytest.raises(UserError, match="do not split evenly over 3"):
        local_experts(8, 0, 3)


# --------------------------------------------------------------------------- the torchrun launcher


def single_process_greedy(
    model_dir: Path, prompt: list[int], new_tokens: int, swap_experts: bool = False
) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if swap_experts:  # a plausible bug: ranks holding each other's experts
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                    p.copy_(p.roll(2, dims=0))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_torchrun_generation_matches_one_process(tiny_moes, family, tmp_path):
    model_dir, new_tokens = tiny_moes[family], 8
    if family == "mixtral":  # built by moekit merge, with the base's tokenizer: prompt as text
        from transformers import AutoTokenizer

        text = "Mixture of experts routes every token"
        prompt_args, prompt = ["--prompt", text], AutoTokenizer.from_pretrained(model_dir)(text).input_ids
    else:
        prompt = [3, 17, 42, 9, 60, 11]
        prompt_args = ["--prompt-ids", ",".join(map(str, prompt))]
    torchrun = Path(sys.executable).with_name("torchrun")
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "moekit.runtime.ep_generate", str(model_dir), *prompt_args,
         "--max-new-tokens", str(new_tokens), "--json", str(result_path)],
        capture_output=True, text=True, timeout=300, env=local_env(),
    )  # fmt: skip
    assert result_path.is_file(), f"launcher wrote no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(result_path.read_text())
    assert result["world_size"] == 2
    expected = single_process_greedy(model_dir, prompt, new_tokens)
    assert result["tokens"] == expected
    # The comparison can fail: the same model with its expert blocks swapped between ranks says otherwise.
    assert single_process_greedy(model_dir, prompt, new_tokens, swap_experts=True) != expected


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "PORT", "DIR"), required=True)
    rank_, world_, port_, dir_ = parser.parse_args().worker
    worker_main(int(rank_), int(world_), int(port_), Path(dir_))
