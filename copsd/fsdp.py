"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainable model, with the fused loss ops.

copsd applies ``fully_shard`` itself when the accelerate launch asks for FSDP version 2
(``ACCELERATE_USE_FSDP=true`` and ``FSDP_VERSION=2``, which ``accelerate launch`` sets from an FSDP config
with ``fsdp_version: 2``), on GPUs and on CPU (gloo) alike.  accelerate's own FSDP2 path is not used:
on CPU accelerate 1.15 ignores an FSDP config and would wrap the model in plain DDP, and on GPU its
``Accelerator.prepare_model`` refuses FSDP2 (it shards only through ``prepare(model, optimizer)``), while
copsd needs its own layout and the lm_head handling below.

Layout.  Every transformer block is one FSDP unit; all other parameters (embeddings, final norm,
lm_head, tied or not) form one more unit that stays gathered from the start of the forward pass to the
end of the backward pass (``reshard_after_forward=False``); the root is ``PolicyHidden`` and holds no
parameters of its own.  The fused loss ops take ``lm_head.weight`` *outside* the lm_head's forward
(the model's forward stops at the final hidden states, so ``[tokens, vocab]`` logits never exist).
Outside its forward a sharded parameter is a DTensor holding 1/world of the rows, so
:func:`full_weight` calls the unit's public ``unshard()`` first and returns the gathered parameter; its
gradient accumulates there and FSDP reduce-scatters it into the sharded parameter's gradient in the
post-backward pass, like every other parameter's.

Frozen models (teacher, initial student for the KL term, EMA teacher) are not sharded: each process keeps
a whole copy (see docs/trainer.md for the memory arithmetic).
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("copsd")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def requested() -> bool:
    """True when the launch asks for FSDP2.  What copsd cannot honour is an error, not ignored: FSDP1,
    DeepSpeed, and the accelerate FSDP options ``fsdp_offload_params`` and ``fsdp_activation_checkpointing``
    (use copsd's ``gradient_checkpointing: true``)."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError("distributed_type: DeepSpeed is not supported by copsd (see docs/trainer.md); use an "
                         "FSDP config with fsdp_version: 2, or plain DDP")
    if not _env_true("ACCELERATE_USE_FSDP"):
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"fsdp_version: copsd supports FSDP2 only (set fsdp_version: 2 in the accelerate "
                         f"config), got FSDP_VERSION={version!r}")
    if _env_true("FSDP_OFFLOAD_PARAMS"):
        raise ValueError("fsdp_offload_params: CPU offload is not supported by copsd's FSDP2 path; set it to false")
    if _env_true("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ValueError("fsdp_activation_checkpointing: set it to false and use copsd's "
                         "gradient_checkpointing: true instead")
    return True


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_weight(head: torch.nn.Module) -> torch.Tensor:
    """``head.weight`` whole: the FSDP unit holding it is gathered first when it is sharded.

    Call it inside the root module's forward (``PolicyHidden``); the gathered parameter stays until the
    post-backward pass, which reduce-scatters its gradient and reshards it.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(head, FSDPModule):
        head.unshard()
    return head.weight


def full_tensor(t):
    """A DTensor gathered into a plain tensor (collective: every process must call it); others unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _blocks(model) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"FSDP2: cannot find the transformer blocks of {type(model).__name__} "
                         "(no module of a class in its _no_split_modules)")
    return blocks


def shard_policy(policy: torch.nn.Module, acc, *, bf16: bool, pad_token_id: int) -> torch.nn.Module:
    """Apply ``fully_shard`` to ``policy`` (a ``PolicyHidden``) in place over all processes; returns it.

    Call before building the optimizer: sharding replaces the parameters by DTensors.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from copsd.training import hf_model

    if not dist.is_initialized():
        raise RuntimeError("FSDP2 needs torch.distributed initialised (launch with accelerate or torchrun)")
    model = hf_model(policy.model)
    world = acc.num_processes
    mesh = init_device_mesh(acc.device.type, (world,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no")
    # every process starts from the main process's weights, as DDP does (a random LoRA initialisation would
    # otherwise differ between the shards)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    in_block = {id(p) for b in blocks for p in b.parameters()}
    rest = [m for m in model.modules()
            if any(id(p) not in in_block for p in m.parameters(recurse=False))]
    if rest:
        fully_shard(rest, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    distribute_on_load(model)
    # one forward through the root first: FSDP's lazy initialisation must start at the root, and rollouts
    # call the language model directly
    with torch.no_grad():
        one = torch.full((1, 1), pad_token_id, dtype=torch.long, device=acc.device)
        policy(one, torch.ones_like(one))
    if rest:
        rest[0].reshard()  # the unit stays gathered after a forward until a backward; not this one
    _log_layout(policy, acc)
    return policy


def _log_layout(policy, acc):
    from torch.distributed.tensor import DTensor

    params = list(policy.parameters())
    sharded = [p for p in params if isinstance(p, DTensor)]
    local = sum(p.to_local().numel() for p in sharded)
    total = sum(p.numel() for p in params)
    mesh = sharded[0].device_mesh.size() if sharded else 1
    logger.info("FSDP2: process %d of %d: %d of %d parameters are DTensors sharded over a %d-way mesh; "
                "this process holds %d of their %d elements", acc.process_index, acc.num_processes, len(sharded),
                len(params), mesh, local, total)


# --------------------------------------------------------------------------- checkpoints

def full_state_dict(model) -> dict | None:
    """The model's full state dict on the main process (CPU tensors), None elsewhere; every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied parameter (lm_head = embeddings) is saved once, as save_pretrained does
            sd.pop(name, None)
        seen.add(id(p))
    return sd or None


def distribute_on_load(model: torch.nn.Module) -> None:
    """Let ``model.load_state_dict`` take whole tensors for its sharded parameters (each process keeps its
    rows; every process must read the same file)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def hook(module, state_dict, prefix, *args):
        for name, p in module.named_parameters():
            v = state_dict.get(prefix + name)
            if isinstance(p, DTensor) and v is not None and not isinstance(v, DTensor):
                state_dict[prefix + name] = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements,
                                                              src_data_rank=None)

    model.register_load_state_dict_pre_hook(hook)


def optimizer_shard_name(rank: int, world: int) -> str:
    return f"optimizer-shard-{rank:05d}-of-{world:05d}.pt"


def local_optimizer_state(optimizer) -> dict:
    """This process's optimizer state with DTensors replaced by their local rows (loadable with weights_only)."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {i: {k: (v.to_local().clone() if isinstance(v, DTensor) else v) for k, v in s.items()}
             for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_local_optimizer_state(optimizer, sd: dict) -> None:
    """Inverse of :func:`local_optimizer_state` for the same layout (same number of processes)."""
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(sd)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor) or p not in optimizer.state:
                continue
            st = optimizer.state[p]
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim() > 0:
                    if v.shape != p.to_local().shape:
                        raise ValueError(f"resume_from_checkpoint: optimizer state {k!r} has shape "
                                         f"{tuple(v.shape)}, this process's shard {tuple(p.to_local().shape)}")
                    st[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                               stride=p.stride())


def load_optimizer_shard(optimizer, ckpt: str, rank: int, world: int) -> None:
    """Restore this process's optimizer shard written by a run with the same number of processes."""
    path = os.path.join(ckpt, optimizer_shard_name(rank, world))
    if not os.path.isfile(path):
        found = sorted(f for f in os.listdir(ckpt) if f.startswith("optimizer"))
        raise FileNotFoundError(f"resume_from_checkpoint: {ckpt} has no {os.path.basename(path)} (found {found}); "
                                f"an FSDP2 checkpoint resumes with the number of processes that wrote it")
    load_local_optimizer_state(optimizer, torch.load(path, weights_only=True, map_location="cpu"))


def all_processes_done(done: bool, device) -> bool:
    """True once ``done`` holds on every process (a collective): sharded rollouts must run the same number of
    forward passes on every process, since each pass gathers parameters from all of them."""
    import torch.distributed as dist

    t = torch.tensor([0 if done else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0
