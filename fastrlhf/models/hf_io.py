"""HF checkpoint folders in and out: config.json + model.safetensors (or shards + model.safetensors.index.json) + tokenizer.

Weights are read with safetensors only (never pickle). Saving is atomic: everything is written to a temporary folder
beside the target, which is then renamed into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastrlhf.models.decoder import FAMILIES, SUPPORTED, CausalLM, ModelConfig, ScoreModel, split_fused_state

DEFAULT_SHARD_BYTES = 5 * 1024**3  # 5 GiB per shard, as HF's save_pretrained default


class ModelFolderError(ValueError):
    """A missing, unreadable or inconsistent checkpoint folder; the message names the folder or file."""


def check_model_folder(path, flag: str) -> None:
    """Fail early, naming the flag, when ``path`` (given with ``flag``, e.g. "--model") is not a folder."""
    p = Path(path)
    if not p.exists():
        raise ModelFolderError(f"{p}: {flag}: no such folder")
    if not p.is_dir():
        raise ModelFolderError(f"{p}: {flag}: not a folder (expected an HF checkpoint folder)")


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_bytes())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{f}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{f}: not valid JSON (not UTF-8 at byte {e.start})") from None
    if not isinstance(d, dict):
        raise ModelFolderError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def _read_config(path: Path) -> dict:
    f = path / "config.json"
    if not path.is_dir():
        raise ModelFolderError(f"{path}: no such checkpoint folder")
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no config.json (expected an HF checkpoint folder)")
    return _read_json(f)


def has_score_head(path) -> bool:
    """Whether the checkpoint folder holds a trained scalar head (a *ForSequenceClassification model, e.g. a reward
    model) rather than a causal LM (whose ``score`` head ``load_model(head="score")`` would initialise at random)."""
    p = Path(path)
    return _check_arch(_read_config(p), p / "config.json").endswith("ForSequenceClassification")


def _check_arch(d: dict, source: Path) -> str:
    archs = d.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED:
        raise ValueError(f"{source}: architectures={archs} is not supported by fastrlhf/models/decoder.py; supported: "
                         f"{SUPPORTED}")
    return archs[0]


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
                                                       for v in weight_map.values()):
            raise ModelFolderError(f"{index}: 'weight_map' must map weight names to shard files of the folder")
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ValueError(f"{path}: only pickle weights (*.bin/*.pt) found; fastrlhf loads safetensors only")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_model(path, *, head: str = "lm", dtype: torch.dtype = torch.float32, device="cpu", attn_impl: str = "auto",
               gradient_checkpointing: bool = False, weights: bool = True):
    """Load an HF Llama/Qwen2/Mistral folder as ``CausalLM`` (head="lm") or ``ScoreModel`` (head="score").
    head="score" from a causal-LM checkpoint: body loaded, ``score`` freshly initialised N(0, initializer_range)
    (e.g. a value model from an SFT model); from a *ForSequenceClassification checkpoint (a reward model): loaded.
    weights=False: only the config is read; the model comes back on the meta device (no memory; for sharded init)."""
    path = Path(path)
    if head not in ("lm", "score"):
        raise ValueError(f"fastrlhf/models/hf_io.py: load_model(head={head!r}); expected 'lm' or 'score'")
    d = _read_config(path)
    arch = _check_arch(d, path / "config.json")
    if arch.endswith("SequenceClassification") and d.get("num_labels", len(d.get("id2label") or {0: 0})) != 1:
        raise ValueError(f"{path / 'config.json'}: num_labels must be 1 for a score head (got {d.get('num_labels')})")
    cfg = ModelConfig.from_hf(d, source=str(path / "config.json"))
    cfg.attn_impl, cfg.gradient_checkpointing = attn_impl, gradient_checkpointing
    with torch.device("meta"):
        model = CausalLM(cfg) if head == "lm" else ScoreModel(cfg)
    if not weights:
        return model.to(dtype=dtype)
    want = split_fused_state(dict(model.state_dict()), cfg)  # HF's names and shapes (q/k/v_proj, gate/up_proj)
    if head == "lm" and cfg.tie_word_embeddings:
        want.pop("lm_head.weight")
    state = {}
    for f in _weight_files(path):
        if not f.is_file():
            raise ModelFolderError(f"{f}: weight shard not found (named by model.safetensors.index.json)")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for k in fh.keys():
                    if k in want:
                        shape = list(fh.get_slice(k).get_shape())
                        if shape != list(want[k].shape):
                            raise ModelFolderError(
                                f"{path}: config.json does not match the weights: '{k}' is {shape} in {f.name}, "
                                f"config.json implies {list(want[k].shape)}")
                        state[k] = fh.get_tensor(k).to(dtype)
        except ModelFolderError:
            raise
        except Exception as e:  # safetensors' SafetensorError (truncated / not safetensors), OSError
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelFolderError(f"{f}: not a readable safetensors file ({first})") from None
    missing = [k for k in want if k not in state]
    fresh_score = head == "score" and missing == ["score.weight"]
    if missing and not fresh_score:
        raise ValueError(f"{path}: checkpoint ({arch}) lacks {missing[:5]}{'...' if len(missing) > 5 else ''} "
                         f"needed for head={head!r}")
    model.to_empty(device=device).to(dtype=dtype)
    model.load_state_dict(state, strict=False)  # the fused projections concatenate their HF parts (decoder's pre-hook)
    if head == "lm" and cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty broke the tie; restore it
    if fresh_score:
        torch.nn.init.normal_(model.score.weight, std=cfg.initializer_range)
    return model


def materialize(model, device):
    """Give a model built on the meta device (``load_model(..., weights=False)``) real, uninitialised storage on
    ``device``, keeping tied weights tied. Its values must then be loaded (e.g. from a checkpoint's training state)."""
    model.to_empty(device=device)
    if isinstance(model, CausalLM) and model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty breaks the tie; restore it
    return model


def save_model(model, path, *, tokenizer=None, max_shard_size_bytes: int = DEFAULT_SHARD_BYTES,
               state_dict: dict | None = None) -> None:
    """Write ``model`` (CausalLM or ScoreModel) as an HF folder at ``path``, atomically; shards when the weights exceed
    ``max_shard_size_bytes`` (model-0000i-of-0000n.safetensors + model.safetensors.index.json).
    ``state_dict``: the full weights to write instead of ``model.state_dict()`` (e.g. gathered from an FSDP-sharded
    model on rank 0; ``model`` then only supplies the config and the architecture)."""
    path = Path(path)
    cfg = model.config
    arch = FAMILIES[cfg.model_type] + ("ForCausalLM" if isinstance(model, CausalLM) else "ForSequenceClassification")
    source = model.state_dict() if state_dict is None else state_dict
    source = split_fused_state(source, cfg)  # fused qkv_proj / gate_up_proj -> HF's separate projections
    state = {k: v.detach().to("cpu").contiguous() for k, v in source.items()}
    if isinstance(model, CausalLM) and cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with model.embed_tokens.weight; HF re-ties on load
    d = cfg.to_hf(arch)
    d["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        shards, cur, size = [], {}, 0
        for k, v in state.items():
            n = v.numel() * v.element_size()
            if cur and size + n > max_shard_size_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + n
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, sh in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(sh, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in sh})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenizer(path):
    """The checkpoint's tokenizer, loaded offline from the folder with transformers.AutoTokenizer (a fast tokenizer,
    i.e. a PreTrainedTokenizerFast). A tokenizer without a pad token (e.g. Llama 3) gets pad = eos."""
    from transformers import AutoTokenizer
    p = Path(path)
    if not p.is_dir():
        raise ModelFolderError(f"{p}: no such checkpoint folder")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"{p}: no tokenizer.json / tokenizer.model / vocab.json in the checkpoint folder")
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (p / name).is_file():  # transformers reads these; a broken one is named here, not in its traceback
            _read_json(p / name)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), use_fast=True, local_files_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelFolderError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {first})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def config_from_tokenizer_check(model, tokenizer) -> None:
    """Raise if the tokenizer can produce ids the model has no embedding for (len(tokenizer) > vocab_size)."""
    n, v = len(tokenizer), model.config.vocab_size
    if n > v:
        raise ValueError(f"fastrlhf/models/hf_io.py: tokenizer has {n} tokens but the model's vocab_size is {v} "
                         f"(config.json vocab_size); ids >= {v} would index past the embedding table")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None and tid >= v:
            raise ValueError(f"fastrlhf/models/hf_io.py: tokenizer.{name}={tid} >= model vocab_size={v}")
