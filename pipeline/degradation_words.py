"""Removing degradation words from image captions (the "explicit caption" route of Lin et al., CVPR 2024, §3.1
and supplement B: caption the degraded image with BLIP-2, drop the words that describe the degradation, and
prompt Stable Diffusion with the rest).

    clean_caption("a blurry photo of a street at night with rain")  # -> "a photo of a street at night"
    clean_caption("A noisy image of a cat.")                         # -> "an image of a cat"

Matching is case-, hyphen- and punctuation-robust ("Out-of-focus," matches ``out of focus``); multi-word
phrases win over single words. What is left is repaired so that it stays a grammatical prompt:

- a preposition, article or conjunction left dangling is dropped ("... at night with" -> "... at night",
  "driving in the" -> "driving", "a and photo" -> "a photo");
- ``a`` / ``an`` is re-chosen for the word that now follows it ("a image" -> "an image");
- a caption with nothing left becomes :data:`EMPTY_PROMPT`.

:data:`DEGRADATION_WORDS` is the built-in list. Users extend it with a text file (one word or phrase per
line, ``#`` starts a comment; ``tdr generate-guidance --source caption --caption-words FILE``).
:func:`word_list_sha256` of the list in use enters the guidance fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence

from ..errors import TdrError

# The degradations of the paper's tasks (motion/defocus blur, rain, haze, noise, low light) and the words
# captioning models use for them or for a bad picture in general.
DEGRADATION_WORDS: tuple[str, ...] = (
    # blur
    "blur", "blurs", "blurry", "blurred", "blurring", "blurriness", "motion blur", "motion blurred",
    "camera shake", "shaky", "out of focus", "unfocused", "defocused", "defocus", "not in focus", "soft focus",
    # rain
    "rain", "rainy", "raining", "rainfall", "rain drops", "raindrops", "raindrop", "rain streaks",
    "rain falling", "falling rain", "heavy rain", "drizzle", "water droplets", "droplets",
    # haze, fog
    "haze", "hazy", "fog", "foggy", "smog", "smoggy", "mist", "misty",
    # noise
    "noise", "noisy", "grain", "grainy", "speckled", "static",
    # quality
    "low quality", "poor quality", "bad quality", "low resolution", "low res", "pixelated", "distorted",
    "jpeg artifacts", "artifacts", "compressed",
    # light
    "dark", "darkness", "dim", "dimly lit", "low light", "poorly lit", "underexposed",
)
EMPTY_PROMPT = "a photo"  # what a caption made only of degradation words becomes

_ARTICLES = {"a", "an", "the", "some"}
_PREPOSITIONS = {"with", "in", "under", "through", "behind", "during", "amid", "amidst", "of", "by", "from", "on",
                 "at", "into", "within"}
_TRAILING = {"covered", "full", "filled"}  # "a car covered in rain" -> "a car covered" -> "a car"
_CONJUNCTIONS = {"and", "or", "but", "&"}
_PUNCT = {",", ";", ":", ".", "!", "?"}
_AN_EXCEPTIONS = ("uni", "use", "usu", "uti", "one", "once", "eu", "ewe", "uk")  # vowel letter, consonant sound
_A_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir")                      # consonant letter, vowel sound


def _normalise(phrase: str) -> tuple[str, ...]:
    """A word or phrase as the tuple of its lower-case words (hyphens and punctuation are spaces)."""
    return tuple(re.sub(r"[^\w']+", " ", phrase.lower().replace("-", " ")).split())


def load_word_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Words and phrases of a user file: one per line, blank lines and ``#`` comments ignored."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise TdrError(f"Cannot read the degradation word file {path} ({exc.strerror or type(exc).__name__}).") from None
    words = tuple(line.split("#", 1)[0].strip() for line in text.splitlines())
    return tuple(w for w in words if w)


def word_list(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The built-in list plus ``extra``, normalised, deduplicated and sorted (the list that is hashed)."""
    return tuple(sorted({" ".join(_normalise(w)) for w in (*DEGRADATION_WORDS, *extra) if _normalise(w)}))


def word_list_sha256(words: Sequence[str]) -> str:
    """sha256 of a normalised word list (one phrase per line), for the guidance fingerprint."""
    return hashlib.sha256("\n".join(word_list(words)).encode()).hexdigest()


