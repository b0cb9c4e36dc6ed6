"""Text <-> token ids for a Hugging Face model directory, chat templates, streaming detokenization.

`Tokenizer` wraps a `tokenizers.Tokenizer` (tokenizer.json) together with what the model
directory says about special tokens (tokenizer_config.json, generation_config.json, config.json)
and renders the chat template in a sandboxed jinja2 environment, as transformers does.
`IncrementalDetokenizer` turns a stream of generated ids into text deltas, cheaply, one step at a
time, without splitting multi-byte characters.

This module does not import transformers, torch or jax; it never touches the network. It does not
support slow (sentencepiece .model only) tokenizers: the directory needs a tokenizer.json.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import jinja2.utils
import tokenizers

_REPLACEMENT = "\ufffd"  # U+FFFD: what decoders emit for incomplete or invalid UTF-8


class ChatTemplateError(ValueError):
    """The chat template is missing, or it rejected the messages (its raise_exception)."""


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: object) -> list[int]:
    """An eos_token_id field: an int, a list of ints, or null."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """A model's tokenizer: encode, decode, chat template and its special token ids.

    BOS: when tokenizer_config.json sets add_bos_token / add_eos_token explicitly they decide (as
    transformers does); otherwise tokenizer.json's post-processor decides. Either way, encode never
    produces two BOS tokens in a row at the start (a chat template that writes bos_token itself
    followed by encode(add_special_tokens=True) yields one BOS).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *,
                 tokenizer_config: Mapping[str, Any] | None = None,
                 generation_config: Mapping[str, Any] | None = None,
                 model_config: Mapping[str, Any] | None = None,
                 chat_templates: Mapping[str, str] | None = None) -> None:
        """Args:
          backend: the loaded tokenizer.json.
          tokenizer_config, generation_config, model_config: the parsed JSON files (may be empty).
          chat_templates: name -> jinja source; "default" is used unless another is asked for.
            When None, taken from tokenizer_config["chat_template"].
        """
        self._backend = backend
        cfg = dict(tokenizer_config or {})
        gen, model = dict(generation_config or {}), dict(model_config or {})
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.unk_token = _token_content(cfg.get("unk_token"))
        self.pad_token = _token_content(cfg.get("pad_token"))
        bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        if bos_id is None and self.bos_token is None and "bos_token" not in cfg:
            bos_ids = _as_ids(gen.get("bos_token_id")) or _as_ids(model.get("bos_token_id"))
            bos_id = bos_ids[0] if bos_ids else None
        self.bos_token_id: int | None = bos_id
        eos: list[int] = []
        tok_eos = self.token_to_id(self.eos_token) if self.eos_token else None
        candidates = [tok_eos] if tok_eos is not None else []
        candidates += _as_ids(gen.get("eos_token_id")) + _as_ids(model.get("eos_token_id"))
        for i in candidates:  # any of them ends a sequence; keep the first occurrence's order
            if i not in eos:
                eos.append(i)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        # None: follow tokenizer.json's post-processor; a bool: the config decides (transformers).
        explicit = "add_bos_token" in cfg or "add_eos_token" in cfg
        self._add_bos: bool | None = (bool(cfg.get("add_bos_token", False))
                                      and bos_id is not None) if explicit else None
        self._add_eos_id: int | None = (tok_eos if explicit and cfg.get("add_eos_token") else None)
        added = backend.get_added_tokens_decoder()
        self.skipped_special_ids: frozenset[int] = frozenset(
            i for i, t in added.items() if t.special)
        named = [self.token_to_id(t) for t in (self.bos_token, self.eos_token, self.unk_token,
                                                self.pad_token) if t]
        self.all_special_ids: tuple[int, ...] = tuple(sorted(
            self.skipped_special_ids | {i for i in named if i is not None}))
        if chat_templates is None:
            chat_templates = _templates_from_config(cfg.get("chat_template"))
        self.chat_templates: dict[str, str] = dict(chat_templates)
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> Tokenizer:
        """Loads tokenizer.json and the config files of a Hugging Face model directory.

        Raises:
          ValueError: the directory or its tokenizer.json is missing, or a JSON file is invalid.
        """
        root = pathlib.Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"path={str(path)!r}: no tokenizer.json there (only fast tokenizers "
                             "with a tokenizer.json are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises its own Exception type for a corrupt file
            raise ValueError(f"{tok_file}: not a readable tokenizer.json ({e})") from e
        cfg = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if key not in cfg and key in special_map:
                cfg[key] = special_map[key]
        templates = _templates_from_config(cfg.get("chat_template"))
        templates |= _templates_from_config(
            _read_json(root / "chat_template.json").get("chat_template"))
        if (root / "chat_template.jinja").is_file():  # transformers >= 4.43 saves it here
            templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
        for extra in sorted((root / "additional_chat_templates").glob("*.jinja")):
            templates[extra.stem] = extra.read_text(encoding="utf-8")
        return cls(backend, tokenizer_config=cfg,
                   generation_config=_read_json(root / "generation_config.json"),
                   model_config=_read_json(root / "config.json"), chat_templates=templates)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (e.g. "▁the", "<0xE2>", "Ġthe"), or None."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary string, or None."""
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS (and EOS) as the model files say."""
        if not isinstance(text, str):
            raise ValueError(f"text={text!r}: must be a str")
        if add_special_tokens and self._add_bos is None:
            ids = self._backend.encode(text, add_special_tokens=True).ids
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
            if add_special_tokens:
                if self._add_bos:
                    ids = [self.bos_token_id, *ids]
                if self._add_eos_id is not None:
                    ids.append(self._add_eos_id)
        bos = self.bos_token_id
        if add_special_tokens and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # the text already started with BOS (a rendered chat template)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (added tokens marked special) dropped when asked."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, *,
                            chat_template: str | None = None, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **kwargs: Any) -> str:
        """Renders a conversation with the model's chat template (not tokenized).

        Args:
          messages: [{"role": ..., "content": ...}, ...].
          add_generation_prompt: end with the header that starts the assistant's turn.
          chat_template: the name of one of `chat_templates`, or a jinja template string;
            default: the "default" template (or "tool_use" when tools are given and it exists).
          tools, documents: passed to the template, as transformers does.
          **kwargs: extra template variables (e.g. enable_thinking=False).
        Raises:
          ChatTemplateError (a ValueError): no template, or the template rejected the messages.
        """
        if isinstance(messages, (str, bytes)) or not all(isinstance(m, Mapping) for m in messages):
            raise ValueError(f"messages={messages!r}: must be a list of dicts")
        source = self._pick_template(chat_template, tools)
        template = self._compiled.get(source)
        if template is None:
            template = self._compiled[source] = _jinja_env().from_string(source)
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "unk_token": self.unk_token or "", "pad_token": self.pad_token or ""}
        variables |= kwargs
        variables |= {"messages": [dict(m) for m in messages], "tools": tools,
                      "documents": documents, "add_generation_prompt": add_generation_prompt}
        try:
            return template.render(**variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from e

    def _pick_template(self, chat_template: str | None, tools: object) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        raise ChatTemplateError(
            "chat_template: this tokenizer has none (tokenizer_config.json chat_template, "
            "chat_template.jinja); pass chat_template= or send a plain prompt"
            + (f"; named templates: {sorted(self.chat_templates)}" if self.chat_templates else ""))


def _templates_from_config(value: object) -> dict[str, str]:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"}."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {str(t["name"]): str(t["template"]) for t in value
                if isinstance(t, Mapping) and "name" in t and "template" in t}
    return {}


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text in HF templates): renders
    its body unchanged; we do not compute assistant masks."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """jinja2's namespace() but refusing underscore names (no way to reach Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's signature trick)
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Not jinja's tojson: that one HTML-escapes, which changes the prompt the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _jinja_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment chat templates are written for (transformers' settings)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals |= {"raise_exception": _raise_exception, "strftime_now": _strftime_now,
                    "namespace": _SafeNamespace}
    return env


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas as they arrive.

    The prefix/read-offset method: keep a short window of ids, `prefix` (text already emitted,
    used as left context) and `read` (the first id not yet emitted). Each step decodes only the
    window, twice at most, so the cost per token is constant. Context matters: SentencePiece
    decoders strip the leading space of the first token they see, and a window that began inside
    a multi-byte character would decode to garbage. The first window takes the prompt's last few
    ids as context, so the first generated "▁Paris" yields " Paris".

    Text that ends in U+FFFD is held back (an incomplete UTF-8 sequence, e.g. the first two of
    three <0xE2><0x82><0xAC> byte tokens, or a ByteLevel token holding half a character) until a
    later token completes it. `flush()` emits whatever is still held (U+FFFD for bytes that were
    never completed); call it when the request finishes.

    Guarantees: with an empty prompt, "".join(deltas) + flush() == tokenizer.decode(ids); with a
    prompt, decode(prompt) + "".join(deltas) + flush() == decode(prompt + ids) whenever both
    decode to valid text. For invalid bytes: ByteLevel tokenizers still match decode exactly;
    byte-fallback decoders replace a whole invalid run of byte tokens with U+FFFD, so an
    already-emitted valid character right before such a run may be counted differently there.
    """

    CONTEXT_TOKENS = 5  # prompt ids used as left context for the first output token
    _MAX_EXTRA_CONTEXT = 8  # step back this far at most to avoid starting inside a character

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._decode = tokenizer.backend.decode
        # Skipped specials never enter the window: decoding without them is what decode(skip=True)
        # does, and they would only make the window grow.
        self._skip = tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
        tail: list[int] = []
        for t in reversed(prompt_token_ids):
            if len(tail) == self.CONTEXT_TOKENS + self._MAX_EXTRA_CONTEXT:
                break
            if int(t) not in self._skip:
                tail.append(int(t))
        tail.reverse()
        start = max(len(tail) - self.CONTEXT_TOKENS, 0)
        while start > 0 and self._decode(tail[start:], skip_special_tokens=False).startswith(
                _REPLACEMENT):
            start -= 1
        self._ids: list[int] = tail[start:]  # the window's ids and what follows
        self._prefix = 0  # window start: ids[prefix:read] were emitted in the previous step
        self._read = len(self._ids)  # ids[read:] have not been emitted yet
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), computed lazily
        self._pieces: list[str] = []
        self._text: str | None = ""

    def add(self, new_token_ids: Iterable[int]) -> str:
        """Appends generated ids; returns the newly completed text ("" while held back)."""
        before = len(self._ids)
        self._ids.extend(t for t in map(int, new_token_ids) if t not in self._skip)
        if len(self._ids) == before:
            return ""
        return self._emit(final=False)

    def flush(self) -> str:
        """Emits any held-back text, incomplete characters as U+FFFD. For the end of a request."""
        return self._emit(final=True) if self._read < len(self._ids) else ""

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the deltas)."""
        if self._text is None:
            self._text = "".join(self._pieces)
        return self._text

    def _emit(self, *, final: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix:self._read],
                                             skip_special_tokens=False)
        new_text = self._decode(self._ids[self._prefix:], skip_special_tokens=False)
        if not final and (len(new_text) <= len(self._prefix_text)
                          or new_text.endswith(_REPLACEMENT)):
            return ""  # nothing visible yet, or an incomplete character at the end
        delta = new_text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None
        if self._prefix > 256:  # forget ids nobody will decode again
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        if delta:
            self._pieces.append(delta)
            self._text = None
        return delta
