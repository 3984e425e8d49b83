"""Default preprocessing settings (the paper's pipeline where it says; see WORKSPACE.md).

`configs/preprocess.py` re-exports `get_config` as the editable starting point;
`python -m leopard_jax.preprocess --config configs/preprocess.py --config.edges.canny_low=40`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # folder of <identity>/<photo>, an unlabelled folder, a CSV path,identity[,flank] (or the
    # wildlife-datasets table with bbox, viewpoint), or a COCO .json (one item per annotation)
    c.input = ""
    c.images = ""  # folder a COCO file's (or CSV's) relative paths start from; see coco.py
    c.output = ""  # dataset dir (leopard_jax/data/records.py)
    c.labels = "auto"  # folders | none | auto (identity folders when no photo at the top level)
    c.identity_field = "name"  # the COCO annotation field naming the individual
    c.split_field = "split"  # the COCO annotation/image field holding the dataset's own split
    c.boxes = "annotations"  # annotations (crop annotated boxes) | detector (its best match)
    c.min_image_side = 32  # smaller photos and annotated boxes are rejected

    c.detector = ml_collections.ConfigDict()
    c.detector.model = ""  # an ONNX file, or "none" for photos already cropped; required
    # unless every item comes with its annotated box
    c.detector.format = "auto"  # auto | yolov5 (MegaDetector v5) | ultralytics | yolox
    c.detector.input_size = 0  # 0: from the model; needed for dynamic-shape exports (MDv5: 1280)
    c.detector.threshold = 0.2  # confidence; MegaDetector's own suggestion for v5
    c.detector.iou = 0.45  # NMS IoU threshold (class-agnostic)
    c.detector.classes = "animal"  # animal | all | ids "0" / "14-23"
    c.detector.max_detections = 10  # animals kept per photo, best first
    c.detector.padding = 0.05  # box grows by this fraction of its size on each side
    c.detector.min_box_side = 32  # smaller boxes (in source pixels) are dropped

    c.background = ml_collections.ConfigDict()
    c.background.model = "none"  # none | a rembg model name (u2net, u2netp, ...) | a local .onnx
    # rembg class for a local file (dis_custom, ben_custom)
    c.background.custom_session = "u2net_custom"
    c.background.fill = 0  # grey level where the background was removed

    c.rgb_source = "crop"  # crop | removed: which image fills R, G, B (paper's best: crop)
    c.edges = ml_collections.ConfigDict()
    # auto (= removed when background.model is set, else crop) | removed | crop
    c.edges.source = "auto"
    c.edges.equalize = True
    c.edges.blur_ksize = 5
    c.edges.blur_sigma = 0.0  # 0: OpenCV's sigma for the kernel size
    c.edges.canny_low = 55
    c.edges.canny_high = 160
    c.edges.l2_gradient = False

    c.render = ml_collections.ConfigDict()
    c.render.height = 256
    c.render.width = 512
    c.render.mode = "stretch"  # stretch (paper) | letterbox
    c.render.pad_value = 0

    c.jpeg_quality = 90  # crops/ and edges/ previews for people
    c.jpeg_max_side = 1024  # 0: keep the crop's size

    c.workers = 0  # 0: one per CPU core; 1: one worker process; -1: in this process (debugging)
    c.onnx_threads = 0  # intra-op threads per worker; 0: cores / workers
    c.shard_size = 256  # items per committed shard: a killed run loses at most this many
    c.shard = ""  # "I/N": this process does part I of N (every N-th item); "" = all
    return c
