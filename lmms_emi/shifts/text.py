"""Text shifts of the question, with ``nlpaug``: keyboard typos and synonym replacement, the paper's two.

* ``KeyboardAug_<L>``: ``nlpaug.augmenter.char.KeyboardAug(aug_word_max=L)`` with nlpaug's defaults
  otherwise (30 % of a word's characters, of at most L words of 4+ characters, become a neighbouring
  QWERTY key; digits, capitals and special characters included). ``KeyboardAug_1`` / ``_3`` match the
  look of the paper's splits (one, then up to three typo'd words per question).
* ``sr_<L>``: synonym replacement, ``nlpaug.augmenter.word.SynonymAug(aug_p=L/10, aug_max=None)`` over
  WordNet 3.0 (:mod:`lmms_emi.shifts.wordnet`, offline), as EDA (Wei & Zou 2019) does it and as the paper's
  ``sr_4`` / ``sr_7`` splits look: the question is lower-cased and reduced to letters and spaces first, a
  share L/10 of its non-stop-words gets a synonym from any part of speech (no POS tagger), and
  the result is reduced to letters and spaces again (a multi-word synonym stays; "2" becomes nothing).

nlpaug draws from Python's ``random`` and NumPy's global generator; :meth:`TextShift.apply` seeds both with
the row's seed for the call and restores them afterwards.

**Extension point (language shifts).** Translations need a model (the natural benchmark's language
splits were machine-translated); none ships here. Register an augmenter under a new name with
:func:`register_text_augmenter`: a factory ``level -> TextAugmenter`` (anything with ``augment(text) -> str``
and ``params() -> dict``); ``--text <name>_<level>`` then uses it and the manifest records its params.
docs/SHIFTS.md has an example.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lmms_emi.errors import UsageError

__all__ = [
    "STOPWORDS",
    "TEXT_AUGMENTERS",
    "KeyboardTypos",
    "SynonymReplacement",
    "TextAugmenter",
    "TextShift",
    "parse_text_shift",
    "register_text_augmenter",
]

LEVELS = range(1, 11)

#: function words synonym replacement leaves alone (determiners, pronouns, auxiliaries, prepositions,
#: conjunctions, question words): WordNet would otherwise turn "is" into "embody" and "in" into "inch"
STOPWORDS: tuple[str, ...] = tuple(
    """a an the this that these those there here it its it's i me my we our you your he him his she her
    they them their what which who whom whose when where why how is are was were be been being am do does
    did doing have has had having can could will would shall should may might must of in on at to from by
    for with about as into onto over under between through during before after above below up down out off
    and or but nor so if then than not no yes very too also just only any some all each every both either
    neither other such own same few more most much many""".split()
)


class TextAugmenter(Protocol):
    """What a text shift runs: deterministic given Python's and NumPy's global generators."""

    def augment(self, text: str) -> str: ...

    def params(self) -> dict[str, Any]: ...


def _first(result: Any, original: str) -> str:
    """nlpaug returns a list of outputs (empty when it declined, e.g. an empty input)."""
    if isinstance(result, list):
        return str(result[0]) if result else original
    return str(result)


class KeyboardTypos:
    """``KeyboardAug_<level>``: nlpaug's KeyboardAug with ``aug_word_max=level``."""

    def __init__(self, level: int) -> None:
        import nlpaug.augmenter.char as nac

        self.level = level
        self._aug = nac.KeyboardAug(aug_word_max=level)

    def augment(self, text: str) -> str:
        return _first(self._aug.augment(text), text)

    def params(self) -> dict[str, Any]:
        a = self._aug
        return {
            "package": "nlpaug",
            "augmenter": "nlpaug.augmenter.char.KeyboardAug",
            "aug_word_max": a.aug_word_max,
            "aug_word_p": a.aug_word_p,
            "aug_char_p": a.aug_char_p,
            "aug_char_max": a.aug_char_max,
            "min_char": a.min_char,
        }


_LETTERS = re.compile(r"[^a-z ]+")


def letters_only(text: str) -> str:
    """EDA's cleaning: lower-case, every character but a-z and space dropped, spaces collapsed.

    >>> letters_only("What's in the image? 2 cats")
    'whats in the image cats'
    """
    return " ".join(_LETTERS.sub("", text.lower().replace("-", " ").replace("_", " ")).split())


