"""Make a small pretrained MoE language model here, with its own tokenizer, to fine-tune federated.

``fedmoe-pretrain-llm`` (``python -m fedmoe_app.tools.pretrain_llm``):

1. trains a byte-level BPE tokenizer (``tokenizers``, ``--vocab`` tokens, ``<|endoftext|>`` as
   EOS, pad and unknown token) on local text: by default the English, German and Spanish
   fortunes (``/usr/share/games/fortunes``), or the files and folders named by ``--text``;
2. builds a small MoE of a transformers family (``--family``: ``olmoe``, ``mixtral`` or
   ``qwen2_moe``; ``--layers``, ``--d-model``, ``--heads``, ``--expert-hidden``, ``--experts``,
   ``--top-k``, ``--context``) and pretrains it centrally on the same text (AdamW, seeded, a
   linear warm-up and cosine decay over ``--steps`` or ``--minutes``, whichever ends first;
   the language-model loss plus the family's router balance loss);
3. writes ``save_pretrained`` (safetensors) of model and tokenizer, and ``pretrain.json`` (the
   arguments, the loss curve, the held-out loss and bits per byte), to ``--out`` (default
   ``<cache>/models/tiny-moe-fortunes``, under :func:`fedmoe_app.config.cache_root`). A folder
   already made with the same arguments (and the same text files) is reused as it is;
4. with ``--corpus [DIR]``, writes a fine-tuning corpus for dataset ``text`` from text every
   Debian system has and pretraining never saw: ``python`` (``/usr/lib/python3.11/*.py``),
   ``licenses`` (``/usr/share/common-licenses``) and ``man`` (``/usr/share/man/man1`` pages,
   decompressed, troff requests stripped), each capped at ``--corpus-bytes``.

It logs the folder (run-config ``hf-model``) and the corpus folder (``data-dir``), and the
loss curve's summary. The folder loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import cache_root
from ..data.text import (
    FORTUNES_DIR,
    documents,
    folder_groups,
    fortune_groups,
    read_text,
    window_bytes,
    windows,
)
from ..data.tokens import encode_documents
from ..hf_config import HF_PRESETS, preset_config

log = logging.getLogger(__name__)

#: transformers ``model_type`` -> the preset that sizes it
FAMILIES = {model_type: name for name, model_type in HF_PRESETS.items()}
EOS = "<|endoftext|>"
#: fortunes languages pretrained on by default (``en``: the top-level files)
DEFAULT_LANGUAGES = ("en", "de", "es")
PYTHON_DIR = Path("/usr/lib/python3.11")
LICENSES_DIR = Path("/usr/share/common-licenses")
MAN1_DIR = Path("/usr/share/man/man1")
HELDOUT_SHARE = 0.05


def default_out() -> Path:
    """Return the default model folder: ``<cache>/models/tiny-moe-fortunes``."""
    return cache_root() / "models" / "tiny-moe-fortunes"


@dataclass(frozen=True)
class PretrainArgs:
    """What the model folder is made from; the same arguments (and text files) reuse the folder."""

    text: tuple[str, ...]
    family: str
    vocab: int
    layers: int
    d_model: int
    heads: int
    expert_hidden: int
    experts: int
    top_k: int
    context: int
    batch: int
    lr: float
    steps: int
    minutes: float
    seed: int


# --------------------------------------------------------------------------- text
def pretraining_documents(text: Sequence[str]) -> list[bytes]:
    """Documents (UTF-8 bytes) of the pretraining text: the default fortunes, or ``text``'s files/folders."""
    files: list[Path] = []
    if not text:
        if not FORTUNES_DIR.is_dir():
            raise FileNotFoundError(
                f"{FORTUNES_DIR} is not a folder: install Debian's fortunes (apt-get install fortunes "
                "fortunes-de fortunes-es) or name text files or folders with --text"
            )
        groups = fortune_groups(FORTUNES_DIR)
        files = [f for lang in DEFAULT_LANGUAGES for f in groups.get(lang, [])]
    for item in text:
        path = Path(item).expanduser()
        if path.is_dir():
            files += [f for fs in folder_groups(path).values() for f in fs]
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--text {item!r} is neither a file nor a folder")
    docs = [d for f in files if (data := read_text(f)) is not None for d in documents(data)]
    if not docs:
        raise ValueError(f"no UTF-8 text in {list(text) or [str(FORTUNES_DIR)]}")
    return docs


