"""The degradation-word filter of the caption source on real-looking captions, and its user word file."""

import pytest

from tdr.errors import TdrError
from tdr.pipeline.degradation_words import (EMPTY_PROMPT, DegradationFilter, clean_caption, load_word_file,
                                            word_list_sha256)

CAPTIONS = [  # BLIP-2-style captions of degraded images -> the prompt Stable Diffusion gets
    ("a blurry photo of a street at night with rain", "a photo of a street at night"),
    ("a noisy image of a cat", "an image of a cat"),
    ("A Noisy image of a cat.", "An image of a cat"),
    ("a car driving in the rain", "a car driving"),
    ("the view of a city through the haze", "the view of a city"),
    ("a blurry and noisy photo of a dog", "a photo of a dog"),
    ("an out-of-focus picture of an umbrella", "a picture of an umbrella"),
    ("a Blurry, grainy photo of a bird on a branch", "a photo of a bird on a branch"),
    ("a photo of a cat, blurry", "a photo of a cat"),
    ("two people walking in the rain with umbrellas", "two people walking with umbrellas"),
    ("a car covered in raindrops", "a car"),
    ("a foggy road with trees on both sides", "a road with trees on both sides"),
    ("a hazy city skyline at sunset", "a city skyline at sunset"),
    ("a man walking in the fog and rain", "a man walking"),
    ("a city street in heavy rain at night", "a city street at night"),
    ("a low quality photo of a hour glass", "a photo of an hour glass"),
    ("a motion blurred picture of a cyclist", "a picture of a cyclist"),
    ("a dark room with a bed", "a room with a bed"),
    # nothing to remove: unchanged, including lists and "full of"
    ("a dog, a cat and a bird", "a dog, a cat and a bird"),
    ("a street full of people", "a street full of people"),
    ("blurry", EMPTY_PROMPT),
]


@pytest.mark.parametrize("caption,prompt", CAPTIONS)
def test_filter_gives_a_grammatical_prompt(caption, prompt):
    assert clean_caption(caption) == prompt


def test_user_word_file_extends_the_list(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# my degradations\nSnowy   # a comment\n\nlens flare\n")
    extra = load_word_file(words)
    assert extra == ("Snowy", "lens flare")
    filt = DegradationFilter(extra)
    assert filt("a snowy street with LENS-FLARE") == "a street"
    assert clean_caption("a snowy street") == "a snowy street"  # the built-in list does not know it
    assert filt("a blurry photo of a cat") == "a photo of a cat"  # the built-in words stay
    assert filt.sha256 != DegradationFilter().sha256 == word_list_sha256(())
    assert DegradationFilter(["snowy", "Lens flare"]).sha256 == filt.sha256  # normalised before hashing
    with pytest.raises(TdrError, match="nope.txt"):
        load_word_file(tmp_path / "nope.txt")
