"""The synthetic generator: learnable pedestrians written in the real releases' layouts (MARS, iLIDS-VID,
PRID-2011)."""
