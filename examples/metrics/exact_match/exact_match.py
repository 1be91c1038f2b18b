"""Exact-match metric, as a local `evaluate` module (no Hugging Face Hub access needed).

Load it with ``evaluate.load("/path/to/examples/metrics/exact_match")``.
"""

import string

import datasets
import evaluate

_DESCRIPTION = """\
Exact match is the fraction of predicted strings that are identical to their
reference string, after optional normalisation (stripping surrounding
whitespace, lower-casing, removing punctuation). It lies in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Predicted texts.
    references (`list` of `str`): Reference texts, same length as `predictions`.
    ignore_case (`bool`, default `False`): Lower-case both sides before comparing.
    ignore_punctuation (`bool`, default `False`): Remove ASCII punctuation
        (`string.punctuation`) from both sides before comparing.
    strip (`bool`, default `True`): Strip leading and trailing whitespace from
        both sides before comparing (applied after punctuation removal).

Returns:
    exact_match (`float`): Fraction of predictions equal to their reference, in [0, 1].
        An empty input gives 0.0.

Examples:
    >>> exact_match = evaluate.load("examples/metrics/exact_match")
    >>> exact_match.compute(predictions=["Sports ", "science"], references=["sports", "science"])
    {'exact_match': 0.5}
    >>> exact_match.compute(predictions=["Sports ", "science"], references=["sports", "science"],
    ...                     ignore_case=True)
    {'exact_match': 1.0}
"""

_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
  title = {{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text},
  author = {Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle = {Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing},
  year = {2016},
  pages = {2383--2392},
}
"""

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Value("string", id="sequence"),
                }
            ),
        )

    @staticmethod
    def _normalize(text, ignore_case, ignore_punctuation, strip):
        text = "" if text is None else str(text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(_PUNCT_TABLE)
        if strip:
            text = text.strip()
        return text

    def _compute(
        self,
        predictions,
        references,
        ignore_case: bool = False,
        ignore_punctuation: bool = False,
        strip: bool = True,
    ):
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references differ in length: {len(predictions)} != {len(references)}"
            )
        if len(predictions) == 0:
            return {"exact_match": 0.0}
        opts = (ignore_case, ignore_punctuation, strip)
        matches = sum(
            self._normalize(p, *opts) == self._normalize(r, *opts)
            for p, r in zip(predictions, references, strict=True)
        )
        return {"exact_match": float(matches / len(predictions))}
