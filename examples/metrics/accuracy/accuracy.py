"""Accuracy metric, as a local `evaluate` module (no Hugging Face Hub access needed).

Load it with ``evaluate.load("/path/to/examples/metrics/accuracy")``.
"""

import datasets
import evaluate

_DESCRIPTION = """\
Accuracy is the proportion of predictions that equal their reference label:
accuracy = (number of correct predictions) / (total number of predictions).
It lies in [0, 1]; 1 means every prediction is correct.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class labels.
    references (`list` of `int`): Ground-truth class labels, same length as `predictions`.

Returns:
    accuracy (`float`): Fraction of predictions equal to their reference, in [0, 1].
        An empty input gives 0.0.

Examples:
    >>> accuracy = evaluate.load("examples/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""

_CITATION = """\
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V.
          and Thirion, B. and Grisel, O. and Blondel, M. and Prettenhofer, P.
          and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int32"),
                    "references": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references differ in length: {len(predictions)} != {len(references)}"
            )
        if len(predictions) == 0:
            return {"accuracy": 0.0}
        correct = sum(int(p) == int(r) for p, r in zip(predictions, references, strict=True))
        return {"accuracy": float(correct / len(predictions))}
