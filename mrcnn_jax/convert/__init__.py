"""Weight converters: torchvision and Detectron2 checkpoints -> mrcnn_jax variables ({"params", "batch_stats"}).

The class layout of the weights is read from the weights themselves; no config field describes it. Inside mrcnn_jax
every class axis has K + 1 entries with the background at index 0: cls_score (D, K+1), bbox_pred (D, 4(K+1)) with
class-specific deltas (the background's are never read), the mask predictor's K + 1 channels. Each framework's own:
  Detectron2   the background logit last; deltas and mask channels for the K foreground classes only, so the
               converter moves the background row first and fills the background slots with zeros
               (`detectron2.convert_state_dict`); a class-agnostic box regressor (CLS_AGNOSTIC_BBOX_REG: 4 deltas
               in all) has no counterpart in the model and is refused;
  torchvision  the background first and deltas for all K + 1 classes: the arrays are copied as they are
               (`torchvision.convert_state_dict`).
"""
