"""IncrementalDetokenizer: deltas add up to decode(ids), never split a character, O(1) per token."""

from __future__ import annotations

import random
from typing import Any

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from xlaserve.checkpoints import builtin
from xlaserve.checkpoints.tokenizer import IncrementalDetokenizer, Tokenizer

EXTRA_CORPUS = "\n".join(["Café crème, très bien. 中文 你好 世界 世界 日本語 😀 😀 🎉 🎉"] * 3)

# Pieces random texts are made of: ASCII words, spaces/newlines, accents, CJK, emoji (with ZWJ
# and skin-tone modifiers), symbols. Every one is valid UTF-8.
ATOMS = ["the", "cat", "Hello", " ", "  ", "\n", "\t", ",", ".", "é", "ü", "ß", "中", "文",
         "你好", "世界", "日本語", "한", "😀", "🎉", "👍🏽", "👨‍👩‍👧", "€", "∑", "𝔘", "42", "<", "x"]  # noqa: E501


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    corpus = builtin.CORPUS + EXTRA_CORPUS
    if request.param == "sentencepiece":
        backend = builtin.build_sentencepiece_bpe(corpus, 650)
        cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        backend = builtin.build_byte_level_bpe(corpus, 650)
        cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return Tokenizer(backend, tokenizer_config=cfg)


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ATOMS) + rng.choice(["", " ", ""]) for _ in range(n))


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], rng: random.Random | None = None,
            **kwargs: Any) -> tuple[list[str], str]:
    """Feeds ids one at a time (or in random chunks); returns the deltas and the flush."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    deltas, i = [], 0
    while i < len(ids):
        step = rng.randint(1, 3) if rng else 1
        deltas.append(detok.add(ids[i:i + step]))
        i += step
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


def test_streams_match_decode_on_valid_text(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for trial in range(60):
        ids = tok.encode(_random_text(rng, rng.randint(1, 25)), add_special_tokens=False)
        deltas, tail = _stream(tok, [], ids, rng if trial % 2 else None)
        assert "".join(deltas) == tok.decode(ids)
        assert tail == ""
        assert not any("\ufffd" in d for d in deltas)


def test_prompt_context_keeps_leading_space(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(60):
        prompt = tok.encode(_random_text(rng, rng.randint(0, 12)))
        ids = tok.encode(" " + _random_text(rng, rng.randint(1, 15)), add_special_tokens=False)
        deltas, tail = _stream(tok, prompt, ids)
        full, head = tok.decode(prompt + ids), tok.decode(prompt)
        assert full.startswith(head)
        assert "".join(deltas) + tail == full[len(head):]
        assert not any("\ufffd" in d for d in deltas)


def test_first_token_after_prompt_has_its_space(tok: Tokenizer) -> None:
    prompt = tok.encode("The capital of France is")
    ids = tok.encode("The capital of France is Paris", add_special_tokens=False)
    prompt_raw = tok.encode("The capital of France is", add_special_tokens=False)
    assert ids[:len(prompt_raw)] == prompt_raw
    deltas, _ = _stream(tok, prompt, ids[len(prompt_raw):])
    assert "".join(deltas) == " Paris"


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
       chunk=st.integers(1, 4))
def test_hypothesis_any_text(tok: Tokenizer, text: str, chunk: int) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas) or "\ufffd" in text


@pytest.mark.parametrize("char", ["😀", "𝔘"])
def test_multibyte_held_back_until_complete(tok: Tokenizer, char: str) -> None:
    ids = tok.encode("a" + char, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    out = [detok.add([i]) for i in ids]
    assert "".join(out) == "a" + char
    assert out[-1].endswith(char) and not any("\ufffd" in d for d in out)
    assert out[0] == "a"
    if char == "𝔘":  # not in the corpus: several byte tokens in both tokenizers
        assert len(ids) > 2
    # the character spans several tokens: nothing shows until its last byte
    assert all(d == "" for d in out[1:-1])


def test_truncated_character_is_flushed_as_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("ok 𝔘", add_special_tokens=False)  # 𝔘 is not in the corpus: 4 bytes
    # Drop the token(s) holding the emoji's last byte: the output ends mid-character.
    cut = ids[:-1]
    expected = tok.decode(cut)
    assert expected.endswith("\ufffd")
    deltas, tail = _stream(tok, [], cut)
    assert "\ufffd" not in "".join(deltas)  # held back while it might still complete
    assert "".join(deltas) + tail == expected  # then flushed exactly as decode() writes it


def test_random_ids_including_invalid_bytes(tok: Tokenizer) -> None:
    """Any ids at all: never raises; byte-level matches decode() exactly; byte fallback matches
    whenever decode() has no U+FFFD (see the class docstring for invalid byte runs)."""
    rng = random.Random(2)
    specials = set(tok.skipped_special_ids)
    for _ in range(80):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        deltas, tail = _stream(tok, [], ids, rng)
        expected = tok.decode(ids)
        if tok.token_to_id("<0x00>") is None or "\ufffd" not in expected:
            assert "".join(deltas) + tail == expected, ids
        else:
            assert len("".join(deltas) + tail) > 0 or not set(ids) - specials


def test_special_tokens(tok: Tokenizer) -> None:
    eos = tok.eos_token_ids[0]
    ids = tok.encode("hi there", add_special_tokens=False)
    stream = [ids[0], eos, *ids[1:], eos]
    deltas, _ = _stream(tok, [eos], stream)
    assert "".join(deltas) == tok.decode([eos, *stream])[len(tok.decode([eos])):]
    assert tok.eos_token not in "".join(deltas)
    kept, _ = _stream(tok, [], stream, skip_special_tokens=False)
    assert "".join(kept) == tok.decode(stream, skip_special_tokens=False)
    assert "".join(kept).count(str(tok.eos_token)) == 2


class _CountingBackend:
    """Stands in for tokenizers.Tokenizer and records the length of every decode call."""

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        self.inner, self.lengths = inner, []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_cost_per_token_is_constant(tok: Tokenizer) -> None:
    counting = _CountingBackend(tok.backend)
    spy = Tokenizer(counting,  # type: ignore[arg-type]
                    tokenizer_config={"eos_token": tok.eos_token})
    rng = random.Random(3)
    ids = tok.encode(_random_text(rng, 400), add_special_tokens=False)
    assert len(ids) > 1000
    prompt = tok.encode(_random_text(rng, 300))
    detok = IncrementalDetokenizer(spy, prompt)
    setup_calls = len(counting.lengths)
    for i in ids:
        detok.add([i])
    assert detok.text == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    calls = counting.lengths[setup_calls:]
    assert len(calls) <= 2 * len(ids)
    assert max(calls) <= 16  # the window: a few tokens of context plus a held-back character


def test_prompt_ending_in_multibyte_characters(tok: Tokenizer) -> None:
    """The prompt context must not start inside a character that spans several tokens."""
    for prompt_text in ("𝔘𝔘", "x𝔘𝔘𝔘", "a 𝔘"):
        prompt = tok.encode(prompt_text)
        for out_text in ("𝔘a", " b𝔘", "𝔘𝔘 c"):
            ids = tok.encode(prompt_text + out_text, add_special_tokens=False)
            ids = ids[len(tok.encode(prompt_text, add_special_tokens=False)):]
            deltas, tail = _stream(tok, prompt, ids)
            full, head = tok.decode(prompt + ids), tok.decode(prompt)
            assert "".join(deltas) + tail == full[len(head):] == out_text
