"""The MARS protocol on the real index tables: query, identity and gallery counts and skipped queries of
both protocols, through query_gallery_split and evaluate_ranking."""

import numpy as np
import pytest

from stal_ray.data.releases.base import DISTRACTOR, JUNK
from stal_ray.data.releases.mars import read_mars
from stal_ray.evaluate.ranking import evaluate_ranking, query_gallery_split


@pytest.fixture(scope="module")
def test_split(real_scale_mars_index):
    """identities, cameras and is_query of the 12,180 test tracklets, in track-table order."""
    release = read_mars(str(real_scale_mars_index), check_images=False)
    identities = np.array([t.identity for t in release.test])
    cameras = np.array([t.camera for t in release.test])
    is_query = np.array([t.is_query for t in release.test])
    return identities, cameras, is_query


def test_queries_and_identities(test_split):
    identities, _, is_query = test_split
    assert len(identities) == 12180 and is_query.sum() == 1980
    assert len(np.unique(identities[is_query])) == 626
    # 634 persons: the 636 distinct labels of the test table less junk (-1) and distractors (0)
    persons = set(identities.tolist()) - {JUNK, DISTRACTOR}
    assert len(set(identities.tolist())) == 636 and len(persons) == 634
    assert (identities == JUNK).sum() == 870 and (identities == DISTRACTOR).sum() == 3248


@pytest.mark.parametrize("protocol, gallery_size, skipped",
                         [("official", 11310, 0), ("torchreid", 9330, 140)])
def test_gallery_and_skipped_queries(test_split, protocol, gallery_size, skipped):
    identities, cameras, is_query = test_split
    queries, gallery = query_gallery_split(identities, cameras, is_query, protocol)
    assert len(queries) == 1980 and len(gallery) == gallery_size
    assert DISTRACTOR in identities[gallery] and JUNK not in identities[gallery]
    # whether a query keeps a true match does not depend on the distances
    dist = np.random.default_rng(0).random((len(queries), len(gallery)), dtype=np.float32)
    result = evaluate_ranking(dist, identities[queries], identities[gallery], cameras[queries],
                              cameras[gallery])
    assert result.skipped_queries == skipped and result.num_query == 1980 - skipped
