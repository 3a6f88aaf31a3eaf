"""Random PEFT LoRA adapters for the tests, made by PEFT itself, with PEFT's merge_and_unload() as the reference."""

from __future__ import annotations

from pathlib import Path

import torch


def peft_adapter(base: Path, out: Path, seed: int, dtype: torch.dtype = torch.float32, **lora_kwargs) -> dict:
    """Save a LoRA of `base` with random factors (and perturbed modules_to_save / DoRA magnitudes) to `out`.

    Returns PEFT's merge_and_unload() state dict of base + that adapter, loaded back from disk as a user would.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # factors, magnitudes and the modules_to_save copies
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(str(out))
    return merged_by_peft(base, out, dtype)


def merged_by_peft(base: Path, adapter: Path, dtype: torch.dtype = torch.float32) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def max_diff(got: dict, want: dict, names=None) -> float:
    names = list(want) if names is None else names
    return max((got[k].float() - want[k].float()).abs().max().item() for k in names)
