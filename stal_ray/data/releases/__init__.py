"""Release readers: MARS, iLIDS-VID and PRID-2011 as shipped, into the Release and Tracklet of base.py."""
