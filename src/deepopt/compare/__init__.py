"""Which optimizer is best (compare/dvc.yaml): every optimizer at its Keras defaults and
tuned with the same budget, over the same seeds; the studies (``studies``), the seeds
(``seeds``) and the report (``report``, ``profile``)."""