def text_fingerprint(text: Sequence[str]) -> str:
    """Digest of the pretraining text files' names, sizes and modification times (the cache key's part)."""
    roots = [Path(t).expanduser() for t in text] or [FORTUNES_DIR]
    h = hashlib.sha256()
    for root in roots:
        for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[bytes], vocab: int) -> Any:
    """Train a byte-level BPE tokenizer of ``vocab`` tokens on ``docs``; a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.decode("utf-8") for d in docs), trainer, length=len(docs))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=EOS)


# --------------------------------------------------------------------------- model
def model_config(args: PretrainArgs, tokenizer: Any) -> dict[str, Any]:
    """Return the model's transformers config dict: the family's preset at the arguments' size."""
    if args.family not in FAMILIES:
        raise ValueError(f"--family {args.family!r} is not one of {', '.join(FAMILIES)}")
    config = preset_config(
        FAMILIES[args.family],
        num_layers=args.layers,
        d_model=args.d_model,
        num_heads=args.heads,
        expert_hidden=args.expert_hidden,
        num_experts=args.experts,
        top_k=args.top_k,
        context_length=args.context,
    )
    eos = int(tokenizer.eos_token_id)
    config.update(vocab_size=len(tokenizer), eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
    return config


def _lr_factor(progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to 10 %."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    p = min((progress - warmup) / (1 - warmup), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def pretrain(args: PretrainArgs, tokens: np.ndarray, held: np.ndarray, held_bytes: np.ndarray, model: Any):
    """Train ``model`` on windows ``tokens [N, T + 1]``; return the loss curve and held-out figures.

    Stops after ``args.steps`` steps or ``args.minutes`` minutes, whichever comes first (0: no
    limit of that kind).
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(args.seed)
    data = torch.from_numpy(tokens.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    limit_s = args.minutes * 60 if args.minutes else math.inf
    max_steps = args.steps or 10**9
    curve: list[tuple[int, float]] = []
    start, step, recent = time.perf_counter(), 0, []
    model.train()
    while step < max_steps:
        elapsed = time.perf_counter() - start
        if elapsed >= limit_s:
            break
        progress = max(step / max_steps if args.steps else 0.0, elapsed / limit_s)
        for group in opt.param_groups:
            group["lr"] = args.lr * _lr_factor(progress)
        batch = data[torch.randint(0, len(data), (args.batch,), generator=gen)]
        out = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        lm = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = getattr(out, "aux_loss", None)
        loss = lm + coef * aux if aux is not None else lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        recent.append(lm.item())
        if step == 1 or step % 25 == 0:
            curve.append((step, float(np.mean(recent))))
            log.info("step %d: loss %.3f (%.0f s)", step, curve[-1][1], time.perf_counter() - start)
            recent = []
    if recent:
        curve.append((step, float(np.mean(recent))))
    seconds = time.perf_counter() - start
    nats, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        held_t = torch.from_numpy(held.astype(np.int64))
        for i in range(0, len(held_t), 32):
            b = held_t[i : i + 32]
            logits = model(input_ids=b[:, :-1], use_cache=False).logits.float()
            flat = logits.reshape(-1, logits.shape[-1])
            nats += float(F.cross_entropy(flat, b[:, 1:].reshape(-1), reduction="sum"))
            count += b[:, 1:].numel()
    eval_loss = nats / max(count, 1)
    bpb = nats / math.log(2) / max(int(held_bytes.sum()), 1)
    return {
        "steps": step,
        "seconds": round(seconds, 1),
        "curve": curve,
        "eval_loss": eval_loss,
        "eval_bpb": bpb,
    }


def make_model_folder(args: PretrainArgs, out: Path) -> tuple[Path, dict[str, Any]]:
    """Make (or reuse) the pretrained model folder ``out``; return it and its ``pretrain.json``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    key = {"args": asdict(args), "text": text_fingerprint(args.text)}
    record = out / "pretrain.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("key") == json.loads(json.dumps(key)):
            log.info("pretrain: reusing %s (made with the same arguments)", out)
            return out, done
    docs = pretraining_documents(args.text)
    rng = np.random.default_rng([args.seed, 7])
    order = rng.permutation(len(docs))
    n_held = max(1, int(len(docs) * HELDOUT_SHARE)) if len(docs) > 1 else 0
    held_docs = [docs[i] for i in sorted(order[:n_held])]
    train_docs = [docs[i] for i in sorted(order[n_held:])]
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_docs, args.vocab)
    ids, _ = encode_documents(tokenizer, train_docs)
    held_ids, held_token_bytes = encode_documents(tokenizer, held_docs)
    tokenizer.model_max_length = args.context  # after encoding whole documents
    train_windows = windows(ids, args.context)
    held_windows = windows(held_ids, args.context)
    held_bytes = window_bytes(held_token_bytes, args.context)
    text_bytes = sum(len(d) for d in train_docs)
    log.info(
        "pretrain: tokenizer of %d tokens in %.1f s; %d bytes -> %d tokens (%.2f bytes/token), %d windows",
        len(tokenizer),
        time.perf_counter() - t0,
        text_bytes,
        len(ids),
        text_bytes / max(len(ids), 1),
        len(train_windows),
    )
    if len(train_windows) == 0:
        raise ValueError(f"the text makes no window of {args.context + 1} tokens")
    config = model_config(args, tokenizer)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretrain: %s with %d parameters", args.family, n_params)
    result = pretrain(args, train_windows, held_windows, held_bytes, model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    done = {
        "key": key,
        "parameters": n_params,
        "train_tokens": len(ids),
        "train_bytes": text_bytes,
        **result,
    }
    (tmp / "pretrain.json").write_text(json.dumps(done, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out, json.loads((out / "pretrain.json").read_text())


# --------------------------------------------------------------------------- corpus
_TROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_TROFF_ESC = re.compile(r"\\(\(..|\[[^\]]*\]|[-&|^ e0])")


def strip_troff(source: str) -> str:
    """Text of a man page's troff source: comments and bare requests dropped, font escapes removed."""
    out = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if len(parts) < 2:
                continue  # a request without text: .PP, .br, .sp
            line = parts[1].replace('"', "")
        line = _TROFF_FONT.sub("", line)
        line = _TROFF_ESC.sub(lambda m: "-" if m.group(1) == "-" else " " if m.group(1) in "0 " else "", line)
        out.append(line)
    return "\n".join(out).strip() + "\n"


def _write_capped(folder: Path, items: Iterable[tuple[str, str]], cap: int) -> int:
    """Write the ``(name, text)`` items that fit in ``cap`` bytes into ``folder``; return their bytes.

    Items too large for the room left are passed over; it stops when under 2 % of ``cap`` is left
    or 200 items in a row did not fit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    total = misses = 0
    for name, text in items:
        data = text.encode("utf-8")
        if not data.strip():
            continue
        if total + len(data) > cap:
            misses += 1
            if misses >= 200 or cap - total < cap // 50:
                break
            continue
        misses = 0
        (folder / name).write_bytes(data)
        total += len(data)
    return total


def _utf8_files(paths: Iterable[Path]) -> Iterator[tuple[str, str]]:
    for p in paths:
        try:
            yield p.name, p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def _man_pages() -> Iterator[tuple[str, str]]:
    for p in sorted(MAN1_DIR.glob("*.1.gz")):
        try:
            text = strip_troff(gzip.decompress(p.read_bytes()).decode("utf-8"))
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        yield p.name.removesuffix(".gz") + ".txt", text


def write_corpus(out: Path, cap: int) -> dict[str, int]:
    """Write the fine-tuning corpus (``python``, ``licenses``, ``man``) under ``out``; its bytes per group."""
    sources = {
        "python": lambda: _utf8_files(sorted(PYTHON_DIR.glob("*.py"))),
        "licenses": lambda: _utf8_files(sorted(p for p in LICENSES_DIR.iterdir() if p.is_file())),
        "man": _man_pages,
    }
    sizes = {}
    for name, items in sources.items():
        shutil.rmtree(out / name, ignore_errors=True)
        sizes[name] = _write_capped(out / name, items(), cap)
    return sizes


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """Return the command line of ``fedmoe-pretrain-llm``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", nargs="*", default=[], help="text files/folders; default: en+de+es fortunes")
    p.add_argument("--out", default="", help="model folder; default: <cache>/models/tiny-moe-fortunes")
    p.add_argument("--family", default="olmoe", choices=sorted(FAMILIES))
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--context", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=0, help="training steps; 0: until --minutes")
    p.add_argument("--minutes", type=float, default=10.0, help="training time; 0: until --steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--corpus",
        nargs="?",
        const=str(cache_root() / "text" / "debian"),
        default="",
        help="also write the fine-tuning corpus (python, licenses, man) here; default <cache>/text/debian",
    )
    p.add_argument("--corpus-bytes", type=int, default=2_000_000, help="cap per corpus sub-folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Make the model folder (and the corpus); log where they are."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    if not a.steps and not a.minutes:
        raise SystemExit("give --steps or --minutes (or both)")
    args = PretrainArgs(
        text=tuple(a.text),
        family=a.family,
        vocab=a.vocab,
        layers=a.layers,
        d_model=a.d_model,
        heads=a.heads,
        expert_hidden=a.expert_hidden,
        experts=a.experts,
        top_k=a.top_k,
        context=a.context,
        batch=a.batch,
        lr=a.lr,
        steps=a.steps,
        minutes=a.minutes,
        seed=a.seed,
    )
    out, done = make_model_folder(args, Path(a.out).expanduser() if a.out else default_out())
    curve = done["curve"]
    log.info(
        "pretrain: %d steps in %.0f s, loss %.3f -> %.3f; held-out loss %.3f nats/token, %.3f bits/byte",
        done["steps"],
        done["seconds"],
        curve[0][1],
        curve[-1][1],
        done["eval_loss"],
        done["eval_bpb"],
    )
    log.info("model folder (run-config hf-model): %s", out)
    if a.corpus:
        sizes = write_corpus(Path(a.corpus).expanduser(), a.corpus_bytes)
        log.info("fine-tuning corpus (dataset text, data-dir): %s %s", a.corpus, sizes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
