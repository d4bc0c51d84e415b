"""The estimator contract (scikit-learn compatible), checked on every direction-finding estimator.

Each estimator is fitted on a tiny planted data set; the checks are those of the contract in
``unveil.directions._base``: parameters, clone, fitted state, ``fit`` returning ``self``, shapes,
determinism for a given ``random_state`` and the ``fit(X, y=None, *, head=None)`` signature.
"""
import inspect

import pytest
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils.validation import check_is_fitted

from unveil import EDDP, DirectionPairs, NotFittedError, ValidationError
from unveil.data.synthetic import make_synthetic
from unveil.directions._base import DirectionEstimator
from unveil.directions.baselines import (ICABaseline, KMeansBaseline, NMFBaseline, PatternCAV, PCABaseline,
                                         SparseAutoencoder, SphericalKMeansBaseline)

# (id, factory, supervised): small settings so that every fit takes well under a second
CASES = [
    ("pca", lambda: PCABaseline(3, random_state=0), False),
    ("ica", lambda: ICABaseline(3, random_state=0), False),
    ("nmf", lambda: NMFBaseline(3, random_state=0), False),
    ("kmeans", lambda: KMeansBaseline(3, random_state=0, n_init=2), False),
    ("spherical-kmeans", lambda: SphericalKMeansBaseline(3, random_state=0, n_init=2), False),
    ("sae", lambda: SparseAutoencoder(3, epochs=2, random_state=0), False),
    ("pattern-cav", lambda: PatternCAV(3, random_state=0), True),
    ("eddp", lambda: EDDP(n_concepts=3, random_state=0, steps={"b": 3, "d": 3}, n_init=1, init_rounds=1,
                          batch_patches=64, max_init_patches=200), False),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_per_class=20, random_state=0)
    return d.X, d.concept[:, None, :]  # maps (60, 16, 1, 2) and their patch labels (60, 1, 2)


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    name, make, supervised = request.param
    return name, make, supervised


def _fit(est, X, y, supervised):
    return est.fit(X, y) if supervised else est.fit(X)


def _init_params(est):
    return [p for p in inspect.signature(type(est).__init__).parameters if p != "self"]


# ----------------------------------------------------------------------------------- the base
def test_is_a_scikit_learn_transformer(case, request):
    name, make, _ = case
    est = make()
    assert isinstance(est, DirectionEstimator)
    assert isinstance(est, BaseEstimator) and isinstance(est, TransformerMixin)


def test_fit_signature_is_x_y_then_keyword_only_head(case, request):
    name, make, _ = case
    params = list(inspect.signature(type(make()).fit).parameters.values())[1:]  # without self
    assert [p.name for p in params[:2]] == ["X", "y"]
    assert params[1].default is None and params[1].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for p in params[2:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p
    head = [p for p in params if p.name == "head"]
    assert not head or head[0].default is None


def test_parameter_constraints_cover_every_parameter(case, request):
    name, make, _ = case
    est = make()
    table = type(est)._parameter_constraints
    assert set(table) == set(_init_params(est))


# ------------------------------------------------------------------------------ parameters
def test_get_params_and_set_params(case):
    _, make, _ = case
    est = make()
    assert set(est.get_params(deep=False)) == set(_init_params(est))
    assert est.set_params(n_concepts=2) is est
    assert est.get_params()["n_concepts"] == 2 and est.n_concepts == 2
    with pytest.raises(ValueError, match="no_such_parameter"):
        est.set_params(no_such_parameter=1)


def test_clone_round_trip(case, data):
    _, make, supervised = case
    X, y = data
    est = _fit(make(), X, y, supervised)
    twin = clone(est)
    assert type(twin) is type(est) and twin is not est
    assert twin.get_params(deep=False).keys() == est.get_params(deep=False).keys()
    for k, v in est.get_params(deep=False).items():
        assert twin.get_params(deep=False)[k] == v, k
    assert not hasattr(twin, "pairs_")  # a clone is unfitted
    with pytest.raises(NotFittedError):
        twin.transform(X)


def test_fit_leaves_parameters_unchanged(case, data):
    _, make, supervised = case
    X, y = data
    est = make()
    before = {k: repr(v) for k, v in est.get_params(deep=False).items()}
    _fit(est, X, y, supervised)
    assert {k: repr(v) for k, v in est.get_params(deep=False).items()} == before


def test_invalid_parameter_is_refused_at_fit_in_one_line(case, data):
    _, make, supervised = case
    X, y = data
    est = make().set_params(n_concepts=0)  # __init__/set_params only store
    with pytest.raises(ValidationError, match=r"n_concepts must be an integer >= 1") as info:
        _fit(est, X, y, supervised)
    assert "\n" not in str(info.value)
    assert not hasattr(est, "pairs_")


# ------------------------------------------------------------------------------ fitted state
def test_not_fitted_error_before_fit(case, data):
    _, make, _ = case
    X, _ = data
    est = make()
    with pytest.raises(NotFittedError, match="not fitted yet") as info:
        est.transform(X)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AttributeError)
    with pytest.raises(ValueError):  # what scikit-learn-style code catches
        est.transform(X)
    assert not hasattr(est, "pairs_")


