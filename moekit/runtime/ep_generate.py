"""Greedy generation with every MoE layer expert-parallel: the launcher example for torchrun.

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29500 \\
        -m moekit.runtime.ep_generate MODEL_DIR --prompt "Hello" --max-new-tokens 16 --compare

Every rank builds the model skeleton on the meta device (no weights allocated), loads the non-expert tensors
(attention, norms, embeddings, routers, shared experts) and only its own block of experts per layer through
moekit's lazy reader, and swaps each layer's experts module for an `ExpertParallelExperts`. The rest of the
model runs replicated, so each MoE layer dispatches an even share of the tokens per rank and all-gathers the
outputs. `--compare` also runs the plain single-process model on rank 0 and reports whether the tokens match.
Works for Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints (per-expert or fused expert tensors); gloo on CPU,
NCCL when CUDA is present.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moekit import transformers_io
from moekit.errors import UserError
from moekit.io.safetensors_reader import TensorReader, checkpoint_infos
from moekit.runtime.ep_checkpoint import checkpoint_name, load_local_experts
from moekit.runtime.expert_parallel import ExpertParallelExperts

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def build_expert_parallel_model(
    model_dir: Path,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.nn.Module:
    """A transformers causal LM for `model_dir` whose MoE layers hold only this rank's experts.

    Only this rank's expert tensors are read. The returned model expects every rank to run the same forward
    calls on the same inputs (replicated tokens); its outputs are then identical on every rank.
    """
    from transformers import AutoModelForCausalLM

    config = transformers_io.load_config(model_dir)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{model_dir}: model_type {config.model_type!r} has no expert-parallel support; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    reader = TensorReader(checkpoint_infos(Path(model_dir)))
    try:
        for name, block in list(model.named_modules()):
            experts = getattr(block, "experts", None)
            if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
                continue
            layer = int(_LAYER.search(f".{name}.").group(1))
            local = load_local_experts(reader, layer, num_experts, rank, world)
            block.experts = ExpertParallelExperts(
                local.gate_up_proj.to(device=device, dtype=dtype),
                local.down_proj.to(device=device, dtype=dtype),
                num_experts,
                group,
                replicated_tokens=True,
                backend=backend,
            )
        _load_replicated_tensors(model, reader, device, dtype)
    finally:
        reader.close()
    _rebuild_meta_buffers(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{model_dir}: the checkpoint leaves {left[0]} (and {len(left) - 1} more) unset")
    return model.eval().requires_grad_(False)


def _load_replicated_tensors(
    model: torch.nn.Module, reader: TensorReader, device, dtype: torch.dtype
) -> None:
    """Fill every parameter and persistent buffer still on the meta device from the checkpoint."""
    state, tied_missing = {}, []
    tied = (
        set(model.get_expanded_tied_weights_keys(all_submodels=True))
        if model.config.tie_word_embeddings
        else set()
    )
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_meta:
            continue
        if key in tied and key not in reader:
            tied_missing.append(key)
            continue
        value = reader.read(checkpoint_name(key, reader))
        if tuple(value.shape) != tuple(tensor.shape):
            raise UserError(
                f"checkpoint: '{key}' has shape {tuple(value.shape)} but the config implies {tuple(tensor.shape)}; "
                "config.json does not match the weights"
            )
        state[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if tied_missing:
        model.tie_weights()


def _rebuild_meta_buffers(model: torch.nn.Module, device) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in checkpoints: rebuild their modules."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        with torch.device(device):
            fresh = type(module)(config=model.config)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, fresh)


def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation of `input_ids` [1, n]; EOS stops it as in `generate` (the same on every rank)."""
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
            pad_token_id=model.generation_config.pad_token_id or model.generation_config.eos_token_id or 0,
        )
    return out[0, input_ids.shape[1] :].tolist()


def _prompt_ids(args, model_dir: Path) -> tuple[torch.Tensor, object]:
    if args.prompt_ids:
        return torch.tensor([[int(t) for t in args.prompt_ids.split(",")]]), None
    try:
        tokenizer = transformers_io.load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: no usable tokenizer ({e}); pass --prompt-ids 1,2,3 instead") from None
    return tokenizer(args.prompt, return_tensors="pt").input_ids, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moekit.runtime.ep_generate",
        description="Greedy generation with expert-parallel MoE layers; run it under torchrun.",
        epilog="example: torchrun --nproc-per-node 2 --master-addr 127.0.0.1 -m moekit.runtime.ep_generate "
        "out/my-moe --prompt 'Hello' --compare",
    )
    parser.add_argument("model_dir", type=Path)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, tokenized with the model's tokenizer")
    prompt.add_argument(
        "--prompt-ids", help="comma-separated token ids (for checkpoints without a tokenizer)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: config.json's")
    parser.add_argument(
        "--backend", default="auto", help="local experts backend (auto, torch, triton, megablocks)"
    )
    parser.add_argument("--compare", action="store_true", help="also generate with one process on rank 0")
    parser.add_argument("--json", type=Path, help="rank 0 writes the tokens (and the comparison) here")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if "RANK" not in os.environ:
        raise UserError(
            "run this under torchrun, e.g. torchrun --nproc-per-node 2 -m moekit.runtime.ep_generate ..."
        )
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    try:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = build_expert_parallel_model(args.model_dir, device=device, dtype=dtype, backend=args.backend)
        input_ids, tokenizer = _prompt_ids(args, args.model_dir)
        tokens = greedy_generate(model, input_ids.to(device), args.max_new_tokens)
        dist.barrier()
        if dist.get_rank() == 0:
            _report(args, tokens, tokenizer, input_ids, dtype, dist.get_world_size())
        dist.barrier()
    finally:
        # Tear down explicitly: gloo may abort in interpreter shutdown otherwise.
        dist.destroy_process_group()
    return 0


def _report(args, tokens: list[int], tokenizer, input_ids: torch.Tensor, dtype, world: int) -> None:
    result: dict = {"world_size": world, "tokens": tokens}
    print(f"expert-parallel ({world} processes): {tokens}")
    if tokenizer is not None:
        print(f"  text: {tokenizer.decode(tokens)!r}")
    if args.compare:
        single = transformers_io.load_model(args.model_dir, dtype=dtype or "auto")
        reference = greedy_generate(single, input_ids, args.max_new_tokens)
        result.update(single_process_tokens=reference, match=reference == tokens)
        print(f"single process:          {reference}")
        print("MATCH" if reference == tokens else "MISMATCH")
    if args.json:
        args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
