"""The client's answers as typed values, in the JSON the CLI prints."""

from __future__ import annotations

import numpy as np
import pytest

from he_inference.client import Classification, Prediction, prediction, softmax

PROB_TOL = 1e-12


def test_a_prediction_names_the_most_probable_class_and_sums_to_one() -> None:
    got = prediction(np.array([0.1, 2.0, -1.0]), ["normal", "cyst", "tumour"])

    assert got.label == "cyst"
    assert sum(got.probabilities.values()) == pytest.approx(1.0, abs=PROB_TOL)
    assert got.to_dict() == {"prediction": "cyst", "probabilities": got.probabilities, "logits": got.logits}
    assert list(got.logits) == ["normal", "cyst", "tumour"]


def test_unnamed_classes_are_called_by_their_index() -> None:
    assert prediction(np.array([3.0, 1.0]), []).label == "0"


def test_softmax_is_stable_for_large_logits() -> None:
    np.testing.assert_allclose(softmax(np.array([1000.0, 1000.0])), [0.5, 0.5], atol=PROB_TOL)


def test_a_classification_puts_the_image_first_then_the_answer_sizes_and_timings() -> None:
    answer = prediction(np.array([0.0, 1.0]), ["a", "b"])

    row = Classification(answer, 0.5, 0.7, 10, 20, image="x.dcm").to_dict()

    assert list(row) == ["image", "prediction", "probabilities", "logits", "server_s", "round_trip_s",
                         "upload_bytes", "download_bytes"]
    assert "image" not in Classification(answer, 0.5, 0.7, 10, 20).to_dict()


def test_a_prediction_of_an_unknown_class_is_refused_by_field() -> None:
    with pytest.raises(ValueError, match="`label` 'c' must be one of the classes"):
        Prediction("c", {"a": 1.0}, {"a": 0.0})
