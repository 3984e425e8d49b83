"""Local-feature matching (HotSpotter-style): SIFT keypoints on the animal, matched pair by
pair and verified geometrically, as a second opinion beside the deep embedding.

    features     one crop -> keypoints + RootSIFT descriptors (OpenCV)
    store        the feature store beside a dataset's records (the one reader/writer)
    build        fills a store: parallel, resumable (`python -m leopard_jax.local`)
    matching     mutual nearest neighbours + ratio test (jitted, batched) and RANSAC
    calibration  scores -> P(same individual), fusion, ECE, the calibrator JSON
    rerank       a query's deep top-k re-scored by local matches (`match --rerank local`)
    pairs        one pair on the review page: P(same) and its correspondences, drawn

Build a dataset's store once: `python -m leopard_jax.local --data DATASET_DIR`.
"""
