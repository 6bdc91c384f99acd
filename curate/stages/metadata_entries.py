"""Metadata entries for concept balancing (MetaCLIP), and the matcher that finds them in captions.

Entries come from a text file (one per line), from WordNet's noun lemmas (Debian's ``wordnet-base`` installs
``/usr/share/wordnet/index.noun``; nothing is downloaded at run time), or both, less single characters and
English function words. Matching is MetaCLIP's substring
matching with an Aho-Corasick automaton (pyahocorasick) over the lowercased caption, kept to whole words: an entry
must start and end at a word boundary (an English plural ending allowed), so ``cat`` is found in ``two cats`` but
not in ``category``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from curate.errors import CurateError

WORDNET_NOUNS = "index.noun"
MAX_ENTRY_CHARS = 200
# WordNet lists these as nouns too (the letter a, indium, the Roman 1): as entries they would match nearly every
# caption, so single characters and English function words are never entries
FUNCTION_WORDS = frozenset(
    "a an the in on at of for to from by with and or but not no is are was were be been it its this that these "
    "those he she they we you i me my our your his her their as up down out over under into onto off about per "
    "vs via de la le el".split())


def read_entries(file: str | None, wordnet: str | None, more: Iterable[str] = ()) -> list[str]:
    """The distinct entries, lowercased and sorted, from ``file``, the WordNet folder ``wordnet`` and ``more``
    (the pool's n-grams)."""
    entries: set[str] = {_normal(entry) for entry in more}
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise CurateError(f"balance.entries: {path} does not exist")
        with open(path, encoding="utf-8", errors="replace") as handle:
            entries.update(_normal(line) for line in handle)
    if wordnet:
        entries.update(wordnet_nouns(wordnet))
    entries = {e for e in entries if len(e) > 1 and e not in FUNCTION_WORDS}
    if not entries:
        raise CurateError("balance: no metadata entries (give entries: a file, wordnet: a folder, pool_ngrams: "
                          "the pool's n-grams with a lower min_rows, or several)")
    return sorted(entries)


def wordnet_nouns(folder: str) -> set[str]:
    """Every noun lemma of WordNet's ``index.noun`` (its license header lines start with spaces; underscores join
    the words of a compound: ``ice_cream`` is the entry ``ice cream``)."""
    path = Path(folder).expanduser() / WORDNET_NOUNS
    if not path.is_file():
        raise CurateError(f"balance.wordnet: {path} does not exist (Debian: apt-get install wordnet-base, then "
                          "wordnet: /usr/share/wordnet)")
    lemmas = set()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith(" ") or not line.strip():
                continue
            lemmas.add(_normal(line.split(" ", 1)[0].replace("_", " ")))
    return lemmas


def _normal(text: str) -> str:
    entry = " ".join(text.strip().lower().split())
    return entry if len(entry) <= MAX_ENTRY_CHARS else ""


def build_matcher(entries: list[str]):
    """An Aho-Corasick automaton whose values are (entry index, entry length); picklable, so one copy travels to
    every task."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for index, entry in enumerate(entries):
        automaton.add_word(entry, (index, len(entry)))
    automaton.make_automaton()
    return automaton


def matched_entries(automaton, caption: str | None) -> list[int]:
    """Indexes of the entries found in ``caption`` as whole words, each once, in order of first appearance."""
    if not caption:
        return []
    text = " ".join(caption.lower().split())  # entries are stored with single spaces
    found: dict[int, None] = {}
    for end, (index, length) in automaton.iter(text):
        start = end - length + 1
        if (start == 0 or not text[start - 1].isalnum()) and _word_ends(text, end + 1):
            found.setdefault(index, None)
    return list(found)


def _word_ends(text: str, at: int) -> bool:
    """Whether a word ends at ``at``, allowing an English plural: the entry ``cat`` is in ``two cats``."""
    for suffix in ("", "s", "es"):
        after = at + len(suffix)
        if text.startswith(suffix, at) and (after == len(text) or not text[after].isalnum()):
            return True
    return False
