"""Tokenizer: encode/decode, BOS rules, special ids, chat templates; agreement with transformers."""

from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Mapping

import pytest
import tokenizers
import tokenizers.processors

from xlaserve.checkpoints import builtin
from xlaserve.checkpoints.tokenizer import ChatTemplateError, Tokenizer

# Some non-English lines, so that a few accented / CJK pieces get their own tokens while the rest
# goes through byte fallback (sentencepiece) or raw bytes (byte level).
EXTRA_CORPUS = "\n".join([
    "Café au lait, s'il vous plaît. Crème brûlée. Ça va très bien.",
    "中文 中文 你好 你好 世界 世界 日本語 한국어",
    "Emoji: 😀 😀 🎉 🎉 ❤️ 👍🏽",
] * 3)

TEXTS = [
    "Hello world",
    " leading space",
    "two  spaces and a tab\there",
    "line one\nline two\n\nend\n",
    "Café crème, naïve façade",
    "中文 你好世界 日本語のテキスト",
    "emoji 😀🎉👍🏽 ❤️ and 👨‍👩‍👧",
    "numbers 3.14159 and 2024-11-21",
    "",
    "   ",
    "ünïcödé ⅀ ∑ ∫ ≈ € £ ¥",
    "<s> text with a literal bos",
    "mixed </s> eos in the middle",
]

LLAMA_TEMPLATE = builtin.LLAMA_CHAT_TEMPLATE
CHATML = builtin.CHATML_TEMPLATE


def _write_dir(path: pathlib.Path, tok: tokenizers.Tokenizer, tokenizer_config: dict,
               generation_config: dict | None = None, config: dict | None = None) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Llama 2 style: byte-fallback BPE + Metaspace, <s> added, eos ids spread over three files."""
    tok = builtin.build_sentencepiece_bpe(builtin.CORPUS + EXTRA_CORPUS, 700)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
           "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
           "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "chat_template": LLAMA_TEMPLATE,
           "clean_up_tokenization_spaces": False}
    return _write_dir(tmp_path_factory.mktemp("sp"), tok, cfg,
                      generation_config={"eos_token_id": [2, 7]}, config={"eos_token_id": 9})


@pytest.fixture(scope="module")
def bl_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Qwen style: byte-level BPE, no BOS, ChatML template."""
    tok = builtin.build_byte_level_bpe(builtin.CORPUS + EXTRA_CORPUS, 700)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
           "clean_up_tokenization_spaces": False}
    return _write_dir(tmp_path_factory.mktemp("bl"), tok, cfg)


def test_missing_tokenizer_json(tmp_path: pathlib.Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("which", ["sp", "bl"])
def test_roundtrip(which: str, sp_dir: pathlib.Path, bl_dir: pathlib.Path) -> None:
    tok = Tokenizer.from_dir(sp_dir if which == "sp" else bl_dir)
    for text in TEXTS:
        if which == "sp" and ("<s>" in text or "</s>" in text):
            continue  # Llama 2's dummy prefix adds a space after each special token
        ids = tok.encode(text, add_special_tokens=False)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids, skip_special_tokens=False) == text, text


def test_sentencepiece_bos_and_ids(sp_dir: pathlib.Path) -> None:
    tok = Tokenizer.from_dir(sp_dir)
    assert tok.bos_token_id == 1 and tok.id_to_token(1) == "<s>"
    assert tok.eos_token_ids == (2, 7, 9)  # tokenizer_config, generation_config, config.json
    assert tok.id_to_token(3) == "<0x00>" and tok.token_to_id("<0xE2>") == 3 + 0xE2
    assert set(tok.all_special_ids) == {0, 1, 2}
    raw = tok.encode("Hello world", add_special_tokens=False)
    assert tok.encode("Hello world") == [1, *raw]
    assert 1 not in raw
    # A text that already starts with BOS (a rendered chat template) still gets exactly one.
    ids = tok.encode("<s>Hello")
    assert ids[0] == 1 and ids[1] != 1
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    assert tok.decode(tok.encode("Hello world"), skip_special_tokens=False) == "<s> Hello world"


def test_byte_fallback_pieces(sp_dir: pathlib.Path) -> None:
    tok = Tokenizer.from_dir(sp_dir)
    pieces = [tok.id_to_token(i) for i in tok.encode("𝔘", add_special_tokens=False)]
    assert pieces[-4:] == [f"<0x{b:02X}>" for b in "𝔘".encode()]


def test_add_bos_token_flag_overrides_post_processor(tmp_path: pathlib.Path) -> None:
    tok = builtin.build_sentencepiece_bpe(builtin.CORPUS, 600)  # its post-processor adds <s>
    base = {"bos_token": "<s>", "eos_token": "</s>"}
    follow = Tokenizer.from_dir(_write_dir(tmp_path / "a", tok, base))
    off = Tokenizer.from_dir(_write_dir(tmp_path / "b", tok, base | {"add_bos_token": False}))
    both = Tokenizer.from_dir(_write_dir(tmp_path / "c", tok, base | {"add_eos_token": True,
                                                                      "add_bos_token": True}))
    raw = follow.encode("the cat", add_special_tokens=False)
    assert follow.encode("the cat") == [1, *raw]
    assert off.encode("the cat") == raw
    assert both.encode("the cat") == [1, *raw, 2]


