"""Built-in tiny models: real Hugging Face-style directories, made deterministically, offline.

`builtin_model_dir("tiny")` writes (once) a Llama-architecture model directory with config.json,
generation_config.json, tokenizer.json, tokenizer_config.json and model.safetensors into the cache
and returns its path. The weights are random (fixed seed) and the tokenizer is a small BPE trained
on the English corpus below, so every machine gets byte-identical files. Tests, examples and
`xlaserve generate --model builtin:tiny` use it; transformers can load it too.

Cache location: `cache_dir` argument, else $XLASERVE_CACHE_DIR, else $XDG_CACHE_HOME/xlaserve, else
~/.cache/xlaserve; the model lands in `<cache>/builtin/<name>-v1/`. The directory is built in a
temporary sibling and renamed into place, so a reader never sees a half-written model and two
processes racing both end up with the same complete directory.

This module must not import jax or torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import zlib

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

# Bump when any generated file changes, so stale caches are never reused.
BUILTIN_VERSION = 1

# A small original English corpus for the tokenizer trainer. Its exact text fixes the vocabulary:
# editing it changes every builtin tokenizer (bump BUILTIN_VERSION).
CORPUS = """\
The little robot woke up early in the morning and looked out of the window at the quiet town.
It was a bright day, and the sun was shining on the river that ran past the old mill.
She asked her friend what he wanted to do, and he said that he would like to go for a long walk.
They walked along the river, talking about books, music, food and the weather.
A small boat moved slowly across the water while two children played on the bank.
The teacher explained that a number is even when it can be divided by two without a remainder.
One, two, three, four, five, six, seven, eight, nine, ten: the children counted the stones.
In the evening the family cooked dinner together: rice, beans, bread, soup and fresh green salad.
The cat slept on the warm chair by the fire, and the dog lay on the floor next to the door.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
How many days are there in a week? There are seven days in a week and twelve months in a year.
Please write a short story about a dragon who is afraid of the dark and learns to be brave.
Once upon a time there was a dragon who lived in a cave high in the mountains above a village.
Every night the dragon lit a small candle, because the darkness made him feel very lonely.
One day a young girl from the village climbed up to the cave and brought him a lantern.
The girl and the dragon became good friends, and the people of the village were no longer afraid.
Computers store numbers in memory, and a program tells the processor what to do with them.
A language model reads a sequence of tokens and predicts the next token, one step at a time.
The server receives a request, schedules the work, runs the model and streams the answer back.
Good software is simple to read, easy to test and honest about what it does not support.
When you are not sure, measure first, then change one thing, then measure again.
The weather report said that it would rain in the afternoon, so she took her umbrella.
He opened the letter, read it twice, smiled, and put it carefully back into the envelope.
The market was full of people buying apples, oranges, cheese, flowers and warm loaves of bread.
Music filled the hall as the orchestra began to play, and everyone in the room fell silent.
Water boils at one hundred degrees and freezes at zero degrees on the Celsius scale.
The train to the city leaves at eight o'clock in the morning and arrives just after ten.
Thank you for your help! I could not have finished the project without you.
Could you tell me the way to the library? Go straight ahead and turn left at the bank.
The garden was full of roses, tulips and tall yellow sunflowers that turned toward the light.
Learning to play an instrument takes patience, practice and a great deal of time.
Hello, world! This is a test of the tokenizer, with numbers like 42, 2024 and 3.14.
The answer is yes. The answer is no. Maybe the answer is somewhere in between.
Scientists study the stars, the planets and the moon to learn how the universe began.
The old man told the children stories about the sea, the ships and the faraway islands.
On Monday we work, on Saturday we rest, and on Sunday we visit our grandparents.
"""


@dataclasses.dataclass(frozen=True)
class BuiltinSpec:
    """What one built-in model is made of."""

    model_type: str  # HF model_type: "llama" or "qwen3"
    tokenizer_kind: str  # "sentencepiece" (byte-fallback BPE, Llama 2 style) or "byte_level"
    tokenizer_vocab: int  # target tokenizer vocabulary size, specials included
    num_layers: int = 2
    hidden_size: int = 64  # D
    intermediate_size: int = 128  # F
    num_heads: int = 4  # N
    num_kv_heads: int = 2  # K
    head_dim: int = 16  # H
    seed: int = 0


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "tiny": BuiltinSpec(model_type="llama", tokenizer_kind="sentencepiece", tokenizer_vocab=768),
    "tiny-qwen3": BuiltinSpec(model_type="qwen3", tokenizer_kind="byte_level",
                              tokenizer_vocab=768, seed=1),
}

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim }}{{ eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _merge_pairs(merges: list[str | list[str]]) -> list[tuple[str, str]]:
    """A trained BPE's merges as (left, right) pairs; its JSON has "left right" strings (older
    tokenizers releases) or [left, right] lists."""
    pairs = []
    for m in merges:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        pairs.append((left, right))
    return pairs


def _token_id(tok: Tokenizer, token: str) -> int:
    """The id of `token`, one of the specials the builders add to `tok`."""
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"builtin tokenizer: {token!r} is not in its vocabulary")
    return i


def build_sentencepiece_bpe(corpus: str, vocab_size: int) -> Tokenizer:
    """Trains a Llama 2 / Mistral style tokenizer: BPE over Metaspace pieces with byte fallback.

    Layout as in Llama 2: <unk>=0, <s>=1, </s>=2, the 256 byte tokens <0x00>..<0xFF> at 3..258,
    then the trained pieces. Encoding prepends <s>. Deterministic for a given corpus.

    Args:
      corpus: training text (lines).
      vocab_size: target total vocabulary size (specials and byte tokens included); must exceed 300.
    """
    if vocab_size <= 300:
        raise ValueError(f"vocab_size={vocab_size!r}: must be > 300 (259 specials and bytes)")
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                         split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, min_frequency=2,
                                  special_tokens=list(LLAMA_SPECIALS), show_progress=False)
    trainer_tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(LLAMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = _merge_pairs(trained["merges"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA_SPECIALS])
    # Llama 2's tokenizer.json: the normalizer writes spaces as "▁" and prepends one (the
    # SentencePiece dummy prefix, so " a" round-trips); no pre-tokenizer.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def build_byte_level_bpe(corpus: str, vocab_size: int) -> Tokenizer:
    """Trains a Llama 3 / Qwen style byte-level BPE; the ChatML specials get the last ids.

    No BOS is added on encode (as Qwen). Deterministic for a given corpus.

    Args:
      corpus: training text (lines).
      vocab_size: target total vocabulary size (specials included); must exceed 300.
    """
    if vocab_size <= 300:
        raise ValueError(f"vocab_size={vocab_size!r}: must be > 300 (256 bytes and specials)")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                          use_regex=True)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = byte_level
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN_SPECIALS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    trainer_tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {piece: i for i, (piece, _) in
             enumerate(sorted(trained["vocab"].items(), key=lambda kv: kv[1]))}
    merges = _merge_pairs(trained["merges"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIALS])
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _tensor_shapes(spec: BuiltinSpec, vocab: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes; Linear weights are [out, in] as in torch."""
    d, f, h = spec.hidden_size, spec.intermediate_size, spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (spec.num_heads * h, d),
            p + "self_attn.k_proj.weight": (spec.num_kv_heads * h, d),
            p + "self_attn.v_proj.weight": (spec.num_kv_heads * h, d),
            p + "self_attn.o_proj.weight": (d, spec.num_heads * h),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
        if spec.model_type == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (h,)}
    shapes |= {"model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    return shapes


def make_weights(spec: BuiltinSpec, vocab: int) -> dict[str, np.ndarray]:
    """Deterministic float32 weights: norms are 1, everything else N(0, std).

    Each tensor draws from its own generator seeded by (spec.seed, crc32(name)), so a tensor's
    values depend only on its name, shape and the seed.
    """
    weights = {}
    for name, shape in _tensor_shapes(spec, vocab).items():
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, np.float32)
            continue
        std = 0.1 if name in ("model.embed_tokens.weight", "lm_head.weight") else 0.05
        rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
        weights[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
    return weights


def _hf_files(spec: BuiltinSpec, tok: Tokenizer) -> dict[str, str]:
    """The JSON files of the model directory, keyed by file name."""
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if spec.tokenizer_kind == "sentencepiece":
        bos, eos, unk, pad = "<s>", "</s>", "<unk>", None
        template, add_bos = LLAMA_CHAT_TEMPLATE, True
        eos_ids: int | list[int] = _token_id(tok, eos)
        bos_id = _token_id(tok, bos)
    else:
        bos, eos, unk, pad = None, "<|im_end|>", None, "<|endoftext|>"
        template, add_bos = CHATML_TEMPLATE, False
        eos_ids = [_token_id(tok, "<|im_end|>"), _token_id(tok, "<|endoftext|>")]
        bos_id = _token_id(tok, "<|endoftext|>")
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[spec.model_type]
    config = {
        "architectures": [arch],
        "model_type": spec.model_type,
        "vocab_size": vocab,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5 if spec.model_type == "llama" else 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
    }
    if spec.model_type == "qwen3":
        config |= {"use_sliding_window": False, "sliding_window": None,
                   "max_window_layers": spec.num_layers}
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_ids, "do_sample": False}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }
    dump = lambda obj: json.dumps(obj, indent=2, sort_keys=True) + "\n"  # noqa: E731
    return {
        "config.json": dump(config),
        "generation_config.json": dump(generation),
        "tokenizer_config.json": dump(tokenizer_config),
        "special_tokens_map.json": dump({k: v for k, v in (("bos_token", bos), ("eos_token", eos),
                                         ("unk_token", unk), ("pad_token", pad)) if v}),
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
    }