class DegradationFilter:
    """Removes the phrases of a word list from captions; ``filter(caption) -> prompt``."""

    def __init__(self, words: Iterable[str] = DEGRADATION_WORDS):
        self.words = word_list(words)
        self.phrases = sorted({_normalise(w) for w in self.words}, key=len, reverse=True)
        self.longest = max((len(p) for p in self.phrases), default=0)
        self._set = set(self.phrases)

    @property
    def sha256(self) -> str:
        return word_list_sha256(self.words)

    def __call__(self, caption: str) -> str:
        return clean_caption(caption, self)


def _tokens(caption: str) -> list[str]:
    """Words (hyphenated ones split) and punctuation marks, in order."""
    return re.findall(r"[\w']+|[,;:.!?&]", caption.replace("-", " "))


def _drop_degradations(tokens: list[str], filt: DegradationFilter) -> list[str]:
    kept: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(filt.longest, len(tokens) - i), 0, -1):
            if tuple(t.lower() for t in tokens[i:i + n]) in filt._set:
                i += n
                break
        else:
            kept.append(tokens[i])
            i += 1
    return kept


def _repair(tokens: list[str]) -> list[str]:
    """Drop dangling function words until none is left (a pass can expose another one)."""
    while True:
        fixed = _trim_end(_drop_dangling_words(_drop_dangling_links(tokens)))
        if fixed == tokens:
            return tokens
        tokens = fixed


def _drop_dangling_links(tokens: list[str]) -> list[str]:
    """Conjunctions and punctuation with nothing to join on their left ("a and photo", "a , photo")."""
    out: list[str] = []
    for tok in tokens:
        prev = out[-1].lower() if out else None
        if (tok.lower() in _CONJUNCTIONS or tok in _PUNCT) and (
                prev is None or prev in _ARTICLES or prev in _PREPOSITIONS or prev in _PUNCT or prev in _CONJUNCTIONS):
            continue
        out.append(tok)
    return out


def _drop_dangling_words(tokens: list[str]) -> list[str]:
    """Articles and prepositions with nothing to govern on their right ("at night with", "in the with")."""
    out: list[str] = []
    for k, tok in enumerate(tokens):
        low = tok.lower()
        nxt = tokens[k + 1].lower() if k + 1 < len(tokens) else None
        open_end = nxt is None or nxt in _PUNCT or nxt in _CONJUNCTIONS
        if low in _ARTICLES and (open_end or nxt in _ARTICLES or nxt in _PREPOSITIONS or nxt in _TRAILING):
            continue
        if low in _PREPOSITIONS and (open_end or nxt in _PREPOSITIONS):
            continue
        if low in _TRAILING and open_end:
            continue
        out.append(tok)
    return out


def _trim_end(tokens: list[str]) -> list[str]:
    """No conjunction or punctuation at the end."""
    out = list(tokens)
    while out and (out[-1] in _PUNCT or out[-1].lower() in _CONJUNCTIONS):
        out.pop()
    return out


def _article(word: str) -> str:
    w = word.lower()
    if w.startswith(_A_EXCEPTIONS):
        return "an"
    if w.startswith(_AN_EXCEPTIONS):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def _fix_articles(tokens: list[str]) -> list[str]:
    out = list(tokens)
    for k, tok in enumerate(out[:-1]):
        if tok.lower() in ("a", "an") and out[k + 1] not in _PUNCT:
            want = _article(out[k + 1])
            out[k] = want.capitalize() if tok[0].isupper() else want
    return out


def _join(tokens: list[str]) -> str:
    text = ""
    for tok in tokens:
        text += tok if (tok in _PUNCT and tok != "&") or not text else " " + tok
    return text


def clean_caption(caption: str, filt: DegradationFilter | None = None) -> str:
    """A caption without its degradation words, still a grammatical prompt (see the module docstring)."""
    filt = filt or _DEFAULT
    tokens = _fix_articles(_repair(_drop_degradations(_tokens(caption), filt)))
    text = _join(tokens).strip()
    return text or EMPTY_PROMPT


_DEFAULT = DegradationFilter()
