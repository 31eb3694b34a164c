"""Checkpoints in the Hugging Face layout, written atomically, and exact resume.

``output_dir/checkpoint-N/`` holds ``save_pretrained`` weights (safetensors; a LoRA adapter when peft is
used), the tokenizer, ``optimizer.pt`` and ``scheduler.pt`` (``torch.save``; read back with
``weights_only=True``), ``rng_state_<rank>.pth``, any extra tensors (e.g. the EMA teacher) as safetensors,
``trainer_state.json`` (step, data position, constitution hash, config) and a model card.  Each is first
written to ``output_dir/.tmp-checkpoint-N`` and the directory is renamed into place with ``os.replace``;
a crash leaves either the old state or the new one, never half a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TRAINER_STATE = "trainer_state.json"
RUN_FILE = "copsd_run.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def list_checkpoints(output_dir: str, run_id: str | None = None) -> list[tuple[int, str]]:
    """Complete checkpoints (those with a trainer state), sorted by step; with ``run_id``, only that run's."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            if run_id is not None and _run_id_of(path) != run_id:
                continue
            out.append((int(m.group(1)), path))
    return sorted(out)


def _run_id_of(ckpt: str) -> str | None:
    try:
        return read_state(ckpt).get("run_id")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- runs

def read_run(output_dir: str) -> dict | None:
    """The run record ``output_dir/copsd_run.json`` (run id, stage, finished), or None."""
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_run(output_dir: str, record: dict) -> None:
    """Write the run record atomically."""
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, f".{RUN_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(output_dir, RUN_FILE))


