"""Incremental detokenization with the default model's byte-level BPE tokenizer, and stop strings."""

import random

import pytest

from server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

TEXTS = [
    "Hello 👋🏽 world! 🇫🇷 flags and 👨‍👩‍👧 families.",
    "中文字符测试，日本語のテキスト、한국어 텍스트。",
    "naïve café, Ångström, São Paulo, Zürich — “quotes” … ok",
    "a  b   c\n\n  d\t\te\n",
    "   leading spaces and trailing   ",
    "mixed 🤖robots🤖 and 数学 ∑∫√ symbols",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def stream(tokenizer, prompt_ids, ids, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    events = [detok.add(t) for t in ids]
    return events, detok.flush()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_streaming_reproduces_decode(tokenizer, text, with_prompt):
    prompt = tokenizer.encode("Some prompt text: ✓") if with_prompt else []
    ids = tokenizer.encode(text)
    events, tail = stream(tokenizer, prompt, ids)
    assert "".join(events) == tokenizer.decode(ids, skip_special_tokens=True)
    assert tail == ""
    assert not any("\ufffd" in e for e in events)


def test_multi_token_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("x👋🏽y")
    assert len(ids) > 3  # the emoji spans several byte-level tokens
    events, _ = stream(tokenizer, [], ids)
    assert "".join(events) == "x👋🏽y"
    assert "" in events  # some tokens completed nothing
    assert all("\ufffd" not in e for e in events)


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("Hi there") + [tokenizer.eos_token_id] + tokenizer.encode(" again")
    events, _ = stream(tokenizer, [], ids)
    assert "".join(events) == tokenizer.decode(ids, skip_special_tokens=True)
    events, _ = stream(tokenizer, [], ids, skip_special_tokens=False)
    assert "".join(events) == tokenizer.decode(ids, skip_special_tokens=False)
    assert tokenizer.eos_token in "".join(events)


def test_random_tokens_including_invalid_bytes(tokenizer):
    """Arbitrary ids (stray byte tokens, invalid UTF-8): events plus flush still equal the decode."""
    rng = random.Random(0)
    byte_tokens = [i for i in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.decode([i])][:200]
    for _ in range(20):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.5 else rng.randrange(100, 40000) for _ in range(30)]
        events, tail = stream(tokenizer, [], ids)
        assert "".join(events) + tail == tokenizer.decode(ids, skip_special_tokens=True)
        # A U+FFFD may be emitted only once a later complete character shows the bytes were invalid.
        assert all(not e.endswith("\ufffd") for e in events)


def test_truncated_character_is_flushed(tokenizer):
    ids = tokenizer.encode("ok👋")[:-1]
    events, tail = stream(tokenizer, [], ids)
    assert "".join(events) == "ok"
    assert tail and set(tail) == {"\ufffd"}


def test_leading_space_kept_for_sentencepiece_style_decoders():
    """A Metaspace decoder drops a leading space at the start of a decode: the window keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert tokenizer.decode([2]) == "world"
    events, _ = stream(tokenizer, [1], [2, 3, 2])
    assert events == [" world", "!", " world"]
    events, _ = stream(tokenizer, [], [1, 2])
    assert events == ["Hello", " world"]


# --- stop strings -------------------------------------------------------------------------------


def feed_all(matcher, chunks):
    out, stopped = [], False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped, out


def test_stop_string_spanning_chunks():
    text, stopped, events = feed_all(StopStringMatcher(["END"]), ["Hello E", "N", "D and more"])
    assert (text, stopped) == ("Hello ", True)
    assert events[0] == "Hello "  # "E" held back
    text, stopped, _ = feed_all(StopStringMatcher(["END"], include_stop_str_in_output=True),
                                ["Hello E", "N", "D and more"])
    assert (text, stopped) == ("Hello END", True)


def test_held_text_released_when_no_stop():
    m = StopStringMatcher(["END"])
    assert m.feed("abc EN") == ("abc ", False)
    assert m.feed("X") == ("ENX", False)
    assert m.feed("E") == ("", False)
    assert m.flush() == "E"
    assert m.flush() == ""


def test_earliest_match_wins():
    # "c" completes before "abcd" could: the stream stops at the first completed stop string.
    assert feed_all(StopStringMatcher(["abcd", "c"]), ["xabcd"])[:2] == ("xab", True)
    assert feed_all(StopStringMatcher(["abcd", "c"]), list("xabcd"))[:2] == ("xab", True)
    assert feed_all(StopStringMatcher(["world", "lo"]), ["hello world"])[:2] == ("hel", True)
    # Same end: the longer one (earlier start) is removed.
    assert feed_all(StopStringMatcher(["cd", "bcd"]), ["abcde"])[:2] == ("a", True)
    assert feed_all(StopStringMatcher(["cd", "bcd"], True), ["abcde"])[:2] == ("abcd", True)


@pytest.mark.parametrize("include", [False, True])
def test_result_independent_of_chunking(include):
    rng = random.Random(1)
    stops = ["\n\n", "Observation:", "###", "serv"]
    text = "Thought: the server said ## no\nthen Observation: x ### y"
    expected = None
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, 12)))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        got = feed_all(StopStringMatcher(stops, include), chunks)[:2]
        expected = expected or got
        assert got == expected
    assert expected == (("Thought: the serv" if include else "Thought: the "), True)


def test_no_stop_strings_passes_through():
    m = StopStringMatcher([""])
    assert m.feed("abc") == ("abc", False) and m.flush() == ""


def test_after_stop_nothing_more():
    m = StopStringMatcher(["x"])
    assert m.feed("axb") == ("a", True)
    assert m.feed("more") == ("", True) and m.flush() == ""


def test_stop_strings_over_detokenized_tokens(tokenizer):
    """Stop strings with multi-byte characters, across token boundaries of real tokens."""
    ids = tokenizer.encode("Answer: 42 👋🏽 done. 中文 more text")
    for stop, include, expected in [("👋🏽", False, "Answer: 42 "), ("🏽 do", True, "Answer: 42 👋🏽 do"),
                                    ("文 m", False, "Answer: 42 👋🏽 done. 中"), ("zzz", False, None)]:
        detok = IncrementalDetokenizer(tokenizer, [])
        matcher = StopStringMatcher([stop], include)
        out, stopped = [], False
        for t in ids:
            text, stopped = matcher.feed(detok.add(t))
            out.append(text)
            if stopped:
                break
        if not stopped:
            out.append(matcher.feed(detok.flush())[0] + matcher.flush())
        assert stopped == (expected is not None)
        assert "".join(out) == (expected if expected is not None else tokenizer.decode(ids))