def test_post_processor_bos_llama3_style(tmp_path: pathlib.Path) -> None:
    """Llama 3: byte level, BOS added by tokenizer.json's TemplateProcessing, no add_bos_token."""
    tok = builtin.build_byte_level_bpe(builtin.CORPUS, 500)
    tok.add_special_tokens([tokenizers.AddedToken("<|begin_of_text|>", special=True)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    ours = Tokenizer.from_dir(_write_dir(tmp_path, tok, {"bos_token": "<|begin_of_text|>",
                                                         "eos_token": "<|im_end|>"}))
    assert ours.bos_token_id == bos
    raw = ours.encode("hi there", add_special_tokens=False)
    assert ours.encode("hi there") == [bos, *raw]
    assert ours.encode("<|begin_of_text|>hi there") == [bos, *raw]  # never two BOS


def test_byte_level_no_bos(bl_dir: pathlib.Path) -> None:
    tok = Tokenizer.from_dir(bl_dir)
    assert tok.bos_token_id is None
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.eos_token_ids == (im_end,)
    assert tok.token_to_id("<|endoftext|>") in tok.all_special_ids
    assert tok.vocab_size == im_end + 1  # specials take the last ids
    ids = tok.encode("hi<|im_end|>")
    assert ids[-1] == im_end
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "hi<|im_end|>"


def test_chat_template_renders(sp_dir: pathlib.Path, bl_dir: pathlib.Path) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}]
    sp = Tokenizer.from_dir(sp_dir)
    assert sp.apply_chat_template(msgs) == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n")
    assert sp.apply_chat_template(msgs, add_generation_prompt=False).endswith("Hi</s>\n")
    ids = sp.encode(sp.apply_chat_template(msgs))
    assert ids[:2] != [1, 1] and ids[0] == 1
    bl = Tokenizer.from_dir(bl_dir)
    out = bl.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert out == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ChatTemplateError, match="Unknown role: robot"):
        sp.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="messages"):
        sp.apply_chat_template("not a list")  # type: ignore[arg-type]


def _tok_with(template: str | None, **cfg: object) -> Tokenizer:
    backend = builtin.build_byte_level_bpe(builtin.CORPUS, 400)
    config = {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", **cfg}
    if template is not None:
        config["chat_template"] = template
    return Tokenizer(backend, tokenizer_config=config)


def test_chat_template_features() -> None:
    template = (
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}|"
        "{% if loop.index == 3 %}{% break %}{% endif %}{% endfor %}"
        "{{ ns.n }}|{{ strftime_now('%Y') }}|{{ bos_token }}{{ eos_token }}|{{ custom }}"
        "{% generation %}gen{% endgeneration %}|{{ tools | tojson(indent=None) }}"
    )
    tok = _tok_with(template)
    msgs = [{"role": "user", "content": "<é>"}, {"role": "skip", "content": "x"},
            {"role": "user", "content": "b"}, {"role": "user", "content": "never"}]
    out = tok.apply_chat_template(msgs, custom="K", tools=[{"name": "f"}])
    year = datetime.datetime.now().strftime("%Y")
    expected = (json.dumps(msgs[0], ensure_ascii=False) + "|" + json.dumps(msgs[2]) + "|2|"
                + year + "|<|endoftext|><|im_end|>|Kgen|" + json.dumps([{"name": "f"}]))
    assert out == expected


def test_chat_template_named_and_override() -> None:
    tok = _tok_with([{"name": "default", "template": "D"},  # type: ignore[arg-type]
                     {"name": "tool_use", "template": "T"}])
    assert tok.apply_chat_template([]) == "D"
    assert tok.apply_chat_template([], tools=[{"name": "f"}]) == "T"
    assert tok.apply_chat_template([], chat_template="tool_use") == "T"
    assert tok.apply_chat_template([], chat_template="{{ 1 + 1 }}") == "2"


def test_chat_template_missing_and_sandbox(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ChatTemplateError, match="chat_template"):
        _tok_with(None).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError):  # the sandbox refuses Python internals
        _tok_with("{{ ''.__class__.__mro__[1].__subclasses__() }}").apply_chat_template([])
    with pytest.raises(ValueError):
        _tok_with("{% set ns = namespace() %}{% set ns._x = 1 %}").apply_chat_template([])


def test_chat_template_jinja_file_wins(tmp_path: pathlib.Path) -> None:
    tok = builtin.build_byte_level_bpe(builtin.CORPUS, 400)
    d = _write_dir(tmp_path, tok, {"chat_template": "config"})
    assert Tokenizer.from_dir(d).apply_chat_template([]) == "config"
    (d / "chat_template.jinja").write_text("file{{ messages | length }}")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": ""}]) == "file1"


# --------------------------------------------------------------------------- transformers parity

@pytest.mark.hf
@pytest.mark.parametrize("which", ["sp", "bl"])
def test_matches_transformers(which: str, sp_dir: pathlib.Path, bl_dir: pathlib.Path) -> None:
    transformers = pytest.importorskip("transformers")
    d = sp_dir if which == "sp" else bl_dir
    ours, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS:
        if text.startswith("<s>"):
            continue  # we deliberately never emit a double BOS; transformers does
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip), (text, skip)
    assert ours.vocab_size == len(hf)
    # Ours also counts added tokens that tokenizer.json marks special but no config field names.
    assert set(hf.all_special_ids) <= set(ours.all_special_ids)
    marked = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert set(ours.all_special_ids) == set(hf.all_special_ids) | marked
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "héllo 😀"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    for gen in (True, False):
        text = ours.apply_chat_template(msgs, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        hf_ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, Mapping) else hf_ids
        assert ours.encode(text, add_special_tokens=False) == list(hf_ids)