def run_outputs(output_dir: str) -> list[str]:
    """What a copsd run leaves in ``output_dir`` (run record, checkpoints, metrics, a final model)."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    found = [n for n in names if n in (RUN_FILE, "metrics.jsonl", "config.json", "adapter", "trainer_state.json")
             or _CKPT.match(n) or (n.startswith("model") and n.endswith(".safetensors"))]
    return found


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """``None`` -> no resume; ``"latest"`` -> newest checkpoint in output_dir of the run recorded there (any
    run's when there is no record; None if there is none); a path -> that checkpoint, which must exist."""
    if not value:
        return None
    if value == "latest":
        run = read_run(output_dir)
        ckpts = list_checkpoints(output_dir, run.get("run_id") if run else None)
        return ckpts[-1][1] if ckpts else None
    if not os.path.isfile(os.path.join(value, TRAINER_STATE)):
        raise FileNotFoundError(f"resume_from_checkpoint: {value} is not a checkpoint directory "
                                f"(no {TRAINER_STATE} in it)")
    return value


# --------------------------------------------------------------------------- RNG

def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------- save

def save_checkpoint(output_dir: str, step: int, *, model, tokenizer, optimizer, scheduler, state: dict,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None, model_card: str | None = None,
                    is_main: bool = True, rank: int = 0, barrier=lambda: None,
                    save_total_limit: int | None = None, model_state_dict: dict | None = None,
                    optimizer_shard: tuple[dict, int] | None = None) -> str:
    """Write ``checkpoint-<step>`` atomically; every process calls this (each writes its own RNG state).

    ``save_total_limit`` rotation deletes only older checkpoints of the same run (``state["run_id"]``).
    FSDP2: ``model_state_dict`` is the gathered full state dict (main process), and ``optimizer_shard`` is
    ``(this process's optimizer state, number of processes)``: each process writes its own shard."""
    final = checkpoint_dir(output_dir, step)
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    torch.save(capture_rng(), os.path.join(tmp, f"rng_state_{rank}.pth"))
    if optimizer_shard is not None:
        from copsd.fsdp import optimizer_shard_name

        torch.save(optimizer_shard[0], os.path.join(tmp, optimizer_shard_name(rank, optimizer_shard[1])))
    if is_main:
        model.save_pretrained(tmp, state_dict=model_state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer_shard is None:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        for name, tensors in (extra_tensors or {}).items():
            save_tensors(tensors, os.path.join(tmp, f"{name}.safetensors"))
        if model_card:
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card)
        with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True, default=str)
    barrier()
    if is_main:
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): swap, then drop the old one
            old = os.path.join(output_dir, f".old-checkpoint-{step}")
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(output_dir)
        if save_total_limit:
            for _, path in list_checkpoints(output_dir, state.get("run_id"))[:-save_total_limit]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safetensors file of ``tensors``, where names sharing one storage (tied embeddings: ``lm_head.weight`` and
    ``model.embed_tokens.weight``) are written once and recorded as aliases in the metadata."""
    kept, aliases, by_view, storages = {}, {}, {}, set()
    for k, v in tensors.items():
        ptr = (v.device, v.untyped_storage().data_ptr())
        view = (*ptr, v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if v.numel() and view in by_view:
            aliases[k] = by_view[view]
            continue
        by_view[view] = k
        v = v.detach().cpu().contiguous()
        # a different view of a storage already written (rare): its own copy, so no two tensors share memory
        kept[k] = v.clone() if v.numel() and ptr in storages else v
        storages.add(ptr)
    save_file(kept, path, metadata={"copsd_aliases": json.dumps(aliases)} if aliases else None)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read a file written by ``save_tensors``; each alias maps to the same tensor as the name it shares."""
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    for alias, name in json.loads(meta.get("copsd_aliases", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- load

def read_state(ckpt: str) -> dict:
    with open(os.path.join(ckpt, TRAINER_STATE), encoding="utf-8") as f:
        return json.load(f)


def load_model_weights(model, ckpt: str) -> None:
    """Load the weights saved by ``save_checkpoint`` into ``model`` (a transformers or peft model), exactly."""
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        path = os.path.join(ckpt, "adapter_model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume_from_checkpoint: {ckpt} has no adapter_model.safetensors "
                                    "(was the checkpoint written without use_peft?)")
        result = set_peft_model_state_dict(model, load_file(path))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"resume_from_checkpoint: {path} has unexpected keys {unexpected[:5]}")
        return
    files = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors") and f.startswith("model"))
    if not files:
        raise FileNotFoundError(f"resume_from_checkpoint: no model*.safetensors in {ckpt}")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(ckpt, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"resume_from_checkpoint: {ckpt} has weights the model lacks: {unexpected[:5]}")
    tied = _tied_names(model)
    really_missing = [k for k in missing if k not in tied]
    if really_missing:
        raise ValueError(f"resume_from_checkpoint: {ckpt} lacks weights for {really_missing[:5]}")


def _tied_names(model) -> set[str]:
    """Parameter names that share storage with an earlier parameter (dropped by save_pretrained)."""
    from torch.distributed.tensor import DTensor

    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p) if isinstance(p, DTensor) else p.data_ptr()  # a DTensor's data_ptr() is 0 (FSDP2)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def load_training_state(ckpt: str, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore optimizer (unless None: FSDP2 shards are restored by ``copsd.fsdp``), scheduler and this process's
    RNG; return the trainer state."""
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True,
                                             map_location="cpu"))
    scheduler.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=True))
    rng = os.path.join(ckpt, f"rng_state_{rank}.pth")
    if os.path.isfile(rng):
        restore_rng(torch.load(rng, weights_only=True))
    return read_state(ckpt)


def load_extra(ckpt: str, name: str) -> dict[str, torch.Tensor]:
    path = os.path.join(ckpt, f"{name}.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume_from_checkpoint: {ckpt} has no {name}.safetensors")
    return load_tensors(path)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


# --------------------------------------------------------------------------- model card

def model_card(*, title: str, base_model: str, constitution, stage: str, step: int, config: dict,
               extra: dict | None = None) -> str:
    """A README.md with the constitution's hash (so a model can be traced to the principles it learned)."""
    keys = ("objective", "teacher_mode", "learning_rate", "num_generations", "max_steps", "num_train_epochs",
            "kl_coef", "seed", "use_peft")
    lines = [
        "---",
        "library_name: transformers",
        # the hub metadata field names hub ids only; a local directory is given (absolute) in the body
        f"base_model: {base_model}" if base_model and not os.path.isabs(base_model) and not os.path.isdir(base_model)
        else "",
        "tags: [copsd, safety, distillation]",
        "---",
        f"# {title}",
        "",
        f"Trained with copsd ({stage}), {step} steps.",
        "",
        f"- constitution sha256: `{constitution.sha256}`",
        f"- constitution file: `{os.path.basename(constitution.path)}`" if constitution.path else "",
        f"- base model: `{os.path.abspath(base_model) if os.path.isdir(base_model) else base_model}`",
    ]
    lines += [f"- {k}: `{v}`" for k, v in (extra or {}).items()]
    lines += [f"- {k}: `{config[k]}`" for k in keys if k in config]
    return "\n".join(line for line in lines if line != "") + "\n"
