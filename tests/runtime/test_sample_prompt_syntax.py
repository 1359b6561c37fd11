"""A1111 prompt syntax: schedules and attention pieces against the examples A1111 documents in
`modules/prompt_parser.py` (its doctests and the schedule comment at its top), and the 75-token
chunks of `modules/sd_hijack_clip.py` (`tokenize_line`) on the toy models' tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdkit.errors import SdkitError
from sdkit.runtime.sample.chunks import prompt_chunks
from sdkit.runtime.sample.prompt_syntax import (
    attention_pieces,
    prompt_schedule,
    switch_step,
    text_at_step,
)

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"

# A1111's doctests of get_learned_conditioning_prompt_schedules, steps=10
A1111_SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(step, "a" if step % 2 else "(b:1.1)") for step in range(1, 11)]),
    ("[fe|]male", [(step, "female" if step % 2 else "male") for step in range(1, 11)]),
    ("[fe|||]male", [(step, "female" if step % 4 == 1 else "male") for step in range(1, 11)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_SCHEDULES)
def test_schedules_are_a1111s_documented_ones(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_the_documented_hundred_step_landscape():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_when_is_a_fraction_with_a_decimal_point_and_a_step_without():
    # A1111 (CollectSteps.scheduled): "." in the number -> times the steps; cut to the steps, truncated
    assert [switch_step(w, 20) for w in ("5", ".25", "0.5", "1.0", "1.5", "30", "0.01", "0")] == \
        [5, 5, 10, 20, 20, 20, 0, 0]
    assert prompt_schedule("a [b:1.0]", 10) == [(10, "a ")]  # "1.0" is all the steps, not step 1
    assert prompt_schedule("a [b:1]", 10) == [(1, "a "), (10, "a b")]
    assert prompt_schedule("a [b:0]", 10) == [(10, "a b")]  # a switch at step 0 is not listed


def test_a_hires_pass_counts_on_from_the_first_pass():
    # A1111's doctests with hires_steps=10 after 10 base steps
    assert prompt_schedule("a [b:.5] c", 10, first_pass=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, first_pass=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:13] c", 10, first_pass=10) == [(3, "a  c"), (10, "a b c")]  # step 13 overall


def test_unreadable_prompts_are_used_unchanged():
    # a `|` outside an alternation, or a lone backslash at the end: A1111's parser fails and
    # the prompt is one text for every step
    for prompt in ("a | b [c:2]", "[a|b] c | d", "x [y:3] \\"):
        assert prompt_schedule(prompt, 10) == [(10, prompt)]


def test_step_i_uses_the_first_entry_that_ends_at_or_after_it():
    # A1111's reconstruct_cond_batch: step (from 0) <= end_at_step
    schedule = prompt_schedule("a [b:3]", 10)
    assert [text_at_step(schedule, step) for step in range(10)] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    alternation = prompt_schedule("[a|b]", 4)
    assert [alternation[text_at_step(alternation, step)][1] for step in range(4)] == ["a", "a", "b", "a"]


# A1111's doctests of parse_prompt_attention
A1111_ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_ATTENTION)
def test_attention_pieces_are_a1111s_documented_ones(prompt, expected):
    assert attention_pieces(prompt) == expected


def test_break_and_escapes():
    assert attention_pieces("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert attention_pieces("a break b") == [("a break b", 1.0)]  # only the capital word
    assert attention_pieces("[a] \\\\ (b:0.5)") == [("a", 1 / 1.1), (" \\ ", 1.0), ("b", 0.5)]
    assert attention_pieces("") == [("", 1.0)]
    with pytest.raises(SdkitError, match="no readable weight"):
        attention_pieces("(a:.)")


# ---- chunks --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    folder = TOY / "sd1" / "diffusers" / "tokenizer"
    if not folder.is_dir():
        pytest.skip("toy fixtures not built (make fixtures)")
    return CLIPTokenizer.from_pretrained(folder)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _wrapped(tokenizer, ids: list[int]) -> list[int]:
    """A1111's chunk: start, the ids, end tokens up to 77."""
    return [tokenizer.bos_token_id, *ids] + [tokenizer.eos_token_id] * (76 - len(ids))


def test_a_long_prompt_fills_75_token_chunks(tokenizer):
    a = _ids(tokenizer, "a")
    assert len(a) == 1
    chunks = prompt_chunks(tokenizer, "a " * 80)
    assert [c.tokens for c in chunks] == [_wrapped(tokenizer, a * 75), _wrapped(tokenizer, a * 5)]
    assert all(len(c.weights) == 77 for c in chunks)


@pytest.mark.parametrize("before_comma, moved", [(55, True), (54, False), (70, True)])
def test_words_after_a_comma_at_most_20_tokens_back_move_to_the_next_chunk(tokenizer, before_comma, moved):
    a, comma, red = _ids(tokenizer, "a"), _ids(tokenizer, ","), _ids(tokenizer, "red")
    assert len(red) == 1 and len(comma) == 1
    after = 80 - before_comma - 1
    chunks = prompt_chunks(tokenizer, "a " * before_comma + ", " + "red " * after)
    # the chunk fills at 75 tokens; the comma sits at position `before_comma` of it
    fits = 75 - before_comma - 1
    if moved:  # 75 - comma position <= 20
        expected = [a * before_comma + comma, red * after]
    else:
        expected = [a * before_comma + comma + red * fits, red * (after - fits)]
    assert [c.tokens for c in chunks] == [_wrapped(tokenizer, ids) for ids in expected]


def test_break_starts_a_new_chunk_and_weights_follow_the_tokens(tokenizer):
    red, blue = _ids(tokenizer, "red circle"), _ids(tokenizer, "blue")
    chunks = prompt_chunks(tokenizer, "red circle BREAK (blue:1.3)")
    assert [c.tokens for c in chunks] == [_wrapped(tokenizer, red), _wrapped(tokenizer, blue)]
    assert chunks[1].weights == [1.0, 1.3] + [1.0] * 75
    assert len(prompt_chunks(tokenizer, "BREAK red")) == 2  # an empty first chunk, as A1111 makes
    assert len(prompt_chunks(tokenizer, "")) == 1


def test_an_embeddings_vectors_stay_in_one_chunk(tokenizer):
    from transformers import CLIPTokenizer

    own = CLIPTokenizer.from_pretrained(TOY / "sd1" / "diffusers" / "tokenizer")
    names = ["<e-0>", "<e-1>", "<e-2>"]
    own.add_tokens(names)
    run = tuple(own.convert_tokens_to_ids(names))
    a = _ids(own, "a")
    chunks = prompt_chunks(own, "a " * 73 + " ".join(names) + " a", {run[0]: run})
    assert [c.tokens for c in chunks] == [_wrapped(own, a * 73), _wrapped(own, [*run, *a])]
    # without the embedding map the placeholders are ordinary tokens and split
    split = prompt_chunks(own, "a " * 73 + " ".join(names))
    assert split[0].tokens[-3:-1] == list(run[:2])