def write_model_dir(name: str, path: pathlib.Path) -> None:
    """Writes the files of builtin model `name` into the existing directory `path`."""
    from safetensors.numpy import save_file  # local: only needed when materializing

    spec = _spec(name)
    if spec.tokenizer_kind == "sentencepiece":
        tok = build_sentencepiece_bpe(CORPUS, spec.tokenizer_vocab)
    else:
        tok = build_byte_level_bpe(CORPUS, spec.tokenizer_vocab)
    for fname, text in _hf_files(spec, tok).items():
        (path / fname).write_text(text, encoding="utf-8")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    save_file(make_weights(spec, vocab), str(path / "model.safetensors"),
              metadata={"format": "pt"})


REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "model.safetensors")
MARKER_FILE = "xlaserve_builtin.json"  # written last; says which generator made the directory


def _marker(name: str) -> str:
    """The marker's content. It hashes this module's source, so a directory made by an older
    generator (same BUILTIN_VERSION, edited code) is rebuilt rather than trusted."""
    import hashlib  # local: only the cache check needs it

    source = hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()
    return json.dumps({"name": name, "version": BUILTIN_VERSION, "generator_sha256": source},
                      indent=2, sort_keys=True) + "\n"


def _is_current(path: pathlib.Path, name: str) -> bool:
    try:
        marker = (path / MARKER_FILE).read_text(encoding="utf-8")
    except OSError:
        return False
    return marker == _marker(name) and all((path / f).is_file() for f in REQUIRED_FILES)