class SynonymReplacement:
    """``sr_<level>``: nlpaug's SynonymAug (``aug_p=level/10``) over offline WordNet 3.0, EDA-style."""

    def __init__(self, level: int) -> None:
        import nlpaug.augmenter.word as naw

        from lmms_emi.shifts.wordnet import WordNetSynonyms

        words = WordNetSynonyms()

        class _OfflineSynonymAug(naw.SynonymAug):
            @classmethod
            def get_model(cls, aug_src: str, lang: str, dict_path: Any, force_reload: bool) -> Any:
                return words  # nlpaug's own WordNet model would download NLTK data and run a POS tagger

        self.level = level
        self._aug = _OfflineSynonymAug(aug_p=level / 10, aug_max=None, stopwords=list(STOPWORDS))

    def augment(self, text: str) -> str:
        clean = letters_only(text)
        if not clean:
            return clean
        return letters_only(_first(self._aug.augment(clean), clean))

    def params(self) -> dict[str, Any]:
        from lmms_emi.shifts.wordnet import wordnet_source

        return {
            "package": "nlpaug",
            "augmenter": "nlpaug.augmenter.word.SynonymAug",
            "aug_p": self._aug.aug_p,
            "aug_min": self._aug.aug_min,
            "aug_max": self._aug.aug_max,
            "stopwords": len(STOPWORDS),
            "pos_tagger": None,
            "normalise": "lower-case, letters and spaces only (EDA), before and after",
            "synonyms": wordnet_source(),
        }


#: text shift name -> factory(level); register_text_augmenter adds more (e.g. a translation model)
TEXT_AUGMENTERS: dict[str, Callable[[int], TextAugmenter]] = {
    "KeyboardAug": KeyboardTypos,
    "sr": SynonymReplacement,
}


def register_text_augmenter(name: str, factory: Callable[[int], TextAugmenter]) -> None:
    """Make ``--text <name>_<level>`` build its augmenter with ``factory(level)`` (the language-shift
    extension point: see the module docstring)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", name):
        raise ValueError(f"text augmenter name {name!r}: letters and digits only, starting with a letter")
    TEXT_AUGMENTERS[name] = factory


_BUILT: dict[tuple[str, int], TextAugmenter] = {}
_BUILT_LOCK = threading.Lock()
_APPLY_LOCK = threading.Lock()  # seed -> augment -> restore of the global generators is one step


@dataclass(frozen=True)
class TextShift:
    """One text augmentation at one level (1-10)."""

    augmenter: str
    level: int

    def __post_init__(self) -> None:
        if self.augmenter not in TEXT_AUGMENTERS:
            raise UsageError(
                f"--text {self.augmenter}_{self.level}: unknown text shift {self.augmenter!r}; "
                f"known: {', '.join(TEXT_AUGMENTERS)}"
            )
        if self.level not in LEVELS:
            raise UsageError(f"--text {self.augmenter}_{self.level}: level {self.level} is out of range 1-10")

    @property
    def name(self) -> str:
        """``<augmenter>_<level>``, as in the paper's split names (``KeyboardAug_3``, ``sr_7``)."""
        return f"{self.augmenter}_{self.level}"

    def augmenter_object(self) -> TextAugmenter:
        key = (self.augmenter, self.level)
        with _BUILT_LOCK:
            if key not in _BUILT:
                _BUILT[key] = TEXT_AUGMENTERS[self.augmenter](self.level)
            return _BUILT[key]

    def params(self) -> dict[str, Any]:
        return self.augmenter_object().params()

    def apply(self, text: str, seed: int) -> str:
        """The shifted ``text``, with Python's and NumPy's global generators seeded by ``seed`` for the call
        (the caller's states are restored)."""
        with _APPLY_LOCK:
            py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 (nlpaug reads it)
            try:
                augmenter = self.augmenter_object()  # building one may draw random numbers too
                random.seed(seed)
                np.random.seed(seed % 2**32)  # noqa: NPY002
                return augmenter.augment(text)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)  # noqa: NPY002


def parse_text_shift(spec: str) -> TextShift:
    """``"KeyboardAug_3"`` -> ``TextShift("KeyboardAug", 3)``; UsageError naming the option when malformed.

    >>> parse_text_shift("sr_7")
    TextShift(augmenter='sr', level=7)
    """
    name, _, level = spec.strip().rpartition("_")
    if not name or not level.lstrip("-").isdigit():
        raise UsageError(
            f"--text {spec}: expected <augmenter>_<level>, e.g. KeyboardAug_3 or sr_7 "
            f"(augmenters: {', '.join(TEXT_AUGMENTERS)})"
        )
    return TextShift(name, int(level))
