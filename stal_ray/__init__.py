"""stal_ray: STAL video person re-identification (Chen et al., IEEE TIP) trained on Ray with DeepSpeed."""
