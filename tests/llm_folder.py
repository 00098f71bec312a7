"""A tiny model folder as users have one: a tokenizer trained here, a small MoE, save_pretrained.

Tests of ``hf-model`` build it in a temporary folder (no hub access): a byte-level BPE trained on
:data:`TEXT` by the pretraining tool's own :func:`train_tokenizer`, and a randomly initialised
model of the tool's config at a tiny size.
"""

from pathlib import Path

from fedmoe_app.tools.pretrain_llm import PretrainArgs, model_config, train_tokenizer

#: a few KB of text in three scripts (multi-byte characters split by byte-level BPE included)
TEXT = [
    (
        f"Fortune {i}: the cat sat on mat number {i}. Der Hund läuft über die Straße. "
        f"El niño comió {i} manzanas. 猫は{i}匹います。"
    ).encode()
    for i in range(60)
]


def tiny_args(family: str = "mixtral", vocab: int = 320, context: int = 32) -> PretrainArgs:
    """The tool's arguments of a tiny model: 2 layers, width 32, 8 experts, top-2."""
    return PretrainArgs(
        text=(),
        family=family,
        vocab=vocab,
        layers=2,
        d_model=32,
        heads=4,
        expert_hidden=32,
        experts=8,
        top_k=2,
        context=context,
        batch=4,
        lr=3e-3,
        steps=5,
        minutes=0.0,
        seed=0,
    )


def tokenizer_folder(folder: Path, vocab: int = 320):
    """Train and save (``save_pretrained``) a byte-level BPE on :data:`TEXT`; return the tokenizer."""
    tok = train_tokenizer(TEXT, vocab)
    tok.save_pretrained(folder)
    return tok


def tiny_model_folder(folder: Path, family: str = "mixtral", vocab: int = 320, seed: int = 0) -> Path:
    """Write a tiny model folder (config.json, tokenizer files, model.safetensors); return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizer_folder(folder, vocab)
    config = model_config(tiny_args(family, vocab), tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    model.save_pretrained(folder)
    return folder
