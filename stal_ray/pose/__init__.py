"""Estimated pose for real data: the 14 joints of every frame of a prepared data set, from a pretrained
person-pose model (models.py), mapped to the paper's joints (joints.py), added to the data set in place
(annotate.py; `python jobs/estimate_pose.py`)."""
