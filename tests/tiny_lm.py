"""Tiny causal LMs and tokenizers built inside the tests (nothing downloaded), for mergekit-style configs.

``make_lm`` saves a random Llama or Mistral (hidden 16, 4-6 layers) with a WordLevel tokenizer
over the given tokens; ``run_mergekit`` runs mergekit-yaml on the same YAML when ``DISTAC_MERGEKIT``
names it (the optional cross-check).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

WORDS = [f"w{i}" for i in range(17)]
SPECIAL = ["<unk>", "<s>", "</s>"]


def make_tokenizer(tokens: Sequence[str], added: Sequence[str] = ()):
    """A WordLevel fast tokenizer over ``tokens`` (ids in order) plus ``added`` special tokens after them."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_tokens(list(added), special_tokens=True)
    return fast


def make_lm(
    path: Path,
    *,
    seed: int = 0,
    layers: int = 4,
    tokens: Sequence[str] = (*SPECIAL, *WORDS),
    added: Sequence[str] = (),
    kind: str = "llama",
    from_model: Path | None = None,
    eps: float = 0.05,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
) -> Path:
    """Save a tiny causal LM with its tokenizer into ``path`` and return it.

    The vocabulary is ``tokens`` + ``added``. With ``from_model`` the weights are that model's plus
    noise of size ``eps`` (a "fine-tune"), else random; the rows of embedding-like tensors follow the
    tokens (a token ``from_model`` also has takes its row there, a new one keeps a random row).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cls, cfg_cls = (MistralForCausalLM, MistralConfig) if kind == "mistral" else (LlamaForCausalLM, LlamaConfig)
    cfg = cfg_cls(
        vocab_size=len(tokens) + len(added),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = cls(cfg)
    vocab = {t: i for i, t in enumerate([*tokens, *added])}
    if from_model is not None:
        from transformers import AutoTokenizer

        state = load_file(str(from_model / "model.safetensors"))
        theirs = AutoTokenizer.from_pretrained(str(from_model)).get_vocab()
        mine = model.state_dict()
        g = torch.Generator().manual_seed(seed)
        for k, v in state.items():
            if k in ("model.embed_tokens.weight", "lm_head.weight"):  # rows by token
                rows = mine[k].clone()
                for t, i in vocab.items():
                    if t in theirs:
                        rows[i] = v[theirs[t]]
                v = rows
            mine[k] = v + eps * torch.randn(v.shape, generator=g)
        model.load_state_dict(mine)
    model.to(dtype).save_pretrained(str(path))
    tok = make_tokenizer(tokens, added)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(path))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model (one or several safetensors shards)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_mergekit(config: Path, out: Path) -> Path | None:
    """Run mergekit-yaml (the path in ``DISTAC_MERGEKIT``) on ``config`` into ``out``; None when unset."""
    exe = os.environ.get("DISTAC_MERGEKIT")
    if not exe:
        return None
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([exe, str(config), str(out), "--no-lazy-unpickle", "--allow-crimes"], check=True, env=env)
    return out