def test_check_is_fitted_works(case, data, request):
    name, make, supervised = case
    X, y = data
    est = make()
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(est)
    check_is_fitted(_fit(est, X, y, supervised))


def test_reading_pairs_before_fit_raises_not_fitted_error(case, request):
    name, make, _ = case
    with pytest.raises(NotFittedError, match="not fitted yet"):
        make().pairs_


def test_fit_returns_self_and_is_fitted(case, data):
    _, make, supervised = case
    X, y = data
    est = make()
    assert _fit(est, X, y, supervised) is est
    assert isinstance(est.pairs_, DirectionPairs) and est.pairs_.n_concepts == 3
    assert est.n_features_in_ == X.shape[1]
    learned = [k for k in vars(est) if k.endswith("_") and not k.startswith("_")]
    assert "pairs_" in learned and "n_features_in_" in learned


def test_transform_shape(case, data):
    _, make, supervised = case
    X, y = data
    est = _fit(make(), X, y, supervised)
    N, D, H, W = X.shape
    assert est.transform(X).shape == (N, 3, H, W)
    patches = X.permute(0, 2, 3, 1).reshape(-1, D)
    assert est.transform(patches).shape == (N * H * W, 3)
    torch.testing.assert_close(est.transform(X), est.pairs_.signal_values(X), atol=0, rtol=0)
    assert est.detect(X).shape == (N, 3, H, W)


def test_same_random_state_same_result(case, data):
    _, make, supervised = case
    X, y = data
    a = _fit(make(), X, y, supervised).pairs_
    b = _fit(make(), X, y, supervised).pairs_
    assert a == b  # exact: every tensor, the names and the metadata
    c = _fit(clone(make()), X, y, supervised).pairs_
    assert c == a


def test_fit_with_positional_none(case, data):
    name, make, supervised = case
    X, y = data
    if supervised:  # labels are required: None is refused, labels positional work
        with pytest.raises(ValidationError, match="needs concept labels"):
            make().fit(X, None)
        assert make().fit(X, y).pairs_ == make().fit(X, y=y).pairs_
    else:
        assert make().fit(X, None).pairs_ == make().fit(X).pairs_


def test_fit_transform_matches_fit_then_transform(case, data):
    _, make, supervised = case
    X, y = data
    direct = make().fit_transform(X, y) if supervised else make().fit_transform(X)
    torch.testing.assert_close(direct, _fit(make(), X, y, supervised).transform(X), atol=0, rtol=0)


def test_contract_test_sees_every_baseline():
    """A new baseline must be added to CASES (the contract is checked on every one)."""
    import unveil.directions.baselines as b
    classes = {obj for obj in vars(b).values()
               if isinstance(obj, type) and issubclass(obj, DirectionEstimator) and obj is not DirectionEstimator}
    covered = {type(make()) for _, make, _ in CASES}
    assert len(classes) == 7 and classes <= covered, classes - covered
