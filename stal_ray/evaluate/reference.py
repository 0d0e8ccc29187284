"""The plain reference implementations that the fast ranking (evaluate/ranking.py) is checked against, by
tests/test_ranking.py and bench/ranking.py: torchreid's per-query loop (step AP, with fast-reid's INP) and a
statement-by-statement transcription of the official MARS evaluation code (trapezoid AP). Slow on purpose:
written as the originals are, so that they can be compared with them line by line; never used to evaluate."""

import numpy as np


def reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """torchreid's eval_func (metrics/rank.py, eval_market1501) as it is written, a plain loop over queries,
    with a stable sort so that ties keep gallery order, and the INP that fast-reid's copy of it adds. Returns
    (cmc_curve, per-query AP, skipped queries, per-query INP)."""
    num_q, num_g = distmat.shape
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp, skipped = [], [], [], 0
    for q_idx in range(num_q):
        q_pid, q_camid = q_pids[q_idx], q_camids[q_idx]
        order = indices[q_idx]
        remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
        keep = np.invert(remove)
        raw_cmc = matches[q_idx][keep]
        if not np.any(raw_cmc):
            skipped += 1
            continue
        cmc = raw_cmc.cumsum()
        max_pos_idx = np.max(np.where(raw_cmc == 1))  # fast-reid: the hardest true match
        all_inp.append(cmc[max_pos_idx] / (max_pos_idx + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = [x / (i + 1.0) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * raw_cmc
        all_ap.append(tmp_cmc.sum() / num_rel)
    return np.asarray(all_cmc, dtype=np.float64).mean(0), np.asarray(all_ap), skipped, np.asarray(all_inp)


def official_compute_ap(good_image, junk_image, index):
    """utils/compute_AP.m of the official MARS evaluation code (github.com/liangzheng06/MARS-evaluation),
    transcribed statement by statement into Python with 0-based positions. index: the gallery in ranking
    order. Returns (ap, cmc), cmc over the ranking positions."""
    cmc = np.zeros(len(index))
    ngood = len(good_image)
    good_image, junk_image = set(good_image.tolist()), set(junk_image.tolist())
    old_recall, old_precision, ap = 0.0, 1.0, 0.0
    intersect_size, j, good_now, njunk = 0, 0, 0, 0
    for n, image in enumerate(index):
        flag = 0
        if image in good_image:
            cmc[n - njunk:] = 1
            flag = 1  # good image
            good_now += 1
        if image in junk_image:
            njunk += 1
            continue  # junk image
        if flag == 1:
            intersect_size += 1
        recall = intersect_size / ngood if ngood else float("nan")  # MATLAB's 0/0
        precision = intersect_size / (j + 1)
        ap += (recall - old_recall) * ((old_precision + precision) / 2)
        old_recall, old_precision = recall, precision
        j += 1
        if good_now == ngood:
            return ap, cmc
    return ap, cmc


def official_evaluation(dist, label_gallery, label_query, cam_gallery, cam_query, max_rank=50):
    """utils/evaluation_mars.m's loop over queries (without its per-camera-pair tables): the gallery is
    every test tracklet, junk (-1) and the query's own-camera entries of its identity marked junk; MATLAB's
    sort is stable. dist: (queries, gallery), the transpose of the MATLAB code's. Returns (per-query AP,
    CMC curve to max_rank)."""
    junk0 = np.flatnonzero(label_gallery == -1)
    ap, cmc = np.zeros(len(dist)), np.zeros((len(dist), max_rank))
    for k, score in enumerate(dist):
        pos = np.flatnonzero(label_gallery == label_query[k])
        good_image = pos[cam_gallery[pos] != cam_query[k]]
        junk_image = np.concatenate([junk0, pos[cam_gallery[pos] == cam_query[k]]])
        index = np.argsort(score, kind="stable")
        ap[k], query_cmc = official_compute_ap(good_image, junk_image, index)
        cmc[k] = query_cmc[:max_rank]
    return ap, cmc.mean(0)
