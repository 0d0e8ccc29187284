"""model.pt: a trained STAL as a plain state dict plus its config, for evaluation and inference outside
DeepSpeed; saved through fsspec (local path, file://, s3://), loaded with torch.load(weights_only=True)."""

import io
from typing import Any

import torch

from stal_ray.config import Config, config_from_dict
from stal_ray.core import storage
from stal_ray.core.preprocess import Preprocess
from stal_ray.model.stal import STAL

FORMAT, VERSION = "stal_ray.model", 1


def save_model(path_or_url: str, model: STAL, config: Config, *, num_classes: int,
               labels: list[int] | None = None, extra: dict | None = None) -> None:
    """Write the model file; atomic on local disk (a reader never sees half a file)."""
    payload = {
        "format": FORMAT, "version": VERSION, "config": config.to_dict(), "num_classes": int(num_classes),
        "labels": [int(label) for label in labels or []], "extra": dict(extra or {}),
        "preprocess": model.preprocess.to_dict(),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
    }
    # streamed into a temporary file beside it on local disk (0o600, as tempfile made it before), one PUT
    # of an in-memory copy elsewhere
    with storage.open_atomic(path_or_url, mode=0o600) as out:
        torch.save(payload, out)


def _read_payload(path_or_url: str, map_location: str | torch.device = "cpu") -> dict:
    fs, path = storage.filesystem(path_or_url, check=False)
    with storage.errors(path_or_url):
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"model file not found: {path_or_url}") from None
    try:
        payload: Any = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors all mean "not our file"
        raise ValueError(f"{path_or_url} is not a stal_ray model file (torch.load failed: {error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path_or_url} is not a stal_ray model file (format {FORMAT!r} expected; found "
                         f"{found}); pass the model.pt that jobs/train_mars.py writes into its run folder")
    return payload


def _config_and_meta(payload: dict) -> tuple[Config, dict]:
    config = config_from_dict(payload["config"])
    config.model.pretrained = None  # every weight is in the file
    if "stan_fc" not in payload["config"].get("model", {}):
        config.model.stan_fc = "clip"  # files written before model.stan_fc existed have the clip-wide FC
    return config, {key: payload[key] for key in ("num_classes", "labels", "extra", "version")}


def load_model(path_or_url: str, *, map_location: str | torch.device = "cpu") -> tuple[STAL, Config, dict]:
    """(model in eval mode, its config, meta: num_classes, labels, extra). The ImageNet weights named by
    model.pretrained are not loaded again: the file holds every trained weight."""
    payload = _read_payload(path_or_url, map_location)
    config, meta = _config_and_meta(payload)
    model = STAL.from_config(config, payload["num_classes"])
    model.load_state_dict(payload["state_dict"], strict=True)
    if "preprocess" in payload:  # files written before it was saved get the backbone's (the same then)
        model.preprocess = Preprocess.from_dict(payload["preprocess"])
    return model.eval(), config, meta


def load_model_config(path_or_url: str) -> tuple[Config, dict]:
    """(config, meta) of a model file without building the model, e.g. for a driver that only plans work."""
    return _config_and_meta(_read_payload(path_or_url))
