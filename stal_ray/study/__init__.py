"""The paper's experiments (§IV-C ablations, §IV-D parameter analysis, §IV-E occlusion) as one study."""
