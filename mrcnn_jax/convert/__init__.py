"""Weight converters: torchvision and Detectron2 checkpoints -> mrcnn_jax variables ({"params", "batch_stats"})."""
