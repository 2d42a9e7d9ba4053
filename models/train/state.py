"""Everything a killed training run needs to continue exactly, without pickle.

Randomness: every step draws from generators seeded by ``step_seed(seed, purpose, epoch,
step, rank)``, so the random stream of any step is a pure function of where it is in the
run. A resumed run (or a data-loader worker) therefore needs no generator state to draw the
same crops, flips, penalty logits and half-and-half masks. The global torch RNG state is
saved too, for anything outside the trainer that draws from it.

Optimiser state is split into tensors (momentum buffers, stored under ``optim.<i>.<key>``
in the safetensors file) and a JSON document (param groups, non-tensor values).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

OPTIM_PREFIX = "optim."
RNG_PREFIX = "rng."


def step_seed(seed: int, purpose: str, *counters: int) -> int:
    """A 63-bit seed that depends on every argument (stable across runs and platforms)."""
    key = ":".join([str(int(seed)), purpose, *(str(int(c)) for c in counters)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, purpose: str, *counters: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, purpose, *counters))


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into safetensors-ready tensors and a JSON document."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    doc = {"param_groups": sd["param_groups"], "scalars": scalars}
    json.dumps(doc)  # fail here, not at save time, if something is not JSON
    return tensors, doc


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    """Inverse of ``optimizer_to_tensors``; tensors move to each parameter's device."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(OPTIM_PREFIX):
            continue
        idx, key = name[len(OPTIM_PREFIX) :].split(".", 1)
        state.setdefault(int(idx), {})[key] = value.to(params[int(idx)].device)
    for idx, values in doc.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": doc["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    """Global RNG states as uint8 tensors (CPU, and the current CUDA device if any)."""
    out = {f"{RNG_PREFIX}torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"{RNG_PREFIX}torch_cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if f"{RNG_PREFIX}torch_cpu" in tensors:
        torch.set_rng_state(tensors[f"{RNG_PREFIX}torch_cpu"].to(torch.uint8))
    if f"{RNG_PREFIX}torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"{RNG_PREFIX}torch_cuda"].to(torch.uint8))
