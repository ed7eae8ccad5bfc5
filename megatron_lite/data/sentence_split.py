"""Sentence splitting for `--split-sentences` with nltk's Punkt (spec §1.7), without network
access: the installed punkt model for `--lang`, or else a Punkt model trained on the input."""
from __future__ import annotations

import sys
from collections.abc import Iterable

WINDOW_CHARS = 1_000_000  # spec §1.7: text is split in windows of this many characters

INSTALL_HINT = ("install it once with `python -m nltk.downloader punkt_tab` (or `-d DIR punkt_tab` and "
                "NLTK_DATA=DIR); preprocessing never downloads")


def installed_punkt_parameters(lang: str):
    """Punkt parameters of nltk's model for `lang`, or None when it is not installed."""
    try:
        from nltk.tokenize.punkt import PunktTokenizer  # nltk >= 3.9: punkt_tab

        return PunktTokenizer(lang)._params
    except (LookupError, ImportError, OSError, ValueError):
        pass
    try:  # older nltk: the pickled model
        import nltk

        return nltk.data.load(f"tokenizers/punkt/{lang}.pickle")._params
    except Exception:  # old nltk versions raise assorted errors for a missing or refused pickle
        return None


def train_punkt_parameters(texts: Iterable[str], max_chars: int = 5_000_000):
    """Unsupervised Punkt training (Kiss & Strunk 2006) on up to `max_chars` of `texts`."""
    from nltk.tokenize.punkt import PunktTrainer

    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    seen = 0
    for text in texts:
        text = text[:max_chars - seen]
        trainer.train(text, finalize=False)
        seen += len(text)
        if seen >= max_chars:
            break
    trainer.finalize_training()
    return trainer.get_params()


def punkt_parameters(lang: str, sample_texts: Iterable[str], log=None):
    """The installed model, else one trained on `sample_texts` (with a note saying how to install)."""
    params = installed_punkt_parameters(lang)
    if params is not None:
        return params
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"nltk's punkt model for {lang!r} is not installed ({INSTALL_HINT}); training a Punkt model "
        "on the input instead")
    return train_punkt_parameters(sample_texts)


def _language_vars(keep_newlines: bool):
    from nltk.tokenize.punkt import PunktLanguageVars

    if not keep_newlines:
        return PunktLanguageVars()

    class KeepNewlines(PunktLanguageVars):
        # The period context keeps the whitespace after a sentence end (newlines included)
        # attached to that sentence, instead of dropping it (spec §1.7 --keep-newlines).
        _period_context_fmt = r"""
            \S*                          # some word material
            %(SentEndChars)s             # a potential sentence ending
            \s*                          # trailing whitespace stays with the sentence
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next word
            ))"""

    return KeepNewlines()


class SentenceSplitter:
    def __init__(self, params, keep_newlines: bool = False):
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        self._tok = PunktSentenceTokenizer(params, lang_vars=_language_vars(keep_newlines))

    def split(self, text: str) -> list[str]:
        out = []
        for start in range(0, len(text), WINDOW_CHARS):
            out.extend(self._tok.tokenize(text[start:start + WINDOW_CHARS]))
        return out
