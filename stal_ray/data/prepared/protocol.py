"""What a prepared data set is and how its test split is ranked, as its manifest records it (`dataset`).

MARS: the queries are query_IDX's tracklets, the gallery follows eval.protocol (official or torchreid).
iLIDS-VID and PRID-2011 (Wang et al. ECCV'14, the paper's §IV-A): the camera-1 (A) sequence of each test
person is a query and the camera-2 (B) sequences are the gallery, so one true match per query; that is the
gallery of eval.protocol=torchreid (the non-query tracklets), with the step AP. Under `official` the other
persons' camera-1 sequences would join the gallery, which is not these data sets' protocol.

A model records the description of the data it was trained on (model.pt, extra["data"]); an evaluation on
another data set is a cross-dataset test (the paper's Table VI), said so in metrics.json.
"""

from stal_ray.data.releases.registry import MARS_PROTOCOL as MARS
from stal_ray.data.releases.registry import REGISTRY, TWO_CAMERA

PROTOCOL_OF = {name: spec.protocol for name, spec in REGISTRY.items()}
NAMES = {name: spec.title for name, spec in REGISTRY.items()}
_QUERY_GALLERY = {
    MARS: ("the query_IDX tracklets", "the test tracklets, as eval.protocol says"),
    TWO_CAMERA: ("the camera-1 (iLIDS-VID cam1, PRID-2011 cam_a) sequence of each test person",
                 "the camera-2 (cam2, cam_b) sequence of each test person"),
}
_EVAL_PROTOCOL = {TWO_CAMERA: "torchreid"}  # the eval.protocol whose gallery is the data set's


def describe(dataset: str = "mars", split: int | None = None, pollution: dict | None = None) -> dict:
    """The manifest's `dataset` entry: name, split, protocol, query and gallery in words, pollution (the
    black boxes drawn into every frame, stal_ray.data.prepared.pollution; None for the release's own
    frames)."""
    if dataset not in PROTOCOL_OF:
        raise ValueError(f"dataset must be one of {', '.join(PROTOCOL_OF)}, got {dataset!r}")
    protocol = PROTOCOL_OF[dataset]
    query, gallery = _QUERY_GALLERY[protocol]
    return {"name": dataset, "split": split, "protocol": protocol, "query": query, "gallery": gallery,
            "pollution": pollution}


def of_manifest(entry: dict | None) -> dict:
    """The description a manifest holds; a manifest written before descriptions existed is MARS's."""
    return dict(entry) if entry else describe("mars")


def eval_protocol(described: dict, asked: str | None, configured: str) -> str:
    """The eval.protocol to rank this data set's test split under: `asked` (--protocol) or `configured`
    (eval.protocol) for MARS; for iLIDS-VID and PRID-2011 always their own (torchreid's gallery), a
    ValueError when --protocol asked for another one."""
    required = _EVAL_PROTOCOL.get(described.get("protocol", MARS))
    if required is None:
        return asked or configured
    if asked is not None and asked != required:
        name = NAMES.get(described.get("name"), described.get("name"))
        raise ValueError(f"--protocol {asked} does not fit {name}: its queries are camera 1 and its gallery "
                         f"camera 2 alone, which is protocol {required}; drop --protocol")
    if configured != required:
        print(f"{NAMES.get(described.get('name'))}: ranking under protocol {required} (queries camera 1, "
              f"gallery camera 2), not eval.protocol={configured}")
    return required


def cross_dataset(trained_on: dict | None, evaluated: dict) -> dict:
    """metrics.json's `dataset` entry: the evaluated data set's description, what the model was trained on
    (None when model.pt does not say), whether that is another data set, and a note saying so when it is."""
    name = evaluated.get("name")
    trained_name = (trained_on or {}).get("name")
    cross = trained_name is not None and trained_name != name
    entry = {**evaluated, "trained_on": trained_on, "cross_dataset": cross}
    if cross:
        entry["note"] = (f"cross-dataset test: the model was trained on "
                         f"{NAMES.get(trained_name, trained_name)} and is evaluated on the test split of "
                         f"{NAMES.get(name, name)}; only its embeddings rank the gallery, its identity "
                         "classifiers (of the training persons) are not used")
    elif trained_on is not None and trained_on.get("split") != evaluated.get("split"):
        entry["note"] = (f"trained on split {trained_on.get('split')}, evaluated on split "
                         f"{evaluated.get('split')} of the same data set: test persons of this split may "
                         "have been trained on")
    return entry
