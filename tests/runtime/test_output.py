"""OutputProcessor: incremental text; stop strings held back while they could match, then cut."""

from __future__ import annotations

from xlaserve.runtime.output import Completion, OutputProcessor, find_stop, held_back
from xlaserve.runtime.request import RequestOutput, SamplingParams


class Chars:
    """Detokenizer over token id = ord(char)."""

    def __init__(self, prompt):
        pass

    def add(self, ids):
        return "".join(map(chr, ids))

    def flush(self):
        return ""


def feed(text, stops, finish_last=False, include_stop=False):
    proc = OutputProcessor(Chars)
    proc.add("r", [1], SamplingParams(stop=stops, max_tokens=100,
                                      include_stop_str_in_output=include_stop))
    deltas, matched = [], None
    for i, ch in enumerate(text):
        last = finish_last and i == len(text) - 1
        out, m = proc.process(RequestOutput("r", (ord(ch),), "", last,
                                            "length" if last else None))
        deltas.append(out.new_text)
        if m is not None:
            matched = (m, out)
            break
    return deltas, matched


def test_helpers():
    assert find_stop("abcSTOPx", 0, ["STOP", "cS"]) == (2, "cS")
    assert find_stop("abc", 0, ["x"]) is None
    assert held_back("hello wor", 0, ["world"]) == 3
    assert held_back("hello", 0, ["xyz"]) == 0


def test_text_that_could_start_a_stop_is_held_then_trimmed():
    deltas, matched = feed("say END now", ["END"])
    assert deltas == ["s", "a", "y", " ", "", "", ""]
    stop, out = matched
    assert stop == "END" and out.finished and out.finish_reason == "stop"
    assert out.stop_reason == "END"
    assert "".join(deltas) == "say "


def test_include_stop_str_in_output_keeps_the_matched_stop_and_nothing_after():
    """vLLM's include_stop_str_in_output: the text ends with the stop string (held back, then
    released with it); what followed it in the same delta is still cut."""
    deltas, matched = feed("say END now", ["END"], include_stop=True)
    assert deltas == ["s", "a", "y", " ", "", "", "END"]
    assert matched[0] == "END" and matched[1].finish_reason == "stop"
    proc = OutputProcessor(Chars)
    proc.add("r", [1], SamplingParams(stop=["XY", "B"], include_stop_str_in_output=True))
    out, m = proc.process(RequestOutput("r", tuple(map(ord, "aXYzB")), "", False, None))
    assert (m, out.new_text) == ("XY", "aXY")  # the earliest stop, then nothing past it


def test_held_text_released_when_it_cannot_match():
    deltas, matched = feed("ENx ok", ["END"])
    assert matched is None
    assert deltas == ["", "", "ENx", " ", "o", "k"]


def test_overlapping_stops_earliest_wins_and_flush_on_finish():
    deltas, matched = feed("abXYZ", ["YZ", "XYQ"])
    assert matched[0] == "YZ" and "".join(deltas) == "abX"
    deltas, matched = feed("abXY", ["XYZ"], finish_last=True)
    assert matched is None and "".join(deltas) == "abXY"  # finished for another reason: flushed


def test_no_stops_streams_everything_and_no_tokenizer_gives_no_text():
    deltas, _ = feed("hello", [])
    assert deltas == list("hello")
    proc = OutputProcessor(None)
    proc.add("r", [1], SamplingParams(stop=["x"]))
    out, m = proc.process(RequestOutput("r", (5,), "", False))
    assert out.new_text == "" and m is None


def test_completion_accumulates():
    c = Completion("r", arrival_time=0.0)
    c.add(RequestOutput("r", (1,), "a", False, num_prompt_tokens=3), now=1.0)
    c.add(RequestOutput("r", (2,), "b", True, "stop", "x", num_prompt_tokens=3), now=3.0)
    assert c.text == "ab" and c.token_ids == [1, 2] and c.finish_reason == "stop"
    assert c.ttft_s == 1.0 and c.latency_s == 3.0 and c.num_prompt_tokens == 3


def test_real_incremental_detokenizer_with_stop():
    # Plain imports: tokenizers and jinja2 are hard dependencies, so an ImportError here is a
    # failure, not a reason to skip.
    from xlaserve.checkpoints.builtin import builtin_model_dir
    from xlaserve.checkpoints.tokenizer import Tokenizer
    from xlaserve.runtime.output import default_detokenizer_factory

    tok = Tokenizer.from_dir(builtin_model_dir("tiny"))
    text = "The capital of France is Paris. It is big."
    ids = tok.encode(text, add_special_tokens=False)
    proc = OutputProcessor(default_detokenizer_factory(tok))
    proc.add("r", [], SamplingParams(stop=["Paris"], max_tokens=100))
    got, matched = "", None
    for t in ids:
        out, matched = proc.process(RequestOutput("r", (t,), "", False))
        got += out.new_text
        if matched:
            break
    assert matched == "Paris" and got == text[:text.index("Paris")]