def _spec(name: str) -> BuiltinSpec:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"name={name!r}: unknown builtin model; known: "
                         f"{', '.join(sorted(BUILTIN_MODELS))}")
    return BUILTIN_MODELS[name]


def default_cache_dir() -> pathlib.Path:
    """$XLASERVE_CACHE_DIR, else $XDG_CACHE_HOME/xlaserve, else ~/.cache/xlaserve."""
    if os.environ.get("XLASERVE_CACHE_DIR"):
        return pathlib.Path(os.environ["XLASERVE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "xlaserve"


def builtin_model_dir(name: str = "tiny", *, cache_dir: str | os.PathLike[str] | None = None
                      ) -> pathlib.Path:
    """Returns the directory of builtin model `name`, writing it first if it is not there yet.

    Args:
      name: one of BUILTIN_MODELS ("tiny": llama, "tiny-qwen3": qwen3).
      cache_dir: cache root; default `default_cache_dir()`.
    Returns:
      `<cache_dir>/builtin/<name>-v<BUILTIN_VERSION>`, holding a complete HF model directory.
    Raises:
      ValueError: unknown name (the message lists the known names).
    """
    _spec(name)
    root = (pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "builtin"
    final = root / f"{name}-v{BUILTIN_VERSION}"
    if _is_current(final, name):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        write_model_dir(name, tmp)
        (tmp / MARKER_FILE).write_text(_marker(name), encoding="utf-8")
        for _ in range(3):
            try:
                tmp.rename(final)  # atomic; fails while `final` exists
                return final
            except OSError:
                if _is_current(final, name):
                    return final  # a racing process put its (identical) copy there first
            # `final` is stale or incomplete: move it out of the way, then try again.
            stale = pathlib.Path(tempfile.mkdtemp(prefix=f".stale-{name}-", dir=root))
            try:
                final.rename(stale / "old")
            except OSError:
                pass  # someone else moved or replaced it first
            shutil.rmtree(stale, ignore_errors=True)
        raise OSError(f"could not put builtin model {name!r} in place at {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
